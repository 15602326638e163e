"""Values of a dnnl program: one per tensor the program computes, with its memory format.

A value is *planned* (it lives in an activation buffer chosen by the memory plan),
*dynamic* (its tensor changes every call: a user input, an output, a torch fallback's
result), an *alias* of another value (a view: same bytes, another descriptor, starting ``offset``
bytes into them), or a *constant* (packed weights, read-only, shared by every call).

An alias's descriptor never carries a start of its own (oneDNN's ``offset0``): a slice's start is
the alias's ``offset``, added to the memory handle when a frame binds it.  oneDNN's gemm-based
matmul ignores a descriptor's ``offset0`` when it has a single batch (it read the key of a one-head
attention from the start of a merged key/value projection: tests/backends/dnnl/test_attention.py).

Values are compile-time objects: they say where a tensor lives, never which bytes it
holds in a given call.  Each call's bytes and memory handles belong to its frame
(``frame.py``), found through ``value.slot``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyrys.backends.dnnl.layout import is_plain_contiguous
from pyrys.backends.dnnl.primitives import MemoryDesc
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH

PLANNED, DYNAMIC, ALIAS, CONSTANT = "planned", "dynamic", "alias", "constant"


@dataclass(eq=False)
class Value:
    name: str
    md: MemoryDesc | None
    kind: str = PLANNED
    alias_of: "Value | None" = None
    storage: torch.Tensor | None = None  # a constant's bytes (kept alive by the program)
    borrows: list = field(default_factory=list)  # values whose bytes this one may view (torch fallback results)
    reads_constants: bool = False  # a torch fallback result computed from constants (it may view them)
    output_meta: torch.Tensor | None = None  # a graph output written into a new tensor each call: its shape
    slot: int = -1  # index into each frame's memories and tensors, set when the program is assembled
    offset: int = 0  # an alias: how many bytes after the start of ``alias_of``'s bytes its own start

    @property
    def byte_offset(self) -> int:
        """Where this value's bytes start, in bytes from its root's start."""
        return self.offset + (self.alias_of.byte_offset if self.alias_of is not None else 0)

    @property
    def nbytes(self) -> int:
        return self.md.size()

    @property
    def plain(self) -> bool:
        return is_plain_contiguous(self.md)

    @property
    def root(self) -> "Value":
        return self.alias_of.root if self.alias_of is not None else self

    def roots(self) -> list["Value"]:
        """Every root value whose bytes reading this value may touch (through aliases and borrows), each once
        (a chain of torch steps each borrowing the one before twice, ``atan2(x, x)``, is walked once, not
        ``2**n`` times: swin3d's compile never ended)."""
        found: dict[int, Value] = {}
        pending = [self.root]
        while pending:
            root = pending.pop()
            if id(root) not in found:
                found[id(root)] = root
                pending.extend(borrowed.root for borrowed in root.borrows)
        return list(found.values())

    def may_view_internal_memory(self) -> bool:
        """Whether this value's tensor may share bytes with an activation buffer or a constant."""
        return any(root.kind in (PLANNED, CONSTANT) or root.reads_constants for root in self.roots())

    def layout(self) -> str:
        """The format tag, e.g. ``abcd`` (plain), ``acdb`` (nhwc), ``aBcd16b`` (blocked)."""
        return self.md.layout_tag() if self.md.format_kind.name == "blocked" else self.md.format_kind.name

    def view_shape(self) -> tuple | None:
        """The torch shape of this value's bytes: its dims for a plain contiguous layout, else None."""
        return tuple(self.md.dims) if self.md is not None and self.plain else None


def part_of(source: Value, name: str, dims, offsets) -> Value:
    """The slice of ``source`` with ``dims`` starting at ``offsets`` (per dim): an alias, no data moves; its
    start is the alias's byte offset, its descriptor starts at 0."""
    start = source.md.submemory(dims, [0] * len(dims))
    assert start.offset0 == 0, f"{source.name}'s descriptor has a start of its own"  # the start is the offset's
    elements = source.md.submemory(dims, offsets).offset0 - start.offset0
    return Value(name, start, ALIAS, source, offset=elements * DNNL_TO_TORCH[start.dtype].itemsize)


def broadcast_of(source: Value, name: str, dims) -> Value:
    """``source`` (plain) seen with ``dims``: its own dims with leading 1s added, a dim of 1 repeated where
    ``dims`` is larger, by a stride of 0 (``Tensor.expand``) - an alias; only a reorder reads one that repeats."""
    dims = [int(d) for d in dims]
    rank, own = len(dims), list(source.md.dims)
    padded = [1] * (rank - len(own)) + own
    strides = [0] * (rank - len(own)) + list(source.md.strides)
    strides = [0 if size == 1 and out != 1 else stride for size, out, stride in zip(padded, dims, strides)]
    return Value(name, MemoryDesc.from_strides(dims, source.md.dtype, strides).canonical(), ALIAS, source)
