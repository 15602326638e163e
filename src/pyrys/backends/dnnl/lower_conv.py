"""Lowering of the fused ops (convolution, transposed convolution, linear) with their post-op chains.

Every conv and linear arrives as its fused op (``passes/legalize.py``), read by name through
:func:`pyrys.ir.fused.read_fused`.

Weights are reordered once, at compile time, into the layout the primitive asked for
(``format_tag_any``).  The source keeps its producer's layout when the primitive has a
fast implementation for it; otherwise it is reordered into the policy's layout.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.backends.dnnl import int8_or_float, linear_kernels, linear_primitive
from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.builder import F32_OR_BF16, Builder, Unsupported, check_dtype, node_text
from pyrys.backends.dnnl.constants import ARG_BIAS, ARG_DST, ARG_SRC, ARG_WEIGHTS, arg_post_op_src1
from pyrys.backends.dnnl.descriptors import convolution_pd, deconvolution_pd, inner_product_pd, matmul_pd
from pyrys.backends.dnnl.layout import plain_md, policy_md
from pyrys.backends.dnnl.lower_int8 import Int8Op, post_operands, read_int8
from pyrys.backends.dnnl.post_ops import Chain, Operand, build_chain, operand_of
from pyrys.backends.dnnl.primitives import MemoryDesc, PrimitiveAttr, PrimitiveDesc
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH, dnnl_dtype
from pyrys.backends.dnnl.values import ALIAS, Value, broadcast_of
from pyrys.ir.fused import Fused, conv_padding, read_fused
from pyrys.ir.released import values_of
from pyrys.ir.vocabulary import INT8
from pyrys.passes.precision import CONVERT


def _grouped_weight_dims(weight: torch.Tensor, groups: int) -> list[int]:
    out, rest = weight.shape[0], list(weight.shape[1:])
    return [groups, out // groups, *rest] if groups > 1 else [out, *rest]


def is_reference(pd: PrimitiveDesc) -> bool:
    """oneDNN's reference code, alone (``ref:any``) or inside a composite (``conv:any+ref:any``)."""
    return "ref:" in pd.impl_info()


def _first_fast(candidates) -> PrimitiveDesc:
    """The first primitive descriptor that builds and is not a reference implementation, else the last that
    builds: the candidates offer the weights' layout ``any`` last, and a reference kernel given weights
    packed for another kernel read them wrong (int8 weights halved for AVX2's s8 kernels: a new batch size's
    conv whose post-op only the reference kernel takes erred 0.18; a helper's find)."""
    fallback, errors = None, []
    for make in candidates:
        try:
            pd = make()
        except DnnlError as error:
            errors.append(str(error))
            continue
        if not is_reference(pd):
            return pd
        fallback = pd
    if fallback is None:
        raise Unsupported("oneDNN has no implementation: " + "; ".join(errors[-1:]))
    return fallback


def format_info(pd: PrimitiveDesc) -> str:
    """``format_info=[src=.., weights=.., dst=..], impl=..`` of a program line."""
    return (f"format_info=[src={pd.src_md().layout_tag()}, weights={pd.weights_md().layout_tag()}, "
            f"dst={pd.dst_md().layout_tag()}], impl={pd.impl_info()}")


def _finish(builder: Builder, node: fx.Node, pd: PrimitiveDesc, src: Value, weight: torch.Tensor,
            bias: torch.Tensor | None, chain: Chain, label: str, note: str = "", int8: Int8Op | None = None) -> Value:
    """Reorder weights, define the output (in place on a sum base), and add the step."""
    weights = builder.constant_value(weight, pd.weights_md(), f"{node.name}.weight")
    args = {ARG_SRC: src, ARG_WEIGHTS: weights}
    if int8 is not None:
        args.update(int8.scale_args(builder, node.name))
        note += int8.note(pd.dst_md().dtype)
    if bias is not None:
        args[ARG_BIAS] = builder.constant_value(bias, None, f"{node.name}.bias")
    if chain.sum_base is not None:
        dst = builder.define(node, pd.dst_md(), ALIAS, chain.sum_base)
    else:
        dst = builder.define(node, pd.dst_md())
    args[ARG_DST] = dst
    for index, operand in chain.binary_operands.items():
        args[arg_post_op_src1(index)] = operand
    reads = [src, *chain.binary_operands.values()] + ([chain.sum_base] if chain.sum_base else [])
    operands = [f"%{v.name}" for v in reads]
    builder.add_primitive(node_text(node, label, format_info(pd) + note, operands, dst), pd, args, reads, [dst],
                          unlike_eager_on_nonfinite=chain.unlike_eager_on_nonfinite)
    return dst


