"""Memory formats for activations: plain (torch strides), channels-last, or channel-blocked.

A *layout policy* names the format conv-like primitives run in: ``"nhwc"`` (``acdb``),
``"blocked8"`` (``nChw8c``, AVX2) or ``"blocked16"`` (``nChw16c``, AVX-512).  Ops without a
preference keep their producer's format; reorders appear only where a consumer needs another.
"""
from __future__ import annotations

import torch

from pyrys.backends.dnnl.constants import FormatTag
from pyrys.backends.dnnl.primitives import MemoryDesc
from pyrys.backends.dnnl.tensors import dnnl_dtype
from pyrys.machine import kernel_flags

POLICY_TAGS: dict[str, dict[int, FormatTag]] = {
    "nhwc": {3: FormatTag.acb, 4: FormatTag.acdb, 5: FormatTag.acdeb},
    "blocked8": {3: FormatTag.aBc8b, 4: FormatTag.aBcd8b, 5: FormatTag.aBcde8b},
    "blocked16": {3: FormatTag.aBc16b, 4: FormatTag.aBcd16b, 5: FormatTag.aBcde16b},
}


def contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for size in reversed(list(shape)):
        strides.insert(0, step)
        step *= max(int(size), 1)
    return strides


def plain_md(shape, dtype: torch.dtype, strides=None) -> MemoryDesc:
    """A plain descriptor: the given strides, or contiguous ones (oneDNN has no rank-0 tensors)."""
    shape = [int(s) for s in shape]
    if not shape:
        raise ValueError("oneDNN has no rank-0 memory descriptor; a 0-dim tensor stays torch's")
    strides = contiguous_strides(shape) if strides is None else [int(s) for s in strides]
    return MemoryDesc.from_strides(shape, dnnl_dtype(dtype), strides)


def policy_md(shape, dtype: torch.dtype, policy: str) -> MemoryDesc:
    """The policy's activation format for a 3-5-D tensor; plain contiguous for other ranks."""
    tag = POLICY_TAGS.get(policy, {}).get(len(shape))
    if tag is None:
        return plain_md(shape, dtype)
    return MemoryDesc.from_tag([int(s) for s in shape], dnnl_dtype(dtype), tag)


def any_md(shape, dtype: torch.dtype) -> MemoryDesc:
    return MemoryDesc.from_tag([int(s) for s in shape], dnnl_dtype(dtype), FormatTag.any)


def is_plain_contiguous(md: MemoryDesc) -> bool:
    return md == MemoryDesc.from_strides(md.dims, md.dtype, contiguous_strides(md.dims))


def native_blocked_policy() -> str:
    """``blocked16`` where AVX-512 runs, else ``blocked8``."""
    return "blocked16" if "avx512f" in kernel_flags() else "blocked8"


def candidate_policies() -> list[str]:
    """The layout policies worth measuring on this CPU."""
    return ["nhwc", native_blocked_policy()]
