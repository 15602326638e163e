"""Compile-time memory planning: activation buffers reused by liveness.

Each planned value lives from the step that writes it to the last step that reads it
(reads through aliases count, and so do reads of torch results that may be views of it), or to the
end where an output may view it.  Buffers are assigned greedily in program order: a value
takes the smallest free buffer that fits, else grows the largest free one, else opens a
new one.  Peak activation memory is the sum of the buffers' sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyrys.backends.dnnl.values import PLANNED, Value


@dataclass
class Plan:
    buffer_sizes: list[int]
    assignment: dict[Value, int]  # planned value -> buffer index

    @property
    def peak_bytes(self) -> int:
        return sum(self.buffer_sizes)


def lifetimes(steps, outputs: list[Value] = ()) -> dict[Value, tuple[int, int]]:
    """(first write, last read) step index of every planned root value; the bytes ``outputs`` may view (a
    torch fallback's result returned as it is, a ``select`` of an activation) live to the end, where the
    output is copied out of them."""
    spans: dict[Value, list[int]] = {}
    for index, step in enumerate(steps):
        for value in step.writes:
            root = value.root
            if root.kind == PLANNED:
                spans.setdefault(root, [index, index])
        for value in step.reads:
            for root in value.roots():
                if root.kind == PLANNED and root in spans:
                    spans[root][1] = max(spans[root][1], index)
    for value in outputs:
        for root in value.roots():
            if root.kind == PLANNED and root in spans:
                spans[root][1] = len(steps)
    return {value: (start, end) for value, (start, end) in spans.items()}


def plan_memory(steps, outputs: list[Value] = ()) -> Plan:
    spans = lifetimes(steps, outputs)
    sizes: list[int] = []
    owner_end: list[int] = []  # per buffer: last step its current value is read
    assignment: dict[Value, int] = {}
    for value, (start, end) in sorted(spans.items(), key=lambda item: item[1][0]):
        free = [b for b in range(len(sizes)) if owner_end[b] < start]
        buffer = _choose(free, sizes, value.nbytes)
        if buffer is None:
            sizes.append(0)
            owner_end.append(-1)
            buffer = len(sizes) - 1
        sizes[buffer] = max(sizes[buffer], _aligned(value.nbytes))
        owner_end[buffer] = end
        assignment[value] = buffer
    return Plan(sizes, assignment)


def _choose(free: list[int], sizes: list[int], need: int) -> int | None:
    fitting = [b for b in free if sizes[b] >= need]
    if fitting:
        return min(fitting, key=lambda b: sizes[b])
    return max(free, key=lambda b: sizes[b]) if free else None


def _aligned(nbytes: int, alignment: int = 64) -> int:
    return (nbytes + alignment - 1) // alignment * alignment
