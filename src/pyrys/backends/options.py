"""Options every backend understands."""
from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("auto", "nhwc", "blocked8", "blocked16")


@dataclass(frozen=True)
class BackendOptions:
    """``threads``: threads per call (None: ``torch.get_num_threads()`` at call time);
    ``layout``: the dnnl activation layout policy (``"auto"``: measured at compile time);
    ``check``: run a new program on the example inputs against the reference backend (the dnnl backend's
    ``self_check.py``; not where the inputs are stand-ins, as at ``pyrys.load``); ``keep_outputs``: the example
    inputs are a call's, which runs the program next (a new shape's): the check's outputs are kept for it."""

    threads: int | None = None
    layout: str = "auto"
    check: bool = False
    keep_outputs: bool = False
