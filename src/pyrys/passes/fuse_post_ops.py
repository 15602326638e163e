"""Fuse element-wise ops that follow a convolution or linear into it, as post-ops.

    %y = aten::conv2d(%x, %w, %b, ...) ; %z = aten::relu(%y)
    ->  %z = pyrys::conv2d_relu(%x, %w, %b, ...)

The activations that can be fused are rows of :data:`pyrys.ir.post_ops.ACTIVATIONS` (op -> post-op, with
its scalar parameters read from the node); chains fuse one after another into the same
node (``conv2d_relu`` then ``conv2d_relu_...``).  The producer's output must have no
other user, since the fused op no longer produces it.  Producers: conv (1d/2d/3d),
transposed conv (``pyrys::conv_transpose2d_relu``), linear and the matrix products
(``mm``, ``bmm``, ``matmul``: ``pyrys::matmul_gelu_erf``).

Binary post-ops take a second tensor: a residual add (either operand order) and a
multiply (a squeeze-and-excitation scale ``(N, C, 1, 1)``), when the other operand does
not broadcast the producer's output to a larger shape:

    %y = aten::conv2d(%x, ...) ; %z = aten::add(%y, %r) ; %o = aten::relu(%z)
    ->  %o = pyrys::conv2d_add_relu(%x, ..., %r)

When both operands are convs, the later one takes the add (its other operand is already
computed); when the other operand is computed after the producer, the fused node moves
down to the add's position (its own inputs all come before the producer).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.ir.edit import replace_node
from pyrys.ir.fused import FUSED_BY_BASE, FUSED_OPS, add_post_op, fused_form_miss, to_fused
from pyrys.ir.graph import op_args, tensor_meta
from pyrys.ir.symbolic import hint, keeps_shape
from pyrys.ir.post_ops import ACTIVATIONS, SCALAR_OPS, NoPostOp, PostOp, activation_post_op, scalar_post_op
from pyrys.passes.rewrite import Match, Miss, PassResult, Rule, apply_rules, fail, shared_miss

aten = torch.ops.aten
FUSABLE_PRODUCERS = frozenset(FUSED_BY_BASE) | FUSED_OPS


def post_op_for(node: fx.Node) -> PostOp | Miss:
    """The post-op of an activation node, or why it has none."""
    try:
        return activation_post_op(node.target, op_args(node))
    except NoPostOp as reason:
        return fail(str(reason))


def _producer_miss(producer: fx.Node, post_op: PostOp) -> Miss | None:
    """Why ``post_op`` cannot run inside this conv/linear (None if it can)."""
    reason = fused_form_miss(producer)
    if reason:
        return fail(reason)
    return shared_miss(producer, f"{post_op} cannot run inside it")


class FuseActivation(Rule):
    """``act(conv(x))`` -> ``pyrys::conv_<act>(x)`` (likewise for linear)."""

    name = "conv_activation"
    anchors = frozenset(ACTIVATIONS)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        producer = node.args[0]
        if not (isinstance(producer, fx.Node) and producer.target in FUSABLE_PRODUCERS):
            return None
        post_op = post_op_for(node)
        if isinstance(post_op, Miss):
            return post_op
        return _producer_miss(producer, post_op) or Match({"producer": producer, "post_op": post_op})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        fused = to_fused(gm, match["producer"])
        add_post_op(fused, match["post_op"])
        replace_node(node, fused)


def _precedes(a: fx.Node, b: fx.Node) -> bool:
    """True if ``a`` comes before ``b`` in the graph's (topological) order."""
    node = a.next
    while node.op != "root":
        if node is b:
            return True
        node = node.next
    return False


def _binary_miss(producer: fx.Node, other: fx.Node, post_op: PostOp) -> Miss | None:
    """Why ``post_op(producer, other)`` cannot run inside ``producer`` (None if it can)."""
    miss = _producer_miss(producer, post_op)
    if miss:
        return miss
    out, operand = producer.meta.get("val"), other.meta.get("val")
    if not isinstance(operand, torch.Tensor) or operand.dtype != out.dtype:
        return fail(f"the other operand of {post_op}, %{other.name}, is not a {out.dtype} tensor")
    if operand.dim() == 0:  # a computed scalar: the backends read post-op operands of one dim or more
        return fail(f"the other operand of {post_op}, %{other.name}, is a 0-dim tensor")
    if not keeps_shape(out.shape, operand.shape):
        return fail(f"the other operand of {post_op}, %{other.name} {_shape(operand)}, broadcasts the output of "
                    f"%{producer.name} {_shape(out)} to a larger shape")
    return None


class FuseBinary(Rule):
    """``conv(x) + y`` / ``y + conv(x)`` -> ``pyrys::conv_add(x, y)`` (likewise ``*``, deconv and linear)."""

    def __init__(self, name: str, targets: frozenset, post_op: PostOp):
        self.name, self.anchors, self.post_op = name, targets, post_op

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        args = op_args(node)
        a, b = args["input"], args["other"]
        if args.get("alpha", 1) != 1 or not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
            return None
        candidates = [(p, o) for p, o in ((b, a), (a, b)) if p.target in FUSABLE_PRODUCERS]
        candidates.sort(key=lambda pair: not _precedes(pair[1], pair[0]))  # the later producer first
        misses = []
        for producer, other in candidates:
            miss = _binary_miss(producer, other, self.post_op)
            if miss is None:
                return Match({"producer": producer, "other": other})
            misses.append(miss.reason)
        return fail("; ".join(misses)) if misses else None

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        producer, other = match["producer"], match["other"]
        if not _precedes(other, producer):
            node.prepend(producer)  # its inputs all precede it; ``other`` precedes ``node``
        fused = to_fused(gm, producer)
        add_post_op(fused, self.post_op, other)
        replace_node(node, fused)


class FuseScalar(Rule):
    """``matmul(a, b) * c`` -> ``pyrys::matmul_scale(a, b)`` for a number ``c`` (likewise ``/ c``, ``+ c``,
    ``- c``, and after a conv or linear whose weights took no fold): one multiply or add, as eager's (a
    divisor becomes the factor ``1 / c``); what stays an op: :func:`pyrys.ir.post_ops.scalar_post_op`."""

    name = "scalar"
    anchors = frozenset(SCALAR_OPS)  # a fold into the weights, where one applies, came first

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        args = op_args(node)
        producer, c = args["input"], args["other"]
        if not (isinstance(producer, fx.Node) and producer.target in FUSABLE_PRODUCERS):
            return None
        if isinstance(c, bool) or not isinstance(c, (int, float)) or args.get("alpha", 1) != 1:
            return None
        out = tensor_meta(node)
        post_op = scalar_post_op(node.target, c, out.dtype if out is not None else torch.float32)
        if isinstance(post_op, str):
            return fail(f"{post_op}: it stays an op")
        return _producer_miss(producer, post_op) or Match({"producer": producer, "post_op": post_op})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        fused = to_fused(gm, match["producer"])
        add_post_op(fused, match["post_op"])
        replace_node(node, fused)


POST_OP_RULES: tuple[Rule, ...] = (
    FuseActivation(),
    FuseScalar(),
    FuseBinary("binary_add", frozenset({aten.add.Tensor}), PostOp("add")),
    FuseBinary("binary_mul", frozenset({aten.mul.Tensor}), PostOp("mul")),
)


def fuse_post_ops(gm: fx.GraphModule) -> PassResult:
    """Apply :data:`POST_OP_RULES` once over the graph (chains fuse in the same sweep)."""
    return apply_rules(gm, POST_OP_RULES)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(hint(d) for d in t.shape)
