"""Which values of a graph may hold a NaN or an infinity made inside it from finite inputs.

A program runs every call whose inputs hold NaN or an infinity on the reference backend where one of its
steps treats them otherwise than eager (``backends/dnnl/post_ops.UNLIKE_EAGER_ON_NONFINITE``: oneDNN's clip
turns NaN into a bound).  A NaN made inside the graph escapes that check: ``clamp(sqrt(a @ b), -1, 1)`` where
``a @ b < 0``.  Those values are the ones computed, through any ops, from

- an op of :data:`NONFINITE_SOURCES` (a square root or logarithm of a computed value, ``0 / 0``);
- a number argument that is NaN or infinite (``x * nan``, ``addmm(..., beta=nan)``), or a divisor of 0;
- a constant tensor that holds one (a released constant, whose numbers the backend holds, counts as finite).

An overflow to infinity (``exp`` of a large value) is not followed: where it happens, eager's result is
not finite either.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from pyrys.ir.graph import is_constant
from pyrys.ir.released import is_released

aten = torch.ops.aten

# ops whose result from finite operands may be NaN or infinite
NONFINITE_SOURCES = frozenset({
    aten.sqrt.default, aten.rsqrt.default, aten.log.default, aten.log2.default, aten.log10.default,
    aten.log1p.default, aten.reciprocal.default, aten.acos.default, aten.asin.default, aten.acosh.default,
    aten.atanh.default, aten.fmod.Tensor, aten.fmod.Scalar, aten.remainder.Tensor, aten.remainder.Scalar,
    aten.pow.Tensor_Tensor, aten.pow.Scalar, aten.logit.default, aten.xlogy.Tensor,
})
_DIVISIONS = frozenset({aten.div.Tensor, aten.div.Tensor_mode, aten.div.Scalar, aten.true_divide.Tensor})


def nonfinite_values(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Each node whose value may hold NaN or an infinity made inside the graph, with where it comes from
    (``"%sqrt"``, ``"the number nan"``)."""
    origin: dict[fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            why = _constant_origin(gm, node)
        elif node.op == "call_function":
            why = next((origin[arg] for arg in node.all_input_nodes if arg in origin), None) or _source(gm, node)
        else:
            why = None
        if why is not None:
            origin[node] = why
    return origin


def _source(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.target in NONFINITE_SOURCES:
        return f"%{node.name}"
    if node.target is aten.pow.Tensor_Scalar and not float(node.args[1]).is_integer():
        return f"%{node.name}"
    if node.target in _DIVISIONS and len(node.args) > 1 and not _nonzero_constant(gm, node.args[1]):
        return f"%{node.name}"
    for arg in (*node.args, *node.kwargs.values()):
        if isinstance(arg, float) and not math.isfinite(arg):
            return f"the number {arg} (%{node.name})"
    return None


def _nonzero_constant(gm: fx.GraphModule, divisor) -> bool:
    """Whether ``divisor`` is a number or a constant tensor that is finite and nowhere 0."""
    if isinstance(divisor, (int, float)):
        return divisor != 0 and math.isfinite(divisor)
    if not (isinstance(divisor, fx.Node) and is_constant(divisor)):
        return False
    value = getattr(gm, divisor.target)
    return is_released(value) or bool((value.isfinite() & (value != 0)).all())


def _constant_origin(gm: fx.GraphModule, node: fx.Node) -> str | None:
    value = getattr(gm, node.target, None)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or is_released(value):
        return None
    return None if bool(value.isfinite().all()) else f"the constant %{node.name}"
