"""Fold inference BatchNorm into the convolution, transposed convolution or linear before it,
or into the convolution after it.

BatchNorm in inference computes, per channel c,

    z = (y - mu) / sqrt(var + eps) * gamma + beta  =  y * s + (beta - mu * s),   s = gamma / sqrt(var + eps)

and with ``y = conv(x, W, b)`` this is ``conv(x, W * s, (b - mu) * s + beta)``.  The rule
rewrites ``batch_norm(conv(x, W, b))`` to ``conv(x, fold_weight(W, ...), fold_bias(b, ...))``;
``constant_propagation`` then evaluates the fold nodes (with it disabled they stay
visible, as in the seed's first dump).  It applies only when every folded operand is
a constant and BN's ``training`` flag is the constant ``False``.

The same scale applies to the output channels of a transposed convolution (weight
``(in, out/groups, k...)``: ``fold_weight(..., channel_dim=1, groups=g)``) and of a linear
whose output is ``(N, C)`` (BatchNorm1d).

BatchNorm *before* a convolution, ``conv(bn(x))`` with ``bn(x) = x * s + t`` per input
channel, folds into the conv's input side (``fold_input_weight``/``fold_input_bias``,
see :mod:`pyrys.ir.ops`) -- only without padding, since the conv would pad ``x`` with
zeros where the original padded ``bn(x)`` with zeros.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.ir.edit import insert_op, replace_node, set_args
from pyrys.ir.graph import is_constant, op_args
from pyrys.ir.ops import FOLD_BIAS, FOLD_INPUT_BIAS, FOLD_INPUT_WEIGHT, FOLD_WEIGHT
from pyrys.ir.vocabulary import CONV_TRANSPOSES, CONVOLUTIONS, LINEARS, output_channel_layout
from pyrys.passes.rewrite import Match, Miss, PassResult, Rule, apply_rules, fail, shared_miss

aten = torch.ops.aten
_BN_OPERANDS = ("weight", "bias", "running_mean", "running_var")


def training_flag_miss(training) -> Miss | None:
    """Why a BatchNorm with this ``training`` argument is not in inference form (None if it is)."""
    if isinstance(training, fx.Node):
        return fail(f"BatchNorm's training flag (%{training.name}) is not a constant: "
                    "freeze_flags did not run or did not include 'training'")
    if training:
        return fail("BatchNorm is in training mode (its module was, when the model was captured; model.eval() sets "
                    "every module's mode: call it before optimizing)")
    return None


def _not_constant(args: dict, names: tuple[str, ...], owner: str) -> Miss | None:
    for name in names:
        if args[name] is not None and not _constant_valued(args[name]):
            return fail(f"{owner} {name} (%{args[name].name}) is not a constant: freeze_params did not freeze it")
    return None


_FOLDS = frozenset({FOLD_WEIGHT, FOLD_BIAS, FOLD_INPUT_WEIGHT, FOLD_INPUT_BIAS})


def _constant_valued(value) -> bool:
    """A constant, or a fold of constants this pass made (``conv(bn(x))`` folded, then a BatchNorm after the
    same conv: MaxViT's blocks), which ``constant_propagation`` evaluates."""
    if isinstance(value, fx.Node) and value.op == "call_function" and value.target in _FOLDS:
        return all(_constant_valued(arg) for arg in value.args)
    return is_constant(value)


def _bn_miss(bn: dict, producer_args: dict, owner: str) -> Miss | None:
    return (training_flag_miss(bn["training"])
            or _not_constant(producer_args, ("weight", "bias"), owner)
            or _not_constant(bn, _BN_OPERANDS, "BatchNorm"))


class FoldBatchNormIntoProducer(Rule):
    """``batch_norm(conv(x, W, b))`` -> ``conv(x, fold_weight(W), fold_bias(b))`` (likewise deconv, linear)."""

    def __init__(self, name: str, producers: frozenset, owner: str):
        self.name, self.producers, self.owner = name, producers, owner
        self.anchors = frozenset({aten.batch_norm.default})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        conv = node.args[0]
        if not (isinstance(conv, fx.Node) and conv.target in self.producers):
            return None
        bn = op_args(node)
        conv_args = op_args(conv)
        miss = (_bn_miss(bn, conv_args, self.owner) or self._shape_miss(conv)
                or shared_miss(conv, "its weights cannot change", f"the {self.owner} output %{conv.name}"))
        if miss:
            return miss
        return Match({"conv": conv, "conv_args": conv_args, "bn": bn})

    def _shape_miss(self, producer: fx.Node) -> Miss | None:
        out = producer.meta.get("val")
        if producer.target in LINEARS and (out is None or out.dim() != 2):
            return fail(f"BatchNorm normalizes dim 1 of the {out.dim() if out is not None else '?'}-d linear output "
                        f"%{producer.name}, which is not its output features")
        return None

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        conv, args, bn = match["conv"], match["conv_args"], match["bn"]
        weight_args = (args["weight"], bn["weight"], bn["running_var"], bn["eps"])
        channel_dim, groups = output_channel_layout(conv.target, args)
        if channel_dim != 0:
            weight_args += (channel_dim, groups)
        bias_args = (args["bias"], bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"], bn["eps"])
        node.prepend(conv)  # (its one reader) after BatchNorm's operands, which may be computed after it: the folds read them
        with gm.graph.inserting_before(conv):
            weight = insert_op(gm.graph, FOLD_WEIGHT, weight_args, f"{_name(args['weight'])}_bn_folded")
            bias = insert_op(gm.graph, FOLD_BIAS, bias_args, f"{_name(args['bias'], conv.name + '_bias')}_bn_folded")
        set_args(conv, tuple({**args, "weight": weight, "bias": bias}.values()))
        replace_node(node, conv)


class FoldBatchNormIntoNextConv(Rule):
    """``conv(batch_norm(x), W, b)`` -> ``conv(x, fold_input_weight(W), fold_input_bias(b, W))`` (no padding)."""

    name = "bn_conv"
    anchors = CONVOLUTIONS

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        bn_node = node.args[0]
        if not (isinstance(bn_node, fx.Node) and bn_node.target is aten.batch_norm.default):
            return None
        bn, conv = op_args(bn_node), op_args(node)
        miss = _bn_miss(bn, conv, "conv")
        if miss:
            return miss
        padding = conv["padding"]
        if padding != "valid" if isinstance(padding, str) else any(padding):
            return fail(f"the conv %{node.name} after BatchNorm %{bn_node.name} pads its input "
                        f"(padding={conv['padding']}), and zeros padded before BatchNorm are not zeros after it")
        return Match({"bn_node": bn_node, "bn": bn, "conv": conv})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        bn, conv = match["bn"], match["conv"]
        w = conv["weight"]
        weight_args = (w, bn["weight"], bn["running_var"], bn["eps"], conv["groups"])
        bias_args = (conv["bias"], w, bn["weight"], bn["bias"], bn["running_mean"], bn["running_var"], bn["eps"],
                     conv["groups"])
        with gm.graph.inserting_before(node):
            weight = insert_op(gm.graph, FOLD_INPUT_WEIGHT, weight_args, f"{_name(w)}_bn_input_folded")
            bias = insert_op(gm.graph, FOLD_INPUT_BIAS, bias_args, f"{node.name}_bias_bn_input_folded")
        set_args(node, tuple({**conv, "input": bn["input"], "weight": weight, "bias": bias}.values()))


def _name(value, default: str = "weight") -> str:
    return value.name if isinstance(value, fx.Node) else default


FOLD_BATCH_NORM_RULES: tuple[Rule, ...] = (
    FoldBatchNormIntoProducer("conv_bn", CONVOLUTIONS, "conv"),
    FoldBatchNormIntoProducer("conv_transpose_bn", CONV_TRANSPOSES, "conv_transpose"),
    FoldBatchNormIntoProducer("linear_bn", LINEARS, "linear"),
    FoldBatchNormIntoNextConv(),
)


def fold_conv_bn(gm: fx.GraphModule) -> PassResult:
    """Apply :data:`FOLD_BATCH_NORM_RULES` once over the graph."""
    return apply_rules(gm, FOLD_BATCH_NORM_RULES)
