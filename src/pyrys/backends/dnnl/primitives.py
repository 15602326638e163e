"""The oneDNN objects pyrys holds, each owning one C handle that it frees once.

``Engine`` and ``Stream``; ``MemoryDesc`` (dims, data type, layout) and ``Memory`` (a
descriptor over bytes); ``PostOps`` and ``PrimitiveAttr``; ``PrimitiveDesc`` (a chosen
implementation, made by the creators in ``descriptors.py``) and ``Primitive``, whose
``bind(stream, {arg: Memory})`` gives a ``BoundCall``: ``run()`` is one C call on
pre-built arguments, the run loop's step.  ``Memory.set_handle(ptr)`` re-points a memory
at a new tensor's bytes without creating anything.  Torch tensors in and out: ``tensors.py``.
"""

from __future__ import annotations

import ctypes
from ctypes import byref, c_char_p, c_int, c_int64, c_void_p
from typing import Iterator, Mapping, Sequence

from pyrys.backends.dnnl import binding
from pyrys.backends.dnnl.binding import ExecArg, as_dims, check, create
from pyrys.backends.dnnl.constants import (
    ARG_SCRATCHPAD,
    AlgKind,
    DataType,
    EngineKind,
    FormatKind,
    FormatTag,
    Query,
    ScratchpadMode,
    StreamFlags,
)

MEMORY_ALLOCATE = c_void_p(ctypes.c_size_t(-1).value)  # DNNL_MEMORY_ALLOCATE
_LETTERS = "abcdefghijkl"


def _destroy(obj: Handle, function: str) -> None:
    """Free obj.handle with the named dnnl_*_destroy, once."""
    handle = getattr(obj, "handle", None)
    lib = getattr(obj, "_lib", None)
    if handle is not None and handle.value and lib is not None:
        getattr(lib, function)(handle)
        handle.value = None


class Handle:
    """Owns one oneDNN handle and frees it with the class's ``DESTROY`` function when collected."""

    DESTROY = ""  # the dnnl_*_destroy for this kind of handle

    def __init__(self, handle: c_void_p) -> None:
        self._lib = binding.load_library()
        self.handle = handle

    def __del__(self, destroy=_destroy) -> None:  # bound now: module globals are gone at exit
        destroy(self, self.DESTROY)


class Engine(Handle):
    """The CPU engine (index 0 unless told)."""

    DESTROY = "dnnl_engine_destroy"

    def __init__(self, index: int = 0) -> None:
        super().__init__(create("dnnl_engine_create", f"cpu engine {index}", EngineKind.cpu, index))


class Stream(Handle):
    """An in-order stream; on CPU with OpenMP, execution is synchronous."""

    DESTROY = "dnnl_stream_destroy"

    def __init__(self, engine: Engine) -> None:
        super().__init__(create("dnnl_stream_create", "cpu in-order stream", engine.handle, StreamFlags.in_order))
        self.engine = engine


def canonical_strides(dims: Sequence[int], strides: Sequence[int]) -> list[int]:
    """``strides`` with each size-1 dim's stride the span of the dims inside it, ``max(stride[e] * dims[e]
    for e > i)`` (1 for the last dim), as oneDNN's own format tags give an outer dim of 1.  Such a stride moves
    no element, and oneDNN 3.2's descriptor equality ignores it, but its primitive cache and kernels do not
    (``memory_desc_wrapper::size`` reads it): two descriptors of the same bytes, one a view whose size-1 dim kept
    a wide stride (a head of a merged projection at one token), compared equal, the cache gave the second the
    first's primitive, and that wrote garbage (a decoder step's logits all NaN)."""
    canonical = [int(s) for s in strides]
    for i in reversed(range(len(canonical))):
        if int(dims[i]) == 1:
            canonical[i] = max((canonical[e] * max(int(dims[e]), 1) for e in range(i + 1, len(canonical))), default=1)
    return canonical


