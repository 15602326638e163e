"""Primitive descriptors: one creator per oneDNN primitive kind, forward inference only.

Each ``*_pd`` takes memory descriptors (``FormatTag.any`` lets oneDNN choose a layout),
the op's parameters and an optional ``PrimitiveAttr`` (post-ops), and returns a
``PrimitiveDesc`` whose ``context`` names the kind and every shape, so a failure reads
``dnnl_convolution_forward_primitive_desc_create failed ...: convolution: src=f32 1x16x8x8 ...``.
Without an attr a primitive gets a shared default one: no post-ops, the caller's scratchpad.

Conventions: dims are in oneDNN's logical order (N, C, spatial...; weights
[G,] O, I, spatial...); ``dilation`` arguments use torch's convention
(1 = dense) and are converted to oneDNN's (0 = dense) here.
"""

from __future__ import annotations

import ctypes
from ctypes import c_float, c_void_p
from typing import Mapping, Sequence

from pyrys.backends.dnnl.binding import as_dims, create
from pyrys.backends.dnnl.constants import AlgKind, NormFlags, PropKind
from pyrys.backends.dnnl.primitives import Engine, MemoryDesc, PrimitiveAttr, PrimitiveDesc


def _handle(obj: MemoryDesc | None) -> c_void_p | None:
    return None if obj is None else obj.handle


_DEFAULT_ATTR: list[PrimitiveAttr] = []


def _attr(attr: PrimitiveAttr | None) -> c_void_p:
    """``attr``'s handle, or that of a shared default: no post-ops, user scratchpad."""
    if attr is not None:
        return attr.handle
    if not _DEFAULT_ATTR:
        _DEFAULT_ATTR.append(PrimitiveAttr())
    return _DEFAULT_ATTR[0].handle


def _describe(kind: str, mds: Mapping[str, MemoryDesc | None], **params: object) -> str:
    parts = [f"{name}={md.format_summary()}" for name, md in mds.items() if md is not None]
    parts += [f"{name}={value}" for name, value in params.items()]
    return f"{kind}: " + ", ".join(parts)


def _create(kind: str, call: str, engine: Engine, context: str, *args: object) -> PrimitiveDesc:
    """Call a dnnl_*_primitive_desc_create function and wrap the result."""
    return PrimitiveDesc(create(call, context, *args), kind, context, engine)


def _conv_like(kind: str, call: str, engine: Engine, src: MemoryDesc, weights: MemoryDesc,
               dst: MemoryDesc, bias: MemoryDesc | None, strides: Sequence[int],
               padding_l: Sequence[int], padding_r: Sequence[int] | None,
               dilation: Sequence[int] | None, attr: PrimitiveAttr | None, alg: AlgKind) -> PrimitiveDesc:  # fmt: skip
    padding_r = padding_l if padding_r is None else padding_r
    dilates = [d - 1 for d in dilation] if dilation else [0] * len(strides)
    mds = {"src": src, "weights": weights, "bias": bias, "dst": dst}
    context = _describe(kind, mds, strides=tuple(strides), dilation=dilation, padding_l=tuple(padding_l),
                        padding_r=tuple(padding_r), attr=attr is not None)  # fmt: skip
    return _create(kind, call, engine, context, engine.handle, PropKind.forward_inference, alg,
                   src.handle, weights.handle, _handle(bias), dst.handle, as_dims(strides),
                   as_dims(dilates), as_dims(padding_l), as_dims(padding_r), _attr(attr))  # fmt: skip


def convolution_pd(engine: Engine, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc,
                   bias: MemoryDesc | None = None, *, strides: Sequence[int],
                   padding_l: Sequence[int], padding_r: Sequence[int] | None = None,
                   dilation: Sequence[int] | None = None, attr: PrimitiveAttr | None = None,
                   alg: AlgKind = AlgKind.convolution_direct) -> PrimitiveDesc:  # fmt: skip
    """Forward-inference convolution, 1d/2d/3d; groups via 5-D (G,O/G,I/G,..) weights."""
    return _conv_like("convolution", "dnnl_convolution_forward_primitive_desc_create", engine, src,
                      weights, dst, bias, strides, padding_l, padding_r, dilation, attr, alg)  # fmt: skip


