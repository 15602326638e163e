"""ctypes binding of the oneDNN v3 C API, declared as data.

`FUNCTIONS` lists every C function pyrys calls with its restype and argtypes,
so a wrong call fails in ctypes, not inside the library. `check()` turns a
`dnnl_status_t` into a `DnnlError` naming the call, the status and what was
being built. Handles are opaque pointers (`c_void_p`); the one struct needed
for execution is `ExecArg` (dnnl_exec_arg_t).

The library is `$PYRYS_DNNL_LIBRARY` if set, else `libdnnl.so.3` from the
`onednn-cpu-gomp` wheel. It is loaded after `import torch`, so both share
torch's libgomp (one OpenMP pool in the process).  Loading a library runs its
code in this process: `$PYRYS_DNNL_LIBRARY` must be an absolute path (a relative
one would depend on the working directory, and is refused).
"""

from __future__ import annotations

import ctypes
import functools
import os
from ctypes import POINTER, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_uint, c_void_p
from typing import Any, Sequence

from pyrys.backends.dnnl.constants import MAX_NDIMS, Status

ENV_VAR = "PYRYS_DNNL_LIBRARY"
WHEEL = "onednn-cpu-gomp"
LIBRARY_NAME = "libdnnl.so.3"

Dims = c_int64 * MAX_NDIMS
handle_p = POINTER(c_void_p)
dims_p = POINTER(c_int64)
status_t = c_int
enum_t = c_int


def as_dims(values: Sequence[int]) -> Dims:
    """A ``dnnl_dims_t`` holding ``values`` (the rest zero)."""
    return Dims(*[int(v) for v in values])


class ExecArg(ctypes.Structure):
    """dnnl_exec_arg_t: one (argument id, memory handle) pair."""

    _fields_ = [("arg", c_int), ("memory", c_void_p)]


class Version(ctypes.Structure):
    """dnnl_version_t."""

    _fields_ = [
        ("major", c_int),
        ("minor", c_int),
        ("patch", c_int),
        ("hash", c_char_p),
        ("cpu_runtime", c_uint),
        ("gpu_runtime", c_uint),
    ]


_CREATE_CONV_LIKE = (
    handle_p, c_void_p, enum_t, enum_t, c_void_p, c_void_p, c_void_p, c_void_p,
    Dims, Dims, Dims, Dims, c_void_p,
)  # fmt: skip

