"""Lowering of the layout-agnostic and normalization ops: eltwise, binary, pooling, concat,
softmax, layer norm, batch norm, resampling, reduction, and views.

Ops without a layout preference run in their producer's layout (their output takes it too).
"""
from __future__ import annotations


import operator

import torch
import torch.fx as fx

from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.builder import F32_OR_BF16, Builder, Unsupported, check_dtype, node_text
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH, dnnl_dtype
from pyrys.backends.dnnl.constants import (
    ARG_ATTR_SCALES, ARG_DST, ARG_FROM, ARG_MEAN, ARG_MULTIPLE_SRC, ARG_SCALE, ARG_SHIFT, ARG_SRC, ARG_SRC_1, ARG_TO, ARG_VARIANCE,
    AlgKind,
)
from pyrys.backends.dnnl.int8_dst import (INT8_DTYPES, quantized_reader, quantizing_attr, quantizing_note,
                                          read_quantized, scale_value, with_int8_dst)
from pyrys.backends.dnnl.descriptors import (
    batch_norm_pd, binary_pd, concat_pd, eltwise_pd, layer_norm_pd, pooling_pd, reduction_pd, reorder_pd, resampling_pd,
    softmax_pd,
)
from pyrys.backends.dnnl.layout import POLICY_TAGS, plain_md, policy_md
from pyrys.backends.dnnl.post_ops import UNLIKE_EAGER_ON_NONFINITE, eltwise_post_ops, eltwise_steps
from pyrys.backends.dnnl.primitives import MemoryDesc, PrimitiveAttr
from pyrys.backends.dnnl.values import broadcast_of, ALIAS, PLANNED, Value, part_of
from pyrys.ir.finite import known_positive
from pyrys.ir.fused import FUSED_CONV, FUSED_CONV_TRANSPOSE
from pyrys.ir.graph import op_args
from pyrys.ir.post_ops import ACTIVATIONS, NoPostOp, PostOp, activation_post_op, scalar_post_op
from pyrys.ir.vocabulary import PERMUTES, POOLS, VIEWS, permutation
from pyrys.quantization import QUANTIZE

aten = torch.ops.aten


def same_layout_md(value: Value, shape, dtype: torch.dtype | None = None) -> MemoryDesc:
    """A descriptor for ``shape`` in the same kind of layout as ``value`` (policy tag or plain), of
    ``value``'s data type or ``dtype``.

    A broadcast operand in its partner's layout keeps oneDNN on its fast per-channel paths
    (a plain ``(1, C, 1, 1)`` next to a blocked tensor sends binary ops to the reference kernel).
    """
    dtype = dtype or DNNL_TO_TORCH[value.md.dtype]
    layout = value.layout()
    for tags in POLICY_TAGS.values():
        for tag in tags.values():
            if tag.name == layout and len(shape) == value.md.ndims:
                return MemoryDesc.from_tag([int(s) for s in shape], dnnl_dtype(dtype), tag)
    return plain_md(shape, dtype)


def _unary(builder: Builder, node: fx.Node, post_op: PostOp) -> None:
    _steps(builder, node, eltwise_steps(post_op, builder.sees_nonfinite), post_op.name,
           post_op.name in UNLIKE_EAGER_ON_NONFINITE)


def _steps(builder: Builder, node: fx.Node, steps: list, name: str, unlike_eager: bool) -> None:
    """One eltwise primitive; a chain of steps runs as the post-ops of ``x + 0`` (a binary
    primitive: oneDNN's eltwise primitive takes post-ops only on its reference code)."""
    x = builder.value_of(node.args[0])
    check_dtype(node.args[0].meta["val"], node.meta["val"], dtypes=F32_OR_BF16)
    (alg, alpha, beta), *rest = steps
    text = node_text(node, f"dnnl::{name}", f"format_info=[{x.layout()}]", [f"%{x.name}"])
    if not rest:
        pd = eltwise_pd(builder.engine, alg, x.md, x.md, alpha, beta)
        out = builder.define(node, pd.dst_md())
        return builder.add_primitive(text, pd, {ARG_SRC: x, ARG_DST: out}, [x], [out], unlike_eager_on_nonfinite=unlike_eager)
    zero = builder.constant_value(torch.zeros([1] * x.md.ndims), same_layout_md(x, [1] * x.md.ndims), "zero")
    pd = binary_pd(builder.engine, AlgKind.binary_add, x.md, zero.md, x.md, PrimitiveAttr(eltwise_post_ops(steps)))
    out = builder.define(node, pd.dst_md())
    builder.add_primitive(text, pd, {ARG_SRC: x, ARG_SRC_1: zero, ARG_DST: out}, [x], [out], unlike_eager_on_nonfinite=unlike_eager)