def deconvolution_pd(engine: Engine, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc,
                     bias: MemoryDesc | None = None, *, strides: Sequence[int],
                     padding_l: Sequence[int], padding_r: Sequence[int] | None = None,
                     dilation: Sequence[int] | None = None, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """Forward-inference transposed convolution; torch output_padding p_o means padding_r = p - p_o."""
    return _conv_like("deconvolution", "dnnl_deconvolution_forward_primitive_desc_create", engine, src,
                      weights, dst, bias, strides, padding_l, padding_r, dilation, attr,
                      AlgKind.deconvolution_direct)  # fmt: skip


def inner_product_pd(engine: Engine, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc,
                     bias: MemoryDesc | None = None, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """dst[N, O] = src[N, I] @ weights[O, I]^T + bias[O]."""
    context = _describe("inner_product", {"src": src, "weights": weights, "bias": bias, "dst": dst})
    return _create("inner_product", "dnnl_inner_product_forward_primitive_desc_create", engine, context,
                   engine.handle, PropKind.forward_inference, src.handle, weights.handle,
                   _handle(bias), dst.handle, _attr(attr))  # fmt: skip


def matmul_pd(engine: Engine, src: MemoryDesc, weights: MemoryDesc, dst: MemoryDesc,
              bias: MemoryDesc | None = None, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """dst[.., M, N] = src[.., M, K] @ weights[.., K, N] (+ broadcast bias)."""
    context = _describe("matmul", {"src": src, "weights": weights, "bias": bias, "dst": dst})
    return _create("matmul", "dnnl_matmul_primitive_desc_create", engine, context, engine.handle,
                   src.handle, weights.handle, _handle(bias), dst.handle, _attr(attr))  # fmt: skip


def pooling_pd(engine: Engine, alg: AlgKind, src: MemoryDesc, dst: MemoryDesc, *,
               kernel: Sequence[int], strides: Sequence[int], padding_l: Sequence[int],
               padding_r: Sequence[int] | None = None, dilation: Sequence[int] | None = None,
               attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """Max / average pooling; torch ceil_mode is expressed through padding_r."""
    padding_r = padding_l if padding_r is None else padding_r
    dilates = [d - 1 for d in dilation] if dilation else [0] * len(kernel)
    context = _describe("pooling", {"src": src, "dst": dst}, alg=alg.name, kernel=tuple(kernel),
                        strides=tuple(strides), padding_l=tuple(padding_l), padding_r=tuple(padding_r))  # fmt: skip
    return _create("pooling", "dnnl_pooling_forward_primitive_desc_create", engine, context,
                   engine.handle, PropKind.forward_inference, alg, src.handle, dst.handle,
                   as_dims(strides), as_dims(kernel), as_dims(dilates), as_dims(padding_l),
                   as_dims(padding_r), _attr(attr))  # fmt: skip


def eltwise_pd(engine: Engine, alg: AlgKind, src: MemoryDesc, dst: MemoryDesc | None = None,
               alpha: float = 0.0, beta: float = 0.0, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """Elementwise alg(x, alpha, beta); dst defaults to src's descriptor."""
    dst = src if dst is None else dst
    context = _describe("eltwise", {"src": src, "dst": dst}, alg=alg.name, alpha=alpha, beta=beta)
    return _create("eltwise", "dnnl_eltwise_forward_primitive_desc_create", engine, context,
                   engine.handle, PropKind.forward_inference, alg, src.handle, dst.handle,
                   alpha, beta, _attr(attr))  # fmt: skip


def binary_pd(engine: Engine, alg: AlgKind, src0: MemoryDesc, src1: MemoryDesc, dst: MemoryDesc,
              attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """dst = alg(src0, src1); src1 broadcasts along its dims of size 1 (same ndims)."""
    context = _describe("binary", {"src0": src0, "src1": src1, "dst": dst}, alg=alg.name)
    return _create("binary", "dnnl_binary_primitive_desc_create", engine, context, engine.handle,
                   alg, src0.handle, src1.handle, dst.handle, _attr(attr))  # fmt: skip


def _md_array(mds: Sequence[MemoryDesc]) -> ctypes.Array:
    return (c_void_p * len(mds))(*[md.handle.value for md in mds])


def concat_pd(engine: Engine, srcs: Sequence[MemoryDesc], axis: int, dst: MemoryDesc | None = None,
              attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """Concatenate along `axis`; sources are ARG_MULTIPLE_SRC + i."""
    mds = {f"src{i}": md for i, md in enumerate(srcs)} | {"dst": dst}
    context = _describe("concat", mds, axis=axis)
    return _create("concat", "dnnl_concat_primitive_desc_create", engine, context, engine.handle,
                   _handle(dst), len(srcs), axis, _md_array(srcs), _attr(attr))  # fmt: skip


def sum_pd(engine: Engine, srcs: Sequence[MemoryDesc], scales: Sequence[float] | None = None,
           dst: MemoryDesc | None = None, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """dst = sum_i scales[i] * src_i; sources are ARG_MULTIPLE_SRC + i."""
    scales = [1.0] * len(srcs) if scales is None else list(scales)
    mds = {f"src{i}": md for i, md in enumerate(srcs)} | {"dst": dst}
    context = _describe("sum", mds, scales=scales)
    return _create("sum", "dnnl_sum_primitive_desc_create", engine, context, engine.handle,
                   _handle(dst), len(srcs), (c_float * len(scales))(*scales), _md_array(srcs),
                   _attr(attr))  # fmt: skip


def softmax_pd(engine: Engine, src: MemoryDesc, axis: int, dst: MemoryDesc | None = None,
               alg: AlgKind = AlgKind.softmax_accurate, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """Softmax (or log-softmax with AlgKind.softmax_log) along `axis`."""
    dst = src if dst is None else dst
    context = _describe("softmax", {"src": src, "dst": dst}, axis=axis, alg=alg.name)
    return _create("softmax", "dnnl_softmax_forward_primitive_desc_create", engine, context,
                   engine.handle, PropKind.forward_inference, alg, src.handle, dst.handle, axis,
                   _attr(attr))  # fmt: skip


def layer_norm_pd(engine: Engine, src: MemoryDesc, dst: MemoryDesc | None = None, eps: float = 1e-5,
                  flags: NormFlags = NormFlags.use_scale | NormFlags.use_shift,
                  attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """Layer norm over the last dim; ARG_SCALE / ARG_SHIFT are 1-D f32 of that size."""
    dst = src if dst is None else dst
    context = _describe("layer_normalization", {"src": src, "dst": dst}, eps=eps, flags=int(flags))
    return _create("layer_normalization", "dnnl_layer_normalization_forward_primitive_desc_create",
                   engine, context, engine.handle, PropKind.forward_inference, src.handle,
                   dst.handle, None, eps, int(flags), _attr(attr))  # fmt: skip


_BN_INFERENCE = NormFlags.use_global_stats | NormFlags.use_scale | NormFlags.use_shift


def batch_norm_pd(engine: Engine, src: MemoryDesc, dst: MemoryDesc | None = None, eps: float = 1e-5,
                  flags: NormFlags = _BN_INFERENCE, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """Inference batch norm with given ARG_MEAN / ARG_VARIANCE / ARG_SCALE / ARG_SHIFT."""
    dst = src if dst is None else dst
    context = _describe("batch_normalization", {"src": src, "dst": dst}, eps=eps, flags=int(flags))
    return _create("batch_normalization", "dnnl_batch_normalization_forward_primitive_desc_create",
                   engine, context, engine.handle, PropKind.forward_inference, src.handle,
                   dst.handle, eps, int(flags), _attr(attr))  # fmt: skip


def resampling_pd(engine: Engine, alg: AlgKind, src: MemoryDesc, dst: MemoryDesc,
                  factors: Sequence[float] | None = None, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """Nearest / linear resampling of the spatial dims (half-pixel centers)."""
    factor_array = None if factors is None else (c_float * len(factors))(*factors)
    context = _describe("resampling", {"src": src, "dst": dst}, alg=alg.name, factors=factors)
    return _create("resampling", "dnnl_resampling_forward_primitive_desc_create", engine, context,
                   engine.handle, PropKind.forward_inference, alg, factor_array, src.handle,
                   dst.handle, _attr(attr))  # fmt: skip


def reduction_pd(engine: Engine, alg: AlgKind, src: MemoryDesc, dst: MemoryDesc, p: float = 0.0,
                 eps: float = 0.0, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:  # fmt: skip
    """Reduce src over the dims where dst has size 1."""
    context = _describe("reduction", {"src": src, "dst": dst}, alg=alg.name)
    return _create("reduction", "dnnl_reduction_primitive_desc_create", engine, context,
                   engine.handle, alg, src.handle, dst.handle, p, eps, _attr(attr))  # fmt: skip


def reorder_pd(engine: Engine, src: MemoryDesc, dst: MemoryDesc, attr: PrimitiveAttr | None = None) -> PrimitiveDesc:
    """Copy between layouts (or data types); args ARG_FROM / ARG_TO."""
    context = _describe("reorder", {"src": src, "dst": dst})
    return _create("reorder", "dnnl_reorder_primitive_desc_create", engine, context, src.handle,
                   engine.handle, dst.handle, engine.handle, _attr(attr))  # fmt: skip
