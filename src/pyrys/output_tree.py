"""Outputs put back into the structure ``forward`` returned, ``torch.Size`` included.

torch's pytree flattens a ``torch.Size`` into its ints but unflattens it as a plain tuple (its sizes may be
symbolic while tracing), so ``return y, x.shape`` came back as ``(y, (2, 8))``, not ``(y, torch.Size([2, 8]))``.
:func:`unflattener` rebuilds each ``torch.Size`` node itself and leaves every other node to torch.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._pytree import TreeSpec, tree_unflatten, treespec_leaf


def unflattener(spec: TreeSpec) -> Callable[[list], object]:
    """``leaves -> structure`` for ``spec``: ``tree_unflatten`` where it holds no ``torch.Size``."""
    if not _holds_size(spec):
        return lambda leaves: tree_unflatten(leaves, spec)
    return lambda leaves: _rebuilt(list(leaves), spec)


def _holds_size(spec: TreeSpec) -> bool:
    return not spec.is_leaf() and (spec.type is torch.Size
                                   or any(_holds_size(spec.child(i)) for i in range(spec.num_children)))


def _rebuilt(leaves: list, spec: TreeSpec):
    """``tree_unflatten(leaves, spec)`` with each ``torch.Size`` node a ``torch.Size``."""
    if spec.is_leaf():
        return leaves[0]
    if not _holds_size(spec):
        return tree_unflatten(leaves, spec)
    children, start = [], 0
    for i in range(spec.num_children):
        child = spec.child(i)
        children.append(_rebuilt(leaves[start:start + child.num_leaves], child))
        start += child.num_leaves
    if spec.type is torch.Size:
        return torch.Size(children)
    return tree_unflatten(children, TreeSpec(spec.type, spec.context, [treespec_leaf()] * len(children)))
