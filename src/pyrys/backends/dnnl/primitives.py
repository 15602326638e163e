"""A thin object layer over the oneDNN C API, used by the dnnl lowering.

Compile time: build `MemoryDesc`s, a `PrimitiveAttr` with `PostOps`, a
primitive descriptor (`convolution_pd(...)` etc.), pick an implementation
(`PrimitiveDesc.candidates()`), then a `Primitive`.
Run time: `Primitive.bind(stream, {arg: Memory})` returns a `BoundCall` whose
`run()` is one C call on pre-built arguments; `Memory.set_handle(ptr)`
re-points a memory at a new torch tensor without reallocating.

Conventions: dims are in oneDNN's logical order (N, C, spatial...; weights
[G,] O, I, spatial...); `dilation` arguments use torch's convention
(1 = dense) and are converted to oneDNN's (0 = dense) here.
"""

from __future__ import annotations

import ctypes
from ctypes import byref, c_char_p, c_float, c_int, c_int64, c_void_p
from typing import Iterator, Mapping, Sequence

import torch

from pyrys.backends.dnnl import binding
from pyrys.backends.dnnl.binding import Dims, ExecArg, check
from pyrys.backends.dnnl.constants import (
    ARG_FROM,
    ARG_SCRATCHPAD,
    ARG_TO,
    AlgKind,
    DataType,
    EngineKind,
    FormatKind,
    FormatTag,
    NormFlags,
    PropKind,
    Query,
    ScratchpadMode,
    StreamFlags,
)

MEMORY_ALLOCATE = c_void_p(ctypes.c_size_t(-1).value)  # DNNL_MEMORY_ALLOCATE
_LETTERS = "abcdefghijkl"


def _destroy(obj: object, function: str) -> None:
    """Free obj.handle with the named dnnl_*_destroy, once."""
    handle = getattr(obj, "handle", None)
    lib = getattr(obj, "_lib", None)
    if handle is not None and handle.value and lib is not None:
        getattr(lib, function)(handle)
        handle.value = None


def _dims(values: Sequence[int]) -> Dims:
    return Dims(*[int(v) for v in values])


def _handle(obj: object | None) -> c_void_p | None:
    return None if obj is None else obj.handle


_DEFAULT_ATTR: list = []


def _attr(attr: "PrimitiveAttr | None") -> c_void_p:
    """``attr``'s handle, or that of a shared default: no post-ops, user scratchpad."""
    if attr is not None:
        return attr.handle
    if not _DEFAULT_ATTR:
        _DEFAULT_ATTR.append(PrimitiveAttr())
    return _DEFAULT_ATTR[0].handle


class Engine:
    """The CPU engine (index 0 unless told)."""

    def __init__(self, index: int = 0) -> None:
        self._lib = binding.load_library()
        self.handle = c_void_p()
        status = self._lib.dnnl_engine_create(byref(self.handle), EngineKind.cpu, index)
        check(status, "dnnl_engine_create", f"cpu engine {index}")

    def __del__(self, destroy=_destroy) -> None:  # bound now: module globals are gone at exit
        destroy(self, "dnnl_engine_destroy")


class Stream:
    """An in-order stream; on CPU with OpenMP, execution is synchronous."""

    def __init__(self, engine: Engine) -> None:
        self._lib = binding.load_library()
        self.engine = engine
        self.handle = c_void_p()
        status = self._lib.dnnl_stream_create(byref(self.handle), engine.handle, StreamFlags.in_order)
        check(status, "dnnl_stream_create", "cpu in-order stream")

    def wait(self) -> None:
        check(self._lib.dnnl_stream_wait(self.handle), "dnnl_stream_wait", "stream")

    def __del__(self, destroy=_destroy) -> None:  # bound now: module globals are gone at exit
        destroy(self, "dnnl_stream_destroy")


