"""Activations written out as arithmetic become the one op they compute, so they lower and fuse as that op.

GPT-2's ``gelu_new`` is the tanh GELU spelled with ``pow``, ``mul``, ``tanh`` and ``add``; BERT ports
spell the erf GELU; some code writes SiLU by hand:

    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   -> gelu(x, approximate="tanh")
    x * 0.5 * (1 + erf(x / sqrt(2)))                            -> gelu(x)
    x * sigmoid(x)                                              -> silu(x)

A formula is recognised by what it computes, not by how it is spelled: from a ``mul`` or ``div``, the
elementwise ops above it (:data:`ELEMENTWISE`) whose other operands are numbers are followed up to a
tensor ``x`` that every path reaches (each of its nodes in turn, nearest first, then the tensors the
ops read); the expression of ``x`` is evaluated in float64 on :data:`PROBE` points and compared with
each of :data:`FORMULAS`.  Any order of operands, ``x*x*x`` for ``x^3``, a
division for a multiplication: all match, and a formula with another constant (``0.0447``) does
not, so nothing changes what the model computes beyond float32 rounding.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from pyrys.ir.edit import insert_op, replace_node, set_args
from pyrys.ir.graph import constant_value, tensor_meta
from pyrys.passes.rewrite import Match, Miss, Rule

aten = torch.ops.aten

# what a written-out activation is made of: arithmetic with numbers, and the curves it bends x with
ELEMENTWISE = frozenset({
    aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.add.Scalar,
    aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Scalar, aten.neg.default, aten.pow.Tensor_Scalar,
    aten.tanh.default, aten.erf.default, aten.sigmoid.default, aten.exp.default, aten.reciprocal.default,
    aten.sqrt.default,
})
CURVES = frozenset({aten.tanh.default, aten.erf.default, aten.sigmoid.default, aten.exp.default})
MAX_NODES = 16  # the longest of FORMULAS spelled out is 9 ops
PROBE = torch.cat([torch.linspace(-8.0, 8.0, 321, dtype=torch.float64), torch.tensor([-30.0, 30.0], dtype=torch.float64)])
AGREE = 1e-9  # float64 agreement, relative to the largest value on the probe


# name -> (the function in float64, the op and keyword arguments that compute it)
FORMULAS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], object, dict]] = {
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), aten.gelu.default, {"approximate": "tanh"}),
    "gelu_erf": (F.gelu, aten.gelu.default, {}),
    "silu": (F.silu, aten.silu.default, {}),
}


class ActivationFromFormula(Rule):
    """An expression of one tensor ``x`` that equals one of :data:`FORMULAS` -> that op on ``x``."""

    name = "activation_from_formula"
    anchors = frozenset({aten.mul.Tensor, aten.div.Tensor})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        region = _expression(gm, node)
        if region is None or not any(n.target in CURVES for n in region[1]):
            return None
        leaves, nodes = region
        for x in [*nodes[1:], *leaves]:  # x: the one tensor the formula reads, wherever the formula begins
            inner = _expression(gm, node, stop=x)
            if inner is None or inner[0] != {x} or not any(n.target in CURVES for n in inner[1]):
                continue
            formula = _formula(gm, node, x, inner[1])
            if formula is not None:
                return Match({"x": x, "formula": formula, "target": FORMULAS[formula][1],
                              "kwargs": FORMULAS[formula][2], "nodes": inner[1]})
        return None

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        with gm.graph.inserting_before(node):
            activation = insert_op(gm.graph, match["target"], (match["x"],), match["formula"])
            if match["kwargs"]:
                set_args(activation, (match["x"],), kwargs=match["kwargs"])
        replace_node(node, activation)
        _erase_unused(match["nodes"][1:])  # so that x has one reader left, and fuses into the op before it


def _erase_unused(nodes: list[fx.Node]) -> None:
    """Erase the nodes of the formula nothing reads any more (a node read elsewhere too stays)."""
    erased = True
    while erased:
        erased = False
        for node in nodes:
            if not node._erased and not node.users:
                node.graph.erase_node(node)
                erased = True


def _expression(gm: fx.GraphModule, root: fx.Node, stop: fx.Node | None = None) -> tuple[set, list] | None:
    """``(the tensors it reads, its nodes from root up)`` of the expression of :data:`ELEMENTWISE` ops on
    tensors and numbers (Python numbers, one-element constants) that ``root`` computes, followed up to
    ``stop`` or :data:`MAX_NODES` nodes; None when an operand is neither."""
    nodes, leaves, stack = [], set(), [root]
    while stack:
        node = stack.pop(0)
        if node in nodes:
            continue
        if (node is stop or len(nodes) == MAX_NODES or node.op != "call_function" or node.target not in ELEMENTWISE
                or node.kwargs.keys() - {"alpha"}):
            leaves.add(node)
            continue
        nodes.append(node)
        for arg in (*node.args, *node.kwargs.values()):
            if isinstance(arg, fx.Node) and not _is_number(gm, arg):
                stack.append(arg)
            elif not isinstance(arg, (fx.Node, int, float)):
                return None
    return (leaves, nodes) if root in nodes else None


def _formula(gm: fx.GraphModule, root: fx.Node, x: fx.Node, nodes: list[fx.Node]) -> str | None:
    """The name of the one of :data:`FORMULAS` that ``root`` computes from ``x`` (through ``nodes``), if any."""
    out, leaf = tensor_meta(root), tensor_meta(x)
    if out is None or leaf is None or not leaf.is_floating_point() or (out.dtype, out.shape) != (leaf.dtype, leaf.shape):
        return None
    values = _evaluate(gm, root, x, nodes)
    if values is None:
        return None
    scale = max(1.0, float(values.abs().max()))
    return next((name for name, (function, _, _) in FORMULAS.items()
                 if float((values - function(PROBE)).abs().max()) <= AGREE * scale), None)


def _is_number(gm: fx.GraphModule, arg: fx.Node) -> bool:
    if arg.op != "get_attr":
        return False
    value = constant_value(gm, arg)
    return isinstance(value, torch.Tensor) and value.numel() == 1 and value.dim() == 0


def _evaluate(gm: fx.GraphModule, root: fx.Node, x: fx.Node, nodes: list[fx.Node]) -> torch.Tensor | None:
    """``root``'s value in float64 as a function of ``x`` on :data:`PROBE`."""
    values: dict[fx.Node, torch.Tensor] = {x: PROBE}

    def value(arg):
        if not isinstance(arg, fx.Node):
            return arg
        if arg not in values:
            if arg in nodes:
                args = tuple(value(a) for a in arg.args)
                values[arg] = arg.target(*args, **{k: value(v) for k, v in arg.kwargs.items()})
            else:
                values[arg] = constant_value(gm, arg).double()
        return values[arg]

    with torch.no_grad():
        result = value(root)
    return result if result.dtype == torch.float64 and result.shape == PROBE.shape else None
