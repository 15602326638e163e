"""Request and answer bodies for ``pyrys serve``: ``.npy``, ``.npz`` and JSON, never pickle.

A body is one of

- ``.npy`` (``np.save``): the module's one input;
- ``.npz`` (``np.savez(f, a, b)`` or ``np.savez(f, ids=..., mask=...)``): its inputs, in the order they
  were written;
- JSON: a nested list of numbers (one input) or ``{"inputs": [first, second, ...]}``.  JSON numbers
  take the dtype of the input they fill (``input_dtypes``); a value that dtype cannot hold exactly
  (``1.5`` for an integer input) is refused.

The answer takes the request's form: ``.npy`` for a one-tensor output (``.npz`` for several), JSON
for JSON.  Several outputs are named by their place in the output's structure: ``"0"``, ``"1"`` for
a tuple, the key for a dict, joined with ``.`` when nested (``"0.logits"``).  ``.npy``/``.npz`` bodies
are read with ``allow_pickle=False``: an object array is refused, not unpickled.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_flatten_with_path

from pyrys.signature import InputError

NPY, NPZ, JSON = "npy", "npz", "json"
CONTENT_TYPES = {NPY: "application/x-npy", NPZ: "application/x-npz", JSON: "application/json"}


@dataclass(frozen=True)
class Request:
    """A decoded body: the module's positional inputs and the form the answer takes."""

    inputs: tuple[torch.Tensor, ...]
    form: str


def decode(body: bytes, input_dtypes: Sequence[torch.dtype | None] = ()) -> Request:
    """The inputs ``body`` holds (see the module docstring); :class:`InputError` saying why not."""
    if body.startswith(b"\x93NUMPY"):
        return Request((as_tensor(_load_npy(body), "the .npy body"),), NPY)
    if body.startswith(b"PK"):
        return Request(_load_npz(body), NPZ)
    if body.lstrip()[:1] in (b"[", b"{"):
        return Request(_load_json(body, input_dtypes), JSON)
    raise InputError("pyrys serve: expected a body in .npy (np.save), .npz (np.savez) or JSON (a nested list, or "
                     f'{{"inputs": [...]}}), got {len(body)} bytes starting {body[:8]!r}')


def encode(outputs: Any, form: str) -> tuple[bytes, str]:
    """``outputs`` (a tensor or a structure of them) as a body in ``form``'s family, and its content type."""
    named = named_leaves(outputs)
    if form == JSON:
        value = _json_value(named[0][1]) if len(named) == 1 else {n: _json_value(v) for n, v in named}
        return json.dumps(value).encode(), CONTENT_TYPES[JSON]
    buffer = io.BytesIO()
    if len(named) == 1:
        np.save(buffer, _numpy(named[0][1]), allow_pickle=False)
        return buffer.getvalue(), CONTENT_TYPES[NPY]
    np.savez(buffer, **{n: _numpy(v) for n, v in named})
    return buffer.getvalue(), CONTENT_TYPES[NPZ]


def named_leaves(outputs: Any) -> list[tuple[str, Any]]:
    """Each leaf of ``outputs`` with its name: its path of tuple indices and dict keys joined by ``.``
    (``""`` for an output that is one tensor)."""
    flat, _ = tree_flatten_with_path(outputs)
    return [(".".join(str(_key_name(k)) for k in path), leaf) for path, leaf in flat]


def as_tensor(array: np.ndarray, what: str) -> torch.Tensor:
    """``array`` as a tensor torch can read (native byte order, writable, dense); :class:`InputError`
    for an array of something that is not a number."""
    if array.dtype.kind not in "biufc":
        raise InputError(f"pyrys: {what} must hold numbers or booleans, got dtype {array.dtype}")
    array = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False))
    if not array.flags.writeable:
        array = array.copy()
    try:
        return torch.from_numpy(array)
    except TypeError as error:
        raise InputError(f"pyrys: {what} has dtype {array.dtype}, which torch does not take ({error})") from None


def _key_name(key: Any) -> Any:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return getattr(key, attribute)
    return key


def _numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)


def _json_value(value: Any) -> Any:
    return _numpy(value).tolist() if isinstance(value, torch.Tensor) else value


def _load_npy(body: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"pyrys serve: the .npy body cannot be read: {error}") from None


def _load_npz(body: bytes) -> tuple[torch.Tensor, ...]:
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            arrays = [(name, archive[name]) for name in archive.files]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise InputError(f"pyrys serve: the .npz body cannot be read: {error}") from None
    if not arrays:
        raise InputError("pyrys serve: the .npz body holds no array; write the inputs with np.savez(f, x, ...)")
    return tuple(as_tensor(array, f"the .npz body's {name!r}") for name, array in arrays)


def _load_json(body: bytes, input_dtypes: Sequence[torch.dtype | None]) -> tuple[torch.Tensor, ...]:
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(f"pyrys serve: the JSON body cannot be read: {error}") from None
    if isinstance(value, dict):
        if set(value) != {"inputs"} or not isinstance(value["inputs"], list) or not value["inputs"]:
            raise InputError('pyrys serve: a JSON object body must be {"inputs": [first, second, ...]} (one nested '
                             f"list per input), got keys {sorted(value)}")
        values = value["inputs"]
    else:
        values = [value]
    dtypes = list(input_dtypes) + [None] * (len(values) - len(input_dtypes))
    return tuple(_json_tensor(v, dtype, f"JSON input {i}") for i, (v, dtype) in enumerate(zip(values, dtypes)))


def _json_tensor(value: Any, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """A nested list of numbers as a tensor of ``dtype`` (the input's), refusing values it cannot hold."""
    try:
        array = np.array(value)
    except ValueError as error:  # a ragged list
        raise InputError(f"pyrys serve: {what} must be a rectangular nested list of numbers: {error}") from None
    if array.dtype.kind not in "biuf":
        raise InputError(f"pyrys serve: {what} must be a rectangular nested list of numbers, got {array.dtype} values")
    if dtype is None or dtype.is_complex:
        return as_tensor(array, what)
    tensor = torch.from_numpy(array)
    cast = tensor.to(dtype)
    if not dtype.is_floating_point and not torch.equal(cast.to(tensor.dtype), tensor):
        raise InputError(f"pyrys serve: {what} must hold values of {dtype} (the module's input), "
                         "got values that type cannot hold exactly")
    return cast
