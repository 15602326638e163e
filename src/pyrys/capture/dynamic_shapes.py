"""Export for every shape: every dim of every input tensor is ``Dim.AUTO``.

``torch.export`` keeps a dim symbolic unless the model pins it (a conv's channels, a reshape
to a constant, a branch on the size), in which case it specializes that dim silently.  Sizes
0 and 1 are specialized by default ("0/1 specialization": a batch-1 example would pin the
batch); ``backed_size_oblivious`` keeps them symbolic, and what the trace assumed about them
(``Ne(s1, 1)``) is recorded as a guard, checked for every later shape
(:func:`pyrys.ir.symbolic.bind_symbols`); the passes propagate shapes in the same mode
(:func:`pyrys.ir.symbolic.sizes_kept_symbolic`).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch.export import Dim
from torch.utils._pytree import tree_map


def every_dim_auto(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """The ``dynamic_shapes`` argument of ``torch.export.export`` with every tensor dim ``Dim.AUTO``."""
    if not kwargs:
        return tuple(_auto(a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: _auto(value) for name, value in bound.arguments.items()}


def _auto(value: Any) -> Any:
    return tree_map(lambda v: {i: Dim.AUTO for i in range(v.dim())}
                    if isinstance(v, torch.Tensor) and v.dim() else None, value)
