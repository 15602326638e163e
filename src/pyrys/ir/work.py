"""How much arithmetic a graph's matrix-product ops do, from the shapes in node meta.

Counted in multiply-adds (one per term of each output element's dot product):

    convolution             out.numel() * C_in/groups * prod(kernel)      (weight [C_out, C_in/g, *k])
    transposed convolution  in.numel() * C_out/groups * prod(kernel)      (weight [C_in, C_out/g, *k])
    linear, matrix products out.numel() * K                               (K: the contracted size)
    attention               B * L * S * (E + E_v)                         (scores, then values)

Other ops (norms, elementwise, views) are left out: next to these they are a few percent of the
work, and what the count answers is "what share of the products is in convolutions".
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from pyrys.ir.fused import FUSED_CONV, FUSED_CONV_TRANSPOSE, FUSED_LINEAR, FUSED_MATMUL
from pyrys.ir.graph import op_args
from pyrys.ir.vocabulary import ATTENTION, MATRIX_PRODUCTS

aten = torch.ops.aten

CONTRACTING = MATRIX_PRODUCTS | {aten.addmm.default, aten.baddbmm.default, FUSED_MATMUL}


def _shape(value) -> list[int] | None:
    """The value's concrete sizes (None for a non-tensor or a symbolic size)."""
    if not isinstance(value, torch.Tensor) or not all(isinstance(size, int) for size in value.shape):
        return None  # a symbolic size: int() of it would add a guard
    return list(value.shape)


def _meta_shape(argument) -> list[int] | None:
    return _shape(argument.meta.get("val")) if isinstance(argument, fx.Node) else None


def multiply_adds(node: fx.Node) -> int | None:
    """``node``'s multiply-adds if it is a matrix-product op with known shapes; 0 for any other op;
    None when its shapes are not concrete."""
    if node.op != "call_function":
        return 0
    target = node.target
    if target in (FUSED_CONV, FUSED_CONV_TRANSPOSE, FUSED_LINEAR):
        data, weight = _meta_shape(node.args[0]), _meta_shape(node.args[1])
        out = _meta_shape(node)
        if data is None or weight is None or out is None:
            return None
        counted = data if target is FUSED_CONV_TRANSPOSE else out
        per_element = math.prod(weight[1:])
        return math.prod(counted) * per_element
    if target in CONTRACTING:
        left = node.args[-2] if target in (aten.addmm.default, aten.baddbmm.default) else node.args[0]
        left_shape, out = _meta_shape(left), _meta_shape(node)
        if left_shape is None or out is None:
            return None
        return math.prod(out) * (left_shape[-1] if left_shape else 1)
    if target is ATTENTION:
        arguments = op_args(node)
        query, key, value = (_meta_shape(arguments[name]) for name in ("query", "key", "value"))
        if query is None or key is None or value is None:
            return None
        return math.prod(query[:-1]) * key[-2] * (query[-1] + value[-1])
    return 0


def share_of(gm: fx.GraphModule, targets: frozenset) -> float | None:
    """The share of ``gm``'s multiply-adds done by nodes calling ``targets`` (None: some shape is not
    concrete, or there are no products at all)."""
    total = part = 0
    for node in gm.graph.nodes:
        count = multiply_adds(node)
        if count is None:
            return None
        total += count
        part += count if node.op == "call_function" and node.target in targets else 0
    return part / total if total else None
