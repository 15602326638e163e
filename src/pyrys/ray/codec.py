"""Request and answer bodies for ``pyrys serve``: ``.npy``, ``.npz`` and JSON, never pickle.

A body is one of

- ``.npy`` (``np.save``): the module's one input;
- ``.npz`` (``np.savez(f, x, mask)``, or ``savez_compressed``): its inputs, by position: the arrays
  must be named ``arr_0``, ``arr_1``, ... (what ``savez`` names positional arrays), since a name
  cannot say which positional input it is;
- JSON: a nested list of numbers (one input) or ``{"inputs": [first, second, ...]}``; a complex input's
  numbers as ``[real, imaginary]`` pairs, as answers give them.

JSON numbers take the dtype of the input they fill (``input_dtypes``); a value that dtype cannot
hold exactly (``1.5`` for an integer input) is refused, and so is a float beyond its range (``1e40``
for float32), which would be inf.  A body, and the arrays it holds once decompressed, may take at most
``max_bytes`` (:class:`RequestTooLarge` beyond: a small ``savez_compressed`` of zeros can hold GBs); a JSON
body at most 1/``JSON_DECODE_FACTOR`` of it, since decoding it takes that many times its size.  A float32 array for a bfloat16 input is
rounded to it (numpy has no bfloat16).  Arrays are read with ``allow_pickle=False`` after their
header's size is checked against the bytes that hold them.

The answer takes the request's form: ``.npy`` for a one-tensor output (``.npz`` for several), JSON
for JSON.  Several outputs are named by their place in the output's structure: ``"0"``, ``"1"`` for
a tuple, the key for a dict, joined with ``.`` when nested (``"0.logits"``).  bfloat16 outputs are
answered as float32; complex ones in JSON as ``[real, imaginary]`` pairs; NaN and infinities in JSON as
``NaN``, ``Infinity`` and ``-Infinity``, as Python's and TensorFlow Serving's JSON write them (strict JSON
has no such numbers: ask for ``.npy`` where they matter).
"""
from __future__ import annotations

import io
import json
import tokenize
import math
import threading
import zipfile
from dataclasses import dataclass
from typing import IO, Any, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_flatten_with_path

from pyrys.signature import InputError

NPY, NPZ, JSON = "npy", "npz", "json"
CONTENT_TYPES = {NPY: "application/x-npy", NPZ: "application/x-npz", JSON: "application/json"}
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
# numpy parses a .npy header with ast.literal_eval, and CPython 3.11's parser is not safe from several threads
# at once ("SystemError: AST constructor recursion depth mismatch", CPython gh-106905): one array at a time
NPY_READING = threading.Lock()
MAX_REQUEST_BYTES = 256 * 2**20  # pyrys serve --max-request-mb
JSON_DECODE_FACTOR = 16  # Python's numbers and lists of a JSON body: measured 15x its bytes at their peak


class RequestTooLarge(InputError):
    """A body, or what it decompresses to, beyond the server's limit (HTTP 413)."""


@dataclass(frozen=True)
class Request:
    """A decoded body: the module's positional inputs and the form the answer takes."""

    inputs: tuple[torch.Tensor, ...]
    form: str


def decode(body: bytes, input_dtypes: Sequence[torch.dtype | None] = (), max_bytes: int = MAX_REQUEST_BYTES) -> Request:
    """The inputs ``body`` holds (see the module docstring); :class:`InputError` saying why not."""
    check_size(len(body), max_bytes, "the body")
    if body.startswith(b"\x93NUMPY"):
        arrays, form = [("the .npy body", _read_npy(io.BytesIO(body), len(body), "the .npy body"))], NPY
    elif body.startswith(b"PK"):
        arrays, form = _read_npz(body, max_bytes), NPZ
    elif body.lstrip()[:1] in (b"[", b"{"):
        check_size(len(body) * JSON_DECODE_FACTOR, max_bytes, f"a JSON body decodes to about {JSON_DECODE_FACTOR} "
                   "times its size, which")
        return Request(_load_json(body, input_dtypes), JSON)
    else:
        raise InputError("pyrys serve: expected a body in .npy (np.save), .npz (np.savez) or JSON (a nested list, "
                         f'or {{"inputs": [...]}}), got {len(body)} bytes starting {body[:8]!r}')
    dtypes = list(input_dtypes) + [None] * (len(arrays) - len(input_dtypes))
    return Request(tuple(as_tensor(array, what, dtype) for (what, array), dtype in zip(arrays, dtypes)), form)


def check_size(size: int, max_bytes: int, what: str) -> None:
    """:class:`RequestTooLarge` where ``size`` bytes is beyond ``max_bytes``."""
    if size > max_bytes:
        raise RequestTooLarge(f"pyrys serve: {what} is {size} bytes, beyond this server's limit of {max_bytes} "
                              "(pyrys serve --max-request-mb): send fewer rows per request")


