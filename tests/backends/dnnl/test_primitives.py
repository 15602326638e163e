"""Each oneDNN primitive kind against its torch reference, fp32.

Tolerance: max |out - ref| <= 1e-4 * max(1, max |ref|).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyrys.backends.dnnl import binding
from pyrys.numerics import FP32_TOLERANCE, relative_error

AVAILABLE, WHY = binding.is_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"oneDNN unavailable: {WHY}")

from pyrys.backends.dnnl.constants import (  # noqa: E402
    ARG_BIAS,
    ARG_DST,
    ARG_MEAN,
    ARG_MULTIPLE_SRC,
    ARG_SCALE,
    ARG_SHIFT,
    ARG_SRC,
    ARG_SRC_1,
    ARG_VARIANCE,
    ARG_WEIGHTS,
    AlgKind,
    DataType,
    FormatKind,
    FormatTag,
    arg_post_op_src1,
)
from pyrys.backends.dnnl.descriptors import (  # noqa: E402
    batch_norm_pd,
    binary_pd,
    concat_pd,
    convolution_pd,
    deconvolution_pd,
    eltwise_pd,
    inner_product_pd,
    layer_norm_pd,
    matmul_pd,
    pooling_pd,
    reduction_pd,
    resampling_pd,
    softmax_pd,
    sum_pd,
)
from pyrys.backends.dnnl.primitives import Engine, MemoryDesc, PostOps, Primitive, PrimitiveAttr, Stream  # noqa: E402
from pyrys.backends.dnnl.tensors import (  # noqa: E402
    dnnl_dtype,
    empty_memory,
    tensor_md,
    tensor_memory,
    to_layout,
    to_tensor,
    torch_weights_md,
)

F32 = DataType.f32


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


@pytest.fixture(scope="module")
def stream(engine: Engine) -> Stream:
    return Stream(engine)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape
    error = relative_error(out, ref)
    assert error <= FP32_TOLERANCE, f"relative error {error:.3g} > {FP32_TOLERANCE}"


def execute(engine, stream, pd, inputs: dict, out: torch.Tensor, out_arg: int = ARG_DST) -> torch.Tensor:
    """Run pd's primitive on plain torch tensors through the pre-bound hot path."""
    memories = {arg: tensor_memory(engine, t.contiguous()) for arg, t in inputs.items()}
    memories[out_arg] = tensor_memory(engine, out)
    Primitive(pd).bind(stream, memories).run()
    return out


def md(t: torch.Tensor) -> MemoryDesc:
    return tensor_md(t.contiguous())


# ------------------------------------------------------------ convolution


def dnnl_conv(engine, stream, x, w, b, out_shape, *, stride, padding_l, padding_r=None,
              dilation=None, groups=1, attr=None, out=None, extra=None):  # fmt: skip
    wmd = torch_weights_md(w, groups)
    out = torch.empty(out_shape) if out is None else out
    bias_md = None if b is None else md(b)
    pd = convolution_pd(engine, md(x), wmd, tensor_md(out), bias_md, strides=stride,
                          padding_l=padding_l, padding_r=padding_r, dilation=dilation, attr=attr)  # fmt: skip
    memories = {ARG_SRC: tensor_memory(engine, x), ARG_WEIGHTS: tensor_memory(engine, w, wmd),
                ARG_DST: tensor_memory(engine, out)}  # fmt: skip
    if b is not None:
        memories[ARG_BIAS] = tensor_memory(engine, b)
    memories.update(extra or {})
    Primitive(pd).bind(stream, memories).run()
    return out


