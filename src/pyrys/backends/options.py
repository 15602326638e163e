"""Options every backend understands."""
from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("auto", "nhwc", "blocked8", "blocked16")


@dataclass(frozen=True)
class BackendOptions:
    """``threads``: threads per call (None: ``torch.get_num_threads()`` at call time);
    ``layout``: the dnnl activation layout policy (``"auto"``: measured at compile time)."""

    threads: int | None = None
    layout: str = "auto"
