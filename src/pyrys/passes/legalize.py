"""Legalize: one spelling of each op before the backends.

Every convolution, transposed convolution and linear nothing was fused into becomes its fused op
with an empty post-op chain (:func:`pyrys.ir.fused.to_fused`), so a backend lowers three ops,
``pyrys::conv``, ``pyrys::conv_transpose`` and ``pyrys::linear``, and reads them by name:

    %conv2d = aten::conv2d(%x, %w, %b, [1, 1], [0, 0], [1, 1], 1)
    ->  %conv2d = pyrys::conv2d(%x, %w, %b, [1, 1], [0, 0], [1, 1], 1)      (the node keeps its name)

A convolution with string padding (``padding="same"``) has no fused form and stays as it is
(the dnnl backend runs it through torch).  This runs after the recorded pipeline
(:func:`pyrys.passes.pipeline.legalize_for_backends`), so ``opt.graph`` keeps ATen's names.
"""
from __future__ import annotations

import torch.fx as fx

from pyrys.ir.fused import FUSED_BY_BASE, fused_form_miss, to_fused
from pyrys.passes.rewrite import Match, Miss, PassResult, Rule, apply_rules, fail


class ToFusedForm(Rule):
    """``aten::conv2d(...)`` -> ``pyrys::conv(..., post_ops=[], post_inputs=[])`` (likewise deconv, linear)."""

    name = "fused_form"
    anchors = frozenset(FUSED_BY_BASE)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        reason = fused_form_miss(node)
        return fail(reason) if reason else Match({})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        to_fused(gm, node, in_place=True)


LEGALIZE_RULES: tuple[Rule, ...] = (ToFusedForm(),)


def legalize(gm: fx.GraphModule) -> PassResult:
    """Apply :data:`LEGALIZE_RULES` once over the graph."""
    return apply_rules(gm, LEGALIZE_RULES)