CONV_CASES = {
    "basic": dict(cin=8, cout=16, k=3, stride=1, pad=1, dil=1, groups=1),
    "grouped": dict(cin=8, cout=16, k=3, stride=1, pad=1, dil=1, groups=2),
    "depthwise": dict(cin=16, cout=16, k=3, stride=1, pad=1, dil=1, groups=16),
    "stride2": dict(cin=8, cout=16, k=3, stride=2, pad=1, dil=1, groups=1),
    "dilation2": dict(cin=8, cout=8, k=3, stride=1, pad=2, dil=2, groups=1),
    "1x1_nobias": dict(cin=8, cout=16, k=1, stride=1, pad=0, dil=1, groups=1, bias=False),
}


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d(engine, stream, case: str) -> None:
    c = CONV_CASES[case]
    x = torch.randn(2, c["cin"], 11, 10)
    w = torch.randn(c["cout"], c["cin"] // c["groups"], c["k"], c["k"])
    b = torch.randn(c["cout"]) if c.get("bias", True) else None
    ref = F.conv2d(x, w, b, stride=c["stride"], padding=c["pad"], dilation=c["dil"], groups=c["groups"])
    two = lambda v: (v, v)  # noqa: E731
    out = dnnl_conv(engine, stream, x, w, b, ref.shape, stride=two(c["stride"]), padding_l=two(c["pad"]),
                    dilation=two(c["dil"]), groups=c["groups"])  # fmt: skip
    assert_close(out, ref)


def test_conv2d_asymmetric_padding(engine, stream) -> None:
    x, w, b = torch.randn(1, 4, 9, 9), torch.randn(6, 4, 3, 3), torch.randn(6)
    ref = F.conv2d(F.pad(x, (0, 1, 2, 0)), w, b, stride=2)  # pad (w_l, w_r, h_t, h_b)
    out = dnnl_conv(engine, stream, x, w, b, ref.shape, stride=(2, 2), padding_l=(2, 0), padding_r=(0, 1))
    assert_close(out, ref)


def test_conv1d_and_conv3d(engine, stream) -> None:
    x1, w1, b1 = torch.randn(2, 4, 20), torch.randn(6, 2, 5), torch.randn(6)
    ref1 = F.conv1d(x1, w1, b1, stride=2, padding=2, groups=2)
    assert_close(dnnl_conv(engine, stream, x1, w1, b1, ref1.shape, stride=(2,), padding_l=(2,), groups=2), ref1)
    x3, w3 = torch.randn(1, 3, 6, 7, 5), torch.randn(4, 3, 3, 3, 3)
    ref3 = F.conv3d(x3, w3, None, padding=1, dilation=(1, 2, 1))
    out3 = dnnl_conv(engine, stream, x3, w3, None, ref3.shape, stride=(1, 1, 1), padding_l=(1, 1, 1),
                     dilation=(1, 2, 1))  # fmt: skip
    assert_close(out3, ref3)


def test_conv_post_ops_relu_then_sum(engine, stream) -> None:
    x, w, b = torch.randn(1, 8, 8, 8), torch.randn(8, 8, 3, 3), torch.randn(8)
    residual = torch.randn(1, 8, 8, 8)
    ref = F.relu(F.conv2d(x, w, b, padding=1)) + residual
    post_ops = PostOps()
    post_ops.append_eltwise(AlgKind.eltwise_relu)
    post_ops.append_sum(1.0)
    out = residual.clone()  # the sum post-op accumulates into dst's previous contents
    dnnl_conv(engine, stream, x, w, b, ref.shape, stride=(1, 1), padding_l=(1, 1),
              attr=PrimitiveAttr(post_ops), out=out)  # fmt: skip
    assert_close(out, ref)


def test_conv_post_op_binary_mul_per_channel(engine, stream) -> None:
    x, w = torch.randn(1, 8, 8, 8), torch.randn(16, 8, 3, 3)
    scale = torch.randn(1, 16, 1, 1)
    ref = F.conv2d(x, w, None, padding=1) * scale
    post_ops = PostOps()
    index = post_ops.append_binary(AlgKind.binary_mul, md(scale))
    extra = {arg_post_op_src1(index): tensor_memory(engine, scale)}
    out = dnnl_conv(engine, stream, x, w, None, ref.shape, stride=(1, 1), padding_l=(1, 1),
                    attr=PrimitiveAttr(post_ops), extra=extra)  # fmt: skip
    assert_close(out, ref)


def test_conv_format_any_picks_blocked_or_nhwc(engine, stream) -> None:
    x, w, b = torch.randn(1, 16, 14, 14), torch.randn(32, 16, 3, 3), torch.randn(32)
    ref = F.conv2d(x, w, b, padding=1)
    any_md = lambda shape: MemoryDesc.from_tag(shape, F32, FormatTag.any)  # noqa: E731
    pd = convolution_pd(engine, any_md(x.shape), any_md(w.shape), any_md(ref.shape), md(b),
                          strides=(1, 1), padding_l=(1, 1))  # fmt: skip
    src_md = pd.src_md()
    assert src_md.format_kind == FormatKind.blocked
    assert src_md.inner_blocks or src_md.layout_tag() == "acdb", src_md.format_summary()
    assert pd.impl_info()
    src = to_layout(engine, stream, x, src_md)
    weights = to_layout(engine, stream, w, pd.weights_md())
    dst = empty_memory(engine, pd.dst_md())
    args = {ARG_SRC: src, ARG_WEIGHTS: weights, ARG_BIAS: tensor_memory(engine, b), ARG_DST: dst}
    Primitive(pd).bind(stream, args).run()
    assert_close(to_tensor(engine, stream, dst), ref)


def test_conv_implementation_candidates(engine) -> None:
    any_md = lambda shape: MemoryDesc.from_tag(shape, F32, FormatTag.any)  # noqa: E731
    pd = convolution_pd(engine, any_md((1, 16, 8, 8)), any_md((16, 16, 3, 3)), any_md((1, 16, 8, 8)),
                          strides=(1, 1), padding_l=(1, 1))  # fmt: skip
    first = pd.impl_info()
    names = [candidate.impl_info() for candidate in pd.candidates()]
    assert names and names[0] == first and all(names)
    assert pd.impl_info() == first  # enumeration does not move the original


def test_memory_set_handle_repoints_without_rebinding(engine, stream) -> None:
    x1, x2, w = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3)
    out = torch.empty(1, 4, 6, 6)
    pd = convolution_pd(engine, md(x1), md(w), md(out), strides=(1, 1), padding_l=(1, 1))
    src = tensor_memory(engine, x1)
    call = Primitive(pd).bind(stream, {ARG_SRC: src, ARG_WEIGHTS: tensor_memory(engine, w),
                                         ARG_DST: tensor_memory(engine, out)})  # fmt: skip
    call.run()
    assert_close(out, F.conv2d(x1, w, padding=1))
    src.set_handle(x2.data_ptr())
    assert src.data_ptr() == x2.data_ptr()
    call.run()
    assert_close(out, F.conv2d(x2, w, padding=1))


