"""Matrix products in oneDNN: ``pyrys::matmul`` (``mm``, ``bmm``, ``matmul``) and its post-op chain.

    dst[b..., m, n] = post_ops( sum_k input[b..., m, k] * mat2[b..., k, n] )

Both operands may be computed (``q @ k.transpose(-1, -2)`` outside an attention pattern) or one a
constant (a stack of matrices).  The lower-rank operand gains leading dims of 1; a batch dim of 1
broadcasts, as in torch.  Operands are read in the strides they lie in, so a transposed view costs no
copy, unless oneDNN gives the strided operands a slower kernel than compact copies of them (bfloat16:
its brgemm kernel wants compact operands; float32 ones may run in its gemm): then they are copied
compact first.  A product oneDNN runs only in its reference code, or a vector operand (``matmul`` of a
1-D tensor), runs through torch.
"""
from __future__ import annotations

import torch.fx as fx

from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.builder import F32_OR_BF16, Builder, Unsupported, check_dtype, node_text
from pyrys.backends.dnnl.constants import ARG_DST, ARG_SRC, ARG_WEIGHTS, arg_post_op_src1
from pyrys.backends.dnnl.descriptors import matmul_pd
from pyrys.backends.dnnl.layout import plain_md
from pyrys.backends.dnnl.lower_attention import output_md
from pyrys.backends.dnnl.lower_conv import destination_dtype, format_info, is_reference
from pyrys.backends.dnnl.lower_int8 import post_operands
from pyrys.backends.dnnl.post_ops import Operand, build_chain
from pyrys.backends.dnnl.primitives import MemoryDesc, PrimitiveAttr, PrimitiveDesc
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH
from pyrys.backends.dnnl.values import ALIAS, CONSTANT, Value
from pyrys.ir.fused import FUSED_MATMUL, read_fused


def lower_matmul(builder: Builder, node: fx.Node) -> None:
    fused = read_fused(node)
    a, b = fused.args["input"], fused.args["mat2"]
    metas = [arg.meta.get("val") if isinstance(arg, fx.Node) else None for arg in (a, b)]
    check_dtype(*metas, dtypes=F32_OR_BF16)
    if min(meta.dim() for meta in metas) < 2:
        raise Unsupported("a product with a vector (a 1-D operand) runs through torch")
    out = node.meta["val"]
    rank = out.dim()
    src, weights = (_operand(builder, arg, rank, f"{node.name}.{role}") for arg, role in ((a, "input"), (b, "mat2")))
    dst_md = _destination(node, bool(fused.post_inputs))
    operands = post_operands(builder, node, fused, None)
    tries = [operands] + ([_first_dim_expanded(operands, dst_md)] if _expandable(operands, dst_md) else [])
    for attempt in tries:
        snapshot = builder.snapshot()
        chain = build_chain(builder, fused.post_ops, attempt, dst_md)
        try:
            pd, compact = _fastest(builder, src, weights, dst_md, PrimitiveAttr(chain.post_ops))
            break
        except Unsupported:
            if attempt is tries[-1]:
                raise
            builder.restore(snapshot, node)
    if compact:
        src, weights = (v if v.kind == CONSTANT else builder.convert(v, _compact(v.md)) for v in (src, weights))
    dst = (builder.define(node, pd.dst_md(), ALIAS, chain.sum_base) if chain.sum_base is not None
           else builder.define(node, pd.dst_md()))
    args = {ARG_SRC: src, ARG_WEIGHTS: weights, ARG_DST: dst}
    for index, operand in chain.binary_operands.items():
        args[arg_post_op_src1(index)] = operand
    reads = [src, weights, *chain.binary_operands.values()] + ([chain.sum_base] if chain.sum_base else [])
    text = node_text(node, f"dnnl::{fused.label}", format_info(pd), [f"%{v.name}" for v in reads])
    builder.add_primitive(text, pd, args, reads, [dst], unlike_eager_on_nonfinite=chain.unlike_eager_on_nonfinite)


