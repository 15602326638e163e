"""Torch tensors in and out of oneDNN: dtypes, descriptors over a tensor's own bytes, copies.

``tensor_md`` and ``torch_weights_md`` describe a tensor where it lies (no copy);
``tensor_memory`` wraps its bytes; ``to_layout`` and ``to_tensor`` copy through a reorder
(compile time only: the run loop binds memories once and re-points them per call).
"""

from __future__ import annotations

import torch

from pyrys.backends.dnnl.constants import ARG_FROM, ARG_TO, DataType
from pyrys.backends.dnnl.descriptors import reorder_pd
from pyrys.backends.dnnl.primitives import Engine, Memory, MemoryDesc, Primitive, Stream

TORCH_TO_DNNL = {
    torch.float32: DataType.f32,
    torch.bfloat16: DataType.bf16,
    torch.float16: DataType.f16,
    torch.int32: DataType.s32,
    torch.int8: DataType.s8,
    torch.uint8: DataType.u8,
}
DNNL_TO_TORCH = {dnnl: dtype for dtype, dnnl in TORCH_TO_DNNL.items()}


def dnnl_dtype(dtype: torch.dtype) -> DataType:
    """The oneDNN data type for a torch dtype; TypeError if oneDNN has none."""
    try:
        return TORCH_TO_DNNL[dtype]
    except KeyError:
        raise TypeError(f"dnnl backend does not support dtype {dtype}") from None


def tensor_md(tensor: torch.Tensor) -> MemoryDesc:
    """A plain descriptor with the tensor's own shape, dtype and strides."""
    return MemoryDesc.from_strides(tensor.shape, dnnl_dtype(tensor.dtype), tensor.stride())


def torch_weights_md(weight: torch.Tensor, groups: int = 1, transposed: bool = False) -> MemoryDesc:
    """Describe a torch conv weight in place, in oneDNN's ([G,] O, I, k...) dims.

    conv: torch (O, I/G, k...); transposed conv: torch (I, O/G, k...).
    """
    shape, strides = list(weight.shape), list(weight.stride())
    if transposed:  # swap the O and I roles: oneDNN wants (O, I)
        shape[0], shape[1] = shape[1], shape[0] // groups
        strides[0], strides[1] = strides[1], strides[0]
        outer_stride = strides[1] * shape[1]
    else:
        shape[0] = shape[0] // groups
        outer_stride = strides[0] * shape[0]
    if groups > 1:
        shape, strides = [groups] + shape, [outer_stride] + strides
    return MemoryDesc.from_strides(shape, dnnl_dtype(weight.dtype), strides)


def tensor_memory(engine: Engine, tensor: torch.Tensor, md: MemoryDesc | None = None) -> Memory:
    """A Memory over the tensor's storage (no copy); keeps the tensor alive."""
    md = tensor_md(tensor) if md is None else md
    return Memory(engine, md, tensor.data_ptr(), keepalive=tensor)


def empty_memory(engine: Engine, md: MemoryDesc) -> Memory:
    """A Memory for `md` backed by a torch byte buffer (any layout, incl. blocked)."""
    buffer = torch.empty(max(md.size(), 1), dtype=torch.uint8)
    return Memory(engine, md, buffer.data_ptr(), keepalive=buffer)


def reorder(engine: Engine, stream: Stream, src: Memory, dst: Memory) -> None:
    """Copy src into dst, converting layout/dtype (compile-time helper)."""
    Primitive(reorder_pd(engine, src.md, dst.md)).execute(stream, {ARG_FROM: src, ARG_TO: dst})


def to_layout(engine: Engine, stream: Stream, tensor: torch.Tensor, md: MemoryDesc) -> Memory:
    """The tensor's values in layout `md` (e.g. nChw8c), in a new buffer."""
    dst = empty_memory(engine, md)
    reorder(engine, stream, tensor_memory(engine, tensor.contiguous()), dst)
    return dst


def to_tensor(engine: Engine, stream: Stream, memory: Memory) -> torch.Tensor:
    """A new contiguous torch tensor with the memory's values."""
    dims, dtype = memory.md.dims, DNNL_TO_TORCH[memory.md.dtype]
    out = torch.empty(dims, dtype=dtype)
    reorder(engine, stream, memory, tensor_memory(engine, out))
    return out
