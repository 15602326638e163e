"""``addmm`` and ``baddbmm`` of computed tensors as a product, a scale and a sum, which fuse as post-ops.

    addmm(c, a, b, beta, alpha)    = beta * c + alpha * (a @ b)      (a, b matrices)
    baddbmm(c, a, b, beta, alpha)  = beta * c + alpha * bmm(a, b)    (a, b batches of matrices)
    ->  add(mul(mm(a, b), alpha), mul(c, beta))                        (a factor of 1 is left out)

With a constant matrix ``b`` and a constant bias ``c`` an ``addmm`` is a linear already
(:class:`pyrys.passes.simplify.LinearFromMatmul`, which comes first); this rule takes the rest: a computed
bias, computed operands, factors other than 1.  ``beta = 0`` drops ``c`` (torch does not read it: a NaN
there does not reach the result); ``alpha = 0`` stays an ``addmm`` (torch does not read ``a`` and ``b``,
and ``0 * (a @ b)`` would carry their NaN).  Each factor is compared as a float32, as torch's kernel reads
it: ``beta=1e-50`` is 0 there; a finite factor beyond float32 (``1e39``) stays torch's, which refuses it at
each call as eager does.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from pyrys.ir.edit import insert_op, replace_node
from pyrys.ir.graph import op_args, tensor_meta
from pyrys.ir.post_ops import FLOAT32_MAX, as_float32
from pyrys.passes.rewrite import Match, Miss, Rule, fail

aten = torch.ops.aten
# op -> (its product, the names of that product's operands)
PRODUCT_OF = {aten.addmm.default: (aten.mm.default, ("mat1", "mat2")),
              aten.baddbmm.default: (aten.bmm.default, ("batch1", "batch2"))}


class ProductPlusTerm(Rule):
    """``addmm(c, a, b)`` -> ``mm(a, b) + c`` (likewise ``baddbmm``, with its factors as products)."""

    name = "product_plus_term"
    anchors = frozenset(PRODUCT_OF)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        args = op_args(node)
        out = tensor_meta(node)
        if out is None or not out.dtype.is_floating_point or as_float32(args["alpha"]) == 0:
            return None
        beyond = [name for name in ("beta", "alpha") if math.isfinite(args[name]) and abs(args[name]) > FLOAT32_MAX]
        if beyond:
            return fail(f"{beyond[0]}={args[beyond[0]]} is beyond float32: torch refuses it at each call, "
                        "as eager does")
        return Match({"args": args})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        args = match["args"]
        product, operands = PRODUCT_OF[node.target]
        with gm.graph.inserting_before(node):
            result = insert_op(gm.graph, product, tuple(args[name] for name in operands), "product")
            if args["alpha"] != 1:
                result = insert_op(gm.graph, aten.mul.Tensor, (result, args["alpha"]), "product_scaled")
            if as_float32(args["beta"]) != 0:
                term = args["input"]
                if args["beta"] != 1:
                    term = insert_op(gm.graph, aten.mul.Tensor, (term, args["beta"]), "term_scaled")
                result = insert_op(gm.graph, aten.add.Tensor, (result, term), "product_plus_term")
        replace_node(node, result)