def _destination(node: fx.Node, binary: bool) -> MemoryDesc:
    """Where every reader permutes the result alike, the layout that makes that view contiguous
    (:func:`output_md`); plain with a binary post-op, whose broadcast operand crashed oneDNN 3.2's brgemm
    matmul writing a strided destination (``lower_attention._operand_layouts``)."""
    dtype = destination_dtype(node)
    return plain_md(node.meta["val"].shape, dtype) if binary else output_md(node, dtype)


def _padded_shape(tensor, rank: int) -> list[int]:
    return [1] * (rank - tensor.dim()) + list(tensor.shape)


def _expandable(operands: list[Operand], dst_md: MemoryDesc) -> bool:
    """Whether a constant operand broadcasts over the first dim, which oneDNN's fast matmul kernels do not
    take (they broadcast over any other dim: ``lower_attention._operand_layouts``)."""
    return dst_md.dims[0] > 1 and any(o.constant is not None and _padded_shape(o.constant, dst_md.ndims)[0] == 1
                                      for o in operands)


def _first_dim_expanded(operands: list[Operand], dst_md: MemoryDesc) -> list[Operand]:
    """The constant operands with their first dim expanded to the destination's (a copy, made once)."""
    expanded = []
    for o in operands:
        if o.constant is not None and _padded_shape(o.constant, dst_md.ndims)[0] == 1:
            dims = _padded_shape(o.constant, dst_md.ndims)
            tensor = o.constant.reshape(dims).expand([dst_md.dims[0], *dims[1:]]).contiguous()
            o = Operand(None, False, constant=tensor, name=f"{o.name}.expanded")
        expanded.append(o)
    return expanded


def _operand(builder: Builder, arg: fx.Node, rank: int, name: str) -> Value:
    """An operand as a plain (strided) value of ``rank`` dims: a computed tensor as it lies (a blocked one
    made plain), a constant packed once in the layout oneDNN picks for it."""
    constant = builder.constant(arg)
    if constant is not None:
        tensor = constant.reshape([1] * (rank - constant.dim()) + list(constant.shape))
        return builder.constant_value(tensor.contiguous(), None, name)
    value = builder.value_of(arg)
    if value.md.inner_blocks:
        value = builder.to_plain(value)
    dims, strides = list(value.md.dims), list(value.md.strides)
    if len(dims) == rank:
        return value
    padding = rank - len(dims)
    md = MemoryDesc.from_strides([1] * padding + dims, value.md.dtype,
                                 [dims[0] * strides[0]] * padding + strides).canonical()
    return Value(f"{value.name}.{rank}d", md, ALIAS, value)


def _compact(md: MemoryDesc) -> MemoryDesc:
    return plain_md(md.dims, DNNL_TO_TORCH[md.dtype])


def _fastest(builder: Builder, src: Value, weights: Value, dst_md: MemoryDesc,
             attr: PrimitiveAttr) -> tuple[PrimitiveDesc, bool]:
    """The matmul on the operands as they lie, or on compact copies where only those get oneDNN's brgemm
    kernel (or any kernel but its reference code); and whether the copies are needed."""
    strided = _pd(builder, src.md, weights.md, dst_md, attr)
    if strided is not None and strided.impl_info().startswith("brg"):
        return strided, False
    already = all(v.kind == CONSTANT or v.md == _compact(v.md) for v in (src, weights))
    compact = None if already else _pd(builder, _compact(src.md), _compact(weights.md), dst_md, attr)
    if compact is not None and (strided is None or compact.impl_info().startswith("brg")):
        return compact, True
    if strided is None:
        raise Unsupported(f"oneDNN runs this matmul only in its reference code ({src.md.format_summary()} x "
                          f"{weights.md.format_summary()})")
    return strided, False


def _pd(builder: Builder, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc,
        attr: PrimitiveAttr) -> PrimitiveDesc | None:
    """A matmul descriptor; None where oneDNN has none for these operands but its reference code."""
    try:
        pd = matmul_pd(builder.engine, src, weights, dst, attr=attr)
    except DnnlError:
        return None
    return None if is_reference(pd) else pd


LOWERINGS = {FUSED_MATMUL: lower_matmul}
