"""What every backend's compile returns: a :class:`Program`, one input signature compiled.

``memory()`` counts bytes under four keys, the same for every backend:

* ``weights``: the model's constants as the optimized graph holds them (frozen parameters,
  folded weights and biases, buffers left unfrozen);
* ``packed_weights``: copies of those constants the backend made in its own layouts
  (0 where it reads the graph's tensors as they are);
* ``activations``: the activation buffers (the planned arena) and scratchpad one call runs
  in (0 where torch allocates each call's tensors and frees them after);
* ``frames``: what the frames kept for reuse hold now, one arena each; it grows to the
  number of callers that ran at the same time.

What a program holds between calls is ``weights + packed_weights + frames``.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

MEMORY_KEYS = ("weights", "packed_weights", "activations", "frames")


def constant_for_caller(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a constant the program keeps, returned as an output: made outside inference mode, as eager
    returns the module's buffer itself (a copy made under ``torch.inference_mode`` could not be written outside
    it; a helper's find)."""
    with torch.inference_mode(False):
        return tensor.clone()


@runtime_checkable
class Program(Protocol):
    """One input signature's compiled model, safe to call from many threads at once."""

    def __call__(self, inputs: list) -> list:
        """The flat list of outputs for the flat list of user inputs (each output the caller's own)."""
        ...

    def describe(self) -> str:
        """The program as text (``opt.program_text()``)."""
        ...

    def profile(self, inputs: list, runs: int = 20) -> list[tuple[str, float]]:
        """``(step text, median microseconds)`` for every step, over ``runs`` calls on ``inputs``."""
        ...

    def memory(self) -> dict[str, int]:
        """Bytes under each of :data:`MEMORY_KEYS` (see the module docstring)."""
        ...
