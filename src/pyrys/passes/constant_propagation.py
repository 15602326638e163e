"""Constant propagation: a node whose inputs are all constants is evaluated once, at compile time.

    %a = aten::full([1], 1.0) ; %b = aten::add(%a, 2) ; %c = aten::add(%b, 3)
    %d = aten::add(%c, 4) ; aten::add(%x, %d)
    ->  %d = prim::Constant[value={10.}] ; aten::add(%x, %d)

Fold ops on frozen weights (``pyrys::fold_weight``/``fold_bias``) become tensors the
same way.  Not folded: ops with random or side effects, ops producing tuples
(their ``getitem`` users are folded instead: each part of a split weight a constant, so that the
linear reading it is a layer), and results much larger than their inputs (``expand`` of a scalar
to an image would only cost memory).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from torch.utils._pytree import tree_leaves

from pyrys.ir.edit import replace_node
from pyrys.ir.graph import add_constant, constant_value, is_constant, replace_with_literal
from pyrys.ir.vocabulary import is_pure
from pyrys.passes.rewrite import PassResult

GROWTH_LIMIT_BYTES = 1 << 20  # a folded result may exceed its inputs by at most this much


def constant_propagation(gm: fx.GraphModule, only: frozenset | None = None) -> PassResult:
    """Evaluate every all-constant node in topological order (only those whose target is in ``only``, where
    given: the int8 pass folds its bf16 weights' conversions, not the weights' dequantize); ``fired["folded"]``
    counts them."""
    result = PassResult()
    tuples: dict[fx.Node, tuple] = {}  # each all-constant op giving a tuple, evaluated once for its getitems
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and (only is None or node.target in only) and _foldable(node):
            if _fold(gm, node):
                result.fired["folded"] += 1
        elif only is None and _item_of_constant_tuple(node):
            if _fold_item(gm, node, tuples):
                result.fired["folded"] += 1
    gm.recompile()
    return result


def _item_of_constant_tuple(node: fx.Node) -> bool:
    """``getitem(op(constants...), i)``: a part of a split, chunk or unbind of a weight (nn.MultiheadAttention's
    in-projection split for a query apart from its key and value)."""
    if node.op != "call_function" or node.target is not operator.getitem or not isinstance(node.args[1], int):
        return False
    source = node.args[0]
    return isinstance(source, fx.Node) and source.op == "call_function" and _foldable(source)


def _fold_item(gm: fx.GraphModule, node: fx.Node, tuples: dict[fx.Node, tuple]) -> bool:
    source = node.args[0]
    args = constant_value(gm, source.args)
    kwargs = {k: constant_value(gm, v) for k, v in source.kwargs.items()}
    if source not in tuples:
        with torch.no_grad():
            tuples[source] = source.target(*args, **kwargs)
    value = tuples[source]
    if not isinstance(value, (tuple, list)) or not isinstance(value[node.args[1]], torch.Tensor):
        return False
    return _replace_by_tensor(gm, node, value[node.args[1]], args, kwargs)


def _foldable(node: fx.Node) -> bool:
    if not is_pure(node) or not node.users:
        return False
    return is_constant(list(node.args)) and is_constant(list(node.kwargs.values()))


def _fold(gm: fx.GraphModule, node: fx.Node) -> bool:
    args = constant_value(gm, node.args)
    kwargs = {k: constant_value(gm, v) for k, v in node.kwargs.items()}
    with torch.no_grad():
        value = node.target(*args, **kwargs)
    if isinstance(value, torch.Tensor):
        return _replace_by_tensor(gm, node, value, args, kwargs)
    if isinstance(value, (bool, int, float)):
        replace_with_literal(node, value)
        return True
    return False  # tuples and other values stay computed at run time


def _input_bytes(args, kwargs) -> int:
    tensors = [v for v in tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
    return sum(v.numel() * v.element_size() for v in tensors)


def _replace_by_tensor(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor, args, kwargs) -> bool:
    if value.numel() * value.element_size() > _input_bytes(args, kwargs) + GROWTH_LIMIT_BYTES:
        return False
    with gm.graph.inserting_before(node):
        constant = add_constant(gm, value.clone(), node.name)  # its strides (dense: as traced; a later view may
        # need them), its own bytes (not the storage of what it viewed)
    replace_node(node, constant)
    return True