# ------------------------------------------------------------ deconvolution, inner product, matmul


@pytest.mark.parametrize("groups", [1, 2])
def test_deconvolution(engine, stream, groups: int) -> None:
    x, w, b = torch.randn(1, 4, 5, 6), torch.randn(4, 6 // groups, 3, 3), torch.randn(6)
    ref = F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1, groups=groups)
    wmd = torch_weights_md(w, groups, transposed=True)
    out = torch.empty(ref.shape)
    pd = deconvolution_pd(engine, md(x), wmd, md(out), md(b), strides=(2, 2), padding_l=(1, 1),
                            padding_r=(0, 0))  # padding_r = padding - output_padding  # fmt: skip
    memories = {ARG_SRC: tensor_memory(engine, x), ARG_WEIGHTS: tensor_memory(engine, w, wmd),
                ARG_BIAS: tensor_memory(engine, b), ARG_DST: tensor_memory(engine, out)}  # fmt: skip
    Primitive(pd).bind(stream, memories).run()
    assert_close(out, ref)


def test_inner_product(engine, stream) -> None:
    x, w, b = torch.randn(4, 32), torch.randn(10, 32), torch.randn(10)
    ref = F.linear(x, w, b)
    out = torch.empty(ref.shape)
    pd = inner_product_pd(engine, md(x), md(w), md(out), md(b))
    assert_close(execute(engine, stream, pd, {ARG_SRC: x, ARG_WEIGHTS: w, ARG_BIAS: b}, out), ref)


def test_matmul_batched_and_with_bias(engine, stream) -> None:
    a, bmat = torch.randn(2, 5, 8), torch.randn(2, 8, 3)
    ref = torch.matmul(a, bmat)
    out = torch.empty(ref.shape)
    pd = matmul_pd(engine, md(a), md(bmat), md(out))
    assert_close(execute(engine, stream, pd, {ARG_SRC: a, ARG_WEIGHTS: bmat}, out), ref)
    x, w, bias = torch.randn(7, 12), torch.randn(12, 5), torch.randn(1, 5)
    ref2 = x @ w + bias
    out2 = torch.empty(ref2.shape)
    pd2 = matmul_pd(engine, md(x), md(w), md(out2), md(bias))
    assert_close(execute(engine, stream, pd2, {ARG_SRC: x, ARG_WEIGHTS: w, ARG_BIAS: bias}, out2), ref2)


# ------------------------------------------------------------ pooling


