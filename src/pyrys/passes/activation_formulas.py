"""Activations written out as arithmetic become the one op they compute, so they lower and fuse as that op.

GPT-2's ``gelu_new`` is the tanh GELU spelled with ``pow``, ``mul``, ``tanh`` and ``add``; BERT ports
spell the erf GELU; some code writes SiLU by hand:

    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   -> gelu(x, approximate="tanh")
    x * 0.5 * (1 + erf(x / sqrt(2)))                            -> gelu(x)
    x * sigmoid(x)                                              -> silu(x)

A formula is recognised by what it computes, not by how it is spelled (it has exactly one curve,
``tanh``, ``erf`` or ``sigmoid``, and at most :data:`MAX_NODES` ops): from a ``mul`` or ``div``, the
elementwise ops above it (:data:`ELEMENTWISE`) whose other operands are numbers are followed up to a
tensor ``x`` that every path reaches (each of its nodes in turn, nearest first, then the tensors the
ops read); the expression of ``x`` is evaluated in float64 on :data:`PROBE` points and compared with
each of :data:`FORMULAS`, and again in the graph's own dtype (so that float32 cancellation a float64
evaluation hides, ``(x + 1e8) - 1e8``, is seen).  Any order of operands, ``x*x*x`` for ``x^3``, a
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
MAX_NODES = 12  # the longest of FORMULAS spelled out is 9 ops
_GRID = torch.linspace(-8.0, 8.0, 641, dtype=torch.float64)
_WIDE = torch.logspace(-6.0, 4.0, 41, dtype=torch.float64)
PROBE = torch.cat([_GRID, _WIDE, -_WIDE, torch.tensor([0.0], dtype=torch.float64)])  # 0 exactly: x / x is NaN there
AGREE = 1e-9  # float64 agreement, relative to the largest value on the probe
AGREE_ULPS = 64  # in the graph's own dtype: within this many of its epsilon, relative (an absolute floor of 1)


# name -> (the function in float64, the op and keyword arguments that compute it)
FORMULAS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], object, dict]] = {
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), aten.gelu.default, {"approximate": "tanh"}),
    "gelu_erf": (F.gelu, aten.gelu.default, {}),
    "silu": (F.silu, aten.silu.default, {}),
}
_EXPECTED = {name: function(PROBE) for name, (function, _, _) in FORMULAS.items()}


class ActivationFromFormula(Rule):
    """An expression of one tensor ``x`` that equals one of :data:`FORMULAS` -> that op on ``x``."""

    name = "activation_from_formula"
    anchors = frozenset({aten.mul.Tensor, aten.div.Tensor})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        region = _expression(gm, node)
        if region is None or not _one_curve(region[1]):
            return None
        leaves, nodes = region
        for x in [*nodes[1:], *leaves]:  # x: the one tensor the formula reads, wherever the formula begins
            inner = _expression(gm, node, stop=x)
            if inner is None or inner[0] != {x} or not _one_curve(inner[1]):
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


def _one_curve(nodes: list[fx.Node]) -> bool:
    return sum(n.target in CURVES for n in nodes) == 1


def _formula(gm: fx.GraphModule, root: fx.Node, x: fx.Node, nodes: list[fx.Node]) -> str | None:
    """The name of the one of :data:`FORMULAS` that ``root`` computes from ``x`` (through ``nodes``), if any."""
    out, leaf = tensor_meta(root), tensor_meta(x)
    if out is None or leaf is None or not leaf.is_floating_point() or out.dtype != leaf.dtype:
        return None
    values = _evaluate(gm, root, x, nodes, PROBE)
    if values is None:
        return None
    scale = max(1.0, float(values.abs().max()))
    for name, (function, _, _) in FORMULAS.items():
        if not float((values - _EXPECTED[name]).abs().max()) <= AGREE * scale:  # NaN anywhere: not it
            continue
        probe = PROBE.to(leaf.dtype)
        own, expected = _evaluate(gm, root, x, nodes, probe), function(probe)
        if own is not None and _close_in(own, expected, leaf.dtype):
            return name
    return None


def _close_in(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    """Within :data:`AGREE_ULPS` of ``dtype``'s epsilon, relative to each value (at least 1)."""
    actual, expected = actual.double(), expected.double()
    bound = AGREE_ULPS * torch.finfo(dtype).eps * expected.abs().clamp_min(1.0)
    return bool(((actual - expected).abs() <= bound).all())


def _is_number(gm: fx.GraphModule, arg: fx.Node) -> bool:
    if arg.op != "get_attr":
        return False
    value = constant_value(gm, arg)
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu"


def _evaluate(gm: fx.GraphModule, root: fx.Node, x: fx.Node, nodes: list[fx.Node],
              probe: torch.Tensor) -> torch.Tensor | None:
    """``root``'s value as a function of ``x`` on ``probe``: numbers in float64 for a float64 probe (the
    exact function), else as the graph holds them (what it computes in its dtype)."""
    values: dict[fx.Node, torch.Tensor] = {x: probe}
    exact = probe.dtype == torch.float64

    def value(arg):
        if not isinstance(arg, fx.Node):
            return arg
        if arg not in values:
            if arg in nodes:
                args = tuple(value(a) for a in arg.args)
                values[arg] = arg.target(*args, **{k: value(v) for k, v in arg.kwargs.items()})
            else:
                constant = constant_value(gm, arg)
                values[arg] = constant.double() if exact else constant
        return values[arg]

    with torch.no_grad():
        result = value(root)
    return result if result.dtype == probe.dtype and result.shape == probe.shape else None
