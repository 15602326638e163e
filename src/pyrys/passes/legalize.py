"""Legalize: one spelling of each op before the backends.

Every convolution, transposed convolution and linear nothing was fused into becomes its fused op
with an empty post-op chain (:func:`pyrys.ir.fused.to_fused`), so a backend lowers three ops,
``pyrys::conv``, ``pyrys::conv_transpose`` and ``pyrys::linear``, and reads them by name:

    %conv2d = aten::conv2d(%x, %w, %b, [1, 1], [0, 0], [1, 1], 1)
    ->  %conv2d = pyrys::conv2d(%x, %w, %b, [1, 1], [0, 0], [1, 1], 1)      (the node keeps its name)

A convolution with string padding (``padding="same"`` with an even kernel; simplify spells out the others)
has no fused form and stays as it is
(the dnnl backend runs it through torch).  An unbatched convolution or pooling (``[C, H, W]`` in)
becomes a batch of one between views, the form oneDNN takes; a binary post-op's operand of the output's rank is
batched too (a lower-rank one broadcasts from the right: it reads the same against ``[1, C, H, W]``):

    %y = pyrys::conv2d(%x, ...)  ->  %x_batched = aten::unsqueeze(%x, 0)
                                     %y = pyrys::conv2d(%x_batched, ...)
                                     %y_unbatched = aten::squeeze(%y, [0])   (read where %y was)

This runs after the recorded pipeline
(:func:`pyrys.passes.pipeline.legalize_for_backends`), so ``opt.graph`` keeps ATen's names.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from pyrys.ir.edit import insert_op, set_args
from pyrys.ir.fused import FUSED_BY_BASE, FUSED_CONV, FUSED_CONV_TRANSPOSE, fused_form_miss, read_fused, to_fused
from pyrys.ir.graph import tensor_meta
from pyrys.ir.vocabulary import POOLS
from pyrys.passes.rewrite import Match, Miss, PassResult, Rule, apply_rules, fail

aten = torch.ops.aten


class ToFusedForm(Rule):
    """``aten::conv2d(...)`` -> ``pyrys::conv(..., post_ops=[], post_inputs=[])`` (likewise deconv, linear)."""

    name = "fused_form"
    anchors = frozenset(FUSED_BY_BASE)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        reason = fused_form_miss(node)
        return fail(reason) if reason else Match({})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        to_fused(gm, node, in_place=True)


class BatchOfOne(Rule):
    """An unbatched (transposed) convolution or pooling runs on its input as a batch of one."""

    name = "batch_of_one"
    anchors = frozenset({FUSED_CONV, FUSED_CONV_TRANSPOSE, *POOLS})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | None:
        data = tensor_meta(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.target in POOLS:
            unbatched_rank = POOLS[node.target] + 1
        else:
            weight = tensor_meta(read_fused(node).args["weight"])
            unbatched_rank = weight.dim() - 1 if weight is not None else None
        return Match({"rank": data.dim()}) if data is not None and data.dim() == unbatched_rank else None

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        data = node.args[0]
        batched = _batch_of(data)
        if batched is None:
            with gm.graph.inserting_before(node):
                batched = insert_op(gm.graph, aten.unsqueeze.default, (data, 0), f"{node.name}_batched")
        if node.target in POOLS:
            with gm.graph.inserting_after(node):
                unbatched = insert_op(gm.graph, aten.squeeze.dims, (node, [0]), f"{node.name}_unbatched")
            node.replace_all_uses_with(unbatched, delete_user_cb=lambda user: user is not unbatched)
            set_args(node, (batched, *node.args[1:]), kwargs=node.kwargs)
            _erase_unread(data)
            return
        fused = read_fused(node)
        operands = []
        for operand in fused.post_inputs:  # batched too where they had the unbatched output's rank
            batched_operand = batched if operand is data else _batch_of(operand)
            val = tensor_meta(operand)
            if batched_operand is None and val is not None and val.dim() == match["rank"]:
                with gm.graph.inserting_before(node):
                    batched_operand = insert_op(gm.graph, aten.unsqueeze.default, (operand, 0),
                                                f"{operand.name}_batched")
            operands.append(batched_operand or operand)
        with gm.graph.inserting_after(node):
            unbatched = insert_op(gm.graph, aten.squeeze.dims, (node, [0]), f"{node.name}_unbatched")
        node.replace_all_uses_with(unbatched, delete_user_cb=lambda user: user is not unbatched)
        set_args(node, replace(fused, args={**fused.args, "input": batched}, post_inputs=tuple(operands)).node_args())
        for dropped in (data, *fused.post_inputs):
            _erase_unread(dropped)


def _erase_unread(node: object) -> None:
    """Erase an earlier batch's squeeze no one reads now."""
    if isinstance(node, fx.Node) and not node.users and _batch_of(node) is not None:
        node.graph.erase_node(node)


def _batch_of(node: object) -> fx.Node | None:
    """The batch of one ``node`` squeezes (``aten::squeeze(%y, [0])`` of a ``%y`` whose first dim is 1:
    an earlier unbatched convolution's), else None: ``unsqueeze(node, 0)`` is that ``%y`` exactly."""
    if not isinstance(node, fx.Node) or node.target is not aten.squeeze.dims or list(node.args[1]) != [0]:
        return None
    source = node.args[0]
    val = tensor_meta(source) if isinstance(source, fx.Node) else None
    return source if val is not None and val.dim() >= 1 and statically_known_true(val.shape[0] == 1) else None


LEGALIZE_RULES: tuple[Rule, ...] = (ToFusedForm(),)
BATCHING_RULES: tuple[Rule, ...] = (BatchOfOne(),)


def legalize(gm: fx.GraphModule) -> PassResult:
    """Apply :data:`LEGALIZE_RULES` once over the graph, then :data:`BATCHING_RULES` on their fused forms."""
    result = apply_rules(gm, LEGALIZE_RULES)
    batching = apply_rules(gm, BATCHING_RULES)
    result.fired.update(batching.fired)
    result.misses += batching.misses
    return result