# (name, restype, argtypes): every C function used by pyrys.
FUNCTIONS: tuple[tuple[str, Any, tuple], ...] = (
    ("dnnl_version", POINTER(Version), ()),
    ("dnnl_status2str", c_char_p, (status_t,)),
    ("dnnl_fmt_tag2str", c_char_p, (enum_t,)),
    ("dnnl_set_verbose", status_t, (c_int,)),
    ("dnnl_get_effective_cpu_isa", c_int, ()),
    # engine and stream
    ("dnnl_engine_get_count", c_size_t, (enum_t,)),
    ("dnnl_engine_create", status_t, (handle_p, enum_t, c_size_t)),
    ("dnnl_engine_destroy", status_t, (c_void_p,)),
    ("dnnl_stream_create", status_t, (handle_p, c_void_p, c_uint)),
    ("dnnl_stream_destroy", status_t, (c_void_p,)),
    # memory descriptors
    ("dnnl_memory_desc_create_with_tag", status_t, (handle_p, c_int, Dims, enum_t, enum_t)),
    ("dnnl_memory_desc_create_with_strides", status_t, (handle_p, c_int, Dims, enum_t, Dims)),
    ("dnnl_memory_desc_reshape", status_t, (handle_p, c_void_p, c_int, Dims)),
    ("dnnl_memory_desc_permute_axes", status_t, (handle_p, c_void_p, POINTER(c_int))),
    ("dnnl_memory_desc_create_submemory", status_t, (handle_p, c_void_p, Dims, Dims)),
    ("dnnl_memory_desc_clone", status_t, (handle_p, c_void_p)),
    ("dnnl_memory_desc_destroy", status_t, (c_void_p,)),
    ("dnnl_memory_desc_query", status_t, (c_void_p, enum_t, c_void_p)),
    ("dnnl_memory_desc_equal", c_int, (c_void_p, c_void_p)),
    ("dnnl_memory_desc_get_size", c_size_t, (c_void_p,)),
    ("dnnl_data_type_size", c_size_t, (enum_t,)),
    # memory objects
    ("dnnl_memory_create", status_t, (handle_p, c_void_p, c_void_p, c_void_p)),
    ("dnnl_memory_get_data_handle", status_t, (c_void_p, handle_p)),
    ("dnnl_memory_set_data_handle", status_t, (c_void_p, c_void_p)),
    ("dnnl_memory_destroy", status_t, (c_void_p,)),
    # attributes and post-ops
    ("dnnl_primitive_attr_create", status_t, (handle_p,)),
    ("dnnl_primitive_attr_destroy", status_t, (c_void_p,)),
    ("dnnl_primitive_attr_set_scratchpad_mode", status_t, (c_void_p, enum_t)),
    ("dnnl_primitive_attr_set_post_ops", status_t, (c_void_p, c_void_p)),
    ("dnnl_primitive_attr_set_scales_mask", status_t, (c_void_p, c_int, c_int)),
    ("dnnl_post_ops_create", status_t, (handle_p,)),
    ("dnnl_post_ops_destroy", status_t, (c_void_p,)),
    ("dnnl_post_ops_len", c_int, (c_void_p,)),
    ("dnnl_post_ops_append_sum", status_t, (c_void_p, c_float, c_int32, enum_t)),
    ("dnnl_post_ops_append_eltwise", status_t, (c_void_p, enum_t, c_float, c_float)),
    ("dnnl_post_ops_append_binary", status_t, (c_void_p, enum_t, c_void_p)),
    # primitive descriptors and primitives
    ("dnnl_primitive_desc_next_impl", status_t, (c_void_p,)),
    ("dnnl_primitive_desc_clone", status_t, (handle_p, c_void_p)),
    ("dnnl_primitive_desc_destroy", status_t, (c_void_p,)),
    ("dnnl_primitive_desc_query", status_t, (c_void_p, enum_t, c_int, c_void_p)),
    ("dnnl_primitive_desc_query_md", c_void_p, (c_void_p, enum_t, c_int)),
    ("dnnl_primitive_desc_query_s32", c_int, (c_void_p, enum_t, c_int)),
    ("dnnl_primitive_create", status_t, (handle_p, c_void_p)),
    ("dnnl_primitive_execute", status_t, (c_void_p, c_void_p, c_int, POINTER(ExecArg))),
    ("dnnl_primitive_destroy", status_t, (c_void_p,)),
    # primitive descriptor creators
    ("dnnl_convolution_forward_primitive_desc_create", status_t, _CREATE_CONV_LIKE),
    ("dnnl_deconvolution_forward_primitive_desc_create", status_t, _CREATE_CONV_LIKE),
    ("dnnl_inner_product_forward_primitive_desc_create", status_t,
     (handle_p, c_void_p, enum_t, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)),
    ("dnnl_matmul_primitive_desc_create", status_t,
     (handle_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)),
    ("dnnl_pooling_forward_primitive_desc_create", status_t,
     (handle_p, c_void_p, enum_t, enum_t, c_void_p, c_void_p, Dims, Dims, Dims, Dims, Dims,
      c_void_p)),
    ("dnnl_eltwise_forward_primitive_desc_create", status_t,
     (handle_p, c_void_p, enum_t, enum_t, c_void_p, c_void_p, c_float, c_float, c_void_p)),
    ("dnnl_binary_primitive_desc_create", status_t,
     (handle_p, c_void_p, enum_t, c_void_p, c_void_p, c_void_p, c_void_p)),
    ("dnnl_concat_primitive_desc_create", status_t,
     (handle_p, c_void_p, c_void_p, c_int, c_int, POINTER(c_void_p), c_void_p)),
    ("dnnl_sum_primitive_desc_create", status_t,
     (handle_p, c_void_p, c_void_p, c_int, POINTER(c_float), POINTER(c_void_p), c_void_p)),
    ("dnnl_softmax_forward_primitive_desc_create", status_t,
     (handle_p, c_void_p, enum_t, enum_t, c_void_p, c_void_p, c_int, c_void_p)),
    ("dnnl_layer_normalization_forward_primitive_desc_create", status_t,
     (handle_p, c_void_p, enum_t, c_void_p, c_void_p, c_void_p, c_float, c_uint, c_void_p)),
    ("dnnl_batch_normalization_forward_primitive_desc_create", status_t,
     (handle_p, c_void_p, enum_t, c_void_p, c_void_p, c_float, c_uint, c_void_p)),
    ("dnnl_resampling_forward_primitive_desc_create", status_t,
     (handle_p, c_void_p, enum_t, enum_t, POINTER(c_float), c_void_p, c_void_p, c_void_p)),
    ("dnnl_reduction_primitive_desc_create", status_t,
     (handle_p, c_void_p, enum_t, c_void_p, c_void_p, c_float, c_float, c_void_p)),
    ("dnnl_reorder_primitive_desc_create", status_t,
     (handle_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)),
)  # fmt: skip


class DnnlUnavailable(RuntimeError):
    """libdnnl could not be found or loaded; the message says why."""


