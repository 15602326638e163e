"""Attention in oneDNN: ``scaled_dot_product_attention`` as matmul -> softmax -> matmul.

    S = (Q K^T) * scale + bias      one matmul; the scale and the mask are its post-ops
    P = softmax(S, -1)              in place, over S's buffer
    O = (P V) * keep                one matmul, written in the layout its reader wants

Q, K and V are read where they lie (the strided head views of a projection's output: no copy),
``K^T`` is a permuted view of K, except where oneDNN has its brgemm kernel only for compact operands:
the heads of one merged projection (``passes/merge_linears.py``) have the merged row's stride, which
oneDNN 3.2 runs in its gemm kernel.  In bfloat16 that is 1.6-2.5x slower than the brgemm kernel on a
compact copy (scores of 12 heads x 197 x 64 on AMX: 112 us against 69; 24 us more for the copies in a
ViT-base program, 365 us against 135 per layer for both matmuls), so bfloat16 heads are copied compact
first (:func:`_compact_is_faster`); in float32 the two kernels are within 7-17% (AVX-512), less than the
copies cost, and the heads stay views.  ``bias`` is the mask as an additive float: 0 where a boolean mask
attends and ``MASKED`` (-1e30) where it does not, a float mask as it is (a query whose every key is -inf:
``MASKED`` there), keys after the query's position for ``is_causal``.  A finite ``MASKED`` keeps a query
whose every key is masked from giving NaN (``exp(-1e30 - max)`` is 0 wherever one key is kept); torch
gives such a query 0, which ``keep`` (1 where the query keeps a key, else 0) restores.  (A float mask
raised to -1e30 everywhere lost what told its values below apart: a query whose keys were all masked by
-1e31 and -1e35 attended to all alike, where torch attends to the -1e31 key alone; a helper's find.)  A constant mask
is read once, when the program is built; a computed one each call, by one torch step that every
attention reading that mask shares.  The output is written in the layout that makes its readers'
``transpose(1, 2)`` (the heads merged back) a contiguous view.

Attention whose scores outgrow ``SCORES_BLOCK_BYTES`` runs a block at a time (:func:`blockings`): the three
steps per block, every block reusing one scores buffer, so that the scores are read back from cache rather
than memory.  A block takes as many batch indices as fit, or else a block of queries of every head; in
bfloat16, where that block is not compact and oneDNN 3.2 gives it a slower kernel than the whole
(:func:`_blocks_lose_brgemm`), a block of one head's queries, the heads copied compact one after another
(the output too, reordered once for the heads' merge).  Measured in one process, interleaved, a
projection and its attention (Sapphire Rapids, bf16): ViT-base's shapes at batch 8 0.95x of the unblocked
time, Whisper's encoder (1500 queries, 9 MB of scores per head) 0.95x; float32 at batch 8 and 16 0.98x.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from pyrys.backends.dnnl import attention_kernels, torch_attention
from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.builder import F32_OR_BF16, Builder, Unsupported, check_dtype, md_type, node_text
from pyrys.backends.dnnl.constants import ARG_DST, ARG_SRC, ARG_WEIGHTS, AlgKind, DataType, arg_post_op_src1
from pyrys.backends.dnnl.descriptors import matmul_pd, softmax_pd
from pyrys.backends.dnnl.layout import contiguous_strides, plain_md
from pyrys.backends.dnnl.lower_conv import format_info, is_reference
from pyrys.backends.dnnl.primitives import MemoryDesc, PostOps, PrimitiveAttr, PrimitiveDesc
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH
from pyrys.backends.dnnl.values import ALIAS, DYNAMIC, Value, part_of
from pyrys.ir.graph import op_args
from pyrys.ir.vocabulary import PERMUTES, VIEWS, permutation

aten = torch.ops.aten
MASKED = -1e30  # a masked score: exp(MASKED - max) is 0 next to any real score, and never NaN
# Attention runs in blocks whose scores take about this much (blockings): Whisper's encoder (1500 queries and
# keys, 6 heads: 54 MB of scores per layer) ran 0.83x of the time of one block in blocks of 6-12 MB, 0.86x in
# 4 MB, 0.93x in 2 MB and 0.97x in 32 MB (Sapphire Rapids, 2 cores, 2 MB of L2 each; float32); ViT-base at
# batch 8 in bf16 within 4% from 2 to 8 MB, 0.86x of unblocked; Whisper's encoder in bf16 on an AVX-512 BF16
# EPYC without AMX (1 MB of L2 per core) 0.72x in 8 MB, 0.74-0.76x in 1-4 MB, 0.80x in 0.5 MB
# (benchmarks/attention_blocks_ab.py); a block of fewer than 16 queries makes too small a matrix product
SCORES_BLOCK_BYTES = 8 << 20
MIN_BLOCK_ROWS = 16


def attention_bias(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bias, keep)`` of an SDPA mask: the additive float32 mask, and float32 1/0 per query (the mask's
    last dim reduced) saying whether it keeps any key."""
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, MASKED)
        keep = mask.any(-1, keepdim=True)
    else:
        bias = mask.float()
        keep = (bias != float("-inf")).any(-1, keepdim=True)
        bias = bias.masked_fill(~keep, MASKED)  # only where every key is -inf: elsewhere -inf and -1e35 stay
    return bias, keep.float()


