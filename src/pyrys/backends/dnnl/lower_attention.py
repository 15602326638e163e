"""Attention in oneDNN: ``scaled_dot_product_attention`` as matmul -> softmax -> matmul.

    S = (Q K^T) * scale + bias      one matmul; the scale and the mask are its post-ops
    P = softmax(S, -1)              in place, over S's buffer
    O = (P V) * keep                one matmul, written in the layout its reader wants

Q, K and V are read where they lie (the strided head views of a projection's output: no copy),
``K^T`` is a permuted view of K.  ``bias`` is the mask as an additive float: 0 where a boolean mask
attends and ``MASKED`` (-1e30) where it does not, a float mask as it is with -inf raised to
``MASKED``, keys after the query's position for ``is_causal``.  A finite ``MASKED`` keeps a query
whose every key is masked from giving NaN (``exp(-1e30 - max)`` is 0 wherever one key is kept); torch
gives such a query 0, which ``keep`` (1 where the query keeps a key, else 0) restores.  A constant mask
is read once, when the program is built; a computed one each call, by one torch step that every
attention reading that mask shares.  The output is written in the layout that makes its readers'
``transpose(1, 2)`` (the heads merged back) a contiguous view.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from pyrys.backends.dnnl.builder import F32_OR_BF16, Builder, Unsupported, check_dtype, node_text
from pyrys.backends.dnnl.constants import ARG_DST, ARG_SRC, ARG_WEIGHTS, AlgKind, arg_post_op_src1
from pyrys.backends.dnnl.descriptors import matmul_pd, softmax_pd
from pyrys.backends.dnnl.layout import contiguous_strides, is_plain_contiguous, plain_md
from pyrys.backends.dnnl.primitives import MemoryDesc, PostOps, PrimitiveAttr, PrimitiveDesc
from pyrys.backends.dnnl.values import ALIAS, DYNAMIC, Value
from pyrys.ir.graph import op_args
from pyrys.ir.vocabulary import PERMUTES, VIEWS, permutation

aten = torch.ops.aten
MASKED = -1e30  # a masked score: exp(MASKED - max) is 0 next to any real score, and never NaN


def attention_bias(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bias, keep)`` of an SDPA mask: the additive float32 mask, and float32 1/0 per query (the mask's
    last dim reduced) saying whether it keeps any key."""
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, MASKED)
        keep = mask.any(-1, keepdim=True)
    else:
        bias = mask.float().clamp_min(MASKED)
        keep = (mask != float("-inf")).any(-1, keepdim=True)
    return bias, keep.float()


def causal_bias(queries: int, keys: int) -> torch.Tensor:
    """torch's ``is_causal`` mask, additive: query i sees keys 0..i (top-left aligned)."""
    allowed = torch.ones(queries, keys, dtype=torch.bool).tril()
    return torch.zeros(queries, keys).masked_fill_(~allowed, MASKED)


def _padded(dims, rank: int) -> list[int]:
    return [1] * (rank - len(dims)) + [int(d) for d in dims]


def _strided(builder: Builder, node: fx.Node) -> Value:
    """``node``'s value in a plain (strided) layout: as it lies when it already is one."""
    value = builder.value_of(node)
    return value if not value.md.inner_blocks else builder.to_plain(value)


def _transposed(value: Value) -> Value:
    """A view of ``value`` with its last two dims swapped (``K^T``)."""
    order = list(range(value.md.ndims))
    order[-1], order[-2] = order[-2], order[-1]
    return Value(f"{value.name}.T", value.md.permute(order), ALIAS, value)


def _through_views(node: fx.Node) -> list[fx.Node]:
    """``node``'s readers, looking through views that keep its shape (``view(x, x.shape)``)."""
    readers = []
    for user in node.users:
        same_shape = user.target in VIEWS and tuple(user.meta["val"].shape) == tuple(node.meta["val"].shape)
        readers += _through_views(user) if same_shape else [user]
    return readers