class DnnlError(RuntimeError):
    """A oneDNN C call returned a status other than dnnl_success."""

    def __init__(self, call: str, status: int, context: str) -> None:
        self.call = call
        self.status = status
        self.context = context
        super().__init__(f"{call} failed with {status_name(status)} (status {status}): {context}")


def status_name(status: int) -> str:
    """'dnnl_invalid_arguments' for 2, etc."""
    try:
        return "dnnl_" + Status(status).name
    except ValueError:
        return f"unknown dnnl status {status}"


def check(status: int, call: str, context: str = "") -> None:
    """Raise DnnlError unless `status` is dnnl_success."""
    if status != Status.success:
        raise DnnlError(call, status, context)


def create(call: str, context: str, *args: Any) -> c_void_p:
    """The handle that `call(&handle, *args)` creates (a dnnl_*_create or _clone); DnnlError if it fails."""
    handle = c_void_p()
    check(getattr(load_library(), call)(ctypes.byref(handle), *args), call, context)
    return handle


def library_path() -> str:
    """Path of the libdnnl to load: $PYRYS_DNNL_LIBRARY, else the wheel's file."""
    override = os.environ.get(ENV_VAR)
    if override:
        if not os.path.isabs(override):
            raise DnnlUnavailable(f"${ENV_VAR}={override!r} is a relative path; pyrys loads and runs the library "
                                  "at that path, so it must be absolute (e.g. /opt/onednn/lib/libdnnl.so.3)")
        return override
    return _wheel_library_path()


@functools.cache
def _wheel_library_path() -> str:
    """The wheel's libdnnl, looked up once per process (the lookup reads the wheel's file list:
    on every primitive it cost ResNet-50 2 s of its compile)."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise DnnlUnavailable(f"the {WHEEL} package is not installed and ${ENV_VAR} is not set")
    for file in dist.files or ():
        if str(file).endswith(LIBRARY_NAME):
            return str(dist.locate_file(file))
    raise DnnlUnavailable(f"the {WHEEL} package has no {LIBRARY_NAME}")


_LOADED: dict[str, ctypes.CDLL] = {}


def load_library() -> ctypes.CDLL:
    """Load (once per path) and declare the C API; raise DnnlUnavailable on failure."""
    path = library_path()
    lib = _LOADED.get(path)
    if lib is None:
        lib = _open(path)
        _declare(lib, path)
        _check_version(lib, path)
        _LOADED[path] = lib
    return lib


def _open(path: str) -> ctypes.CDLL:
    import torch  # noqa: F401  -- loads libgomp first so libdnnl shares it

    if not os.path.exists(path):
        raise DnnlUnavailable(f"{path} does not exist (from ${ENV_VAR} or the {WHEEL} wheel)")
    try:
        return ctypes.CDLL(path)
    except OSError as err:
        raise DnnlUnavailable(f"cannot load {path}: {err}") from err


def _declare(lib: ctypes.CDLL, path: str) -> None:
    for name, restype, argtypes in FUNCTIONS:
        try:
            function = getattr(lib, name)
        except AttributeError:
            raise DnnlUnavailable(f"{path} has no symbol {name}; is it oneDNN v3?") from None
        function.restype = restype
        function.argtypes = argtypes


def _check_version(lib: ctypes.CDLL, path: str) -> None:
    version = lib.dnnl_version().contents
    if version.major != 3:
        raise DnnlUnavailable(f"{path} is oneDNN {version.major}.{version.minor}, need v3")


def prevalidated(name: str, args: tuple) -> Any:
    """`name` without per-call argument conversion, for the hot loop.

    `args` (the arguments every later call will pass) are first checked once
    against the declared argtypes, so a wrong call still fails in ctypes.
    """
    function = getattr(load_library(), name)
    if len(args) != len(function.argtypes):
        raise TypeError(f"{name} takes {len(function.argtypes)} arguments, got {len(args)}")
    for argtype, value in zip(function.argtypes, args):
        argtype.from_param(value)
    address = ctypes.cast(function, c_void_p).value
    return ctypes.CFUNCTYPE(function.restype)(address)


def version() -> str:
    """'3.2.0' for the loaded library."""
    v = load_library().dnnl_version().contents
    return f"{v.major}.{v.minor}.{v.patch}"


def effective_cpu_isa() -> int:
    """The ``dnnl_cpu_isa_t`` oneDNN dispatches to: the CPU's, or lower under ``ONEDNN_MAX_CPU_ISA``."""
    return int(load_library().dnnl_get_effective_cpu_isa())


def is_available() -> tuple[bool, str]:
    """(True, 'oneDNN 3.2.0 at <path>') or (False, why it cannot be used)."""
    try:
        load_library()
        return True, f"oneDNN {version()} at {library_path()}"
    except DnnlUnavailable as err:
        return False, str(err)