POOL_CASES = {
    "max": (AlgKind.pooling_max, lambda x: F.max_pool2d(x, 3, 2, 1)),
    "max_dilated": (AlgKind.pooling_max, lambda x: F.max_pool2d(x, 3, 1, 1, dilation=2)),
    "avg_include_pad": (AlgKind.pooling_avg_include_padding, lambda x: F.avg_pool2d(x, 3, 2, 1)),
    "avg_exclude_pad": (
        AlgKind.pooling_avg_exclude_padding,
        lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
    ),
}
POOL_GEOMETRY = {"max_dilated": dict(strides=(1, 1), padding_l=(1, 1), dilation=(2, 2))}


@pytest.mark.parametrize("case", POOL_CASES, ids=str)
def test_pooling(engine, stream, case: str) -> None:
    alg, reference = POOL_CASES[case]
    x = torch.randn(1, 8, 11, 11)
    ref = reference(x)
    out = torch.empty(ref.shape)
    geometry = POOL_GEOMETRY.get(case, dict(strides=(2, 2), padding_l=(1, 1)))
    pd = pooling_pd(engine, alg, md(x), md(out), kernel=(3, 3), **geometry)
    assert_close(execute(engine, stream, pd, {ARG_SRC: x}, out), ref)


# ------------------------------------------------------------ eltwise


ELTWISE_CASES = {
    "relu": (AlgKind.eltwise_relu, 0.0, 0.0, F.relu),
    "leaky_relu": (AlgKind.eltwise_relu, 0.1, 0.0, lambda x: F.leaky_relu(x, 0.1)),
    "tanh": (AlgKind.eltwise_tanh, 0.0, 0.0, torch.tanh),
    "elu": (AlgKind.eltwise_elu, 1.0, 0.0, F.elu),
    "square": (AlgKind.eltwise_square, 0.0, 0.0, torch.square),
    "abs": (AlgKind.eltwise_abs, 0.0, 0.0, torch.abs),
    "sqrt": (AlgKind.eltwise_sqrt, 0.0, 0.0, torch.sqrt),
    "linear": (AlgKind.eltwise_linear, 2.0, 0.5, lambda x: 2.0 * x + 0.5),
    "soft_relu": (AlgKind.eltwise_soft_relu, 1.0, 0.0, F.softplus),
    "logistic": (AlgKind.eltwise_logistic, 0.0, 0.0, torch.sigmoid),
    "exp": (AlgKind.eltwise_exp, 0.0, 0.0, torch.exp),
    "gelu_tanh": (AlgKind.eltwise_gelu_tanh, 0.0, 0.0, lambda x: F.gelu(x, approximate="tanh")),
    "gelu_erf": (AlgKind.eltwise_gelu_erf, 0.0, 0.0, F.gelu),
    "swish": (AlgKind.eltwise_swish, 1.0, 0.0, F.silu),
    "log": (AlgKind.eltwise_log, 0.0, 0.0, torch.log),
    "clip": (AlgKind.eltwise_clip, -0.5, 0.5, lambda x: x.clamp(-0.5, 0.5)),
    "clip_v2": (AlgKind.eltwise_clip_v2, 0.0, 6.0, F.relu6),
    "pow": (AlgKind.eltwise_pow, 1.0, 3.0, lambda x: x**3),
    "round": (AlgKind.eltwise_round, 0.0, 0.0, torch.round),
    "hardswish": (AlgKind.eltwise_hardswish, 1 / 6, 0.5, F.hardswish),
    "hardsigmoid": (AlgKind.eltwise_hardsigmoid, 1 / 6, 0.5, F.hardsigmoid),
    "mish": (AlgKind.eltwise_mish, 0.0, 0.0, F.mish),
}
POSITIVE_ONLY = {"sqrt", "log"}


@pytest.mark.parametrize("case", ELTWISE_CASES, ids=str)
def test_eltwise(engine, stream, case: str) -> None:
    alg, alpha, beta, reference = ELTWISE_CASES[case]
    x = torch.randn(2, 3, 5, 7) * 3
    if case in POSITIVE_ONLY:
        x = x.abs() + 0.1
    ref = reference(x)
    out = torch.empty(ref.shape)
    pd = eltwise_pd(engine, alg, md(x), alpha=alpha, beta=beta)
    assert_close(execute(engine, stream, pd, {ARG_SRC: x}, out), ref)