def lower_unary(builder: Builder, node: fx.Node) -> None:
    try:
        post_op = activation_post_op(node.target, op_args(node))
    except NoPostOp as reason:
        raise Unsupported(str(reason)) from None
    _unary(builder, node, post_op)


BINARY_ALGS = {aten.add.Tensor: AlgKind.binary_add, aten.mul.Tensor: AlgKind.binary_mul,
               aten.sub.Tensor: AlgKind.binary_sub, aten.div.Tensor: AlgKind.binary_div}


def lower_binary(builder: Builder, node: fx.Node) -> None:
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
        raise Unsupported("alpha")
    out = node.meta["val"]
    check_dtype(out, dtypes=F32_OR_BF16)
    if isinstance(b, (int, float)) and isinstance(a, fx.Node):
        check_dtype(a.meta["val"], out, dtypes=F32_OR_BF16)
        post_op = scalar_post_op(node.target, b)
        if isinstance(post_op, str):
            raise Unsupported(post_op)
        return _unary(builder, node, post_op)  # x * c as pow(c x^1), one multiply; x + c as linear(x + c)
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        raise Unsupported("operands")
    check_dtype(a.meta["val"], b.meta["val"], out, dtypes=F32_OR_BF16)
    if tuple(a.meta["val"].shape) != tuple(out.shape) and node.target in (aten.add.Tensor, aten.mul.Tensor):
        a, b = b, a  # commutative: put the full-shape operand first
    if tuple(a.meta["val"].shape) != tuple(out.shape) or builder.constant(a) is not None:
        raise Unsupported("the first operand is broadcast or constant")
    x, x_scale = read_quantized(builder, a)  # int8 with its scale where int8 layers share it (int8_dst.py)
    y = _second_operand(builder, b, x)
    quant = quantized_reader(node)

    def create(quant):
        dst_md = same_layout_md(x, x.md.dims, out.dtype if quant is None else quant.dtype)
        attr = quantizing_attr(quant, scales={ARG_SRC: 0} if x_scale is not None else None)
        return binary_pd(builder.engine, BINARY_ALGS[node.target], x.md, y.md, dst_md, attr)
    try:
        pd, quant = with_int8_dst(create, _writable_int8(quant, x))
    except DnnlError:
        if x_scale is None:
            raise
        x, x_scale = builder.value_of(a), None  # no int8 kernel for it: it reads the dequantized value
        pd, quant = with_int8_dst(create, _writable_int8(quant, x))
    result = builder.define(node, pd.dst_md())
    label = f"dnnl::{node.target._schema.name.split('::')[1]}"
    note = quantizing_note(quant) + (f", src_scale={x_scale:.6g}" if x_scale is not None else "")
    text = node_text(node, label, f"format_info=[{x.layout()}, {y.layout()}]{note}", [f"%{x.name}", f"%{y.name}"])
    args = {ARG_SRC: x, ARG_SRC_1: y, ARG_DST: result}
    if x_scale is not None:
        args[ARG_ATTR_SCALES | ARG_SRC] = scale_value(builder, x_scale, f"{node.name}.src_scale")
    builder.add_primitive(text, pd, args, [x, y], [result])


def _writable_int8(quant, x: Value):
    """``quant``, or None where a binary op reading ``x`` must not write int8: oneDNN 3.2's jit:uni binary kernel
    writing s8 or u8 from float32 or bf16 with a post-op (the destination's scale) into a blocked layout whose
    channels are padded (6 in aBcd8b) crashed the process (SIGSEGV; a helper's find: an int8 guard's float32
    convs feeding ``a / (b.abs() + 1e-3)`` under ``layout="blocked8"``).  There it writes its own data type,
    and the quantize after it converts."""
    padded = x.md.padded_dims != x.md.dims
    return None if quant is not None and padded and x.md.dtype not in INT8_DTYPES else quant


def _broadcast_dims(shape, ndims: int) -> list[int]:
    """``shape`` with leading 1s up to ``ndims`` (oneDNN broadcasts along dims of size 1)."""
    return [1] * (ndims - len(shape)) + [int(s) for s in shape]