def masks_nothing(mask: torch.Tensor) -> bool:
    """Whether an SDPA mask keeps every score as it is: all True, or all 0.0."""
    return bool(mask.all() if mask.dtype == torch.bool else (mask == 0).all())


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
    if masks_nothing(constant):
        return None, False  # HF ViT's all-True mask: adding it changes no score
    bias, keep = attention_bias(constant)
    return bias, not bool(keep.all())


def _operand_layouts(natural: list[int], dst: MemoryDesc) -> list[tuple[list[int], list[int]]]:
    """The ``(dims, strides)`` to offer a matmul's binary post-op operand, fastest first.  oneDNN's fast
    kernels broadcast an operand over any dim but the first, into a contiguous destination: the first dim
    expanded, then the full shape.  A broadcast operand into a strided destination crashed oneDNN's brgemm
    matmul (tests/backends/dnnl/test_attention.py), so there the operand takes the destination's own shape
    and strides.  Contiguous means contiguous strides on every dim: oneDNN's descriptors compare equal
    whatever a dim of 1's stride is, but its brgemm kernel reads that stride (one query written into
    merged heads, ``(B, H, 1, E)`` with strides ``(H*E, E, H*E, 1)``, crashed with a broadcast operand)."""
    full = list(dst.dims)
    if list(dst.strides) != contiguous_strides(full):
        return [(full, list(dst.strides))]
    expanded = [full[0], *natural[1:]]
    return [(expanded, contiguous_strides(expanded)), (full, contiguous_strides(full))]


def _expanded(tensor: torch.Tensor, layout: tuple[list[int], list[int]]) -> torch.Tensor:
    """``tensor`` broadcast to ``layout``'s dims, in new memory with its strides."""
    dims, strides = layout
    return torch.empty_strided(dims, strides, dtype=tensor.dtype).copy_(_padded_expand(tensor, dims))


def _padded_expand(tensor: torch.Tensor, dims: list[int]) -> torch.Tensor:
    return tensor.reshape(_padded(tensor.shape, len(dims))).expand(dims)


def _constant_operand(builder: Builder, tensor: torch.Tensor, layout: tuple, name: str) -> Value:
    """A constant post-op operand, packed once in ``layout``."""
    dims, strides = layout
    logical = _padded_expand(tensor, dims).contiguous()
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
            if not masks_nothing(mask):
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
               binary: tuple[AlgKind, MemoryDesc] | None) -> PrimitiveDesc | None:
    """A matmul descriptor, ``dst = (src @ weights) [* scale] [alg operand]``; None where oneDNN runs it only
    in its reference code."""
    chain = PostOps()
    if scale is not None:
        chain.append_eltwise(AlgKind.eltwise_linear, scale, 0.0)
    if binary is not None:
        chain.append_binary(*binary)
    pd = matmul_pd(builder.engine, src, weights, dst, attr=PrimitiveAttr(chain))
    return None if is_reference(pd) else pd