def output_md(node: fx.Node, dtype: torch.dtype) -> MemoryDesc:
    """Where every reader permutes the result the same way (``transpose(1, 2)``), the layout that makes the
    permuted view contiguous; else plain."""
    shape = list(node.meta["val"].shape)
    readers = _through_views(node)
    orders = {tuple(permutation(r)) for r in readers if r.target in PERMUTES}
    if len(orders) != 1 or len(readers) != sum(r.target in PERMUTES for r in readers):
        return plain_md(shape, dtype)
    (order,) = orders
    permuted_strides = contiguous_strides([shape[d] for d in order])
    strides = [0] * len(shape)
    for position, axis in enumerate(order):
        strides[axis] = permuted_strides[position]
    return plain_md(shape, dtype, strides)


def _mask_tensors(builder: Builder, mask, queries: int, keys: int,
                  is_causal: bool) -> tuple[torch.Tensor | fx.Node | None, bool]:
    """The mask's bias as a constant tensor (causal, or a constant mask), or its node (computed each call),
    or None; and whether a query may keep no key (then ``keep`` is needed)."""
    if is_causal:
        if mask is not None:
            raise Unsupported("a mask and is_causal together")
        return causal_bias(queries, keys), False
    if mask is None:
        return None, False
    meta = mask.meta.get("val") if isinstance(mask, fx.Node) else None
    if not isinstance(meta, torch.Tensor) or not (meta.dtype == torch.bool or meta.dtype.is_floating_point):
        raise Unsupported("the mask is neither a boolean nor a floating-point tensor")
    constant = builder.constant_values(mask)
    if constant is None:
        return mask, True
    bias, keep = attention_bias(constant)
    return bias, not bool(keep.all())


def _operand_layouts(natural: list[int], dst: MemoryDesc) -> list[tuple[list[int], list[int]]]:
    """The ``(dims, strides)`` to offer a matmul's binary post-op operand, fastest first.  oneDNN's fast
    kernels broadcast an operand over any dim but the first, into a contiguous destination: the first dim
    expanded, then the full shape.  A broadcast operand into a strided destination crashed oneDNN's brgemm
    matmul (tests/backends/dnnl/test_attention.py), so there the operand takes the destination's own shape
    and strides."""
    full = list(dst.dims)
    if not is_plain_contiguous(dst):
        return [(full, list(dst.strides))]
    expanded = [full[0], *natural[1:]]
    return [(expanded, contiguous_strides(expanded)), (full, contiguous_strides(full))]


def _expanded(tensor: torch.Tensor, layout: tuple[list[int], list[int]]) -> torch.Tensor:
    """``tensor`` broadcast to ``layout``'s dims, in new memory with its strides."""
    dims, strides = layout
    broadcast = tensor.reshape(_padded(tensor.shape, len(dims))).expand(dims)
    return torch.empty_strided(dims, strides, dtype=tensor.dtype).copy_(broadcast)


def _constant_operand(builder: Builder, tensor: torch.Tensor, layout: tuple, name: str) -> Value:
    """A constant post-op operand, packed once in ``layout``."""
    dims, strides = layout
    logical = tensor.reshape(_padded(tensor.shape, len(dims))).expand(dims).contiguous()
    return builder.constant_value(logical, plain_md(dims, torch.float32, strides), name)


