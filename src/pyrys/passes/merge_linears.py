"""Linears that read one input become one linear over their weights stacked, its output split back:

    %q = linear(%x, %Wq, %bq) ; %k = linear(%x, %Wk, %bk) ; %v = linear(%x, %Wv, %bv)
    ->  %qkv = linear(%x, cat([Wq, Wk, Wv]), cat([bq, bk, bv])) ; %q, %k, %v = split(%qkv, [Nq, Nk, Nv], -1)

A transformer's query, key and value projections are one matrix product three times as wide (one
primitive, a larger product, the input read once); the parts are views of its output.  Linears are
merged when their weights are constant matrices of one dtype and width, their biases all constant or
all absent, and no reader of theirs is an activation or an ``add``/``mul`` a post-op could take (those
fuse into each linear instead).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from pyrys.ir.edit import insert_op, replace_node
from pyrys.ir.graph import add_constant, constant_value, op_args, tensor_meta
from pyrys.ir.post_ops import ACTIVATIONS
from pyrys.ir.output_aliases import aliased_input
from pyrys.passes.rewrite import Match, Miss, Rule

aten = torch.ops.aten
FUSABLE_READERS = frozenset({*ACTIVATIONS, aten.add.Tensor, aten.mul.Tensor})


def _mergeable(node: fx.Node) -> bool:
    """A linear with a constant matrix weight and a constant or no bias, none of whose readers would fuse."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return False
    args = op_args(node)
    weight, bias = args["weight"], args.get("bias")
    constant = (lambda arg: isinstance(arg, fx.Node) and arg.op == "get_attr" and tensor_meta(arg) is not None)
    if not constant(weight) or tensor_meta(weight).dim() != 2 or (bias is not None and not constant(bias)):
        return False
    return not any(user.target in FUSABLE_READERS for user in node.users)


class MergeSiblingLinears(Rule):
    """Every mergeable linear reading the first one's input -> one linear and a split (at the first one)."""

    name = "merge_sibling_linears"
    anchors = frozenset({aten.linear.default})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        x = node.args[0]
        if not isinstance(x, fx.Node) or not _mergeable(node):
            return None
        siblings = [u for u in x.users if u.args and u.args[0] is x and _mergeable(u)]
        if len(siblings) < 2 or node is not min(siblings, key=_position):
            return None
        kinds = {(tensor_meta(op_args(s)["weight"]).dtype, tensor_meta(op_args(s)["weight"]).shape[1],
                  op_args(s).get("bias") is None) for s in siblings}
        if len(kinds) != 1:
            return None  # weights of another dtype or width, or a bias on some but not all
        return Match({"x": x, "linears": sorted(siblings, key=_position)})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        linears = match["linears"]
        weights = [constant_value(gm, op_args(n)["weight"]) for n in linears]
        biases = [op_args(n).get("bias") for n in linears]
        with gm.graph.inserting_before(linears[0]):
            weight = add_constant(gm, torch.cat(weights, 0), "merged_weight")
            args = (match["x"], weight)
            if biases[0] is not None:
                args += (add_constant(gm, torch.cat([constant_value(gm, b) for b in biases], 0), "merged_bias"),)
            merged = insert_op(gm.graph, aten.linear.default, args, "merged_linear")
            parts = insert_op(gm.graph, aten.split_with_sizes.default, (merged, [w.shape[0] for w in weights], -1),
                              "split")
            pieces = [insert_op(gm.graph, operator.getitem, (parts, index), f"{linear.name}_part")
                      for index, linear in enumerate(linears)]
        for linear, piece in zip(linears, pieces):
            _views_as_reshapes(linear)
            replace_node(linear, piece)


_VIEWS = frozenset({aten.view.default, aten._unsafe_view.default})


def _views_as_reshapes(node: fx.Node) -> None:
    """The views of ``node``'s result, and of whatever aliases it (a transpose, a permute, a slice, another
    view), as reshapes: a part of the split is strided (a row of the merged output), where the linear's own
    result was contiguous, and a view the model made of it may not be one of the part (``nn.MultiheadAttention``
    at batch 2: ``q.view(L, B * H, D)``; Longformer's ``q.view(S, B, H, D).transpose(0, 1).transpose(1, 2)
    .view(B * H, S, D)``: torch's "Cannot view" from the pass, helpers' finds); a reshape gives the same
    values, copying where it must."""
    work, seen = [node], {node}
    while work:
        for user in list(work.pop().users):
            if user in seen:
                continue
            if user.target in _VIEWS:  # (``_unsafe_view``'s schema says no alias: named here)
                user.target = aten.reshape.default
            elif aliased_input(user, as_backends_run=True) is None:
                continue
            seen.add(user)
            work.append(user)


def _position(node: fx.Node) -> int:
    """``node``'s index in its graph (nodes are in topological order)."""
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)