def destination_dtype(node: fx.Node, int8: bool = False) -> torch.dtype:
    """The data type the primitive writes: the node's own, or float32 where a bfloat16 result's one reader
    converts it to float32 (``passes/precision.py``), or bfloat16 where an int8 op's one reader converts its
    float32 result to bfloat16 (a bf16 op reads it): the kernel accumulates in float32 and rounds once to
    what it writes, without a reorder (the conversion becomes an alias).  (oneDNN documents bf16
    destinations for int8 and bf16 sources, not for float32 ones.)"""
    dtype = node.meta["val"].dtype
    users = list(node.users)
    if len(users) != 1 or users[0].target is not CONVERT:
        return dtype
    wanted = users[0].meta["val"].dtype
    if (dtype, wanted) == (torch.bfloat16, torch.float32) or (int8 and (dtype, wanted) == (torch.float32,
                                                                                       torch.bfloat16)):
        return wanted
    return dtype


def _dst_dtype(node: fx.Node, int8: Int8Op | None) -> torch.dtype:
    """What a conv or linear writes: its int8 result's type where it is quantized, else :func:`destination_dtype`."""
    if int8 is not None and int8.dst_quant is not None:
        return int8.dst_quant.dtype
    return destination_dtype(node, int8 is not None)


def _dtype_note(dtype: torch.dtype, node: fx.Node) -> str:
    return f", dst_dtype={dnnl_dtype(dtype).name}" if dtype != node.meta["val"].dtype else ""


def _layouts_to_try(policy: str) -> list[str]:
    """The policy's layout first; channels-last next, for convs the blocked kernels do not cover
    (e.g. groups whose width is not a multiple of the block run only in oneDNN's reference code)."""
    return [policy] if policy == "nhwc" else [policy, "nhwc"]


def _per_dim(values, rank: int) -> list[int]:
    """torch allows one value for every spatial dim: ``[1]`` -> ``[1, 1]``."""
    return list(values) * (rank if len(values) == 1 else 1)


def _lower_conv_like(builder: Builder, node: fx.Node, fused: Fused, weight: torch.Tensor,
                     bias: torch.Tensor | None, create, int8: Int8Op | None = None, weight_mask: int = 1) -> None:
    """Shared by convolution and deconvolution: the post-op chain and the primitive in the best layout,
    then the step.  ``weight`` is already in oneDNN's logical dims; ``create(src, weights, dst, bias, attr)``
    makes the primitive descriptor.  ``int8``: it reads int8 (``lower_int8.py``); ``weight_mask``: the dims of
    ``weight`` its per-output-channel scales run over."""
    out = node.meta["val"]
    source = int8.src if int8 is not None else fused.args["input"]
    check_dtype(source.meta["val"], dtypes=F32_OR_BF16 | INT8 if int8 is not None else F32_OR_BF16)
    check_dtype(out, dtypes=F32_OR_BF16)  # bfloat16 in, float32 out: a bf16 op with a float32 residual
    x = builder.value_of(source)
    w_mds, b_md = builder.weight_layouts(weight), None if bias is None else plain_md(bias.shape, bias.dtype)
    dst_dtype = _dst_dtype(node, int8)
    for layout in _layouts_to_try(builder.policy):
        snapshot = builder.snapshot()
        dst_md = policy_md(out.shape, dst_dtype, layout)
        chain = build_chain(builder, fused.post_ops, post_operands(builder, node, fused, int8), dst_md)
        attr = int8.attr(chain.post_ops, weight_mask) if int8 is not None else PrimitiveAttr(chain.post_ops)
        sources = (x.md, policy_md(x.md.dims, source.meta["val"].dtype, layout))
        pd = _first_fast([lambda src=src, w_md=w_md: create(src, w_md, dst_md, b_md, attr)
                          for w_md in w_mds for src in sources])
        if not is_reference(pd) or layout == "nhwc":
            break
        builder.restore(snapshot, node)
    _finish(builder, node, pd, builder.convert(x, pd.src_md()), weight, bias, chain, f"dnnl::{fused.label}",
            _dtype_note(dst_dtype, node) if int8 is None else "", int8)