class MemoryDesc:
    """An owned dnnl_memory_desc_t: dims, data type and layout."""

    def __init__(self, handle: c_void_p) -> None:
        self._lib = binding.load_library()
        self.handle = handle

    @classmethod
    def from_tag(cls, dims: Sequence[int], dtype: DataType, tag: FormatTag) -> MemoryDesc:
        """A descriptor with a format tag (FormatTag.any lets a primitive choose)."""
        lib = binding.load_library()
        handle = c_void_p()
        status = lib.dnnl_memory_desc_create_with_tag(byref(handle), len(dims), _dims(dims), dtype, tag)
        check(status, "dnnl_memory_desc_create_with_tag", f"dims={tuple(dims)} {dtype.name} {tag.name}")
        return cls(handle)

    @classmethod
    def from_strides(cls, dims: Sequence[int], dtype: DataType, strides: Sequence[int]) -> MemoryDesc:
        """A plain (unblocked) descriptor with explicit strides in elements."""
        lib = binding.load_library()
        handle = c_void_p()
        status = lib.dnnl_memory_desc_create_with_strides(
            byref(handle), len(dims), _dims(dims), dtype, _dims(strides)
        )
        check(status, "dnnl_memory_desc_create_with_strides", f"dims={tuple(dims)} strides={tuple(strides)}")
        return cls(handle)

    @classmethod
    def copy_of(cls, handle: int | c_void_p | None) -> MemoryDesc:
        """An owned clone of a descriptor owned by someone else (e.g. a query result)."""
        lib = binding.load_library()
        owned = c_void_p()
        check(lib.dnnl_memory_desc_clone(byref(owned), handle), "dnnl_memory_desc_clone", "query result")
        return cls(owned)

    def reshape(self, dims: Sequence[int]) -> MemoryDesc:
        """Same memory, new logical dims (dnnl_memory_desc_reshape)."""
        handle = c_void_p()
        status = self._lib.dnnl_memory_desc_reshape(byref(handle), self.handle, len(dims), _dims(dims))
        check(status, "dnnl_memory_desc_reshape", f"{self.format_summary()} -> {tuple(dims)}")
        return MemoryDesc(handle)

    def permute(self, dims: Sequence[int]) -> MemoryDesc:
        """The same memory seen through ``torch.permute(dims)`` (no data moves)."""
        inverse = [0] * len(dims)
        for position, axis in enumerate(dims):
            inverse[axis] = position  # oneDNN: out.dims[perm[i]] = in.dims[i]
        handle = c_void_p()
        status = self._lib.dnnl_memory_desc_permute_axes(byref(handle), self.handle, (c_int * len(dims))(*inverse))
        check(status, "dnnl_memory_desc_permute_axes", f"{self.format_summary()} permute {tuple(dims)}")
        return MemoryDesc(handle)

    def submemory(self, dims: Sequence[int], offsets: Sequence[int]) -> MemoryDesc:
        """The part of this memory with ``dims`` starting at ``offsets`` (a slice; no data moves)."""
        handle = c_void_p()
        status = self._lib.dnnl_memory_desc_create_submemory(byref(handle), self.handle, _dims(dims), _dims(offsets))
        check(status, "dnnl_memory_desc_create_submemory", f"{self.format_summary()} [{tuple(offsets)} + {tuple(dims)}]")
        return MemoryDesc(handle)

    def _query_int(self, what: Query) -> int:
        result = c_int()
        check(self._lib.dnnl_memory_desc_query(self.handle, what, byref(result)), "dnnl_memory_desc_query", what.name)
        return result.value

    def _query_dims(self, what: Query, count: int) -> tuple[int, ...]:
        result = ctypes.POINTER(c_int64)()
        check(self._lib.dnnl_memory_desc_query(self.handle, what, byref(result)), "dnnl_memory_desc_query", what.name)
        return tuple(result[:count])

    @property
    def ndims(self) -> int:
        return self._query_int(Query.ndims_s32)

    @property
    def dims(self) -> tuple[int, ...]:
        return self._query_dims(Query.dims, self.ndims)

    @property
    def dtype(self) -> DataType:
        return DataType(self._query_int(Query.data_type))

    @property
    def format_kind(self) -> FormatKind:
        return FormatKind(self._query_int(Query.format_kind))

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides of the outer blocks (blocked format kind only)."""
        return self._query_dims(Query.strides, self.ndims)

    @property
    def inner_blocks(self) -> list[tuple[int, int]]:
        """[(block size, logical dim index)], innermost last; [] for plain layouts."""
        count = self._query_int(Query.inner_nblks_s32)
        sizes = self._query_dims(Query.inner_blks, count)
        idxs = self._query_dims(Query.inner_idxs, count)
        return list(zip(sizes, idxs))

    def size(self) -> int:
        """Bytes needed for memory with this descriptor (0 for a zero md)."""
        return self._lib.dnnl_memory_desc_get_size(self.handle)

    def is_zero(self) -> bool:
        return self.ndims == 0

    def layout_tag(self) -> str:
        """oneDNN-style tag of a blocked layout: 'acdb' (nhwc), 'aBcd8b' (nChw8c)."""
        blocks = self.inner_blocks
        blocked = {idx for _, idx in blocks}
        order = sorted(range(self.ndims), key=lambda i: (-self.strides[i], i))
        outer = "".join(_LETTERS[i].upper() if i in blocked else _LETTERS[i] for i in order)
        return outer + "".join(f"{size}{_LETTERS[idx]}" for size, idx in blocks)

    def format_summary(self) -> str:
        """Readable one-liner, e.g. 'f32 1x16x8x8 aBcd8b'."""
        if self.is_zero():
            return "none"
        kind = self.format_kind
        layout = self.layout_tag() if kind == FormatKind.blocked else kind.name
        shape = "x".join(str(d) for d in self.dims)
        return f"{self.dtype.name} {shape} {layout}"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryDesc):
            return NotImplemented
        return bool(self._lib.dnnl_memory_desc_equal(self.handle, other.handle))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MemoryDesc({self.format_summary()})"

    def __del__(self, destroy=_destroy) -> None:  # bound now: module globals are gone at exit
        destroy(self, "dnnl_memory_desc_destroy")


class Memory:
    """A dnnl_memory_t over a user pointer (re-pointable) or library-allocated."""

    def __init__(self, engine: Engine, md: MemoryDesc, ptr: int | None = None, keepalive: object = None) -> None:
        self._lib = binding.load_library()
        self.engine = engine
        self.md = md
        self.keepalive = keepalive
        self.handle = c_void_p()
        data = MEMORY_ALLOCATE if ptr is None else c_void_p(ptr)
        status = self._lib.dnnl_memory_create(byref(self.handle), md.handle, engine.handle, data)
        check(status, "dnnl_memory_create", md.format_summary())
        self._set = self._lib.dnnl_memory_set_data_handle

    def set_handle(self, ptr: int) -> None:
        """Point this memory at new data (e.g. a torch tensor's data_ptr())."""
        status = self._set(self.handle, ptr)
        if status:
            check(status, "dnnl_memory_set_data_handle", self.md.format_summary())

    def data_ptr(self) -> int:
        result = c_void_p()
        check(self._lib.dnnl_memory_get_data_handle(self.handle, byref(result)), "dnnl_memory_get_data_handle", "")
        return result.value or 0

    def __del__(self, destroy=_destroy) -> None:  # bound now: module globals are gone at exit
        destroy(self, "dnnl_memory_destroy")


class PostOps:
    """An ordered chain of post-ops applied to a primitive's result."""

    def __init__(self) -> None:
        self._lib = binding.load_library()
        self.handle = c_void_p()
        self._src1_mds: list[MemoryDesc] = []
        check(self._lib.dnnl_post_ops_create(byref(self.handle)), "dnnl_post_ops_create", "")

    def append_eltwise(self, alg: AlgKind, alpha: float = 0.0, beta: float = 0.0) -> int:
        """dst = alg(dst, alpha, beta); returns the post-op index."""
        status = self._lib.dnnl_post_ops_append_eltwise(self.handle, alg, alpha, beta)
        check(status, "dnnl_post_ops_append_eltwise", f"{alg.name} alpha={alpha} beta={beta}")
        return len(self) - 1

    def append_sum(self, scale: float = 1.0) -> int:
        """dst = dst + scale * (previous dst contents); returns the post-op index."""
        status = self._lib.dnnl_post_ops_append_sum(self.handle, scale, 0, DataType.undef)
        check(status, "dnnl_post_ops_append_sum", f"scale={scale}")
        return len(self) - 1

    def append_binary(self, alg: AlgKind, src1: MemoryDesc) -> int:
        """dst = alg(dst, src1); pass src1 as arg_post_op_src1(index)."""
        status = self._lib.dnnl_post_ops_append_binary(self.handle, alg, src1.handle)
        check(status, "dnnl_post_ops_append_binary", f"{alg.name} src1={src1.format_summary()}")
        self._src1_mds.append(src1)
        return len(self) - 1

    def __len__(self) -> int:
        return self._lib.dnnl_post_ops_len(self.handle)

    def __del__(self, destroy=_destroy) -> None:  # bound now: module globals are gone at exit
        destroy(self, "dnnl_post_ops_destroy")


class PrimitiveAttr:
    """Primitive attributes: post-ops and scratchpad mode.

    The scratchpad is the caller's (``dnnl_scratchpad_mode_user``) unless told otherwise: a
    primitive then keeps no per-execution state and may run from many threads at once, each
    execution passing its own ``ARG_SCRATCHPAD`` (in the library mode it may only run on the
    thread that created it)."""

    def __init__(self, post_ops: PostOps | None = None, user_scratchpad: bool = True) -> None:
        self._lib = binding.load_library()
        self.handle = c_void_p()
        self.post_ops = post_ops
        check(self._lib.dnnl_primitive_attr_create(byref(self.handle)), "dnnl_primitive_attr_create", "")
        if post_ops is not None:
            status = self._lib.dnnl_primitive_attr_set_post_ops(self.handle, post_ops.handle)
            check(status, "dnnl_primitive_attr_set_post_ops", f"{len(post_ops)} post-ops")
        if user_scratchpad:
            status = self._lib.dnnl_primitive_attr_set_scratchpad_mode(self.handle, ScratchpadMode.user)
            check(status, "dnnl_primitive_attr_set_scratchpad_mode", "user")

    def __del__(self, destroy=_destroy) -> None:  # bound now: module globals are gone at exit
        destroy(self, "dnnl_primitive_attr_destroy")


class PrimitiveDesc:
    """A primitive descriptor: the chosen implementation and its memory formats."""

    def __init__(self, handle: c_void_p, kind: str, context: str, engine: Engine) -> None:
        self._lib = binding.load_library()
        self.handle = handle
        self.kind = kind
        self.context = context
        self.engine = engine

    def query_md(self, what: Query, index: int = 0) -> MemoryDesc:
        """An owned copy of the queried descriptor (a zero md if not used)."""
        pointer = self._lib.dnnl_primitive_desc_query_md(self.handle, what, index)
        if not pointer:
            raise binding.DnnlError("dnnl_primitive_desc_query_md", 2, f"{self.kind} {what.name}[{index}]")
        return MemoryDesc.copy_of(pointer)

    def src_md(self, index: int = 0) -> MemoryDesc:
        return self.query_md(Query.src_md, index)

    def weights_md(self, index: int = 0) -> MemoryDesc:
        return self.query_md(Query.weights_md, index)

    def dst_md(self, index: int = 0) -> MemoryDesc:
        return self.query_md(Query.dst_md, index)

    def scratchpad_md(self) -> MemoryDesc:
        return self.query_md(Query.scratchpad_md)

    def exec_arg_md(self, arg: int) -> MemoryDesc:
        """Descriptor of any execution argument id (e.g. ARG_BIAS, arg_post_op_src1(i))."""
        return self.query_md(Query.exec_arg_md, arg)

    def impl_info(self) -> str:
        """Implementation name, e.g. 'brgconv:avx2' or 'jit:avx512_core'."""
        result = c_char_p()
        status = self._lib.dnnl_primitive_desc_query(self.handle, Query.impl_info_str, 0, byref(result))
        check(status, "dnnl_primitive_desc_query", f"{self.kind} impl_info_str")
        return (result.value or b"").decode()

    def next_impl(self) -> bool:
        """Move to the next implementation; False (and unchanged) when none is left."""
        status = self._lib.dnnl_primitive_desc_next_impl(self.handle)
        if status == binding.Status.last_impl_reached:
            return False
        check(status, "dnnl_primitive_desc_next_impl", self.context)
        return True

    def clone(self) -> PrimitiveDesc:
        handle = c_void_p()
        check(self._lib.dnnl_primitive_desc_clone(byref(handle), self.handle), "dnnl_primitive_desc_clone", self.context)
        return PrimitiveDesc(handle, self.kind, self.context, self.engine)

    def candidates(self) -> Iterator[PrimitiveDesc]:
        """A clone per implementation, from the current one to the last."""
        probe = self.clone()
        yield probe.clone()
        while probe.next_impl():
            yield probe.clone()

    def __repr__(self) -> str:
        return f"PrimitiveDesc({self.kind}, {self.impl_info()})"

    def __del__(self, destroy=_destroy) -> None:  # bound now: module globals are gone at exit
        destroy(self, "dnnl_primitive_desc_destroy")


class ExecArgs:
    """The dnnl_exec_arg_t array for one call, built once; keeps its memories alive."""

    def __init__(self, args: Mapping[int, Memory]) -> None:
        self.memories = dict(args)
        self.count = len(self.memories)
        pairs = [ExecArg(arg, memory.handle.value) for arg, memory in self.memories.items()]
        self.array = (ExecArg * self.count)(*pairs)


class BoundCall:
    """One primitive call with its stream and arguments pre-bound: `run()` is the hot path."""

    __slots__ = ("primitive", "exec_args", "_execute", "_call_args")

    def __init__(self, primitive: Primitive, stream: Stream, exec_args: ExecArgs) -> None:
        self.primitive = primitive
        self.exec_args = exec_args
        self._call_args = (primitive.handle, stream.handle, exec_args.count, exec_args.array)
        self._execute = binding.prevalidated("dnnl_primitive_execute", self._call_args)

    def run(self) -> None:
        status = self._execute(*self._call_args)
        if status:
            check(status, "dnnl_primitive_execute", self.primitive.pd.context)


class Primitive:
    """A created primitive; create once, run many times."""

    def __init__(self, pd: PrimitiveDesc) -> None:
        self._lib = binding.load_library()
        self.pd = pd
        self.handle = c_void_p()
        check(self._lib.dnnl_primitive_create(byref(self.handle), pd.handle), "dnnl_primitive_create", pd.context)

    def complete_args(self, args: Mapping[int, Memory]) -> dict[int, Memory]:
        """args plus a new scratchpad memory when the descriptor asks for one (user mode)."""
        full = dict(args)
        if ARG_SCRATCHPAD not in full:
            md = self.pd.scratchpad_md()
            if md.size() > 0:
                full[ARG_SCRATCHPAD] = Memory(self.pd.engine, md)
        return full

    def bind(self, stream: Stream, args: Mapping[int, Memory]) -> BoundCall:
        """Pre-build a call; `bound.run()` then executes with no allocation.

        The scratchpad belongs to the bound call, never to the primitive: ``args`` may bring
        one (``ARG_SCRATCHPAD``, e.g. a frame's), else the call gets its own."""
        return BoundCall(self, stream, ExecArgs(self.complete_args(args)))

    def run(self, stream: Stream, exec_args: ExecArgs) -> None:
        """Execute with pre-built arguments."""
        status = self._lib.dnnl_primitive_execute(self.handle, stream.handle, exec_args.count, exec_args.array)
        check(status, "dnnl_primitive_execute", self.pd.context)

    def execute(self, stream: Stream, args: Mapping[int, Memory]) -> None:
        """Convenience for compile time and tests (builds the arguments each call)."""
        self.run(stream, ExecArgs(self.complete_args(args)))

    def __del__(self, destroy=_destroy) -> None:  # bound now: module globals are gone at exit
        destroy(self, "dnnl_primitive_destroy")


# ---------------------------------------------------------------- descriptors


def _describe(kind: str, mds: Mapping[str, MemoryDesc | None], **params: object) -> str:
    parts = [f"{name}={md.format_summary()}" for name, md in mds.items() if md is not None]
    parts += [f"{name}={value}" for name, value in params.items()]
    return f"{kind}: " + ", ".join(parts)


def _create(kind: str, call: str, engine: Engine, context: str, *args: object) -> PrimitiveDesc:
    """Call a dnnl_*_primitive_desc_create function and wrap the result."""
    lib = binding.load_library()
    handle = c_void_p()
    check(getattr(lib, call)(byref(handle), *args), call, context)
    return PrimitiveDesc(handle, kind, context, engine)


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
                   src.handle, weights.handle, _handle(bias), dst.handle, _dims(strides),
                   _dims(dilates), _dims(padding_l), _dims(padding_r), _attr(attr))  # fmt: skip


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
                   _dims(strides), _dims(kernel), _dims(dilates), _dims(padding_l),
                   _dims(padding_r), _attr(attr))  # fmt: skip


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