def _second_operand(builder: Builder, node: fx.Node, x: Value) -> Value:
    """The second operand in ``x``'s layout: reordered once now if constant, else where needed."""
    md = same_layout_md(x, _broadcast_dims(node.meta["val"].shape, x.md.ndims), node.meta["val"].dtype)
    constant = builder.constant(node)
    if constant is not None:
        return builder.constant_value(constant, md, node.name)
    return builder.convert(builder.value_of(node), md)


# elementwise math with no post-op form, op -> (its oneDNN eltwise step, from the op's arguments); an
# exponent oneDNN computes as an approximation (through exp and log) is left to torch
# elementwise math with no post-op form: op -> its oneDNN eltwise steps, from the op's arguments (or why
# torch computes it).  Each step is one operation, as in torch's kernels (sqrt within one rounding of torch's): a
# product by -1 or a reciprocal is pow with exponent 1 or -1, which oneDNN computes as one multiply or
# divide; other exponents go through exp and log, and stay torch's.  rsqrt is 1 / sqrt(x) where x is known
# positive (RMSNorm's mean of squares plus eps): oneDNN gives +inf for -0 (torch: -inf), and pow(x, -0.5)
# also 0 for -inf (torch: NaN).
ELEMENTWISE = {
    aten.rsqrt.default: lambda a: ([(AlgKind.eltwise_sqrt, 0.0, 0.0), (AlgKind.eltwise_pow, 1.0, -1.0)]
                                   if known_positive(a["input"]) else "rsqrt of a value not known positive "
                                   "(oneDNN's gives +inf for -0)"),
    aten.sqrt.default: lambda a: [(AlgKind.eltwise_sqrt, 0.0, 0.0)],
    aten.abs.default: lambda a: [(AlgKind.eltwise_abs, 0.0, 0.0)],
    aten.neg.default: lambda a: [(AlgKind.eltwise_pow, -1.0, 1.0)],
    aten.pow.Tensor_Scalar: lambda a: ([(AlgKind.eltwise_square, 0.0, 0.0)] if a["exponent"] == 2 else
                                       f"pow to {a['exponent']!r} (oneDNN's goes through exp and log)"),
}


def lower_elementwise(builder: Builder, node: fx.Node) -> None:
    """``rsqrt``, ``sqrt``, ``abs``, ``neg``, ``pow(x, 2)`` (RMSNorm's steps) as eltwise steps."""
    steps = ELEMENTWISE[node.target](op_args(node))
    if isinstance(steps, str):
        raise Unsupported(steps)
    _steps(builder, node, steps, node.target._schema.name.split("::")[1], unlike_eager=False)


