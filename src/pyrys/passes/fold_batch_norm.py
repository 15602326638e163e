"""Fold inference BatchNorm into the convolution before it.

BatchNorm in inference computes, per channel c,

    z = (y - mu) / sqrt(var + eps) * gamma + beta  =  y * s + (beta - mu * s),   s = gamma / sqrt(var + eps)

and with ``y = conv(x, W, b)`` this is ``conv(x, W * s, (b - mu) * s + beta)``.  The rule
rewrites ``batch_norm(conv(x, W, b))`` to ``conv(x, fold_weight(W, ...), fold_bias(b, ...))``;
``constant_propagation`` then evaluates the fold nodes (with it disabled they stay
visible, as in the seed's first dump).  It applies only when every folded operand is
a constant and BN's ``training`` flag is the constant ``False``.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.ir.graph import insert_call, is_constant, op_args
from pyrys.ir.ops import FOLD_BIAS, FOLD_WEIGHT
from pyrys.passes.rewrite import Match, Miss, PassResult, Rule, apply_rules, fail

aten = torch.ops.aten
CONVOLUTIONS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
_BN_OPERANDS = ("weight", "bias", "running_mean", "running_var")


def training_flag_miss(training) -> Miss | None:
    """Why a BatchNorm with this ``training`` argument is not in inference form (None if it is)."""
    if isinstance(training, fx.Node):
        return fail(f"BatchNorm's training flag (%{training.name}) is not a constant: "
                    "freeze_flags did not run or did not include 'training'")
    if training:
        return fail("BatchNorm is in training mode (the model was captured with training=True; "
                    "call model.eval() before optimizing)")
    return None


def _not_constant(args: dict, names: tuple[str, ...], owner: str) -> Miss | None:
    for name in names:
        if args[name] is not None and not is_constant(args[name]):
            return fail(f"{owner} {name} (%{args[name].name}) is not a constant: freeze_params did not freeze it")
    return None


class FoldConvBatchNorm(Rule):
    """``batch_norm(conv(x, W, b))`` -> ``conv(x, fold_weight(W), fold_bias(b))``."""

    name = "conv_bn"
    anchors = frozenset({aten.batch_norm.default})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        conv = node.args[0]
        if not (isinstance(conv, fx.Node) and conv.target in CONVOLUTIONS):
            return None
        bn = op_args(node)
        conv_args = op_args(conv)
        miss = (training_flag_miss(bn["training"])
                or _not_constant(conv_args, ("weight", "bias"), "conv")
                or _not_constant(bn, _BN_OPERANDS, "BatchNorm"))
        if miss:
            return miss
        if len(conv.users) > 1:
            return fail(f"the conv output %{conv.name} has {len(conv.users)} users, so its weights cannot change")
        return Match({"conv": conv, "conv_args": conv_args, "bn": bn})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        conv, args, bn = match["conv"], match["conv_args"], match["bn"]
        weight_args = (args["weight"], bn["weight"], bn["running_var"], bn["eps"])
        bias_args = (args["bias"], bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"], bn["eps"])
        with gm.graph.inserting_before(conv):
            weight = insert_call(gm.graph, FOLD_WEIGHT, weight_args, f"{_name(args['weight'])}_bn_folded")
            bias = insert_call(gm.graph, FOLD_BIAS, bias_args, f"{_name(args['bias'], conv.name + '_bias')}_bn_folded")
        conv.args = tuple({**args, "weight": weight, "bias": bias}.values())
        conv.kwargs = {}
        node.replace_all_uses_with(conv)
        gm.graph.erase_node(node)


def _name(value, default: str = "weight") -> str:
    return value.name if isinstance(value, fx.Node) else default


FOLD_BATCH_NORM_RULES: tuple[Rule, ...] = (FoldConvBatchNorm(),)


def fold_conv_bn(gm: fx.GraphModule) -> PassResult:
    """Apply :data:`FOLD_BATCH_NORM_RULES` once over the graph."""
    return apply_rules(gm, FOLD_BATCH_NORM_RULES)