def _reference_only(src: MemoryDesc, weights: MemoryDesc) -> Unsupported:
    return Unsupported(f"oneDNN runs this matmul only in its reference code ({src.format_summary()} x "
                       f"{weights.format_summary()})")


def _fast_matmul(builder: Builder, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc, scale: float | None,
                 alg: AlgKind, operand_layouts: list[tuple] | None) -> tuple[PrimitiveDesc, tuple | None]:
    """The first fast matmul over the operand layouts offered (None: no binary post-op), and that layout."""
    for layout in operand_layouts or [None]:
        operand = None if layout is None else (alg, plain_md(layout[0], torch.float32, layout[1]))
        pd = _matmul_pd(builder, src, weights, dst, scale, operand)
        if pd is not None:
            return pd, layout
    raise _reference_only(src, weights)


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
    if rank < 3 or k_meta.dim() != rank or v_meta.dim() != rank or not _batch_broadcasts(q_meta, k_meta, v_meta):
        raise Unsupported("query, key and value of one rank (3 or more), the key's and value's batch dims the "
                          "query's or 1 (one key and value head for every query head)")
    *batch, queries, width = (int(d) for d in q_meta.shape)
    keys, value_width = int(k_meta.shape[-2]), int(v_meta.shape[-1])
    if 0 in (queries, keys, width, value_width, *batch):
        raise Unsupported("attention over an empty dim")
    scale = a["scale"] if a.get("scale") is not None else 1.0 / math.sqrt(width)
    bias, may_drop = _mask_tensors(builder, a.get("attn_mask"), queries, keys, bool(a.get("is_causal")))
    q, k, v = (_strided(builder, n) for n in (q_node, k_node, v_node))
    start, read = builder.snapshot(), (q, k, v)
    scores_md = plain_md([*batch, queries, keys], torch.float32)
    k_t = _transposed(k)
    probs_md = scores_md if out.dtype == torch.float32 else plain_md(scores_md.dims, out.dtype)
    out_md = output_md(node, out.dtype)
    compact_qk = _compact_is_faster(builder, q.md, k_t.md, scores_md)
    compact_v = _compact_is_faster(builder, probs_md, v.md, out_md)
    # in blocks where a block's operands are whole buffers: oneDNN's kernels misread a broadcast operand that
    # is a slice of a larger one, so a keep (a computed mask has one) runs all at once
    whole = Blocks(rank - 2, queries)
    choices = [whole] if may_drop else blockings(q.md.dims, keys)
    blocks = next(b for b in choices if b == whole or not _blocks_lose_brgemm(
        builder, _compact_md(q.md, b) if compact_qk else q.md, _compact_md(k_t.md, b) if compact_qk else k_t.md, b))
    if compact_qk:
        q, k_t = _compact(builder, q, blocks), _compact(builder, k_t, blocks)
    if compact_v:
        v = _compact(builder, v, blocks)

    # S = (Q K^T) * scale + bias, in float32 (bfloat16 inputs too)
    natural = None if bias is None else _padded(bias.shape if isinstance(bias, torch.Tensor) else bias.meta["val"].shape, rank)
    bias_offers = None if bias is None else _operand_layouts(natural, scores_md)
    bias_layout = _fast_matmul(builder, q.md, k_t.md, scores_md, scale, AlgKind.binary_add, bias_offers)[1]
    keep_layout = None
    if may_drop:
        keep_offers = _operand_layouts([*natural[:-1], value_width], out_md)
        keep_layout = _fast_matmul(builder, probs_md, v.md, out_md, None, AlgKind.binary_mul, keep_offers)[1]
    bias_value = keep_value = bias_rows = None
    if isinstance(bias, fx.Node):
        bias_value, keep_value = _computed_mask(builder, bias, bias_layout, keep_layout)
    elif bias is not None:
        bias_rows = (_padded_expand(bias, bias_layout[0]).contiguous(), bias_layout, natural)  # packed per block
        if may_drop:
            keep = attention_bias(builder.constant_values(a["attn_mask"]))[1]
            keep_value = _constant_operand(builder, keep, keep_layout, f"{node.name}.keep")
    operands = Operands(q, k_t, v, bias_value, keep_value, scale, out.dtype, bias_rows)
    snapshot = builder.snapshot()
    try:
        _emit(builder, node, operands, out_md, blocks, compact_v)
    except (Unsupported, DnnlError):
        if blocks == whole:
            raise
        builder.restore(snapshot, node)  # a block oneDNN has no fast kernel for: the whole at once
        _emit(builder, node, operands, out_md, whole, compact_v)
    if scores_md.size() > attention_kernels.TIMED_SCORES_BYTES:
        torch_attention.instead_if_faster(builder, node, start, read, out_md, a, bias is not None or may_drop)


