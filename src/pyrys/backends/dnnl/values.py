"""Values of a dnnl program: one per tensor the program computes, with its memory format.

A value is *planned* (it lives in a buffer chosen by the memory plan, at a fixed address),
*dynamic* (its tensor changes every call: a user input, an output, a torch fallback's
result), or an *alias* of another value (a view: same bytes, another descriptor).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyrys.backends.dnnl.layout import is_plain_contiguous
from pyrys.backends.dnnl.primitives import DNNL_TO_TORCH, Engine, Memory, MemoryDesc

PLANNED, DYNAMIC, ALIAS, CONSTANT = "planned", "dynamic", "alias", "constant"


@dataclass(eq=False)
class Value:
    name: str
    md: MemoryDesc
    kind: str = PLANNED
    alias_of: "Value | None" = None
    memory: Memory | None = None
    current: torch.Tensor | None = None  # a torch view of the bytes (plain layouts), or the dynamic tensor
    aliases: list = field(default_factory=list)  # aliases of a dynamic value, re-pointed with it
    borrows: list = field(default_factory=list)  # values whose bytes this one may view (torch fallback results)
    view_shape: tuple | None = None  # set by attach: the torch shape of a plain layout (None otherwise)

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
        """Every root value whose bytes reading this value may touch (through aliases and borrows)."""
        found = [self.root]
        for borrowed in self.borrows:
            found += borrowed.roots()
        return found

    def layout(self) -> str:
        """The format tag, e.g. ``abcd`` (plain), ``acdb`` (nhwc), ``aBcd16b`` (blocked)."""
        return self.md.layout_tag() if self.md.format_kind.name == "blocked" else self.md.format_kind.name

    def torch_view(self, storage: torch.Tensor) -> torch.Tensor | None:
        """A tensor over ``storage`` (bytes) with this value's dims; only for plain contiguous layouts."""
        if self.view_shape is None:
            return None
        count = 1
        for d in self.view_shape:
            count *= d
        return storage[:self.nbytes].view(DNNL_TO_TORCH[self.md.dtype])[:count].view(self.view_shape)

    def attach(self, engine: Engine, ptr: int) -> None:
        """Create this value's dnnl memory over ``ptr`` (0 for a dynamic value, bound each call)."""
        self.memory = Memory(engine, self.md, ptr)
        self.view_shape = tuple(self.md.dims) if self.plain else None

    def bind(self, tensor: torch.Tensor) -> None:
        """Point a dynamic value (and its aliases) at this call's tensor."""
        self.current = tensor
        if self.memory is not None:
            self.memory.set_handle(tensor.data_ptr())
        for alias in self.aliases:
            alias.bind(tensor.view(alias.view_shape) if alias.view_shape is not None else tensor)