def _pool_padding(size: int, out: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    """Right padding that makes oneDNN produce ``out`` elements (covers ceil_mode)."""
    return (out - 1) * stride + (kernel - 1) * dilation + 1 - size - pad


def _pool(builder: Builder, node: fx.Node, alg: AlgKind, kernel, stride, padding, dilation=None) -> None:
    check_dtype(node.args[0].meta["val"], node.meta["val"], dtypes=F32_OR_BF16)
    out = builder.define(node, None)
    if alg != AlgKind.pooling_max:  # an average reads int8 with its scale where it can (int8_dst.py)
        x, x_scale = read_quantized(builder, node.args[0])
        if x_scale is not None:
            try:
                return _pool_into(builder, node, out, x, alg, kernel, stride, padding, node.meta["val"].shape,
                                  dilation, x_scale)
            except DnnlError:
                pass  # no int8 kernel for it: it reads the dequantized value
    x = builder.value_of(node.args[0])
    _pool_into(builder, node, out, x, alg, kernel, stride, padding, node.meta["val"].shape, dilation)


def _pool_into(builder: Builder, node: fx.Node, out: Value, x: Value, alg: AlgKind, kernel, stride, padding,
               out_shape, dilation=None, x_scale: float | None = None) -> None:
    """Pooling of ``x`` into ``out`` (whose descriptor is set here); ``x_scale``: ``x`` is int8 with this scale
    (an average is linear: the result is multiplied by it)."""
    rank = len(kernel)
    in_spatial, out_spatial = x.md.dims[2:], out_shape[2:]
    dilation = dilation or [1] * rank
    right = [_pool_padding(in_spatial[i], out_spatial[i], kernel[i], stride[i], padding[i], dilation[i])
             for i in range(rank)]
    if alg != AlgKind.pooling_max and right != list(padding):
        raise Unsupported("ceil_mode average pooling")
    written = x_scale is None and x.md.dtype in INT8_DTYPES  # int8 already, for the quantize after (max pooling)
    quant = None if written else quantized_reader(node)  # int8: int8_dst.py
    dtype = DNNL_TO_TORCH[x.md.dtype] if written else node.meta["val"].dtype

    def create(quant):
        dst_md = same_layout_md(x, out_shape, dtype if quant is None else quant.dtype)
        return pooling_pd(builder.engine, alg, x.md, dst_md, kernel=kernel, strides=stride, padding_l=padding,
                          padding_r=right, dilation=dilation, attr=quantizing_attr(quant, x_scale or 1.0))
    pd, quant = with_int8_dst(create, quant)
    out.md = pd.dst_md()
    text = node_text(node, f"dnnl::{alg.name}", f"kernel={list(kernel)}, format_info=[{x.layout()}]"
                                               f"{quantizing_note(quant)}", [f"%{x.name}"], out)
    builder.add_primitive(text, pd, {ARG_SRC: x, ARG_DST: out}, [x], [out], unlike_eager_on_nonfinite=alg == AlgKind.pooling_max)


def _expand(values, rank: int) -> list[int]:
    values = list(values)
    return values * rank if len(values) == 1 else values


def _spatial_rank(node: fx.Node) -> int:
    """The pooling op's number of spatial dims, its input being (N, C, spatial...); Unsupported otherwise
    (an unbatched input reaches here only if legalize did not batch it)."""
    rank = POOLS[node.target]
    if node.args[0].meta["val"].dim() != rank + 2:
        raise Unsupported(f"a {node.args[0].meta['val'].dim()}-D input: oneDNN pools (N, C, {rank} spatial dims)")
    return rank


def lower_max_pool(builder: Builder, node: fx.Node) -> None:
    a = op_args(node)
    rank = _spatial_rank(node)
    kernel = _expand(a["kernel_size"], rank)
    stride = _expand(a["stride"] or kernel, rank)
    _pool(builder, node, AlgKind.pooling_max, kernel, stride, _expand(a["padding"], rank), _expand(a["dilation"], rank))


def lower_avg_pool(builder: Builder, node: fx.Node) -> None:
    a = op_args(node)
    if a.get("divisor_override") is not None:
        raise Unsupported("divisor_override")
    rank = _spatial_rank(node)
    kernel = _expand(a["kernel_size"], rank)
    stride = _expand(a["stride"] or kernel, rank)
    alg = AlgKind.pooling_avg_include_padding if a["count_include_pad"] else AlgKind.pooling_avg_exclude_padding
    _pool(builder, node, alg, kernel, stride, _expand(a["padding"], rank))


def lower_adaptive_avg_pool(builder: Builder, node: fx.Node) -> None:
    """Adaptive average pooling where every window has the same size (global pooling included)."""
    _spatial_rank(node)
    in_spatial = node.args[0].meta["val"].shape[2:]
    out_spatial = node.meta["val"].shape[2:]
    if any(i % o for i, o in zip(in_spatial, out_spatial)):
        raise Unsupported("uneven adaptive pooling windows")
    kernel = [i // o for i, o in zip(in_spatial, out_spatial)]
    _pool(builder, node, AlgKind.pooling_avg_exclude_padding, kernel, kernel, [0] * len(kernel))


def _is_global_pool(x: Value, reduced: list[int]) -> bool:
    """Reducing every spatial dim of an (N, C, spatial...) tensor: a global average pooling."""
    return x.md.ndims >= 3 and sorted(d % x.md.ndims for d in reduced) == list(range(2, x.md.ndims))


def lower_mean(builder: Builder, node: fx.Node) -> None:
    """Mean over dims: global average pooling when it reduces the spatial dims (fast in every
    layout), else a reduction on the plain layout."""
    a = op_args(node)
    source = node.args[0]
    check_dtype(source.meta["val"], node.meta["val"])
    if a.get("dtype") is not None:
        raise Unsupported("dtype")
    x = builder.value_of(source)
    dims = list(x.md.dims)
    reduced = list(a["dim"] or range(len(dims)))
    for d in reduced:
        dims[d % len(dims)] = 1
    if _is_global_pool(x, reduced):
        kernel = list(x.md.dims[2:])
        keepdim = Value(f"{node.name}.keepdim", None)
        builder.values[node] = keepdim
        _pool_into(builder, node, keepdim, x, AlgKind.pooling_avg_exclude_padding, kernel, kernel, [0] * len(kernel),
                   dims)
    else:
        x = builder.to_plain(x)
        keepdim = _reduce(builder, node, x, dims)
    out_shape = node.meta["val"].shape
    if not a["keepdim"]:
        plain = builder.to_plain(keepdim)
        builder.values[node] = Value(node.name, plain_md(out_shape, DNNL_TO_TORCH[plain.md.dtype]), ALIAS, plain)


def _reduce(builder: Builder, node: fx.Node, x: Value, dims: list[int]) -> Value:
    dst_md = plain_md(dims, torch.float32)
    pd = reduction_pd(builder.engine, AlgKind.reduction_mean, x.md, dst_md)
    reduced = Value(f"{node.name}.keepdim", pd.dst_md())
    text = node_text(node, "dnnl::reduction_mean", f"format_info=[{x.layout()}]", [f"%{x.name}"], reduced)
    builder.add_primitive(text, pd, {ARG_SRC: x, ARG_DST: reduced}, [x], [reduced])
    builder.values[node] = reduced
    return reduced


def lower_cat(builder: Builder, node: fx.Node) -> None:
    tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    check_dtype(node.meta["val"], *[t.meta["val"] for t in tensors], dtypes=F32_OR_BF16)
    computed = [builder.value_of(t) for t in tensors if builder.constant(t) is None]
    if not computed:
        raise Unsupported("every part is a constant")
    first = computed[0]
    srcs = []
    for t in tensors:  # a constant part (ViT's class token, expanded over the batch) is packed once
        constant = builder.constant(t)
        if constant is None:
            value = builder.value_of(t)
            srcs.append(builder.convert(value, same_layout_md(first, value.md.dims)))
        else:
            values = builder.constant_values(t).contiguous()
            srcs.append(builder.constant_value(values, same_layout_md(first, values.shape), t.name))
    out_shape = node.meta["val"].shape
    dim = dim % len(out_shape)
    pd = concat_pd(builder.engine, [v.md for v in srcs], dim, same_layout_md(first, out_shape))
    out = builder.define(node, pd.dst_md())
    args = {ARG_MULTIPLE_SRC + i: v for i, v in enumerate(srcs)}
    args[ARG_DST] = out
    text = node_text(node, "dnnl::concat", f"axis={dim}, format_info=[{first.layout()}]", [f"%{v.name}" for v in srcs])
    builder.add_primitive(text, pd, args, srcs, [out])


def lower_softmax(builder: Builder, node: fx.Node) -> None:
    x = builder.value_of(node.args[0])
    check_dtype(node.args[0].meta["val"], node.meta["val"])
    dim = node.args[1] % x.md.ndims
    if len(node.args) > 2 and node.args[2] not in (None, False):
        raise Unsupported("softmax with a dtype")
    alg = AlgKind.softmax_log if "log_softmax" in node.target._schema.name else AlgKind.softmax_accurate
    pd = softmax_pd(builder.engine, x.md, dim, x.md, alg)
    out = builder.define(node, pd.dst_md())
    builder.add_primitive(node_text(node, "dnnl::softmax", f"axis={dim}", [f"%{x.name}"]),
                          pd, {ARG_SRC: x, ARG_DST: out}, [x], [out], unlike_eager_on_nonfinite=True)  # a row's NaN or inf


def lower_layer_norm(builder: Builder, node: fx.Node) -> None:
    a = op_args(node)
    weight, bias = builder.constant(a["weight"]), builder.constant(a["bias"])
    if weight is None or bias is None or len(a["normalized_shape"]) != 1:
        raise Unsupported("layer norm needs constant affine parameters over the last dim")
    check_dtype(a["input"].meta["val"], node.meta["val"])
    x = builder.to_plain(builder.value_of(a["input"]))

    def create(quant):  # int8 where its one reader quantizes (int8_dst.py): y / s rounded, the dst scale s
        dst_md = x.md if quant is None else same_layout_md(x, x.md.dims, quant.dtype)
        attr = None if quant is None else PrimitiveAttr(scales={ARG_DST: 0})
        return layer_norm_pd(builder.engine, x.md, dst_md, a["eps"], attr=attr)
    pd, quant = with_int8_dst(create, quantized_reader(node))
    out = builder.define(node, pd.dst_md())
    scale = builder.constant_value(weight, None, f"{node.name}.weight")
    shift = builder.constant_value(bias, None, f"{node.name}.bias")
    args = {ARG_SRC: x, ARG_SCALE: scale, ARG_SHIFT: shift, ARG_DST: out}
    if quant is not None:
        args[ARG_ATTR_SCALES | ARG_DST] = scale_value(builder, quant.scale, f"{node.name}.dst_scale")
    builder.add_primitive(node_text(node, "dnnl::layer_norm", f"eps={a['eps']:g}{quantizing_note(quant)}",
                                    [f"%{x.name}"]), pd, args, [x], [out])


def lower_batch_norm(builder: Builder, node: fx.Node) -> None:
    """Inference BatchNorm that could not be folded (e.g. after a concat, as in DenseNet)."""
    a = op_args(node)
    if a["training"] is not False:
        raise Unsupported("training-mode BatchNorm")
    params = [builder.constant(a[k]) for k in ("weight", "bias", "running_mean", "running_var")]
    if any(p is None for p in params):
        raise Unsupported("BatchNorm parameters are not constants")
    check_dtype(a["input"].meta["val"], node.meta["val"])
    x = builder.value_of(a["input"])
    pd = batch_norm_pd(builder.engine, x.md, x.md, a["eps"])
    out = builder.define(node, pd.dst_md())
    weight, bias, mean, var = (builder.constant_value(p, None, f"{node.name}.{k}") for p, k in
                               zip(params, ("weight", "bias", "mean", "var")))
    args = {ARG_SRC: x, ARG_SCALE: weight, ARG_SHIFT: bias, ARG_MEAN: mean, ARG_VARIANCE: var, ARG_DST: out}
    builder.add_primitive(node_text(node, "dnnl::batch_norm", f"eps={a['eps']:g}, format_info=[{x.layout()}]",
                                    [f"%{x.name}"]), pd, args, [x], [out])


def _resampling_miss(node: fx.Node, nearest: bool) -> str | None:
    """Where torch's and oneDNN's source-coordinate rules differ, the op stays in torch."""
    a = op_args(node)
    if a.get("align_corners"):
        return "align_corners=True"
    in_size, out_size = node.args[0].meta["val"].shape[2:], node.meta["val"].shape[2:]
    if nearest and any(o % i for i, o in zip(in_size, out_size)):
        return "nearest resampling by a non-integer factor"
    scales = a.get("scale_factors") or []
    if any(s is not None and i * s != o for i, o, s in zip(in_size, out_size, scales)):
        return "a scale factor that does not give the output size exactly"
    return None


def lower_upsample(builder: Builder, node: fx.Node) -> None:
    nearest = "nearest" in node.target._schema.name
    miss = _resampling_miss(node, nearest)
    if miss:
        raise Unsupported(miss)
    x = builder.value_of(node.args[0])
    check_dtype(node.args[0].meta["val"], node.meta["val"])
    alg = AlgKind.resampling_nearest if nearest else AlgKind.resampling_linear
    dst_md = same_layout_md(x, node.meta["val"].shape)
    pd = resampling_pd(builder.engine, alg, x.md, dst_md)
    out = builder.define(node, pd.dst_md())
    builder.add_primitive(node_text(node, f"dnnl::{alg.name}", f"format_info=[{x.layout()}]", [f"%{x.name}"]),
                          pd, {ARG_SRC: x, ARG_DST: out}, [x], [out])


def lower_view(builder: Builder, node: fx.Node) -> None:
    """A view of a planned value is an alias: same bytes, another descriptor, no step (strides kept where
    the new dims allow, as ``torch.Tensor.view``)."""
    source = builder.value_of(node.args[0])
    if source.root.kind != PLANNED:
        raise Unsupported("view of a dynamic tensor")
    meta = node.meta["val"]
    check_dtype(node.args[0].meta["val"], meta, dtypes=F32_OR_BF16)
    if meta.dim() == 0:
        raise Unsupported("a view to 0 dims (oneDNN has no rank-0 memory descriptor: it stays torch's)")
    if not source.md.inner_blocks:
        try:  # a strided view (a head of a split projection) stays one where its dims allow
            builder.values[node] = Value(node.name, source.md.reshape(list(meta.shape)), ALIAS, source)
            return
        except DnnlError:
            pass  # dims no view of these strides can take: a contiguous copy first, as torch's reshape does
    plain = builder.to_plain(source)
    builder.values[node] = Value(node.name, plain_md(meta.shape, meta.dtype), ALIAS, plain)


def lower_permute(builder: Builder, node: fx.Node) -> None:
    """A permute is an alias with permuted axes: no data moves until a consumer needs another layout."""
    source = builder.value_of(node.args[0])
    if source.root.kind != PLANNED:
        raise Unsupported("permute of a dynamic tensor")
    check_dtype(node.args[0].meta["val"], node.meta["val"], dtypes=F32_OR_BF16)
    builder.values[node] = Value(node.name, source.md.permute(permutation(node)), ALIAS, source)


def lower_clone(builder: Builder, node: fx.Node) -> None:
    """Nothing writes in place in an inference graph, so a clone is a view in the requested layout."""
    memory_format = node.kwargs.get("memory_format", torch.contiguous_format)
    if memory_format not in (torch.contiguous_format, torch.preserve_format, None):
        raise Unsupported(f"clone to {memory_format}")
    source = builder.value_of(node.args[0])
    check_dtype(node.args[0].meta["val"], node.meta["val"], dtypes=F32_OR_BF16)
    plain = builder.to_plain(source) if memory_format == torch.contiguous_format else source
    builder.values[node] = Value(node.name, plain.md, ALIAS, plain)


def lower_split(builder: Builder, node: fx.Node) -> None:
    """Each part of a split is an alias of a slice of the source (a sub-memory descriptor)."""
    source = builder.value_of(node.args[0])
    if source.root.kind != PLANNED:
        raise Unsupported("split of a dynamic tensor")
    dim = (node.args[2] if len(node.args) > 2 else 0) % source.md.ndims
    offsets, parts = [0] * source.md.ndims, []
    for index, meta in enumerate(node.meta["val"]):
        check_dtype(node.args[0].meta["val"], meta, dtypes=F32_OR_BF16)
        parts.append(part_of(source, f"{node.name}[{index}]", list(meta.shape), offsets))
        offsets[dim] += int(meta.shape[dim])
    builder.parts[node] = parts


def lower_slice(builder: Builder, node: fx.Node) -> None:
    """``x[..., a:b]`` is an alias of a part of the source (RoPE's halves).  A step > 1 runs through torch:
    oneDNN takes no strides whose dims could overlap (``x[:, ::2]``: 3 rows 24 apart inside a row of 60)."""
    source = builder.value_of(node.args[0])
    if source.root.kind != PLANNED:
        raise Unsupported("slice of a dynamic tensor")
    meta, a = node.meta["val"], op_args(node)
    if a["step"] != 1:
        raise Unsupported("a slice with a step (oneDNN takes no such strides)")
    check_dtype(node.args[0].meta["val"], meta, dtypes=F32_OR_BF16)
    if source.md.inner_blocks:
        source = builder.to_plain(source)
    dims = list(source.md.dims)
    dim = a["dim"] % len(dims)
    start = 0 if a["start"] is None else a["start"]
    start = min(max(start + dims[dim] if start < 0 else start, 0), dims[dim])
    counts, offsets = list(dims), [0] * len(dims)
    counts[dim], offsets[dim] = int(meta.shape[dim]), start
    builder.values[node] = part_of(source, node.name, counts, offsets)


def lower_expand(builder: Builder, node: fx.Node) -> None:
    """``x.expand(sizes)``: a copy, made by a reorder from a view of ``x`` with strides of 0 along the dims it
    repeats (grouped-query attention's keys, expanded and then reshaped to every head)."""
    source = builder.value_of(node.args[0])
    meta = node.meta["val"]
    check_dtype(node.args[0].meta["val"], meta, dtypes=F32_OR_BF16)
    source = builder.to_plain(source) if source.md.inner_blocks else source
    view = broadcast_of(source, f"{node.name}.view", meta.shape)
    out = builder.define(node, plain_md(meta.shape, meta.dtype))
    pd = reorder_pd(builder.engine, view.md, out.md)
    text = node_text(node, "dnnl::expand", f"format_info=[{source.layout()} -> {out.layout()}]", [f"%{source.name}"])
    builder.add_primitive(text, pd, {ARG_FROM: view, ARG_TO: out}, [view], [out])


def lower_unbind(builder: Builder, node: fx.Node) -> None:
    """Each part of an unbind is an alias of one slice of the source, the dim dropped (``q, k, v = qkv``)."""
    source = builder.value_of(node.args[0])
    if source.root.kind != PLANNED:
        raise Unsupported("unbind of a dynamic tensor")
    if source.md.inner_blocks:
        source = builder.to_plain(source)
    dim = (node.args[1] if len(node.args) > 1 else 0) % source.md.ndims
    parts = []
    for index, meta in enumerate(node.meta["val"]):
        check_dtype(node.args[0].meta["val"], meta, dtypes=F32_OR_BF16)
        dims, offsets = list(source.md.dims), [0] * source.md.ndims
        dims[dim], offsets[dim] = 1, index
        part = part_of(source, f"{node.name}[{index}]", dims, offsets)
        part.md = part.md.reshape(list(meta.shape))
        parts.append(part)
    builder.parts[node] = parts


def is_bf16_to_float32(node) -> bool:
    """Whether ``node`` is a ``to(x, float32)`` of a bfloat16 ``x`` (``passes/precision.py``)."""
    return isinstance(node, fx.Node) and node.target is aten.to.dtype and node.meta["val"].dtype == torch.float32 \
        and isinstance(node.args[0], fx.Node) and node.args[0].meta["val"].dtype == torch.bfloat16


def lower_convert(builder: Builder, node: fx.Node) -> None:
    """``to(x, dtype)`` between float32 and bfloat16 (``passes/precision.py``): a reorder into the same kind
    of layout in the other data type; made only where something reads it when every reader quantizes it
    (``lower_int8.lower_quantize`` quantizes the bfloat16 value itself)."""
    a = op_args(node)
    if a.get("memory_format") not in (None, torch.preserve_format):
        raise Unsupported(f"to() with memory_format={a['memory_format']}")
    check_dtype(node.args[0].meta["val"], dtypes=F32_OR_BF16)
    check_dtype(node.meta["val"], dtypes=F32_OR_BF16)
    if node.users and is_bf16_to_float32(node) and all(user.target is QUANTIZE for user in node.users):
        builder.value_of(node.args[0])  # the bfloat16 value exists (else this runs through torch)
        builder.defer(node, lambda: _convert(builder, node))
        return
    _convert(builder, node)


def _convert(builder: Builder, node: fx.Node) -> None:
    x = builder.value_of(node.args[0])
    dtype = node.meta["val"].dtype
    if x.md.dtype == dnnl_dtype(dtype):  # its producer wrote this data type already (destination_dtype)
        builder.values[node] = x
        return
    md = same_layout_md(x, x.md.dims, dtype)
    if node.users and all(user.target in (FUSED_CONV, FUSED_CONV_TRANSPOSE) for user in node.users):
        md = policy_md(x.md.dims, dtype, builder.policy)  # straight into the layout the convs read
    pd = reorder_pd(builder.engine, x.md, md)
    out = builder.define(node, pd.dst_md())
    text = node_text(node, "dnnl::reorder", f"format_info=[{x.layout()} -> {out.layout()}]", [f"%{x.name}"])
    builder.add_primitive(text, pd, {ARG_FROM: x, ARG_TO: out}, [x], [out])


def lower_getitem(builder: Builder, node: fx.Node) -> None:
    parts = builder.parts.get(node.args[0])
    if parts is None:
        raise Unsupported("getitem of a tensor computed by torch")
    builder.values[node] = parts[node.args[1]]


LOWERINGS = {
    **{target: lower_unary for target in ACTIVATIONS},
    **{target: lower_binary for target in BINARY_ALGS},
    **{target: lower_elementwise for target in ELEMENTWISE},
    **{target: lower_view for target in VIEWS},
    aten.max_pool2d.default: lower_max_pool,
    aten.max_pool1d.default: lower_max_pool,
    aten.max_pool3d.default: lower_max_pool,
    aten.avg_pool2d.default: lower_avg_pool,
    aten.avg_pool1d.default: lower_avg_pool,
    aten.avg_pool3d.default: lower_avg_pool,
    aten.adaptive_avg_pool2d.default: lower_adaptive_avg_pool,
    aten.adaptive_avg_pool1d.default: lower_adaptive_avg_pool,
    aten.mean.dim: lower_mean,
    aten.cat.default: lower_cat,
    aten._softmax.default: lower_softmax,
    aten._log_softmax.default: lower_softmax,
    aten.softmax.int: lower_softmax,
    aten.log_softmax.int: lower_softmax,
    aten.layer_norm.default: lower_layer_norm,
    aten.batch_norm.default: lower_batch_norm,
    aten.upsample_nearest2d.default: lower_upsample,
    aten.upsample_bilinear2d.default: lower_upsample,
    aten.upsample_nearest2d.vec: lower_upsample,
    aten.upsample_bilinear2d.vec: lower_upsample,
    **{target: lower_permute for target in PERMUTES},
    aten.clone.default: lower_clone,
    aten.split.Tensor: lower_split,
    aten.split_with_sizes.default: lower_split,
    aten.unbind.int: lower_unbind,
    aten.slice.Tensor: lower_slice,
    aten.expand.default: lower_expand,
    operator.getitem: lower_getitem,
    aten.to.dtype: lower_convert,
}
