"""Graph edits that keep ``meta["val"]`` current.

What an edit creates or changes gets its value by propagation from its inputs' values
(:func:`pyrys.ir.meta.settle_meta`), and so do the users whose inputs changed.  Rewrites
edit through these and never write ``meta`` themselves; the verifier checks the result.

    fold = insert_op(gm.graph, FOLD_WEIGHT, (w, gamma, var, eps), "w_bn_folded")
    set_args(conv, (x, fold, bias, ...))      # conv's value is inferred again
    replace_node(bn, conv)                    # bn's users read conv; their values follow
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from pyrys.ir.graph import insert_call
from pyrys.ir.meta import meta_mismatch, settle_meta
from pyrys.ir.provenance import take_over


def insert_op(graph: fx.Graph, target, args: tuple, name: str | None = None) -> fx.Node:
    """A new call at the graph's insert point (see :func:`pyrys.ir.graph.insert_call`), its value inferred."""
    node = insert_call(graph, target, args, name)
    settle_meta([node])
    return node


def set_args(node: fx.Node, args: tuple[Any, ...], target=None, kwargs: dict | None = None) -> None:
    """``node`` now calls its op (or ``target``) on ``args`` (and ``kwargs``, none by default); its value
    is inferred again."""
    if target is not None:
        node.target = target
    node.args, node.kwargs = tuple(args), dict(kwargs or {})
    settle_meta([node])


def replace_node(node: fx.Node, replacement: fx.Node) -> None:
    """Every use of ``node`` reads ``replacement`` instead, and ``node`` is erased.

    The users' values are inferred again unless ``replacement`` has the value ``node`` had;
    ``replacement`` inherits ``node``'s provenance (:mod:`pyrys.ir.provenance`)."""
    users = list(node.users)
    take_over(replacement, node)
    same = "val" in node.meta and "val" in replacement.meta and not meta_mismatch(node.meta["val"],
                                                                                 replacement.meta["val"])
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)
    if not same:
        settle_meta(users)