def encode(outputs: Any, form: str) -> tuple[bytes, str]:
    """``outputs`` (a tensor or a structure of them) as a body in ``form``'s family, and its content type."""
    named = named_leaves(outputs)
    if form == JSON:
        value = _json_value(named[0][1]) if len(named) == 1 else {n: _json_value(v) for n, v in named}
        return json.dumps(value).encode(), CONTENT_TYPES[JSON]
    buffer = io.BytesIO()
    if len(named) == 1:
        np.lib.format.write_array(buffer, to_numpy(named[0][1]), allow_pickle=False)
        return buffer.getvalue(), CONTENT_TYPES[NPY]
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, value in named:
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, to_numpy(value), allow_pickle=False)
    return buffer.getvalue(), CONTENT_TYPES[NPZ]


def named_leaves(outputs: Any) -> list[tuple[str, Any]]:
    """Each leaf of ``outputs`` with its name: its path of tuple indices and dict keys joined by ``.``
    (``""`` for an output that is one tensor), made :func:`distinct`."""
    flat, _ = tree_flatten_with_path(outputs)
    names = distinct([".".join(str(_key_name(k)) for k in path) for path, _ in flat])
    return [(name, leaf) for name, (_, leaf) in zip(names, flat)]


def distinct(names: list[str]) -> list[str]:
    """``names`` with each one that repeats an earlier one suffixed ``~1``, ``~2`` ... (``{"c.d": a, "c":
    {"d": b}}`` names two outputs ``c.d``: the second is ``c.d~1``, not lost in a zip or a JSON object)."""
    taken: set[str] = set()
    made = []
    for name in names:
        unique, count = name, 0
        while unique in taken:
            count += 1
            unique = f"{name}~{count}"
        taken.add(unique)
        made.append(unique)
    return made


def to_numpy(value: Any) -> np.ndarray:
    """An output as an array: a tensor's values (bfloat16 as float32, lazy negation/conjugation applied)."""
    if isinstance(value, torch.Tensor):
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy(force=True)
    return np.asarray(value)


def as_tensor(array: np.ndarray, what: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``array`` as a tensor torch can read (native byte order, writable, dense, its shape kept); a float32
    array for a bfloat16 ``dtype`` rounded to it; :class:`InputError` for something that is not numbers."""
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biufc":
        described = f"dtype {array.dtype}" if isinstance(array, np.ndarray) else type(array).__name__
        raise InputError(f"pyrys: {what} must hold numbers or booleans, got {described}")
    array = np.require(array.astype(array.dtype.newbyteorder("="), copy=False), requirements=["C", "W"])
    try:
        tensor = torch.from_numpy(array)
    except TypeError as error:
        raise InputError(f"pyrys: {what} has dtype {array.dtype}, which torch does not take ({error})") from None
    return tensor.to(dtype) if dtype == torch.bfloat16 and tensor.dtype == torch.float32 else tensor


def _key_name(key: Any) -> Any:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    return key


def _json_value(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    return to_numpy(torch.view_as_real(value.resolve_conj()) if value.is_complex() else value).tolist()


def _read_npy(stream: IO[bytes], available: int, what: str) -> np.ndarray:
    """One array from ``stream`` (``available`` bytes), its header's claimed size checked first."""
    with NPY_READING:
        return _read_npy_alone(stream, available, what)


def _read_npy_alone(stream: IO[bytes], available: int, what: str) -> np.ndarray:
    try:
        start = stream.tell()
        reader = _HEADER_READERS.get(np.lib.format.read_magic(stream))
        if reader is not None:
            shape, _, dtype = reader(stream)
            needed = math.prod(shape) * dtype.itemsize + stream.tell() - start
            if needed > available:
                raise InputError(f"pyrys serve: {what} declares shape {shape} of {dtype} ({needed} bytes) but holds "
                                 f"{available} bytes")
        stream.seek(start)
        return np.lib.format.read_array(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, MemoryError, tokenize.TokenError) as error:  # (TokenError: a header
        raise InputError(f"pyrys serve: {what} cannot be read: {error or type(error).__name__}") from None  # "(2, 4 ")


def _read_npz(body: bytes, max_bytes: int) -> list[tuple[str, np.ndarray]]:
    try:
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            infos = archive.infolist()
            check_size(sum(info.file_size for info in infos), max_bytes, "the .npz body decompressed")
            members = {info.filename.removesuffix(".npy"): info for info in infos}
            if len(members) != len(infos):
                names = sorted(info.filename for info in infos)
                raise InputError(f"pyrys serve: the .npz body names an input twice ({names}): each array once, "
                                 "arr_0, arr_1, ...")
            order = [f"arr_{i}" for i in range(len(members))]
            if not members or set(members) != set(order):
                raise InputError("pyrys serve: the .npz body must hold the inputs by position, arrays named arr_0, "
                                 f"arr_1, ... (np.savez(f, x, mask) writes them so); got {sorted(members)}")
            arrays = []
            for name in order:
                with archive.open(members[name]) as member:
                    stream = io.BytesIO(member.read())
                arrays.append((f"the .npz body's {name}", _read_npy(stream, members[name].file_size,
                                                                     f"the .npz body's {name}")))
            return arrays
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, MemoryError) as error:
        raise InputError(f"pyrys serve: the .npz body cannot be read: {error or type(error).__name__}") from None