def _constant_weights(builder: Builder, a: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight, bias = builder.constant(a["weight"]), builder.constant(a["bias"])
    if weight is None or (a["bias"] is not None and bias is None):
        raise Unsupported("weights are not constants")
    return weight, bias


def lower_conv(builder: Builder, node: fx.Node) -> None:
    fused = read_fused(node)
    a = fused.args
    int8 = read_int8(builder, node, fused)
    if int8 is not None:
        weight, bias = int8.weight, builder.constant(a["bias"])
        if a["bias"] is not None and bias is None:
            raise Unsupported("the bias is not a constant")
    else:
        weight, bias = _constant_weights(builder, a)
    rank = weight.dim() - 2
    stride, dilation = (_per_dim(a[k], rank) for k in ("stride", "dilation"))
    begin, end = conv_padding(a["padding"], rank)

    patches = int8 is not None and _patches(weight.shape[2:], stride, begin + end, dilation)

    def create(src, weights, dst, bias_md, attr):
        pd = convolution_pd(builder.engine, src, weights, dst, bias_md, strides=stride, padding_l=begin,
                            padding_r=end, dilation=dilation, attr=attr)
        return _past_amx_brgconv(pd) if patches else pd

    grouped = weight.reshape(_grouped_weight_dims(weight, a["groups"]))
    weight_mask = 0b11 if a["groups"] > 1 else 0b1  # the output channels: (G, O/G) grouped, O plain
    _lower_conv_like(builder, node, fused, grouped, bias, create, int8, weight_mask)


def _patches(kernel, stride, padding, dilation) -> bool:
    """Whether a convolution cuts its input into patches: kernel = stride > 1, no padding, no dilation (a
    patch embedding, ConvNeXt's downsampling)."""
    return (all(k == s > 1 for k, s in zip(kernel, stride)) and not any(padding)
            and all(d == 1 for d in dilation))


def _past_amx_brgconv(pd: PrimitiveDesc) -> PrimitiveDesc:
    """``pd`` moved past oneDNN 3.2's AMX int8 brgconv, which computes a patch convolution wrongly for some
    channel counts (96, 144, 160, 224 or 288 input channels: errors of 0.6-1.5 against eager, ConvNeXt-T's
    downsampling; 16-128 and 192 were right; its AVX-512 VNNI and AVX2 VNNI brgconv are right on all of them).
    Raises :class:`Unsupported` where no other implementation is left."""
    while pd.impl_info().startswith("brgconv") and "amx" in pd.impl_info():
        if not pd.next_impl():
            raise Unsupported("oneDNN 3.2's AMX int8 patch convolution is wrong for some channel counts, and it "
                              "has no other implementation here")
    return pd


def lower_linear(builder: Builder, node: fx.Node) -> None:
    """``y = x W^T + b`` on ``x`` viewed as 2-D (leading dims flattened): an inner product, or a matmul on
    ``W^T`` where :mod:`linear_primitive` says so."""
    fused = read_fused(node)
    a = fused.args
    out = node.meta["val"]
    rows = out.numel() // out.shape[-1]
    int8, in_float32 = read_int8(builder, node, fused, residual=False), ""
    if int8 is not None:
        in_float32 = int8_or_float.float32_instead(builder, int8, rows, a["bias"] is not None)
    if in_float32:  # the same numbers in float32: the dequantized input and weight the graph names
        weight, int8 = int8_or_float.float_weight(builder, a["weight"], int8), None
    else:
        weight = int8.weight if int8 is not None else builder.constant(a["weight"])
    bias = builder.constant(a["bias"])
    if weight is None or weight.dim() != 2 or (a["bias"] is not None and bias is None):
        raise Unsupported("linear weights are not 2-D constants")
    source = int8.src if int8 is not None else a["input"]
    check_dtype(source.meta["val"], dtypes=F32_OR_BF16 | INT8 if int8 is not None else F32_OR_BF16)
    check_dtype(out, dtypes=F32_OR_BF16)  # bfloat16 in, float32 out: a bf16 op with a float32 residual
    x = _as_2d(builder, builder.value_of(source), rows)
    dst_dtype = _dst_dtype(node, int8)
    dst_md = plain_md([rows, weight.shape[0]], dst_dtype)
    operands = [_operand_2d(builder, n, rows, out.shape) for n in fused.post_inputs]
    chain = build_chain(builder, fused.post_ops, operands, dst_md)
    note = _dtype_note(dst_dtype, node) if int8 is None else ""
    note += f"{int8_or_float.IN_FLOAT32}{in_float32}]" if in_float32 else ""
    pd = None
    if linear_primitive.as_matmul(rows, weight, builder.packed):
        # x [rows, in] @ W^T [in, out]: the weight's transposed view is what is packed (the same view every build)
        weight_t, bias_row = weight.t(), None if bias is None else bias.reshape(1, -1)
        pd = _matmul_linear_pd(builder, x, weight_t, bias_row, dst_md, chain, int8)
        # the brgemm kernel the rule measured, or any where the weight is packed for a matmul already (packed once)
        packed_as_matmul = linear_primitive.packed_for_matmul(weight, builder.packed)
        if pd is not None and (pd.impl_info().startswith("brg") or packed_as_matmul):
            weight, bias, note = weight_t, bias_row, note + ", as=matmul"
        else:
            pd = None
    if pd is None:
        pd = _inner_product_pd(builder, x, weight, bias, dst_md, chain, int8)
    dst = _finish(builder, node, pd, x, weight, bias, chain, f"dnnl::{fused.label}", note, int8)
    if out.dim() != 2:
        builder.values[node] = Value(node.name, plain_md(out.shape, dst_dtype), ALIAS, dst)


def _inner_product_pd(builder: Builder, x: Value, weight: torch.Tensor, bias: torch.Tensor | None,
                      dst_md: MemoryDesc, chain: Chain, int8: Int8Op | None) -> PrimitiveDesc:
    """``dst [rows, out] = x [rows, in] W^T + b`` as an inner product on ``W [out, in]``."""
    b_md = None if bias is None else plain_md(bias.shape, bias.dtype)
    attr = int8.attr(chain.post_ops, 0b1) if int8 is not None else PrimitiveAttr(chain.post_ops)  # scales per out
    layouts = builder.weight_layouts(weight)
    if int8 is None:
        layouts = linear_kernels.weight_layouts(builder.engine, x.md, weight, dst_md, b_md, layouts,
                                                builder.packed.layouts_of(weight, plain=True), builder.kernel_choices)
    return _first_fast([lambda w_md=w_md: inner_product_pd(builder.engine, x.md, w_md, dst_md, b_md, attr=attr)
                        for w_md in layouts])


def _matmul_linear_pd(builder: Builder, x: Value, weight_t: torch.Tensor, bias_row: torch.Tensor | None,
                      dst_md: MemoryDesc, chain: Chain, int8: Int8Op | None) -> PrimitiveDesc | None:
    """The same as a matmul on ``W^T [in, out]`` with a ``[1, out]`` bias; None where oneDNN has only its
    reference code for it."""
    b_md = None if bias_row is None else plain_md(bias_row.shape, bias_row.dtype)
    attr = int8.attr(chain.post_ops, 0b10) if int8 is not None else PrimitiveAttr(chain.post_ops)  # scales per out
    try:
        pd = _first_fast([lambda w_md=w_md: matmul_pd(builder.engine, x.md, w_md, dst_md, b_md, attr=attr)
                          for w_md in builder.weight_layouts(weight_t)])
    except Unsupported:
        return None
    return None if is_reference(pd) else pd


def _as_2d(builder: Builder, value: Value, rows: int) -> Value:
    """``value`` (made plain) viewed as ``(rows, -1)``."""
    plain = builder.to_plain(value)
    dims = plain.md.dims
    if len(dims) == 2:
        return plain
    return Value(f"{plain.name}.2d", plain.md.reshape([rows, _numel(dims) // rows]), ALIAS, plain)


def _operand_2d(builder: Builder, node: fx.Node, rows: int, out_shape) -> Operand:
    """A post-op operand of a linear run on ``rows`` rows, as 2-D: one row where it is the same for every row;
    viewed as ``(rows, -1)`` where it has every row (its last dim the output's or 1); else (it broadcasts over
    some leading dims but not all: ``(B, 1, N)`` or ``(L, N)`` added to ``(B, L, N)``) broadcast to every row,
    a constant once, a computed one by a copy each call."""
    operand = operand_of(builder, node)
    out_shape = list(out_shape)
    dims = list(operand.constant.shape) if operand.constant is not None else list(operand.value.md.dims)
    if len(dims) > len(out_shape):
        raise Unsupported(f"a post-op operand of shape {dims} has more dims than the linear's output {out_shape}")
    padded = [1] * (len(out_shape) - len(dims)) + dims
    if operand.constant is not None:
        constant = operand.constant
        if all(d == 1 for d in padded[:-1]):
            constant = constant.reshape(1, -1)
        else:
            constant = values_of(constant).expand(out_shape).reshape(rows, -1)  # a released one's values
        return Operand(None, False, constant=constant, name=operand.name)
    if all(d == 1 for d in padded[:-1]):
        return Operand(_as_2d(builder, operand.value, 1), operand.exclusive)
    if padded[:-1] == out_shape[:-1]:
        return Operand(_as_2d(builder, operand.value, rows), operand.exclusive)
    source = builder.to_plain(operand.value)
    full = out_shape[:-1] + padded[-1:]
    view = broadcast_of(source, f"{source.name}.expanded", full)
    copy = builder.copy(view, plain_md(full, DNNL_TO_TORCH[source.md.dtype]))
    return Operand(_as_2d(builder, copy, rows), True)


def _numel(dims) -> int:
    count = 1
    for d in dims:
        count *= d
    return count


def _deconv_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """torch (I, O/G, k...) -> oneDNN ([G,] O/G, I/G, k...): a view of the weight, the same one every build,
    so that the packed copy is made once (the packer reads it whatever its strides)."""
    in_channels, out_per_group, *kernel = weight.shape
    grouped = weight.reshape(groups, in_channels // groups, out_per_group, *kernel).transpose(1, 2)
    return grouped if groups > 1 else grouped[0]


def lower_deconv(builder: Builder, node: fx.Node) -> None:
    """Transposed convolution; torch's output_padding p_o becomes oneDNN's padding_r = p - p_o."""
    fused = read_fused(node)
    a = fused.args
    weight, bias = _constant_weights(builder, a)
    rank = weight.dim() - 2
    stride, padding, output_padding, dilation = (
        _per_dim(a[k], rank) for k in ("stride", "padding", "output_padding", "dilation"))
    padding_r = [p - o for p, o in zip(padding, output_padding)]

    def create(src, weights, dst, bias_md, attr):
        return deconvolution_pd(builder.engine, src, weights, dst, bias_md, strides=stride, padding_l=padding,
                                padding_r=padding_r, dilation=dilation, attr=attr)

    _lower_conv_like(builder, node, fused, _deconv_weight(weight, a["groups"]), bias, create)