def _computed_mask(builder: Builder, mask: fx.Node, bias_layout: tuple, keep_layout: tuple) -> tuple[Value, Value]:
    """One torch step per mask (and layouts) computing its ``(bias, keep)`` each call, shared by every
    attention reading it."""
    key = ("attention_bias", mask, *map(tuple, bias_layout), *map(tuple, keep_layout))
    if key in builder.converted:
        return builder.converted[key]
    source = builder.value_of(mask, in_memory=False)
    if source.md is not None:
        source = builder.to_plain(source)
    bias = Value(f"{mask.name}.bias", plain_md(bias_layout[0], torch.float32, bias_layout[1]), DYNAMIC)
    keep = Value(f"{mask.name}.keep", plain_md(keep_layout[0], torch.float32, keep_layout[1]), DYNAMIC)

    def bind(frame):
        tensors, bind_value = frame.tensors, frame.bind
        source_slot, bias_slot, keep_slot = source.slot, bias.slot, keep.slot
        neutral = []  # this frame's (zeros, ones): the bias and keep of a mask that masks nothing

        def call() -> None:
            mask = tensors[source_slot]
            if not bool(mask.all() if mask.dtype == torch.bool else (mask == 0).all()):
                bias_tensor, keep_tensor = attention_bias(mask)
                bind_value(bias_slot, _expanded(bias_tensor, bias_layout))
                bind_value(keep_slot, _expanded(keep_tensor, keep_layout))
                return
            if not neutral:
                neutral.extend([_expanded(torch.zeros(()), bias_layout), _expanded(torch.ones(()), keep_layout)])
            bind_value(bias_slot, neutral[0])
            bind_value(keep_slot, neutral[1])

        return call

    text = (f"%{bias.name}, %{keep.name} = torch::attention_bias(%{source.name})  # the mask as an additive "
            "float; per query, 1 if it keeps a key")
    builder.add_torch(text, bind, [source], [bias, keep])
    builder.converted[key] = (bias, keep)
    return bias, keep


def _matmul_pd(builder: Builder, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc, scale: float | None,
               binary: tuple[AlgKind, tuple] | None) -> PrimitiveDesc:
    """A matmul descriptor, ``dst = (src @ weights) [* scale] [alg operand]``; None where oneDNN runs it only
    in its reference code."""
    chain = PostOps()
    if scale is not None:
        chain.append_eltwise(AlgKind.eltwise_linear, scale, 0.0)
    if binary is not None:
        dims, strides = binary[1]
        chain.append_binary(binary[0], plain_md(dims, torch.float32, strides))
    pd = matmul_pd(builder.engine, src, weights, dst, attr=PrimitiveAttr(chain))
    return None if "ref" in pd.impl_info() else pd


def _fast_matmul(builder: Builder, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc, scale: float | None,
                 alg: AlgKind, operand_layouts: list[tuple] | None) -> tuple[PrimitiveDesc, tuple | None]:
    """The first fast matmul over the operand layouts offered (None: no binary post-op), and that layout."""
    for layout in operand_layouts or [None]:
        pd = _matmul_pd(builder, src, weights, dst, scale, None if layout is None else (alg, layout))
        if pd is not None:
            return pd, layout
    raise Unsupported(f"oneDNN runs this matmul only in its reference code ({src.format_summary()} x "
                      f"{weights.format_summary()})")


def _format_info(pd: PrimitiveDesc) -> str:
    return (f"format_info=[src={pd.src_md().layout_tag()}, weights={pd.weights_md().layout_tag()}, "
            f"dst={pd.dst_md().layout_tag()}], impl={pd.impl_info()}")