# ------------------------------------------------------------ binary, concat, sum


BINARY_CASES = {
    AlgKind.binary_add: torch.add,
    AlgKind.binary_mul: torch.mul,
    AlgKind.binary_sub: torch.sub,
    AlgKind.binary_div: torch.div,
    AlgKind.binary_max: torch.maximum,
    AlgKind.binary_min: torch.minimum,
}


@pytest.mark.parametrize("alg", BINARY_CASES, ids=lambda alg: alg.name)
@pytest.mark.parametrize("src1_shape", [(2, 6, 4, 5), (1, 6, 1, 1), (1, 1, 1, 5)], ids=str)
def test_binary_with_broadcast(engine, stream, alg: AlgKind, src1_shape) -> None:
    a, b = torch.randn(2, 6, 4, 5), torch.randn(src1_shape)
    if alg == AlgKind.binary_div:
        b = b.abs() + 0.5
    ref = BINARY_CASES[alg](a, b)
    out = torch.empty(ref.shape)
    pd = binary_pd(engine, alg, md(a), md(b), md(out))
    assert_close(execute(engine, stream, pd, {ARG_SRC: a, ARG_SRC_1: b}, out), ref)


def test_concat(engine, stream) -> None:
    parts = [torch.randn(1, c, 4, 4) for c in (3, 5, 8)]
    ref = torch.cat(parts, dim=1)
    out = torch.empty(ref.shape)
    pd = concat_pd(engine, [md(t) for t in parts], axis=1, dst=md(out))
    inputs = {ARG_MULTIPLE_SRC + i: t for i, t in enumerate(parts)}
    assert_close(execute(engine, stream, pd, inputs, out), ref)


def test_sum_with_scales(engine, stream) -> None:
    parts = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    ref = 1.0 * parts[0] + 0.5 * parts[1] - 2.0 * parts[2]
    out = torch.empty(ref.shape)
    pd = sum_pd(engine, [md(t) for t in parts], scales=[1.0, 0.5, -2.0], dst=md(out))
    inputs = {ARG_MULTIPLE_SRC + i: t for i, t in enumerate(parts)}
    assert_close(execute(engine, stream, pd, inputs, out), ref)


# ------------------------------------------------------------ softmax, norms


@pytest.mark.parametrize("alg", [AlgKind.softmax_accurate, AlgKind.softmax_log], ids=lambda a: a.name)
def test_softmax(engine, stream, alg: AlgKind) -> None:
    x = torch.randn(3, 10, 4) * 4
    ref = F.softmax(x, dim=1) if alg == AlgKind.softmax_accurate else F.log_softmax(x, dim=1)
    out = torch.empty(ref.shape)
    pd = softmax_pd(engine, md(x), axis=1, alg=alg)
    assert_close(execute(engine, stream, pd, {ARG_SRC: x}, out), ref)


def test_layer_norm(engine, stream) -> None:
    x, weight, bias = torch.randn(2, 5, 16), torch.randn(16), torch.randn(16)
    ref = F.layer_norm(x, (16,), weight, bias, eps=1e-5)
    out = torch.empty(ref.shape)
    pd = layer_norm_pd(engine, md(x), eps=1e-5)
    inputs = {ARG_SRC: x, ARG_SCALE: weight, ARG_SHIFT: bias}
    assert_close(execute(engine, stream, pd, inputs, out), ref)


def test_batch_norm_inference(engine, stream) -> None:
    x = torch.randn(2, 6, 5, 5)
    mean, var = torch.randn(6), torch.rand(6) + 0.5
    weight, bias = torch.randn(6), torch.randn(6)
    ref = F.batch_norm(x, mean, var, weight, bias, training=False, eps=1e-5)
    out = torch.empty(ref.shape)
    pd = batch_norm_pd(engine, md(x), eps=1e-5)
    inputs = {ARG_SRC: x, ARG_MEAN: mean, ARG_VARIANCE: var, ARG_SCALE: weight, ARG_SHIFT: bias}
    assert_close(execute(engine, stream, pd, inputs, out), ref)


# ------------------------------------------------------------ resampling, reduction


RESAMPLING_CASES = {
    "nearest": (AlgKind.resampling_nearest, lambda x: F.interpolate(x, scale_factor=2, mode="nearest")),
    "linear": (
        AlgKind.resampling_linear,
        lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
    ),
}