# ---------------------------------------------------------------- torch glue

TORCH_TO_DNNL = {
    torch.float32: DataType.f32,
    torch.bfloat16: DataType.bf16,
    torch.float16: DataType.f16,
    torch.int32: DataType.s32,
    torch.int8: DataType.s8,
    torch.uint8: DataType.u8,
}
DNNL_TO_TORCH = {dnnl: dtype for dtype, dnnl in TORCH_TO_DNNL.items()}


def dnnl_dtype(dtype: torch.dtype) -> DataType:
    """The oneDNN data type for a torch dtype; TypeError if oneDNN has none."""
    try:
        return TORCH_TO_DNNL[dtype]
    except KeyError:
        raise TypeError(f"dnnl backend does not support dtype {dtype}") from None


def tensor_md(tensor: torch.Tensor) -> MemoryDesc:
    """A plain descriptor with the tensor's own shape, dtype and strides."""
    return MemoryDesc.from_strides(tensor.shape, dnnl_dtype(tensor.dtype), tensor.stride())


def torch_weights_md(weight: torch.Tensor, groups: int = 1, transposed: bool = False) -> MemoryDesc:
    """Describe a torch conv weight in place, in oneDNN's ([G,] O, I, k...) dims.

    conv: torch (O, I/G, k...); transposed conv: torch (I, O/G, k...).
    """
    shape, strides = list(weight.shape), list(weight.stride())
    if transposed:  # swap the O and I roles: oneDNN wants (O, I)
        shape[0], shape[1] = shape[1], shape[0] // groups
        strides[0], strides[1] = strides[1], strides[0]
        outer_stride = strides[1] * shape[1]
    else:
        shape[0] = shape[0] // groups
        outer_stride = strides[0] * shape[0]
    if groups > 1:
        shape, strides = [groups] + shape, [outer_stride] + strides
    return MemoryDesc.from_strides(shape, dnnl_dtype(weight.dtype), strides)