def lower_attention(builder: Builder, node: fx.Node) -> None:
    a = op_args(node)
    if a.get("dropout_p", 0.0) != 0.0:
        raise Unsupported("attention with dropout")
    if a.get("enable_gqa"):
        raise Unsupported("grouped-query attention")
    q_node, k_node, v_node, out = a["query"], a["key"], a["value"], node.meta["val"]
    metas = [n.meta.get("val") if isinstance(n, fx.Node) else None for n in (q_node, k_node, v_node)]
    check_dtype(*metas, out, dtypes=F32_OR_BF16)
    q_meta, k_meta, v_meta = metas
    rank = q_meta.dim()
    if rank < 3 or k_meta.dim() != rank or v_meta.dim() != rank or \
            not (q_meta.shape[:-2] == k_meta.shape[:-2] == v_meta.shape[:-2]):
        raise Unsupported("query, key and value of one rank (3 or more) and the same batch dims")
    *batch, queries, width = (int(d) for d in q_meta.shape)
    keys, value_width = int(k_meta.shape[-2]), int(v_meta.shape[-1])
    scale = a["scale"] if a.get("scale") is not None else 1.0 / math.sqrt(width)
    bias, may_drop = _mask_tensors(builder, a.get("attn_mask"), queries, keys, bool(a.get("is_causal")))
    q, k, v = (_strided(builder, n) for n in (q_node, k_node, v_node))
    k_t = _transposed(k)

    # S = (Q K^T) * scale + bias, in float32 (bfloat16 inputs too)
    scores_md = plain_md([*batch, queries, keys], torch.float32)
    natural = None if bias is None else _padded(bias.shape if isinstance(bias, torch.Tensor) else bias.meta["val"].shape, rank)
    bias_offers = None if bias is None else _operand_layouts(natural, scores_md)
    pd, bias_layout = _fast_matmul(builder, q.md, k_t.md, scores_md, scale, AlgKind.binary_add, bias_offers)
    probs_md = scores_md if out.dtype == torch.float32 else plain_md(scores_md.dims, out.dtype)
    out_md = output_md(node, out.dtype)
    keep_layout = None
    if may_drop:
        keep_offers = _operand_layouts([*natural[:-1], value_width], out_md)
        keep_layout = _fast_matmul(builder, probs_md, v.md, out_md, None, AlgKind.binary_mul, keep_offers)[1]
    bias_value = keep_value = None
    if isinstance(bias, fx.Node):
        bias_value, keep_value = _computed_mask(builder, bias, bias_layout, keep_layout)
    elif bias is not None:
        bias_value = _constant_operand(builder, bias, bias_layout, f"{node.name}.bias")
        if may_drop:
            keep = attention_bias(builder.constant_values(a["attn_mask"]))[1]
            keep_value = _constant_operand(builder, keep, keep_layout, f"{node.name}.keep")
    scores = Value(f"{node.name}.scores", pd.dst_md())
    reads = [q, k_t] + ([bias_value] if bias_value is not None else [])
    post_args = {arg_post_op_src1(1): bias_value} if bias_value is not None else {}
    text = f"%{scores.name} : Float({', '.join(str(d) for d in scores_md.dims)}) = dnnl::matmul"
    text += f"[scale={scale:g}, {_format_info(pd)}]({', '.join(f'%{r.name}' for r in reads)})"
    builder.add_primitive(text, pd, {ARG_SRC: q, ARG_WEIGHTS: k_t, ARG_DST: scores, **post_args}, reads, [scores])

    # P = softmax(S), in place (in bfloat16 for bfloat16 attention)
    softmax = softmax_pd(builder.engine, scores.md, rank - 1, probs_md)
    probs = Value(f"{node.name}.probs", probs_md, ALIAS, scores) if probs_md == scores.md else \
        Value(f"{node.name}.probs", probs_md)
    text = f"%{probs.name} = dnnl::softmax[axis={rank - 1}](%{scores.name})"
    builder.add_primitive(text, softmax, {ARG_SRC: scores, ARG_DST: probs}, [scores], [probs])

    # O = (P V) * keep
    pd, _ = _fast_matmul(builder, probs.md, v.md, out_md, None, AlgKind.binary_mul, None if keep_layout is None else [keep_layout])
    result = builder.define(node, pd.dst_md())
    reads = [probs, v] + ([keep_value] if keep_value is not None else [])
    post_args = {arg_post_op_src1(0): keep_value} if keep_value is not None else {}
    label = "dnnl::matmul_mul" if keep_value is not None else "dnnl::matmul"
    builder.add_primitive(node_text(node, label, _format_info(pd), [f"%{r.name}" for r in reads]), pd,
                          {ARG_SRC: probs, ARG_WEIGHTS: v, ARG_DST: result, **post_args}, reads, [result])


LOWERINGS = {aten.scaled_dot_product_attention.default: lower_attention}