def _emit(builder: Builder, node: fx.Node, o: Operands, out_md: MemoryDesc, blocks: Blocks, compact: bool) -> None:
    """The blocks, written into the node's value; or, where a block is one head (``blocks.singles``) and
    oneDNN 3.2 gives its values matmul the brgemm kernel only with a compact destination (bfloat16: where V
    was copied compact, or the node's value is laid out for the heads' merge, a head's rows 6 heads apart:
    Whisper's encoder, 0.27 against 0.22 ms a block on an AVX-512 BF16 EPYC), into a compact buffer that
    one reorder then lays out as the node's value."""
    staged = _compact_md(out_md, blocks)
    if not blocks.singles or staged == out_md or not (compact or _staging_keeps_brgemm(builder, o, out_md, staged, blocks)):
        _emit_blocks(builder, node, o, builder.define(node, out_md), blocks)
        return
    heads = Value(f"{node.name}.heads", staged)
    _emit_blocks(builder, node, o, heads, blocks)
    builder.define(node, out_md, ALIAS, alias_of=builder.copy(heads, out_md))


def _staging_keeps_brgemm(builder: Builder, o: Operands, out_md: MemoryDesc, staged: MemoryDesc, blocks: Blocks) -> bool:
    """Whether the first block's bfloat16 values matmul gets oneDNN's brgemm kernel writing into ``staged``
    and not writing into its part of ``out_md``."""
    if o.v.md.dtype != DataType.bf16:
        return False
    dims, keys = list(o.q.md.dims), o.k_t.md.dims[-1]
    offsets, counts = blocks.parts(dims)[0]
    probs = plain_md([*counts[:-1], keys], o.dtype)
    v = _part_md(o.v.md, offsets, counts, dims, len(dims) - 2)
    into_out, into_staged = (_matmul_kernel(builder, probs, v, _part_md(md, offsets, counts, dims, len(dims) - 1))
                             for md in (out_md, staged))
    return into_staged.startswith("brg") and not into_out.startswith("brg")


def _compact_md(md: MemoryDesc, blocks: Blocks | None = None) -> MemoryDesc:
    """``md`` with no gaps.  Where ``blocks`` split a batch or head dim, the batch dims go outermost, in
    order, so that one index of them is one compact matrix; else every dim keeps its place in memory."""
    strides, step = [0] * md.ndims, 1
    innermost_first = sorted(range(md.ndims), key=lambda d: (md.strides[d], md.dims[d]))
    if blocks is not None and blocks.splits_batch(md.ndims):
        innermost_first = [d for d in innermost_first if d >= md.ndims - 2] + list(reversed(range(md.ndims - 2)))
    for dim in innermost_first:
        strides[dim] = step
        step *= md.dims[dim]
    return MemoryDesc.from_strides(md.dims, md.dtype, strides)


def _matmul_kernel(builder: Builder, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc) -> str:
    """The implementation oneDNN gives a matmul of these operands (``brg:avx512_core_amx``, ``gemm:jit:bf16``)."""
    try:
        return matmul_pd(builder.engine, src, weights, dst).impl_info()
    except DnnlError:
        return ""


def _compact_is_faster(builder: Builder, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc) -> bool:
    """Whether a bfloat16 matmul gets oneDNN's brgemm kernel only on compact copies of its operands (module
    docstring).  An operand broadcast along a dim (stride 0) stays as it is."""
    broadcast = any(s == 0 and d > 1 for md in (src, weights) for s, d in zip(md.strides, md.dims))
    if weights.dtype != DataType.bf16 or broadcast:
        return False
    compact = [_compact_md(md) for md in (src, weights)]
    if compact == [src, weights] or _matmul_kernel(builder, src, weights, dst).startswith("brg"):
        return False
    return _matmul_kernel(builder, *compact, dst).startswith("brg")