def tensor_memory(engine: Engine, tensor: torch.Tensor, md: MemoryDesc | None = None) -> Memory:
    """A Memory over the tensor's storage (no copy); keeps the tensor alive."""
    md = tensor_md(tensor) if md is None else md
    return Memory(engine, md, tensor.data_ptr(), keepalive=tensor)


def empty_memory(engine: Engine, md: MemoryDesc) -> Memory:
    """A Memory for `md` backed by a torch byte buffer (any layout, incl. blocked)."""
    buffer = torch.empty(max(md.size(), 1), dtype=torch.uint8)
    return Memory(engine, md, buffer.data_ptr(), keepalive=buffer)


def reorder(engine: Engine, stream: Stream, src: Memory, dst: Memory) -> None:
    """Copy src into dst, converting layout/dtype (compile-time helper)."""
    Primitive(reorder_pd(engine, src.md, dst.md)).execute(stream, {ARG_FROM: src, ARG_TO: dst})


def to_layout(engine: Engine, stream: Stream, tensor: torch.Tensor, md: MemoryDesc) -> Memory:
    """The tensor's values in layout `md` (e.g. nChw8c), in a new buffer."""
    dst = empty_memory(engine, md)
    reorder(engine, stream, tensor_memory(engine, tensor.contiguous()), dst)
    return dst


def to_tensor(engine: Engine, stream: Stream, memory: Memory) -> torch.Tensor:
    """A new contiguous torch tensor with the memory's values."""
    dims, dtype = memory.md.dims, DNNL_TO_TORCH[memory.md.dtype]
    out = torch.empty(dims, dtype=dtype)
    reorder(engine, stream, memory, tensor_memory(engine, out))
    return out