@pytest.mark.parametrize("case", RESAMPLING_CASES, ids=str)
def test_resampling(engine, stream, case: str) -> None:
    alg, reference = RESAMPLING_CASES[case]
    x = torch.randn(1, 3, 5, 6)
    ref = reference(x)
    out = torch.empty(ref.shape)
    pd = resampling_pd(engine, alg, md(x), md(out))
    assert_close(execute(engine, stream, pd, {ARG_SRC: x}, out), ref)


REDUCTION_CASES = {
    AlgKind.reduction_sum: lambda x: x.sum(dim=(2, 3), keepdim=True),
    AlgKind.reduction_mean: lambda x: x.mean(dim=(2, 3), keepdim=True),
    AlgKind.reduction_max: lambda x: x.amax(dim=1, keepdim=True),
    AlgKind.reduction_min: lambda x: x.amin(dim=(0, 3), keepdim=True),
}


@pytest.mark.parametrize("alg", REDUCTION_CASES, ids=lambda alg: alg.name)
def test_reduction(engine, stream, alg: AlgKind) -> None:
    x = torch.randn(2, 6, 5, 4)
    ref = REDUCTION_CASES[alg](x)
    out = torch.empty(ref.shape)
    pd = reduction_pd(engine, alg, md(x), md(out))
    assert_close(execute(engine, stream, pd, {ARG_SRC: x}, out), ref)


# ------------------------------------------------------------ reorder and memory descriptors


@pytest.mark.parametrize("tag", [FormatTag.nChw8c, FormatTag.nChw16c, FormatTag.nhwc], ids=lambda t: t.name)
def test_reorder_roundtrip(engine, stream, tag: FormatTag) -> None:
    x = torch.randn(2, 12, 5, 3)  # 12 channels: blocked layouts pad to 16
    blocked_md = MemoryDesc.from_tag(x.shape, F32, tag)
    blocked = to_layout(engine, stream, x, blocked_md)
    assert blocked.md == blocked_md and blocked.md != md(x)
    assert torch.equal(to_tensor(engine, stream, blocked), x)


def test_memory_desc_queries_and_summary() -> None:
    nchw = MemoryDesc.from_tag((1, 16, 8, 8), F32, FormatTag.nchw)
    assert nchw.dims == (1, 16, 8, 8) and nchw.dtype == F32 and nchw.size() == 16 * 64 * 4
    assert nchw.format_summary() == "f32 1x16x8x8 abcd"
    assert MemoryDesc.from_tag((1, 16, 8, 8), F32, FormatTag.nChw8c).format_summary() == "f32 1x16x8x8 aBcd8b"
    assert MemoryDesc.from_tag((1, 16, 8, 8), F32, FormatTag.any).format_summary() == "f32 1x16x8x8 any"
    channels_last = torch.randn(1, 16, 8, 8).to(memory_format=torch.channels_last)
    assert tensor_md(channels_last).format_summary() == "f32 1x16x8x8 acdb"
    assert tensor_md(channels_last) == MemoryDesc.from_tag((1, 16, 8, 8), F32, FormatTag.nhwc)
    assert nchw.reshape((16, 64)).dims == (16, 64)


def test_unsupported_dtype_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="float64"):
        dnnl_dtype(torch.float64)


@pytest.mark.parametrize("dims, strides, canonical", [
    ((1, 4, 1, 16), (128, 16, 128, 1), (64, 16, 16, 1)),     # a head of a merged projection at one token
    ((1, 3, 4, 4), (48, 1, 12, 3), (48, 1, 12, 3)),          # channels-last at batch 1: as oneDNN's tag gives it
    ((2, 1, 5), (5, 999, 1), (5, 5, 1)),
    ((3, 1), (1, 7), (1, 1)),
])
def test_a_size_one_dims_stride_is_the_span_inside_it(dims, strides, canonical):
    """Descriptors of the same bytes are the same descriptor: oneDNN 3.2 compares them equal whatever a dim of
    1's stride, and its primitive cache then hands one's primitive to the other, whose kernel reads that
    stride (a decoder step's logits came out NaN)."""
    from pyrys.backends.dnnl.primitives import MemoryDesc, canonical_strides

    assert canonical_strides(dims, strides) == list(canonical)
    md = MemoryDesc.from_strides(dims, DataType.f32, strides)
    assert md.strides == canonical and md.permute(list(range(len(dims)))).strides == canonical
