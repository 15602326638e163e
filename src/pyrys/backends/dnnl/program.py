"""The dnnl program: pre-bound primitive calls run from a flat loop.

Per call: point the input memories at the user's tensors, allocate fresh output tensors
and point their memories at them, run every pre-bound call in order, return the outputs.
Nothing else happens per call: no lookups, no descriptor work, no dispatch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from pyrys.backends.dnnl.memory_plan import Plan
from pyrys.backends.dnnl.primitives import Engine, Stream
from pyrys.backends.dnnl.values import Value


@dataclass(eq=False)
class Step:
    """One entry of the run loop; ``make_call`` turns it into a zero-argument callable."""

    text: str
    reads: list[Value]
    writes: list[Value]
    make_call: Callable[[Stream], Callable[[], None]]


@dataclass(eq=False)
class FreshOutput:
    """An output whose tensor is allocated anew each call (the caller keeps it)."""

    value: Value
    shape: tuple
    strides: tuple
    dtype: torch.dtype


@dataclass(eq=False)
class DnnlProgram:
    engine: Engine
    stream: Stream
    inputs: list[Value]
    fresh: list[FreshOutput]
    results: list  # per output: a Value (its .current is returned) or a constant
    calls: list[Callable[[], None]]
    text: str
    plan: Plan
    weight_bytes: int
    policy: str
    arena: list[torch.Tensor] = field(default_factory=list)
    step_texts: list[str] = field(default_factory=list)

    def __call__(self, inputs: list) -> list:
        self._bind(inputs)
        for call in self.calls:
            call()
        return [r.current if isinstance(r, Value) else r for r in self.results]

    def _bind(self, inputs: list) -> None:
        for value, tensor in zip(self.inputs, inputs):
            value.bind(tensor if tensor.is_contiguous() else tensor.contiguous())
        for out in self.fresh:
            out.value.bind(torch.empty_strided(out.shape, out.strides, dtype=out.dtype))

    def profile(self, inputs: list, runs: int = 20) -> list[tuple[str, float]]:
        """Median microseconds of every step over ``runs`` calls, with the step's program line."""
        samples = [[] for _ in self.calls]
        for _ in range(runs):
            self._bind(inputs)
            for call, times in zip(self.calls, samples):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
        return [(text, sorted(t)[len(t) // 2] * 1e6) for text, t in zip(self.step_texts, samples)]

    @property
    def peak_activation_bytes(self) -> int:
        return self.plan.peak_bytes

    def describe(self) -> str:
        mib = 1 << 20
        return (f"{self.text}\n# layout policy: {self.policy}; {len(self.calls)} calls; "
                f"peak activation memory {self.plan.peak_bytes / mib:.2f} MiB in {len(self.plan.buffer_sizes)} "
                f"buffers; weights {self.weight_bytes / mib:.2f} MiB")
