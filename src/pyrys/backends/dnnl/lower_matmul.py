"""Matrix products in oneDNN: ``pyrys::matmul`` (``mm``, ``bmm``, ``matmul``) and its post-op chain.

    dst[b..., m, n] = post_ops( sum_k input[b..., m, k] * mat2[b..., k, n] )

Both operands may be computed (``q @ k.transpose(-1, -2)`` outside an attention pattern) or one a
constant (a stack of matrices).  The lower-rank operand gains leading dims of 1; a batch dim of 1
broadcasts, as in torch.  Operands are read in the strides they lie in, so a transposed view costs no
copy, unless oneDNN gives the strided operands a slower kernel than compact copies of them (bfloat16:
its brgemm kernel wants compact operands; float32 ones may run in its gemm): then they are copied
compact first.  A post-op operand that broadcasts where oneDNN's fast kernels do not take it (over the
first dim, or a per-batch bias) is expanded first: a constant once, a computed one by a copy each call.
A product oneDNN runs only in its reference code, or a vector operand (``matmul`` of a 1-D tensor), runs
through torch.
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
from pyrys.backends.dnnl.values import ALIAS, CONSTANT, Value, broadcast_of
from pyrys.ir.fused import FUSED_MATMUL, read_fused
from pyrys.ir.released import values_of


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
    operands = post_operands(builder, node, fused, None)
    pd, compact, chain = _first_fast(builder, node, fused, src, weights, operands)
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


def _first_fast(builder: Builder, node: fx.Node, fused, src: Value, weights: Value, operands: list[Operand]):
    """The first of these that oneDNN runs in more than its reference code: the destination in the layout
    its readers want (:func:`_destination`), then plain, then with the post-op operands that broadcast over
    the first dim expanded (a copy: oneDNN's fast kernels broadcast over some other dims,
    ``lower_attention._operand_layouts``), then expanded over every dim.  Gives the descriptor, whether the
    operands are copied compact, and the post-op chain."""
    wanted = _destination(node, bool(operands))
    plain = plain_md(wanted.dims, DNNL_TO_TORCH[wanted.dtype])
    tries = [(wanted, None)] + ([(plain, None)] if plain != wanted else [])
    tries += [(plain, "first")] if _broadcast_first(operands, plain) else []
    tries += [(plain, "every")] if any(_padded_dims(_operand_dims(o), plain.ndims) != list(plain.dims)
                                       for o in operands) else []
    for dst_md, expand in tries:
        snapshot = builder.snapshot()
        try:
            attempt = _expanded(builder, operands, dst_md, expand == "every") if expand else operands
            chain = build_chain(builder, fused.post_ops, attempt, dst_md)
            pd, compact = _fastest(builder, src, weights, dst_md, PrimitiveAttr(chain.post_ops))
            return pd, compact, chain
        except (Unsupported, DnnlError):
            builder.restore(snapshot, node)
            if (dst_md, expand) == tries[-1]:
                raise


def _destination(node: fx.Node, binary: bool) -> MemoryDesc:
    """Where every reader permutes the result alike, the layout that makes that view contiguous
    (:func:`output_md`); plain with a binary post-op, whose broadcast operand crashed oneDNN 3.2's brgemm
    matmul writing a strided destination (``lower_attention._operand_layouts``)."""
    dtype = destination_dtype(node)
    return plain_md(node.meta["val"].shape, dtype) if binary else output_md(node, dtype)


def _padded_dims(dims, rank: int) -> list[int]:
    return [1] * (rank - len(dims)) + list(dims)


def _operand_dims(operand: Operand) -> list[int]:
    return list(operand.constant.shape) if operand.constant is not None else list(operand.value.md.dims)


def _broadcast_first(operands: list[Operand], dst_md: MemoryDesc) -> bool:
    """Whether an operand broadcasts over the destination's first dim."""
    return dst_md.dims[0] > 1 and any(_padded_dims(_operand_dims(o), dst_md.ndims)[0] == 1 for o in operands)


def _expanded(builder: Builder, operands: list[Operand], dst_md: MemoryDesc, every_dim: bool) -> list[Operand]:
    """The operands that broadcast over the first dim (``every_dim``: over any dim) expanded to the
    destination's size there: a constant once, now; a computed one by a reorder each call, from a view with
    strides of 0 along those dims."""
    expanded = []
    for o in operands:
        dims = _padded_dims(_operand_dims(o), dst_md.ndims)
        grown = [d for d in range(len(dims)) if dims[d] == 1 and dst_md.dims[d] > 1 and (every_dim or d == 0)]
        if not grown:
            expanded.append(o)
            continue
        full = [dst_md.dims[d] if d in grown else dims[d] for d in range(len(dims))]
        if o.constant is not None:
            tensor = values_of(o.constant).reshape(dims).expand(full).contiguous()  # a released one's values
            expanded.append(Operand(None, False, constant=tensor, name=f"{o.name}.expanded"))
            continue
        source = builder.to_plain(o.value)
        view = broadcast_of(source, f"{source.name}.expanded", full)
        expanded.append(Operand(builder.copy(view, plain_md(full, DNNL_TO_TORCH[source.md.dtype])), True))
    return expanded


def _operand(builder: Builder, arg: fx.Node, rank: int, name: str) -> Value:
    """An operand as a plain (strided) value of ``rank`` dims: a computed tensor as it lies (a blocked one
    made plain), a constant packed once in the layout oneDNN picks for it."""
    constant = builder.constant(arg)
    if constant is not None:
        tensor = values_of(constant).reshape([1] * (rank - constant.dim()) + list(constant.shape))
        return builder.constant_value(tensor.contiguous(), None, name)
    value = builder.value_of(arg)
    if value.md.inner_blocks:
        value = builder.to_plain(value)
    if value.md.ndims == rank:
        return value
    return broadcast_of(value, f"{value.name}.{rank}d", _padded_dims(value.md.dims, rank))


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
