"""oneDNN v3.2 C API enum values used by pyrys, as plain IntEnums.

Every value here is checked against the installed headers
(`dnnl_types.h`, `dnnl_common_types.h`) by tests/backends/dnnl/test_binding.py.
A member's C name is `C_PREFIX[enum] + member name`, except the few spelled
out in `C_NAME_EXCEPTIONS`; `c_name(member)` gives it.
"""

from __future__ import annotations

import enum

MAX_NDIMS = 12


class Status(enum.IntEnum):
    success = 0
    out_of_memory = 1
    invalid_arguments = 2
    unimplemented = 3
    last_impl_reached = 4
    runtime_error = 5
    not_required = 6
    invalid_graph = 7
    invalid_graph_op = 8
    invalid_shape = 9
    invalid_data_type = 10


class DataType(enum.IntEnum):
    undef = 0
    f16 = 1
    bf16 = 2
    f32 = 3
    s32 = 4
    s8 = 5
    u8 = 6
    f64 = 7
    boolean = 8


class EngineKind(enum.IntEnum):
    any_engine = 0
    cpu = 1
    gpu = 2


class StreamFlags(enum.IntEnum):
    in_order = 1
    out_of_order = 2
    default_flags = 1


class FormatKind(enum.IntEnum):
    undef = 0
    any = 1
    blocked = 2
    opaque = 3


class FormatTag(enum.IntEnum):
    """Layout tags; letters are logical dims, a capital letter is blocked."""

    undef = 0
    any = 1
    a = 2
    ab = 3
    abc = 4
    abcd = 5
    abcde = 6
    abcdef = 7
    ba = 14
    acb = 15
    bac = 16
    abdc = 20
    acbd = 21
    acdb = 22
    bacd = 25
    cdba = 28
    acbde = 32
    acdeb = 33
    cdeba = 38
    aBc16b = 56
    aBc8b = 69
    aBcd16b = 78
    aBcd8b = 102
    aBcde16b = 121
    aBcde8b = 142
    # semantic aliases (same values as above)
    x = 2
    nc = 3
    ncw = 4
    nwc = 15
    nchw = 5
    nhwc = 22
    ncdhw = 6
    ndhwc = 33
    oi = 3
    io = 14
    oiw = 4
    oihw = 5
    oidhw = 6
    hwio = 28
    dhwio = 38
    iohw = 25
    goiw = 5
    goihw = 6
    goidhw = 7
    giohw = 32
    nCw8c = 69
    nCw16c = 56
    nChw8c = 102
    nChw16c = 78
    nCdhw8c = 142
    nCdhw16c = 121


class PropKind(enum.IntEnum):
    undef = 0
    forward_training = 64
    forward_inference = 96


class PrimitiveKind(enum.IntEnum):
    undefined_primitive = 0
    reorder = 1
    shuffle = 2
    concat = 3
    sum = 4
    convolution = 5
    deconvolution = 6
    eltwise = 7
    lrn = 8
    batch_normalization = 9
    inner_product = 10
    rnn = 11
    gemm = 12
    binary = 13
    matmul = 14
    resampling = 15
    pooling = 16
    reduction = 17
    prelu = 18
    softmax = 19
    layer_normalization = 20


class AlgKind(enum.IntEnum):
    undef = 0
    convolution_direct = 0x1
    convolution_winograd = 0x2
    convolution_auto = 0x3
    deconvolution_direct = 0xA
    deconvolution_winograd = 0xB
    eltwise_relu = 0x20
    eltwise_tanh = 0x21
    eltwise_elu = 0x22
    eltwise_square = 0x23
    eltwise_abs = 0x24
    eltwise_sqrt = 0x25
    eltwise_linear = 0x26
    eltwise_soft_relu = 0x27
    eltwise_hardsigmoid = 0x28
    eltwise_logistic = 0x29
    eltwise_exp = 0x2A
    eltwise_gelu_tanh = 0x2B
    eltwise_swish = 0x2C
    eltwise_log = 0x2D
    eltwise_clip = 0x2E
    eltwise_clip_v2 = 0x2F
    eltwise_pow = 0x30
    eltwise_gelu_erf = 0x31
    eltwise_round = 0x32
    eltwise_mish = 0x33
    eltwise_hardswish = 0x34
    pooling_max = 0x1FF
    pooling_avg_include_padding = 0x2FF
    pooling_avg_exclude_padding = 0x3FF
    binary_add = 0x1FFF0
    binary_mul = 0x1FFF1
    binary_max = 0x1FFF2
    binary_min = 0x1FFF3
    binary_div = 0x1FFF4
    binary_sub = 0x1FFF5
    resampling_nearest = 0x2FFF0
    resampling_linear = 0x2FFF1
    reduction_max = 0x2FFF2
    reduction_min = 0x2FFF3
    reduction_sum = 0x2FFF4
    reduction_mul = 0x2FFF5
    reduction_mean = 0x2FFF6
    softmax_accurate = 0x30000
    softmax_log = 0x30001


