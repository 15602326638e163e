"""Constants a backend holds in its own layout: the graph keeps a stand-in with their shape.

Once a backend has packed a weight into the layout its kernels read (oneDNN's blocked
convolution weights), the plain tensor in the graph is a second copy of the same numbers.
:func:`release` makes a *stand-in* for it: a tensor on the ``meta`` device with the weight's
shape, strides and dtype (all that printing, shape propagation and specializing read),
registered with a function that restores its values from the backend's copy, exactly
(a layout change moves the same numbers).  Code that reads a constant's numbers (saving, a
torch fallback, the reference backend, comparing two captures) asks :func:`values_of`.

    stand_in = release(weight, restore)     # weight's bytes can now be freed
    values_of(stand_in)                     # a new tensor equal to weight, bit for bit
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from pyrys.ir.fingerprint import fingerprint

_RESTORE: WeakIdKeyDictionary = WeakIdKeyDictionary()  # stand-in -> () -> its values
_FINGERPRINTS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # stand-in -> its values' fingerprint
_LOCK = threading.Lock()  # compiles and loads on several threads register stand-ins


def release(tensor: torch.Tensor, restore: Callable[[], torch.Tensor]) -> torch.Tensor:
    """A stand-in for ``tensor`` (same shape, strides and dtype; no bytes); ``restore()`` gives its values.
    Made outside inference mode: an inference tensor's views and detached copies keep no base to find it by."""
    with torch.inference_mode(False):
        stand_in = torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="meta")
    kept = fingerprint(tensor)  # (microseconds: a later capture is matched to it without restoring it)
    with _LOCK:
        _RESTORE[stand_in] = restore
        if kept is not None:
            _FINGERPRINTS[stand_in] = kept
    return stand_in


def released_base(value: object) -> torch.Tensor | None:
    """The stand-in ``value`` is, or is a view of (a reshape in a lowering); None for anything else."""
    if not isinstance(value, torch.Tensor) or not value.is_meta:
        return None
    base = value if value._base is None else value._base
    with _LOCK:
        return base if base in _RESTORE else None


def released_fingerprint(value: object) -> int | None:
    """The :func:`~pyrys.ir.fingerprint.fingerprint` of the values the stand-in ``value`` stands for (not a view
    of one), kept at :func:`release`; None for anything else."""
    if released_base(value) is not value:
        return None
    with _LOCK:
        return _FINGERPRINTS.get(value)


def is_released(value: object) -> bool:
    """Whether ``value`` is a stand-in made by :func:`release` (or a view of one)."""
    return released_base(value) is not None


def values_of(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or for a stand-in (or a view of one) a new tensor with the values it stands for."""
    base = released_base(tensor)
    if base is None:
        return tensor
    with _LOCK:
        restore = _RESTORE[base]
    values = restore()
    if values.shape != base.shape or values.dtype != base.dtype:
        raise RuntimeError(f"pyrys: a released constant came back as {values.dtype}{tuple(values.shape)}, "
                           f"not {base.dtype}{tuple(base.shape)}")
    if values.stride() != base.stride():
        values = torch.empty_strided(base.shape, base.stride(), dtype=base.dtype).copy_(values)
    if tensor is base:
        return values
    return values.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())