def _blocks_lose_brgemm(builder: Builder, q: MemoryDesc, k_t: MemoryDesc, blocks: Blocks) -> bool:
    """Whether a bfloat16 scores matmul gets oneDNN's brgemm kernel on every query at once and not on the
    first of ``blocks`` (oneDNN 3.2 gives a batched operand whose batch strides are not those of a compact
    one its gemm kernel: a block of the queries of several heads)."""
    if k_t.dtype != DataType.bf16:
        return False
    keys, dims = k_t.dims[-1], q.dims
    whole_kernel = _matmul_kernel(builder, q, k_t, plain_md([*dims[:-1], keys], torch.float32))
    offsets, counts = blocks.parts(dims)[0]
    q_block = _part_md(q, offsets, counts, dims, q.ndims - 1)
    k_block = _part_md(k_t, offsets, counts, dims, q.ndims - 2)
    block_kernel = _matmul_kernel(builder, q_block, k_block, plain_md([*counts[:-1], keys], torch.float32))
    return whole_kernel.startswith("brg") and whole_kernel != block_kernel


def _compact(builder: Builder, value: Value, blocks: Blocks) -> Value:
    """``value`` itself where it is compact already (as ``blocks`` need it), else a compact copy of it."""
    compact = _compact_md(value.md, blocks)
    return value if value.md == compact else builder.convert(value, compact)


def _batch_broadcasts(query, key, value) -> bool:
    """Whether every batch dim of ``key`` and ``value`` is the query's, or 1 and broadcast (multi-query
    attention: one key and value head serves every query head; oneDNN's matmul broadcasts its weights)."""
    return all(k in (q, 1) and v == k for q, k, v in zip(query.shape[:-2], key.shape[:-2], value.shape[:-2]))


@dataclass(frozen=True)
class Operands:
    """What one attention reads: ``Q``, ``K^T``, ``V``, the mask's bias and keep (or None), the scale, and the
    output's data type."""

    q: Value
    k_t: Value
    v: Value
    bias: Value | None
    keep: Value | None
    scale: float
    dtype: torch.dtype
    bias_rows: tuple | None = None  # a constant bias: its values (broadcast), layout and own dims, packed per block


@dataclass(frozen=True)
class Blocks:
    """Attention a block at a time: ``size`` indices of Q's dim ``dim`` per block, and each index of Q's first
    ``singles`` dims on its own; the scores, the output and a constant mask split alike, K and V along their
    batch dims only (a dim they broadcast stays whole)."""

    dim: int
    size: int
    singles: int = 0

    def splits_batch(self, rank: int) -> bool:
        return self.singles > 0 or self.dim < rank - 2

    def parts(self, dims) -> list[tuple[list[int], list[int]]]:
        """``(offsets, counts)`` per dim of Q, for each block in order."""
        ranges = [[(i, 1) for i in range(dims[d])] for d in range(self.singles)]
        ranges.append([(s, min(self.size, dims[self.dim] - s)) for s in range(0, dims[self.dim], self.size)])
        parts = []
        for choice in itertools.product(*ranges):
            offsets, counts = [0] * len(dims), list(dims)
            for d, (offset, count) in zip([*range(self.singles), self.dim], choice):
                offsets[d], counts[d] = offset, count
            parts.append((offsets, counts))
        return parts

    def label(self, offsets, counts, dims) -> str:
        """A block as an index (``[0:4]``, ``[:, :, 16:32]``, ``[0, 3, 0:752]``); empty for the whole."""
        items = [str(o) if d < self.singles else ":" if c == n else f"{o}:{o + c}"
                 for d, (o, c, n) in enumerate(zip(offsets, counts, dims))]
        while items and items[-1] == ":":
            items.pop()
        return f"[{', '.join(items)}]" if items else ""