class NormFlags(enum.IntFlag):
    none = 0x0
    use_global_stats = 0x1
    use_scale = 0x2
    use_shift = 0x4
    fuse_norm_relu = 0x8


class ScratchpadMode(enum.IntEnum):
    library = 0
    user = 1


class Query(enum.IntEnum):
    undef = 0
    engine = 1
    primitive_kind = 2
    num_of_inputs_s32 = 3
    num_of_outputs_s32 = 4
    impl_info_str = 8
    prop_kind = 11
    strides = 14
    dilations = 15
    padding_l = 16
    padding_r = 17
    alg_kind = 20
    some_md = 128
    src_md = 129
    weights_md = 131
    dst_md = 133
    workspace_md = 135
    scratchpad_md = 136
    exec_arg_md = 255
    ndims_s32 = 256
    dims = 257
    data_type = 258
    submemory_offset_s64 = 259
    padded_dims = 260
    format_kind = 262
    inner_nblks_s32 = 263
    inner_blks = 264
    inner_idxs = 265


# Execution argument ids (DNNL_ARG_*); C name is "DNNL_" + Python name.
ARG_SRC = 1
ARG_SRC_0 = 1
ARG_SRC_1 = 2
ARG_SRC_2 = 3
ARG_DST = 17
ARG_DST_0 = 17
ARG_FROM = 1
ARG_TO = 17
ARG_WEIGHTS = 33
ARG_WEIGHTS_0 = 33
ARG_BIAS = 41
ARG_MEAN = 49
ARG_VARIANCE = 50
ARG_SCALE = 51
ARG_SHIFT = 52
ARG_WORKSPACE = 64
ARG_SCRATCHPAD = 80
ARG_MULTIPLE_SRC = 1024
ARG_MULTIPLE_DST = 2048
ARG_ATTR_MULTIPLE_POST_OP_BASE = 32768
ARG_ATTR_SCALES = 4096  # | ARG_SRC etc.: the runtime scales of that argument (int8)


def arg_attr_multiple_post_op(index: int) -> int:
    """DNNL_ARG_ATTR_MULTIPLE_POST_OP(index)."""
    return ARG_ATTR_MULTIPLE_POST_OP_BASE * (index + 1)


def arg_post_op_src1(index: int) -> int:
    """Exec arg id of the second input of binary post-op number `index`."""
    return arg_attr_multiple_post_op(index) | ARG_SRC_1


C_PREFIX = {
    Status: "dnnl_",
    DataType: "dnnl_",
    EngineKind: "dnnl_",
    StreamFlags: "dnnl_stream_",
    FormatKind: "dnnl_format_kind_",
    FormatTag: "dnnl_",
    PropKind: "dnnl_",
    PrimitiveKind: "dnnl_",
    AlgKind: "dnnl_",
    NormFlags: "dnnl_",
    ScratchpadMode: "dnnl_scratchpad_mode_",
    Query: "dnnl_query_",
}

C_NAME_EXCEPTIONS = {
    (DataType, "undef"): "dnnl_data_type_undef",
    (FormatKind, "blocked"): "dnnl_blocked",
    (FormatTag, "undef"): "dnnl_format_tag_undef",
    (FormatTag, "any"): "dnnl_format_tag_any",
    (PropKind, "undef"): "dnnl_prop_kind_undef",
    (AlgKind, "undef"): "dnnl_alg_kind_undef",
    (NormFlags, "none"): "dnnl_normalization_flags_none",
}


def c_name(enum_cls: type, member_name: str) -> str:
    """The C spelling of `enum_cls.member_name`, e.g. dnnl_query_src_md."""
    special = C_NAME_EXCEPTIONS.get((enum_cls, member_name))
    if special is not None:
        return special
    return C_PREFIX[enum_cls] + member_name
