"""Options every backend understands."""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("auto", "nhwc", "blocked8", "blocked16")


@dataclass(frozen=True)
class BackendOptions:
    """``threads``: threads per call (None: ``torch.get_num_threads()`` at call time);
    ``layout``: the dnnl activation layout policy (``"auto"``: measured at compile time)."""

    threads: int | None = None
    layout: str = "auto"


class ThreadPinned:
    """Runs ``program`` with ``threads`` torch/OpenMP threads, restoring the caller's setting after."""

    def __init__(self, program, threads: int):
        self.program, self.threads = program, threads

    def __call__(self, inputs: list) -> list:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.program(inputs)
        finally:
            torch.set_num_threads(previous)

    def __getattr__(self, name: str):
        return getattr(self.program, name)
