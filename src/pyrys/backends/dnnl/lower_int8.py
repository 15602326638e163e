"""int8 in the dnnl backend: the quantize/dequantize spelling of ``passes/quantize.py`` as int8 primitives.

    %x_q  = quantize(%x, s_x)          x * (1/s_x) written u8/s8 (a binary multiply; a scaled reorder into
                                       the layout int8 convs read), of %x in f32 or bf16; or nothing: the
                                       conv making %x writes u8/s8 itself when this is its one reader
    %x_dq = dequantize(%x_q, s_x)      nothing, unless an op reads it in float32 (then a reorder, made then)
    %W_dq = dequantize_per_channel(%W_int8, %s_W, ...)   nothing: the conv packs %W_int8 itself
    %y    = pyrys::conv(%x_dq, %W_dq, %b)  one u8/s8 x s8 primitive, int32 sums, with the runtime scales
                                       src = s_x, weights = s_W[o] and (writing int8) dst = s_y:

    y = post_ops(s_x * s_W[o] * sum(q_x * q_W) + b[o])      then, for an int8 result, round(y / s_y)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from pyrys.backends.dnnl.builder import Builder, Unsupported, node_text
from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.constants import (ARG_ATTR_SCALES, ARG_DST, ARG_FROM, ARG_SRC, ARG_SRC_0, ARG_SRC_1, ARG_TO,
                                          ARG_WEIGHTS, AlgKind, DataType)
from pyrys.backends.dnnl.descriptors import binary_pd, reorder_pd
from pyrys.backends.dnnl.int8_dst import COMMUTING, int8_quant, quantized_reader, scale_value
from pyrys.backends.dnnl.layout import plain_md, policy_md
from pyrys.backends.dnnl.lower_ops import is_bf16_to_float32, same_layout_md
from pyrys.backends.dnnl.post_ops import Operand, operand_of
from pyrys.backends.dnnl.primitives import PrimitiveAttr
from pyrys.backends.dnnl.tensors import dnnl_dtype
from pyrys.backends.dnnl.values import Value
from pyrys.ir.fused import FUSED_CONV, FUSED_CONV_TRANSPOSE, Fused
from pyrys.ir.released import values_of
from pyrys.quantization import DEQUANTIZE, DEQUANTIZE_WEIGHT, QUANTIZE, TensorQuant, weight_max, weight_step


@dataclass(frozen=True)
class Int8Op:
    """What an int8 conv or linear reads: the quantized input (the quantize node), its quantization, the int8
    weight and its scales, and the quantization it writes (None: it writes float32)."""

    src: fx.Node
    src_quant: TensorQuant
    weight: torch.Tensor
    weight_scales: torch.Tensor
    dst_quant: TensorQuant | None

    def attr(self, post_ops, weight_mask: int) -> PrimitiveAttr:
        """Post-ops and the scales (given at execution) of src, weights (``weight_mask``: the output-channel
        dims) and, writing int8, dst."""
        scales = {ARG_SRC: 0, ARG_WEIGHTS: weight_mask}
        if self.dst_quant is not None:
            scales[ARG_DST] = 0
        return PrimitiveAttr(post_ops, scales=scales)

    def scale_args(self, builder: Builder, name: str) -> dict[int, Value]:
        """The runtime scales, as constant values."""
        args = {ARG_ATTR_SCALES | ARG_SRC: scale_value(builder, self.src_quant.scale, f"{name}.src_scale"),
                ARG_ATTR_SCALES | ARG_WEIGHTS: builder.constant_value(self.weight_scales, None, f"{name}.weight_scales")}
        if self.dst_quant is not None:
            args[ARG_ATTR_SCALES | ARG_DST] = scale_value(builder, self.dst_quant.scale, f"{name}.dst_scale")
        return args

    def note(self, dst: DataType) -> str:
        """``, int8=[src=.., weights=s8, dst=..]`` of a program line, for a primitive writing ``dst``."""
        return f", int8=[src={_short(self.src_quant.dtype)}, weights=s8, dst={DataType(dst).name}]"


def read_int8(builder: Builder, node: fx.Node, fused: Fused, residual: bool = True) -> Int8Op | None:
    """``node`` read as an int8 op (its input a dequantize, its weight a dequantize of constants), or None."""
    x, weight = fused.args["input"], fused.args["weight"]
    if not (isinstance(x, fx.Node) and x.target is DEQUANTIZE and isinstance(weight, fx.Node)
            and weight.target is DEQUANTIZE_WEIGHT):
        return None
    q_weight, scales, zero_points = (builder.constant(a) for a in weight.args[:3])
    if q_weight is None or scales is None or weight.args[3] != 0 or weight.args[6] != torch.int8:
        raise Unsupported("an int8 weight that is not a constant quantized per output channel")
    if zero_points is not None and bool(zero_points.ne(0).any()):
        raise Unsupported("an int8 weight with zero points")
    src_quant = int8_quant(x)
    if src_quant is None:
        raise Unsupported("an int8 input with a zero point or a narrower range")
    convolution = fused.kind.op is FUSED_CONV
    w_max = weight_max(src_quant.dtype, convolution)
    if -weight.args[4] != weight.args[5] or weight.args[5] > w_max:
        raise Unsupported(f"weights in -{weight.args[5]}..{weight.args[5]}: this CPU's int8 kernels take "
                          f"-{w_max}..{w_max} for {src_quant.dtype} inputs (without VNNI their 16-bit sums saturate)")
    # (values_of, not builder.constant_values: that marks the weight read as it lies, never released)
    if weight_step(src_quant.dtype, convolution) == 2 and bool(values_of(q_weight).remainder(2).any()):
        raise Unsupported("odd int8 weights for a convolution reading s8: oneDNN's AVX2 kernels halve them (a "
                          "graph quantized for another CPU; optimize again here)")
    return Int8Op(x.args[0], src_quant, q_weight, scales.to(torch.float32), _written_quant(node, fused, residual))


def _written_quant(node: fx.Node, fused: Fused, residual: bool) -> TensorQuant | None:
    """The quantization the op writes: that of its one reader (through max poolings), a quantize node, when
    each residual it adds in int8 is one it can sum (``residual``: at most one, an ``add``: see
    :func:`post_operands`); else None (float32).  Float32 post-op operands are read as they are."""
    reader = node
    while len(reader.users) == 1 and next(iter(reader.users)).target in COMMUTING:  # q(max_pool(y)) = max_pool(q(y))
        reader = next(iter(reader.users))
    quant = quantized_reader(reader)
    dequantized = [p for p in fused.post_inputs if p.target is DEQUANTIZE]
    if quant is None or not dequantized:
        return quant
    added = dict(zip(fused.post_inputs, [p.name for p in fused.post_ops if p.binary]))
    if not residual or len(dequantized) > 1 or added[dequantized[0]] != "add":
        return None
    return quant if int8_quant(dequantized[0]) is not None else None


def post_operands(builder: Builder, node: fx.Node, fused: Fused, int8: Int8Op | None) -> list[Operand]:
    """The post-op operands of a fused op: an int8 op writing int8 reads its int8 residual as it is (the
    quantized value, added with its scale: ``y = post_ops(acc + s_r * q_r)``), in place when this op is its
    last reader; every other operand is read in float32."""
    writes_int8 = int8 is not None and int8.dst_quant is not None
    return [_int8_operand(builder, node, n) if writes_int8 and n.target is DEQUANTIZE else operand_of(builder, n)
            for n in fused.post_inputs]


def _int8_operand(builder: Builder, node: fx.Node, dequantized: fx.Node) -> Operand:
    return Operand(builder.value_of(dequantized.args[0]), _last_reader(node, dequantized),
                   TensorQuant.of_node(dequantized).scale)


def _last_reader(node: fx.Node, dequantized: fx.Node) -> bool:
    """Whether ``node`` reads the quantized value behind ``dequantized`` once and after everything else that
    reads it (so that its buffer may take ``node``'s result)."""
    quantized = dequantized.args[0]
    readers = [user for user in quantized.users if user.target is not DEQUANTIZE]
    readers += [user for d in quantized.users if d.target is DEQUANTIZE for user in d.users]
    if sum(1 for arg in tree_leaves((node.args, node.kwargs)) if arg is dequantized) != 1:
        return False
    later = set()
    cursor = node.next
    while cursor.op != "root":
        later.add(cursor)
        cursor = cursor.next
    return not any(reader in later for reader in readers if reader is not node)


def lower_quantize(builder: Builder, node: fx.Node) -> None:
    """``quantize_per_tensor``: the int8 value its producer wrote (see :func:`_written_quant`), else
    ``q = round(x * (1 / s))``, saturated: a binary multiply (:func:`_quantizing_multiply`), or a reorder
    with the scale into the layout int8 convolutions read (or where there is no such binary kernel)."""
    quant = int8_quant(node)
    if quant is None:
        raise Unsupported("quantization with a zero point or a narrower range")
    source = node.args[0]
    if is_bf16_to_float32(source):  # converted for this quantize only (lower_ops.lower_convert): read bf16
        source = source.args[0]
    x = builder.value_of(source)
    if x.md.dtype == dnnl_dtype(quant.dtype):
        builder.values[node] = x  # written by its producer in int8 already
        return
    if x.md.dtype not in (DataType.f32, DataType.bf16):
        raise Unsupported("quantizing a value that is neither float32 nor bfloat16")
    md = same_layout_md(x, x.md.dims, quant.dtype)
    if node.users and all(_read_as_int8_by_convs(user) for user in node.users):
        md = policy_md(x.md.dims, quant.dtype, "nhwc")  # straight into the layout oneDNN's int8 convs read
    elif _quantizing_multiply(builder, node, x, md, quant.scale):
        return
    _scaled_reorder(builder, node, x, md, {ARG_DST: quant.scale})


def _quantizing_multiply(builder: Builder, node: fx.Node, x: Value, md, scale: float) -> bool:
    """``q = x * (1 / s)`` as a binary multiply by a constant writing u8/s8 (rounding to nearest even,
    saturating, as torch's quantize): oneDNN 3.2's jit binary does it 1.8-3x as fast as its scaled reorder
    (Sapphire Rapids, 1x128x768: 13.2 against 4.3 G elements/s; 8x197x768: 7.4 against 4.1).  False where
    it has no such kernel (then the reorder)."""
    inverse = torch.full([1] * len(x.md.dims), 1.0 / scale, dtype=torch.float32)
    try:
        pd = binary_pd(builder.engine, AlgKind.binary_mul, x.md, plain_md(inverse.shape, torch.float32), md)
    except DnnlError:
        return False
    if not pd.impl_info().startswith("jit"):
        return False
    factor = builder.constant_value(inverse, None, f"{node.name}.inverse_scale")
    out = builder.define(node, pd.dst_md())
    text = node_text(node, "dnnl::binary_mul", f"format_info=[{x.layout()} -> {out.layout()}], "
                                               f"dst_scale={scale:.6g}", [f"%{x.name}"])
    builder.add_primitive(text, pd, {ARG_SRC_0: x, ARG_SRC_1: factor, ARG_DST: out}, [x], [out])
    return True


def _read_as_int8_by_convs(dequantize: fx.Node) -> bool:
    return dequantize.target is DEQUANTIZE and bool(dequantize.users) and all(
        user.target in (FUSED_CONV, FUSED_CONV_TRANSPOSE) for user in dequantize.users)


def lower_dequantize(builder: Builder, node: fx.Node) -> None:
    """``dequantize_per_tensor``: made only when an op reads it in float32 (int8 ops read the quantized value):
    a reorder ``x = s * q``."""
    quant = int8_quant(node)
    if quant is None:
        raise Unsupported("quantization with a zero point or a narrower range")

    def define() -> None:
        q = builder.value_of(node.args[0])
        _scaled_reorder(builder, node, q, same_layout_md(q, q.md.dims, torch.float32), {ARG_SRC: quant.scale})

    builder.value_of(node.args[0])  # the quantized value exists (else this runs through torch)
    builder.defer(node, define)


def lower_dequantize_weight(builder: Builder, node: fx.Node) -> None:
    """``dequantize_per_channel`` of constants: nothing unless an op reads the float32 weight (then the
    float32 values, computed once, as a constant)."""
    if any(builder.constant(a) is None for a in node.args[:2]):
        raise Unsupported("dequantizing a weight that is not a constant")

    def define() -> None:
        q, scales, zero_points = (builder.constant_values(a) for a in node.args[:3])
        values = node.target(q, scales, zero_points, *node.args[3:])
        builder.values[node] = builder.constant_value(values, None, node.name)

    builder.defer(node, define)


def _scaled_reorder(builder: Builder, node: fx.Node, x: Value, md, scales: dict[int, float]) -> None:
    attr = PrimitiveAttr(scales={arg: 0 for arg in scales})
    pd = reorder_pd(builder.engine, x.md, md, attr)
    out = builder.define(node, pd.dst_md())
    args = {ARG_FROM: x, ARG_TO: out}
    for arg, scale in scales.items():
        args[ARG_ATTR_SCALES | arg] = scale_value(builder, scale, f"{node.name}.scale")
    (arg, scale), = scales.items()
    text = node_text(node, "dnnl::reorder", f"format_info=[{x.layout()} -> {out.layout()}], "
                                            f"{'dst' if arg == ARG_DST else 'src'}_scale={scale:.6g}", [f"%{x.name}"])
    builder.add_primitive(text, pd, args, [x], [out])


def _short(dtype: torch.dtype) -> str:
    return {torch.uint8: "u8", torch.int8: "s8"}[dtype]


LOWERINGS = {QUANTIZE: lower_quantize, DEQUANTIZE: lower_dequantize, DEQUANTIZE_WEIGHT: lower_dequantize_weight}