def _load_json(body: bytes, input_dtypes: Sequence[torch.dtype | None]) -> tuple[torch.Tensor, ...]:
    try:
        value = json.loads(body, parse_float=_finite_float)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise InputError(f"pyrys serve: the JSON body cannot be read: {error}") from None
    if isinstance(value, dict):
        if set(value) != {"inputs"} or not isinstance(value["inputs"], list) or not value["inputs"]:
            got = (f"keys {sorted(value)}" if set(value) != {"inputs"} else
                   "an empty list" if value["inputs"] == [] else f"a {type(value['inputs']).__name__} there")
            raise InputError('pyrys serve: a JSON object body must be {"inputs": [first, second, ...]} (one nested '
                             f"list per input), got {got}")
        values = value["inputs"]
    else:
        values = [value]
    dtypes = list(input_dtypes) + [None] * (len(values) - len(input_dtypes))
    return tuple(_json_tensor(v, dtype, f"JSON input {i}") for i, (v, dtype) in enumerate(zip(values, dtypes)))


def _finite_float(text: str) -> float:
    """A JSON number as a float; beyond float64 (``1e400``, which Python reads as inf) a ValueError."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text} is beyond float64's range")
    return value


INT64_RANGE = (-2 ** 63, 2 ** 63 - 1)


def _exact_integers(array: np.ndarray, value: Any, dtype: torch.dtype, what: str) -> np.ndarray:
    """The numbers of ``value`` (JSON that mixes integers and floats, which ``array`` holds as float64) as
    exact Python integers, for an input of the integer ``dtype``; a float that is not a whole number is refused."""
    given = np.array(value, dtype=object).reshape(-1)
    if any(isinstance(v, float) and not v.is_integer() for v in given):
        raise InputError(f"pyrys serve: {what} must hold values of {dtype} (the module's input), "
                         "got values that type cannot hold exactly")
    whole = np.empty(given.shape, dtype=object)
    whole[:] = [int(v) for v in given]
    if all(INT64_RANGE[0] <= v <= INT64_RANGE[1] for v in whole):
        whole = whole.astype(np.int64)
    return whole.reshape(array.shape)


def _json_tensor(value: Any, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """A nested list of numbers as a tensor of ``dtype`` (the input's), refusing values it cannot hold."""
    try:
        array = np.array(value)
    except (ValueError, RecursionError) as error:  # a ragged list; one nested too deep
        raise InputError(f"pyrys serve: {what} must be a rectangular nested list of numbers: {error}") from None
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex) and array.dtype.kind == "f":
        array = _exact_integers(array, value, dtype, what)  # float64 rounds past 2**53: [2**53 + 1, 1.0]
    if array.dtype == np.uint64 or array.dtype == object and any(isinstance(v, int) and not isinstance(v, bool)
                                                                and not INT64_RANGE[0] <= v <= INT64_RANGE[1]
                                                                for v in array.reshape(-1)):
        raise InputError(f"pyrys serve: {what} holds an integer too large for 64 bits")
    if array.dtype.kind not in "biuf":
        raise InputError(f"pyrys serve: {what} must be a rectangular nested list of numbers, got {array.dtype} values")
    if dtype is not None and dtype.is_complex:  # [real, imaginary] pairs, as answers give them
        if array.ndim == 0 or array.shape[-1] != 2 or array.dtype.kind == "b":
            raise InputError(f"pyrys serve: {what} is {dtype} (the module's input): give each number as a "
                             f"[real, imaginary] pair of numbers, got a list of shape {list(array.shape)} of "
                             f"{array.dtype} values")
        return torch.view_as_complex(_json_tensor(value, dtype.to_real(), what)).to(dtype)
    if dtype is None:
        return as_tensor(array, what)
    tensor = torch.from_numpy(array)
    cast = tensor.to(dtype)
    if not dtype.is_floating_point and not torch.equal(cast.to(tensor.dtype), tensor):
        raise InputError(f"pyrys serve: {what} must hold values of {dtype} (the module's input), "
                         "got values that type cannot hold exactly")
    finite = ~tensor.isinf() if tensor.is_floating_point() else torch.ones_like(cast, dtype=torch.bool)
    if dtype.is_floating_point and bool((cast.isinf() & finite).any()):  # (an integer too: 70000 as float16)
        raise InputError(f"pyrys serve: {what} holds a number beyond the range of {dtype} (the module's input), "
                         f"which would be inf; the largest is {torch.finfo(dtype).max:g}")
    return cast