class MemoryDesc(Handle):
    """An owned dnnl_memory_desc_t: dims, data type and layout."""

    DESTROY = "dnnl_memory_desc_destroy"

    @classmethod
    def from_tag(cls, dims: Sequence[int], dtype: DataType, tag: FormatTag) -> MemoryDesc:
        """A descriptor with a format tag (FormatTag.any lets a primitive choose)."""
        return cls(create("dnnl_memory_desc_create_with_tag", f"dims={tuple(dims)} {dtype.name} {tag.name}",
                          len(dims), as_dims(dims), dtype, tag))

    @classmethod
    def from_strides(cls, dims: Sequence[int], dtype: DataType, strides: Sequence[int]) -> MemoryDesc:
        """A plain (unblocked) descriptor with explicit strides in elements (those of its size-1 dims made
        canonical: :func:`canonical_strides`)."""
        strides = canonical_strides(dims, strides)
        return cls(create("dnnl_memory_desc_create_with_strides", f"dims={tuple(dims)} strides={tuple(strides)}",
                          len(dims), as_dims(dims), dtype, as_dims(strides)))

    @classmethod
    def copy_of(cls, handle: int | c_void_p | None) -> MemoryDesc:
        """An owned clone of a descriptor owned by someone else (e.g. a query result)."""
        return cls(create("dnnl_memory_desc_clone", "query result", handle))

    def reshape(self, dims: Sequence[int]) -> MemoryDesc:
        """Same memory, new logical dims (dnnl_memory_desc_reshape)."""
        return MemoryDesc(create("dnnl_memory_desc_reshape", f"{self.format_summary()} -> {tuple(dims)}",
                                 self.handle, len(dims), as_dims(dims))).canonical()

    def permute(self, dims: Sequence[int]) -> MemoryDesc:
        """The same memory seen through ``torch.permute(dims)`` (no data moves)."""
        inverse = [0] * len(dims)
        for position, axis in enumerate(dims):
            inverse[axis] = position  # oneDNN: out.dims[perm[i]] = in.dims[i]
        return MemoryDesc(create("dnnl_memory_desc_permute_axes", f"{self.format_summary()} permute {tuple(dims)}",
                                 self.handle, (c_int * len(dims))(*inverse))).canonical()

    def submemory(self, dims: Sequence[int], offsets: Sequence[int]) -> MemoryDesc:
        """The part of this memory with ``dims`` starting at ``offsets`` (a slice; no data moves)."""
        context = f"{self.format_summary()} [{tuple(offsets)} + {tuple(dims)}]"
        return MemoryDesc(create("dnnl_memory_desc_create_submemory", context, self.handle, as_dims(dims),
                                 as_dims(offsets))).canonical()

    def canonical(self) -> MemoryDesc:
        """This descriptor with its size-1 dims' strides made canonical (:func:`canonical_strides`), where it is
        plain and starts at 0 (a blocked one is made by oneDNN; a start would be lost); else itself."""
        if self.format_kind != FormatKind.blocked or self.inner_blocks or self.offset0 != 0:
            return self
        dims, strides = self.dims, self.strides
        if list(strides) == canonical_strides(dims, strides):
            return self
        return MemoryDesc.from_strides(dims, self.dtype, strides)

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
    def offset0(self) -> int:
        """Where the described data starts, in elements from the memory's handle (a submemory's start)."""
        result = c_int64()
        check(self._lib.dnnl_memory_desc_query(self.handle, Query.submemory_offset_s64, byref(result)),
              "dnnl_memory_desc_query", "submemory_offset_s64")
        return result.value

    @property
    def format_kind(self) -> FormatKind:
        return FormatKind(self._query_int(Query.format_kind))

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides of the outer blocks (blocked format kind only)."""
        return self._query_dims(Query.strides, self.ndims)

    @property
    def padded_dims(self) -> tuple[int, ...]:
        """The dims as laid out: a blocked dim rounded up to its block (6 channels in ``aBcd8b``: 8)."""
        return self._query_dims(Query.padded_dims, self.ndims)

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


class Memory(Handle):
    """A dnnl_memory_t over a user pointer (re-pointable) or library-allocated."""

    DESTROY = "dnnl_memory_destroy"

    def __init__(self, engine: Engine, md: MemoryDesc, ptr: int | None = None, keepalive: object = None) -> None:
        data = MEMORY_ALLOCATE if ptr is None else c_void_p(ptr)
        super().__init__(create("dnnl_memory_create", md.format_summary(), md.handle, engine.handle, data))
        self.engine = engine
        self.md = md
        self.keepalive = keepalive
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


class PostOps(Handle):
    """An ordered chain of post-ops applied to a primitive's result."""

    DESTROY = "dnnl_post_ops_destroy"

    def __init__(self) -> None:
        super().__init__(create("dnnl_post_ops_create", ""))
        self._src1_mds: list[MemoryDesc] = []

    def append_eltwise(self, alg: AlgKind, alpha: float = 0.0, beta: float = 0.0) -> int:
        """dst = alg(dst, alpha, beta); returns the post-op index."""
        status = self._lib.dnnl_post_ops_append_eltwise(self.handle, alg, alpha, beta)
        check(status, "dnnl_post_ops_append_eltwise", f"{alg.name} alpha={alpha} beta={beta}")
        return len(self) - 1

    def append_sum(self, scale: float = 1.0, dtype: DataType = DataType.undef) -> int:
        """dst = dst + scale * (previous dst contents, read as ``dtype``: one of dst's size; undef: dst's own);
        returns the post-op index."""
        status = self._lib.dnnl_post_ops_append_sum(self.handle, scale, 0, dtype)
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


