"""A frame: everything one call of a dnnl program writes to.

The program (``program.py``) is immutable after compile: primitives, packed weights,
descriptors and a step list naming its operands by slot.  A frame holds one call's
state: its activation buffers, its oneDNN memories (one per slot, pointing into the
frame's buffers or at the call's tensors), a scratchpad (every primitive is created in
oneDNN's *user* scratchpad mode, so primitives may run from many threads at once as long
as no two executions share a scratchpad), a stream, and the steps pre-bound to all of it.

A frame serves one call at a time; the program keeps a pool of them that grows to the
number of concurrent callers.  A frame holds the parts of the program it reads, not the program:
the pool and the frames would be a cycle, freed (with the packed weights the frames view) only by
the cyclic collector; the program closes its frames when it goes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from pyrys.backends.dnnl.layout import contiguous_strides
from pyrys.backends.dnnl.primitives import Memory, Stream
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH
from pyrys.backends.program import constant_for_caller

if TYPE_CHECKING:
    from pyrys.backends.dnnl.program import DnnlProgram


class Frame:
    def __init__(self, program: "DnnlProgram"):
        self.input_slots, self.fresh, self.slots = program.input_slots, program.fresh, program.slots
        self.outputs, self.released = program.outputs, program.released
        self.stream = Stream(program.engine)
        self.buffers = [torch.zeros(size, dtype=torch.uint8) if zeroed else torch.empty(size, dtype=torch.uint8)
                        for size, zeroed in program.buffers]
        self.scratchpad = torch.empty(max(program.scratchpad_bytes, 64), dtype=torch.uint8)
        self.memories: list[Memory | None] = []
        self.tensors: list[torch.Tensor | None] = []
        for slot in program.slots:
            memory, tensor = slot.materialize(program.engine, self.buffers)
            self.memories.append(memory)
            self.tensors.append(tensor)
        self.aliases = {root: [(alias, shape, offset, self.memories[alias]) for alias, shape, offset in aliases]
                        for root, aliases in program.dynamic_aliases.items()}
        self.internal = program.constant_storages | {b.untyped_storage().data_ptr() for b in self.buffers}
        self.calls: list[Callable[[], None]] = [step.bind(self) for step in program.steps]

    def bind(self, slot: int, tensor: torch.Tensor) -> None:
        """Point a dynamic slot (and its aliases) at this call's ``tensor``."""
        self.tensors[slot] = tensor
        memory = self.memories[slot]
        if memory is not None:
            memory.set_handle(tensor.data_ptr())
        for alias, shape, offset, alias_memory in self.aliases.get(slot, ()):
            self.tensors[alias] = tensor if shape is None else _view(tensor, shape, offset)
            if alias_memory is not None:
                alias_memory.set_handle(tensor.data_ptr() + offset)

    def prepare(self, inputs: list) -> None:
        """Bind the call's inputs (tensors made contiguous; numbers as they are) and fresh output tensors."""
        for slot, value in zip(self.input_slots, inputs):
            contiguous = not isinstance(value, torch.Tensor) or value.is_contiguous()
            self.bind(slot, value if contiguous else value.contiguous())
        for slot, shape, strides, dtype in self.fresh:
            self.bind(slot, torch.empty_strided(shape, strides, dtype=dtype))

    def run(self, inputs: list) -> list:
        self.prepare(inputs)
        for call in self.calls:
            call()
        return self.finish()

    def finish(self) -> list:
        """The call's outputs; then the frame lets go of the call's tensors."""
        outputs = [output(self) for output in self.outputs]
        tensors = self.tensors
        for slot in self.released:
            tensors[slot] = None
        return outputs

    def close(self) -> None:
        """Let go of everything: its steps' bound calls refer back to it (a cycle only the collector would
        free), so a frame closed frees its buffers at once."""
        self.calls, self.memories, self.tensors, self.buffers, self.aliases = [], [], [], [], {}

    def strided(self, value) -> torch.Tensor:
        """A torch view of a planned value's bytes in this frame, with its (plain) descriptor's dims and
        strides: what a torch step reads or writes in place."""
        root = self.slots[value.root.slot]
        dtype = DNNL_TO_TORCH[value.md.dtype]
        data = self.buffers[root.buffer][root.offset + value.byte_offset:]
        typed = data[:len(data) // dtype.itemsize * dtype.itemsize].view(dtype)
        return typed.as_strided(value.md.dims, value.md.strides)

    def owned(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, or a copy of it if it shares bytes with this frame's buffers or the program's constants
        (made outside inference mode: a constant's view is a module buffer's in eager, writable after)."""
        return constant_for_caller(tensor) if tensor.untyped_storage().data_ptr() in self.internal else tensor


def _view(tensor: torch.Tensor, shape: tuple, offset: int) -> torch.Tensor:
    """The contiguous ``shape`` starting ``offset`` bytes into ``tensor``'s data (what an alias's plain
    descriptor says, whatever ``tensor``'s own strides)."""
    start = tensor.storage_offset() + offset // tensor.element_size()
    return tensor.as_strided(shape, contiguous_strides(shape), start)
