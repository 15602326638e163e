"""Attention written out becomes ``scaled_dot_product_attention``, which the dnnl backend runs as three
primitives with the scale and the mask fused (``backends/dnnl/lower_attention.py``):

    %kt = transpose(%k, -1, -2) ; %s = matmul(%q, %kt) ; %s2 = div(%s, 8.0) ; %s3 = add(%s2, %mask)
    %p = softmax(%s3, -1) ; %o = matmul(%p, %v)
    ->  %o = scaled_dot_product_attention(%q, %k, %v, %mask, scale=0.125)

The scale is a multiplication or a division by a number, the mask a floating-point tensor added to the
scores; either may be absent (no scale: 1).  ``K^T`` is read through the transpose that made it (or
transposed back).  Query, key and value have one rank and the same batch dims, and every value in
between has this one reader.  One difference from the formula: a query whose every key is masked with
-inf gets 0 (torch's attention) where the formula gives NaN.
"""
from __future__ import annotations

import numbers

import torch
import torch.fx as fx

from pyrys.ir.edit import insert_op, replace_node, set_args
from pyrys.ir.graph import op_args, tensor_meta
from pyrys.ir.symbolic import dims_key
from pyrys.ir.vocabulary import ATTENTION, PERMUTES, permutation, single_user
from pyrys.passes.rewrite import Match, Miss, Rule

aten = torch.ops.aten
SOFTMAXES = frozenset({aten.softmax.int, aten._softmax.default})
SCALES = {aten.mul.Tensor: lambda c: c, aten.mul.Scalar: lambda c: c,
          aten.div.Tensor: lambda c: 1.0 / c, aten.div.Scalar: lambda c: 1.0 / c}
ADDS = frozenset({aten.add.Tensor})


def _only_reader(node, of: fx.Node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and single_user(node) and next(iter(node.users)) is of


def _softmax_input(node) -> fx.Node | None:
    """The input of a last-dim softmax without a dtype, else None."""
    if node.target not in SOFTMAXES:
        return None
    args = op_args(node)
    meta = tensor_meta(node)
    dim = args.get("dim")
    if meta is None or not isinstance(dim, int) or dim % meta.dim() != meta.dim() - 1:
        return None
    if args.get("dtype") is not None or args.get("half_to_float"):
        return None
    return args["input"] if isinstance(args["input"], fx.Node) else None


def _scaled(node: fx.Node) -> tuple[fx.Node, float | None]:
    """``(x, s)`` for ``x * s`` or ``x / (1/s)`` with a number, else ``(node, None)``."""
    if node.target in SCALES and single_user(node):
        x, c = node.args[0], node.args[1]
        if isinstance(x, fx.Node) and isinstance(c, numbers.Real) and not isinstance(c, bool) and c != 0:
            return x, float(SCALES[node.target](c))
    return node, None


def _key_of(key_t: fx.Node) -> fx.Node | None:
    """``k`` where ``key_t`` is ``k`` with its last two dims swapped; None where it is not made so."""
    if key_t.target not in PERMUTES or not isinstance(key_t.args[0], fx.Node):
        return None
    order = permutation(key_t)
    swapped = list(range(len(order)))
    swapped[-1], swapped[-2] = swapped[-2], swapped[-1]
    return key_t.args[0] if order == swapped else None


class AttentionFromFormula(Rule):
    """``softmax(q @ k^T * s + mask, -1) @ v`` -> ``scaled_dot_product_attention(q, k, v, mask, scale=s)``."""

    name = "attention_from_formula"
    anchors = frozenset({aten.matmul.default})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        probs, value = node.args[0], node.args[1]
        if not (_only_reader(probs, node) and isinstance(value, fx.Node)):
            return None
        scores = _softmax_input(probs)
        if scores is None or not _only_reader(scores, probs):
            return None
        mask = None
        if scores.target in ADDS and len(scores.args) == 2 and op_args(scores).get("alpha", 1) == 1:
            for inner, other in (scores.args, scores.args[::-1]):
                base = _scaled(inner)[0] if isinstance(inner, fx.Node) else None
                if base is not None and base.target is aten.matmul.default and isinstance(other, fx.Node):
                    scores, mask = inner, other
                    break
            else:
                return None
            if not _only_reader(scores, probs.args[0]) or \
                    dims_key(tensor_meta(probs.args[0]).shape) != dims_key(tensor_meta(scores).shape):
                return None  # the mask broadcasts the scores to a larger shape
        product, scale = _scaled(scores)
        if product.target is not aten.matmul.default or not single_user(product):
            return None
        query, key_t = product.args[0], product.args[1]
        if not (isinstance(query, fx.Node) and isinstance(key_t, fx.Node)):
            return None
        metas = [tensor_meta(n) for n in (query, key_t, value, node)]
        if any(m is None for m in metas) or not _attention_shapes(*metas[:3]):
            return None
        if mask is not None and not _is_float_mask(tensor_meta(mask), metas[0].dtype):
            return None
        return Match({"query": query, "key_t": key_t, "value": value, "mask": mask, "scale": scale,
                      "dead": [probs, probs.args[0], scores, product]})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        key_t = match["key_t"]
        with gm.graph.inserting_before(node):
            key = _key_of(key_t)
            if key is None:
                key = insert_op(gm.graph, aten.transpose.int, (key_t, -1, -2), "key")
            args = (match["query"], key, match["value"], match["mask"])
            attention = insert_op(gm.graph, ATTENTION, args, "scaled_dot_product_attention")
            scale = 1.0 if match["scale"] is None else match["scale"]
            set_args(attention, args, kwargs={"scale": scale})
        replace_node(node, attention)
        for dead in [*match["dead"], key_t]:
            if not dead._erased and not dead.users:
                dead.graph.erase_node(dead)


def _attention_shapes(query: torch.Tensor, key_t: torch.Tensor, value: torch.Tensor) -> bool:
    """q (..., L, E) @ k^T (..., E, S), then (..., L, S) @ v (..., S, Ev), one rank (3 or more), one batch."""
    if not (query.dim() == key_t.dim() == value.dim() >= 3):
        return False
    if query.dtype not in (torch.float32, torch.bfloat16) or not (query.dtype == key_t.dtype == value.dtype):
        return False
    batch = dims_key(query.shape[:-2])
    return (batch == dims_key(key_t.shape[:-2]) == dims_key(value.shape[:-2])
            and dims_key(query.shape[-1:]) == dims_key(key_t.shape[-2:-1])
            and dims_key(key_t.shape[-1:]) == dims_key(value.shape[-2:-1]))


def _is_float_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> bool:
    return mask is not None and mask.dtype == dtype and mask.dim() >= 1
