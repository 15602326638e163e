"""Which values of a graph may hold a NaN or an infinity made inside it from finite inputs.

A program runs every call whose inputs hold NaN or an infinity on the reference backend where one of its
steps treats them otherwise than eager (``backends/dnnl/post_ops.UNLIKE_EAGER_ON_NONFINITE``: oneDNN's clip
turns NaN into a bound).  A NaN made inside the graph escapes that check: ``clamp(sqrt(a @ b), -1, 1)`` where
``a @ b < 0``.  Those values are the ones computed, through any ops, from

- an op of :data:`NONFINITE_SOURCES` (a square root or logarithm of a computed value not known positive,
  a variance over one element, ``x ** -1`` at 0), or a division by anything but a finite nonzero constant;
- a number argument that is NaN or infinite as torch reads it, in float32 (``x * nan``, ``x * 1e39``,
  ``addmm(..., beta=nan)``), or a divisor that is 0 there (``x / 1e-50``);
- a constant tensor that holds one (a released constant, whose numbers the backend holds, counts as finite
  and nowhere 0).

A known gap: an overflow to infinity (``exp`` of a large value, a sum beyond float32) is not followed, and
``inf - inf`` after it makes a NaN that a clip downstream turns into its bound.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from pyrys.ir.graph import is_constant
from pyrys.ir.post_ops import as_float32, is_float32_factor
from pyrys.ir.released import is_released

aten = torch.ops.aten

# ops whose result from finite operands may be NaN or infinite
NONFINITE_SOURCES = frozenset({
    aten.log2.default, aten.log10.default, aten.log1p.default, aten.reciprocal.default, aten.acos.default,
    aten.asin.default, aten.acosh.default, aten.atanh.default, aten.fmod.Tensor, aten.fmod.Scalar,
    aten.remainder.Tensor, aten.remainder.Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar, aten.logit.default,
    aten.xlogy.Tensor, aten.var.correction, aten.var.dim, aten.std.correction, aten.std.dim,
    aten.var_mean.correction, aten.std_mean.correction, aten.erfinv.default, aten.lgamma.default,
    aten.digamma.default, aten.floor_divide.default,
})
# ops finite on a value known positive (:func:`known_positive`); sqrt also on one known non-negative
_POSITIVE_ONLY = frozenset({aten.rsqrt.default, aten.log.default})
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


def makes_nonfinite(gm: fx.GraphModule) -> bool:
    """Whether an op of ``gm`` may make NaN or an infinity from finite operands (its constants' numbers not read)."""
    return any(node.op == "call_function" and _source(gm, node) is not None for node in gm.graph.nodes)


def _source(gm: fx.GraphModule, node: fx.Node) -> str | None:
    x = node.args[0] if node.args else None
    if node.target in NONFINITE_SOURCES:
        return f"%{node.name}"
    if node.target in _POSITIVE_ONLY and not known_positive(x):
        return f"%{node.name}"
    if node.target is aten.sqrt.default and not (known_positive(x) or known_non_negative(x)):
        return f"%{node.name}"
    if node.target is aten.pow.Tensor_Scalar:
        exponent = node.args[1]
        if not isinstance(exponent, (int, float)) or exponent < 0 or not float(exponent).is_integer():
            return f"%{node.name}"
    if node.target in _DIVISIONS and len(node.args) > 1 and not _nonzero_constant(gm, node.args[1]):
        return f"%{node.name}"
    for arg in (*node.args, *node.kwargs.values()):
        if isinstance(arg, float) and not math.isfinite(as_float32(arg)):
            return f"the number {arg} (%{node.name})"
    return None


def known_positive(node) -> bool:
    """``c + x`` with a number ``c > 0`` and ``x`` a square or a mean or sum of them: RMSNorm's
    ``mean(x^2) + eps`` (positive unless a NaN came in)."""
    if not (isinstance(node, fx.Node) and node.target is aten.add.Tensor):
        return False
    x, c = node.args[0], node.args[1]
    return isinstance(c, (int, float)) and c > 0 and known_non_negative(x)


def known_non_negative(node) -> bool:
    """A square ``x^2``, or a mean or sum of squares."""
    if not isinstance(node, fx.Node):
        return False
    if node.target is aten.pow.Tensor_Scalar:
        return node.args[1] == 2
    if node.target in (aten.mean.dim, aten.sum.dim_IntList):
        return known_non_negative(node.args[0])
    return False


def _nonzero_constant(gm: fx.GraphModule, divisor) -> bool:
    """Whether ``divisor`` is a number or a constant tensor that is finite and nowhere 0 (as float32, for a
    number: ``1e-50`` is 0 there)."""
    if isinstance(divisor, (int, float)):
        return is_float32_factor(divisor)
    if not (isinstance(divisor, fx.Node) and is_constant(divisor)):
        return False
    value = getattr(gm, divisor.target, None)
    if not isinstance(value, torch.Tensor):
        return False
    return is_released(value) or bool((value.isfinite() & (value != 0)).all())


def _constant_origin(gm: fx.GraphModule, node: fx.Node) -> str | None:
    value = getattr(gm, node.target, None)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or is_released(value):
        return None
    return None if bool(value.isfinite().all()) else f"the constant %{node.name}"


def all_finite(inputs: list, positions: list[int]) -> bool:
    """Whether the inputs at ``positions`` hold only finite numbers, read at run time (their sums are finite,
    a 16-bit input's summed in float32, where a finite image cannot overflow; a float32 sum that overflows
    sends the call the slower way too, which is as right)."""
    return all(math.isfinite(_sum(inputs[i])) for i in positions)


def _sum(tensor: torch.Tensor) -> float:
    return (tensor.sum(dtype=torch.float32) if tensor.element_size() < 4 else tensor.sum()).item()