class PrimitiveAttr(Handle):
    """Primitive attributes: post-ops and scratchpad mode.

    The scratchpad is the caller's (``dnnl_scratchpad_mode_user``) unless told otherwise: a
    primitive then keeps no per-execution state and may run from many threads at once, each
    execution passing its own ``ARG_SCRATCHPAD`` (in the library mode it may only run on the
    thread that created it)."""

    DESTROY = "dnnl_primitive_attr_destroy"

    def __init__(self, post_ops: PostOps | None = None, user_scratchpad: bool = True,
                 scales: Mapping[int, int] | None = None) -> None:
        super().__init__(create("dnnl_primitive_attr_create", ""))
        self.post_ops = post_ops
        if post_ops is not None:
            status = self._lib.dnnl_primitive_attr_set_post_ops(self.handle, post_ops.handle)
            check(status, "dnnl_primitive_attr_set_post_ops", f"{len(post_ops)} post-ops")
        for arg, mask in (scales or {}).items():  # int8: the scales come at execution, ARG_ATTR_SCALES | arg
            status = self._lib.dnnl_primitive_attr_set_scales_mask(self.handle, arg, mask)
            check(status, "dnnl_primitive_attr_set_scales_mask", f"arg={arg} mask={mask}")
        if user_scratchpad:
            status = self._lib.dnnl_primitive_attr_set_scratchpad_mode(self.handle, ScratchpadMode.user)
            check(status, "dnnl_primitive_attr_set_scratchpad_mode", "user")


class PrimitiveDesc(Handle):
    """A primitive descriptor: the chosen implementation and its memory formats."""

    DESTROY = "dnnl_primitive_desc_destroy"

    def __init__(self, handle: c_void_p, kind: str, context: str, engine: Engine) -> None:
        super().__init__(handle)
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
        handle = create("dnnl_primitive_desc_clone", self.context, self.handle)
        return PrimitiveDesc(handle, self.kind, self.context, self.engine)

    def candidates(self) -> Iterator[PrimitiveDesc]:
        """A clone per implementation, from the current one to the last."""
        probe = self.clone()
        yield probe.clone()
        while probe.next_impl():
            yield probe.clone()

    def __repr__(self) -> str:
        return f"PrimitiveDesc({self.kind}, {self.impl_info()})"


class ExecArgs:
    """The dnnl_exec_arg_t array for one call, built once; keeps its memories alive."""

    def __init__(self, args: Mapping[int, Memory]) -> None:
        self.memories = dict(args)
        self.count = len(self.memories)
        pairs = [ExecArg(arg, memory.handle.value) for arg, memory in self.memories.items()]
        self.array = (ExecArg * self.count)(*pairs)


class BoundCall:
    """One primitive call with its stream and arguments pre-bound: `run()` is the hot path."""

    __slots__ = ("primitive", "stream", "exec_args", "_execute", "_call_args")

    def __init__(self, primitive: Primitive, stream: Stream, exec_args: ExecArgs) -> None:
        self.primitive = primitive
        self.stream = stream  # its handle is in the call's arguments: the stream lives as long as the call
        self.exec_args = exec_args
        self._call_args = (primitive.handle, stream.handle, exec_args.count, exec_args.array)
        self._execute = binding.prevalidated("dnnl_primitive_execute", self._call_args)

    def run(self) -> None:
        status = self._execute(*self._call_args)
        if status:
            check(status, "dnnl_primitive_execute", self.primitive.pd.context)


class Primitive(Handle):
    """A created primitive; create once, run many times."""

    DESTROY = "dnnl_primitive_destroy"

    def __init__(self, pd: PrimitiveDesc) -> None:
        super().__init__(create("dnnl_primitive_create", pd.context, pd.handle))
        self.pd = pd

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


_MOVED_TO = ("descriptors", "tensors")  # the *_pd creators and the torch glue lived here before issue 17


def __getattr__(name: str):
    """``from pyrys.backends.dnnl.primitives import convolution_pd`` still works: the name is looked up in
    the module it moved to (imported on first use: both import this one)."""
    import importlib

    if not name.startswith("_"):
        for module in _MOVED_TO:
            moved = importlib.import_module(f"pyrys.backends.dnnl.{module}")
            if hasattr(moved, name):
                return getattr(moved, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
