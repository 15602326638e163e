"""The dnnl program: an immutable plan of pre-built primitives, run in a frame per call.

Per call: take an idle frame (or make one), point its input memories at the caller's
tensors and its output memories at fresh tensors, run every pre-bound call in order,
return the outputs, put the frame back.  Nothing else happens per call: no lookups, no
descriptor work, no dispatch.  Two threads calling the same program run in two frames,
at the same time, with no lock.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from pyrys.backends.dnnl.frame import Frame
from pyrys.backends.dnnl.layout import is_plain_contiguous
from pyrys.backends.dnnl.memory_plan import Plan
from pyrys.backends.dnnl.primitives import Engine, Memory, MemoryDesc
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH

if TYPE_CHECKING:
    from pyrys.backends.dnnl.values import Value


@dataclass(eq=False)
class Step:
    """One entry of the run loop; ``bind(frame)`` returns it as a zero-argument call on that frame."""

    text: str
    reads: list["Value"]
    writes: list["Value"]
    bind: Callable[[Frame], Callable[[], None]]
    constants: list["Value"] = field(default_factory=list)  # read-only operands (weights), not planned
    # the kernel differs from eager on a value that is not finite (max-pooling, clip and hardsigmoid turn NaN
    # into a number, relu's mask -inf into NaN, softmax a row's NaN or inf into numbers)
    unlike_eager_on_nonfinite: bool = False
    primitive: tuple | None = None  # a oneDNN step: (its primitive, {argument: descriptor}), to time it alone


@dataclass(frozen=True, eq=False)
class Slot:
    """Where one value's bytes live in every frame: an activation buffer, a constant, or the call's tensor."""

    md: MemoryDesc | None
    buffer: int | None = None  # planned: index of the frame's buffer
    constant: torch.Tensor | None = None  # constant: its bytes, shared by every frame
    view_shape: tuple | None = None  # planned and plain: the torch view the frame keeps of its bytes
    offset: int = 0  # planned: where its bytes start in the buffer

    def materialize(self, engine: Engine, buffers: list[torch.Tensor]) -> tuple[Memory | None, torch.Tensor | None]:
        """This slot's memory (and torch view, for planned plain values) in a frame with ``buffers``."""
        if self.md is None:
            return None, None
        if self.constant is not None:  # a plain one viewed for torch steps too (a dequantized weight they read)
            bytes_ = self.constant.view(-1).view(torch.uint8)  # contiguous: packed once
            shape = tuple(self.md.dims) if is_plain_contiguous(self.md) else None
            return Memory(engine, self.md, self.constant.data_ptr()), self._view(bytes_, shape)
        if self.buffer is None:
            return Memory(engine, self.md, 0), None  # bound to each call's tensor
        storage = buffers[self.buffer][self.offset:]
        return Memory(engine, self.md, storage.data_ptr()), self._view(storage, self.view_shape)

    def _view(self, storage: torch.Tensor, shape: tuple | None) -> torch.Tensor | None:
        """``storage`` (bytes) as a tensor of ``shape`` and this slot's dtype (None for no shape)."""
        if shape is None:
            return None
        count = 1
        for d in shape:
            count *= d
        return storage[:self.md.size()].view(DNNL_TO_TORCH[self.md.dtype])[:count].view(shape)


@dataclass(eq=False)
class DnnlProgram:
    engine: Engine
    steps: list[Step]
    slots: list[Slot]
    buffers: list[tuple[int, bool]]  # per frame buffer: (bytes, zero-filled)
    scratchpad_bytes: int
    input_slots: list[int]
    fresh: list[tuple[int, tuple, tuple, torch.dtype]]  # outputs written into a new tensor each call
    outputs: list[Callable[[Frame], Any]]
    released: list[int]  # slots holding a call's tensors, dropped when the call ends
    dynamic_aliases: dict[int, list[tuple[int, tuple | None, int]]]  # dynamic root slot -> (alias slot, view shape, byte offset)
    constant_storages: frozenset[int]  # storage addresses of constants a returned tensor may view
    text: str
    plan: Plan
    weight_bytes: int
    policy: str
    threads: int
    kernel_choices: dict = field(default_factory=dict)  # measured kernel choices: saved, given back at load
    _idle: deque = field(default_factory=deque, repr=False)

    def __call__(self, inputs: list) -> list:
        try:
            frame = self._idle.pop()
        except IndexError:
            frame = Frame(self)
        try:
            return frame.run(inputs)
        finally:
            self._idle.append(frame)

    def close(self) -> None:
        """Close the idle frames (a program no caller will run again: its memory goes back at once)."""
        while self._idle:
            self._idle.pop().close()

    def __del__(self) -> None:
        """Its frames go with it: their bound steps refer back to them (a cycle only the collector would
        free, holding the packed weights they view: a model optimized or loaded again and again, its last
        module deleted each time, grew by its weights at each until a collection)."""
        idle = self.__dict__.get("_idle")
        while idle:
            idle.pop().close()

    def __deepcopy__(self, memo: dict) -> "DnnlProgram":
        """A program with its own frames; the immutable plan (primitives, packed weights) is shared."""
        copied = object.__new__(DnnlProgram)
        copied.__dict__.update(self.__dict__)
        copied._idle = deque()
        return copied

    def profile(self, inputs: list, runs: int = 20) -> list[tuple[str, float]]:
        """Median microseconds of every step over ``runs`` calls, with the step's program line."""
        frame = Frame(self)
        samples: list[list[float]] = [[] for _ in frame.calls]
        for _ in range(runs):
            frame.prepare(inputs)
            for call, times in zip(frame.calls, samples):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            frame.finish()
        return [(step.text, sorted(t)[len(t) // 2] * 1e6) for step, t in zip(self.steps, samples)]

    def memory(self) -> dict[str, int]:
        """Bytes: ``packed_weights`` the constants its steps read, in the layouts they read them (the
        runtime, which holds the graph's ``weights``, tells copies from the graph's own tensors);
        ``activations`` one frame's buffers and scratchpad; ``frames`` what its idle frames hold."""
        arena = sum(size for size, _ in self.buffers) + self.scratchpad_bytes
        return {"weights": 0, "packed_weights": self.weight_bytes, "activations": arena, "frames": self.frames * arena}

    @property
    def frames(self) -> int:
        """Idle frames kept for reuse (one per caller that ran at the same time)."""
        return len(self._idle)

    @property
    def peak_activation_bytes(self) -> int:
        return self.plan.peak_bytes

    @property
    def unlike_eager_on_nonfinite(self) -> bool:
        return any(step.unlike_eager_on_nonfinite for step in self.steps)

    def describe(self) -> str:
        mib = 1 << 20
        return (f"{self.text}\n# layout policy: {self.policy}; {len(self.steps)} calls; "
                f"peak activation memory {self.plan.peak_bytes / mib:.2f} MiB in {len(self.plan.buffer_sizes)} "
                f"buffers; weights {self.weight_bytes / mib:.2f} MiB; {self.threads} threads")
