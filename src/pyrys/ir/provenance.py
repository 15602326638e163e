"""Which captured value each node of an optimized graph computes.

Every rewrite that makes a node compute another node's value goes through
:func:`pyrys.ir.edit.replace_node`, which appends the replaced node's names to the
replacement's provenance: the fused conv that took over a BatchNorm and then a ReLU has
provenance ``("conv2d_3", "batch_norm_3", "relu_3")``, and computes ``relu_3``'s value.
Graph copies (specialization, legalization) keep node meta, so the names survive to the
backend's graph, where :mod:`pyrys.layer_errors` compares each node with its captured twin.

    computes(node)        -> "relu_3"        # the last captured name it took over
    absorbed(node)        -> ("conv2d_3", "batch_norm_3", "relu_3")

A conversion to another dtype (``passes/precision.py``) stands for the value it converts
(:func:`copies`): its twin is that value's.
"""
from __future__ import annotations

import torch.fx as fx

PROVENANCE_KEY = "pyrys_provenance"


def absorbed(node: fx.Node) -> tuple[str, ...]:
    """Every name whose value ``node`` has computed, oldest first (its own name when no rewrite touched it)."""
    return node.meta.get(PROVENANCE_KEY, (node.name,))


def computes(node: fx.Node) -> str:
    """The name of the node whose value ``node`` computes now."""
    return absorbed(node)[-1]


def take_over(replacement: fx.Node, node: fx.Node) -> None:
    """``replacement`` now computes what ``node`` computed (called as ``node`` is replaced)."""
    if replacement is node:
        return
    taken = absorbed(node)
    replacement.meta[PROVENANCE_KEY] = tuple(n for n in absorbed(replacement) if n not in taken) + taken


def copies(copy: fx.Node, source: fx.Node) -> None:
    """``copy`` computes ``source``'s value in another form (a dtype conversion): it stands for the same."""
    copy.meta[PROVENANCE_KEY] = absorbed(source)