def blockings(query_dims, keys: int) -> list[Blocks]:
    """The ways to split attention whose scores do not fit ``SCORES_BLOCK_BYTES``, best first; the whole last.

    1. blocks of the outermost batch or head dim longer than 1 (every dim before it is 1), as many indices of
       it as fit: each block keeps the whole's kernel;
    2. blocks of queries of every head at once, a multiple of ``MIN_BLOCK_ROWS``, as few as fit;
    3. blocks of queries of one head at a time, where bfloat16 loses oneDNN's brgemm kernel on 2
       (:func:`_blocks_lose_brgemm`; Whisper's encoder: 1500 queries and keys, 9 MB of scores per head);
    4. the whole."""
    *batch, queries, _ = query_dims
    rank = len(query_dims)
    whole = Blocks(rank - 2, queries)
    scores = math.prod(batch) * queries * keys * 4
    if scores <= SCORES_BLOCK_BYTES:
        return [whole]
    outer = next((d for d, n in enumerate(batch) if n > 1), None)
    choices = []
    if outer is not None and scores // batch[outer] <= SCORES_BLOCK_BYTES:
        choices.append(Blocks(outer, SCORES_BLOCK_BYTES // (scores // batch[outer])))
    choices.append(Blocks(rank - 2, _rows(queries, scores)))
    if batch and scores // math.prod(batch) > SCORES_BLOCK_BYTES:
        choices.append(Blocks(rank - 2, _rows(queries, scores // math.prod(batch)), singles=rank - 2))
    return [*choices, whole]


def _rows(queries: int, scores: int) -> int:
    """Queries per block: the fewest blocks whose ``scores`` bytes fit, a multiple of ``MIN_BLOCK_ROWS``."""
    blocks = -(-scores // SCORES_BLOCK_BYTES)
    return min(queries, -(-queries // blocks // MIN_BLOCK_ROWS) * MIN_BLOCK_ROWS)


def _part_md(md: MemoryDesc, offsets, counts, dims, split: int) -> MemoryDesc:
    """The descriptor of ``md``'s part ``counts`` (over Q's ``dims``) along its first ``split`` dims (those
    it broadcasts stay whole), starting at 0; its dims of 1 get the span inside them as their stride
    (``primitives.canonical_strides``): oneDNN 3.2 takes a batch stride that is not for its brgemm kernel
    (one head of several)."""
    part = [c if d < split and md.dims[d] == dims[d] else md.dims[d] for d, c in enumerate(counts)]
    if part == list(md.dims):
        return md
    return md.submemory(part, [0] * md.ndims)


def _part(value: Value | None, blocks: Blocks, offsets, counts, dims, split: int) -> Value | None:
    """``value``'s part of a block (:func:`_part_md`): a view; ``value`` itself where it is the whole."""
    if value is None:
        return None
    md = _part_md(value.md, offsets, counts, dims, split)
    if md is value.md:
        return value
    start = [o if d < split and value.md.dims[d] == dims[d] else 0 for d, o in enumerate(offsets)]
    part = part_of(value, value.name + blocks.label(start, md.dims, value.md.dims), list(md.dims), start)
    part.md = md  # the same bytes, its dims of 1 strided as compact
    return part


def _leading(value: Value, counts) -> Value:
    """A contiguous buffer of dims ``counts`` at the start of ``value``'s memory (a smaller last block reusing
    the scores buffer; a broadcast post-op operand needs a contiguous destination)."""
    if list(counts) == list(value.md.dims):
        return value
    return Value(f"{value.name}[:{counts[-2]}]", plain_md(counts, DNNL_TO_TORCH[value.md.dtype]), ALIAS, value)


def _emit_blocks(builder: Builder, node: fx.Node, o: Operands, result: Value, blocks: Blocks) -> None:
    """The three steps per block; every block reuses one scores buffer."""
    dims = list(o.q.md.dims)
    rank, keys, last = len(dims), o.k_t.md.dims[-1], len(dims) - 1
    parts = blocks.parts(dims)
    scores = Value(f"{node.name}.scores", plain_md([*parts[0][1][:-1], keys], torch.float32))
    probs_md = scores.md if o.dtype == torch.float32 else plain_md(scores.md.dims, o.dtype)
    probs = Value(f"{node.name}.probs", probs_md, ALIAS, scores) if probs_md == scores.md else \
        Value(f"{node.name}.probs", probs_md)
    packed = {}
    for offsets, counts in parts:
        block = blocks.label(offsets, counts, dims)
        q, out = (_part(x, blocks, offsets, counts, dims, rank - 1) for x in (o.q, result))
        k_t, v = (_part(x, blocks, offsets, counts, dims, rank - 2) for x in (o.k_t, o.v))
        keep, bias = o.keep, _constant_bias(builder, node, o, blocks, offsets, counts, dims, packed) or o.bias
        s, p = (_leading(x, [*counts[:-1], keys]) for x in (scores, probs))

        # S = (Q K^T) * scale + bias, in float32 (bfloat16 inputs too)
        pd = _block_pd(builder, q, k_t, s, o.scale, bias and (AlgKind.binary_add, bias))
        reads = [q, k_t] + ([bias] if bias is not None else [])
        text = f"%{scores.name}{block} : Float({', '.join(str(d) for d in s.md.dims)}) = dnnl::matmul"
        text += f"[scale={o.scale:g}, {format_info(pd)}]({', '.join(f'%{r.name}' for r in reads)})"
        post_args = {arg_post_op_src1(1): bias} if bias is not None else {}
        builder.add_primitive(text, pd, {ARG_SRC: q, ARG_WEIGHTS: k_t, ARG_DST: s, **post_args}, reads, [s])

        # P = softmax(S), in place (in bfloat16 for bfloat16 attention)
        softmax = softmax_pd(builder.engine, s.md, last, p.md)
        text = f"%{probs.name}{block} : {md_type(p.md)} = dnnl::softmax[axis={last}](%{scores.name}{block})"
        builder.add_primitive(text, softmax, {ARG_SRC: s, ARG_DST: p}, [s], [p], unlike_eager_on_nonfinite=True)

        # O = (P V) * keep, into the block's part of the output
        pd = _block_pd(builder, p, v, out, None, keep and (AlgKind.binary_mul, keep))
        reads = [p, v] + ([keep] if keep is not None else [])
        label = "dnnl::matmul_mul" if keep is not None else "dnnl::matmul"
        post_args = {arg_post_op_src1(0): keep} if keep is not None else {}
        text = node_text(node, label, format_info(pd), [f"%{r.name}" for r in reads])
        if result.name != node.name or block:
            text = text.replace(f"%{node.name} :", f"%{result.name}{block} :", 1)
        builder.add_primitive(text, pd, {ARG_SRC: p, ARG_WEIGHTS: v, ARG_DST: out, **post_args}, reads, [out])


def _constant_bias(builder: Builder, node: fx.Node, o: Operands, blocks: Blocks, offsets, counts, dims,
                   packed: dict) -> Value | None:
    """A constant bias for the block: the whole where it broadcasts every dim the block splits, else the
    block's part as its own buffer, each packed once (kept in ``packed``).  None for a computed bias, or
    none."""
    if o.bias_rows is None:
        return None
    values, (whole_dims, strides), natural = o.bias_rows
    split = [d for d in range(len(dims) - 1) if counts[d] < dims[d] and whole_dims[d] != 1]
    if not split:
        if "whole" not in packed:
            packed["whole"] = builder.constant_value(values, plain_md(whole_dims, torch.float32, strides),
                                                     f"{node.name}.bias")
        return packed["whole"]
    # along a dim the mask itself broadcasts (a causal mask's batch and heads) every block's part is the same
    starts = {d: offsets[d] if natural[d] != 1 else 0 for d in split}
    key = tuple((d, starts[d], counts[d]) for d in split)
    if key not in packed:
        part = values
        for d in split:
            part = part.narrow(d, starts[d], counts[d])
        label = blocks.label(offsets, counts, dims)
        packed[key] = builder.constant_value(part.contiguous(), None, f"{node.name}.bias{label}")
    return packed[key]


def _block_pd(builder: Builder, src: Value, weights: Value, dst: Value, scale: float | None, binary) -> PrimitiveDesc:
    pd = _matmul_pd(builder, src.md, weights.md, dst.md, scale, binary and (binary[0], binary[1].md))
    if pd is None:
        raise _reference_only(src.md, weights.md)
    return pd


LOWERINGS = {aten.scaled_dot_product_attention.default: lower_attention}
