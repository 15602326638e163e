"""Fold constant affine ops (``+ c``, ``- c``, ``* a``, ``/ a``) into the conv or linear before them,
and merge chains of them.

With ``y = conv(x, W, b)`` and ``a``, ``c`` scalars or one value per output channel
(shape ``(C, 1, 1)``, ``(1, C, 1, 1)`` for a conv, ``(C,)`` for a linear):

    y * a + c  ==  conv(x, W * a, b * a + c)      (``pyrys::fold_scale``, ``pyrys::fold_affine_bias``)
    y / a      ==  y * (1 / a)                    y - c  ==  y + (-c)

Consecutive constant ops of one family merge into one op on a constant expression,
which ``constant_propagation`` evaluates:

    (x + c1) - c2 -> x + (c1 - c2)        (x - c1) + c2 -> x - (c1 - c2)
    (x * a1) / a2 -> x * (a1 / a2)        (x / a1) * a2 -> x / (a1 / a2)

Only when the constant has the input's dtype (no type promotion) and does not
broadcast the result to a larger shape; and, for ``*`` and ``/``, where its values (known now:
a number, a frozen tensor) are finite, nonzero as a divisor, within 2^+-64, and merge into a finite,
nonzero one in that dtype: ``conv(x) / 0`` is ``+-inf`` in eager, ``W * inf`` sums to NaN,
``x * 1e-39 * 1e39`` is ``inf`` in float32 (``1e39`` rounds to it) but ``x * 1.0`` merged, and
``x * 1e30 * 1e30 * 1e-30`` overflows in eager's second step.  Terms merge where they are at most 1 (in
float32), or do not cancel, ``|c1 + c2| >= max(|c1|, |c2|) / 2``: eager's ``x + 1e8 - 1e8`` rounds x to
a multiple of 8 on the way, which ``x + 0`` would not (terms up to 1 move x by at most 6e-8).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from pyrys.ir.edit import insert_op, replace_node, set_args
from pyrys.ir.graph import add_constant, constant_value, is_constant, op_args, tensor_meta
from pyrys.ir.symbolic import keeps_shape
from pyrys.ir.ops import FOLD_AFFINE_BIAS, FOLD_SCALE
from pyrys.ir.vocabulary import LINEARS, WEIGHTED, is_pure, output_channel_layout
from pyrys.passes.rewrite import Match, Miss, PassResult, Rule, apply_rules, fail, shared_miss

aten = torch.ops.aten
MODERATE_EXPONENT = 64  # scales beyond 2^+-64 stay ops: folded, the weights' products may leave float32's range

# op -> (family, inverse): sub is add of -c, div is mul by 1/a
AFFINE_OPS = {
    aten.add.Tensor: ("add", False), aten.add.Scalar: ("add", False),
    aten.sub.Tensor: ("add", True), aten.sub.Scalar: ("add", True),
    aten.mul.Tensor: ("mul", False), aten.mul.Scalar: ("mul", False),
    aten.div.Tensor: ("mul", True), aten.div.Scalar: ("mul", True),
}
_TENSOR_OP = {("add", False): aten.add.Tensor, ("add", True): aten.sub.Tensor,
              ("mul", False): aten.mul.Tensor, ("mul", True): aten.div.Tensor}
_PYTHON_OP = {aten.add.Tensor: lambda a, b: a + b, aten.sub.Tensor: lambda a, b: a - b,
              aten.mul.Tensor: lambda a, b: a * b, aten.div.Tensor: lambda a, b: a / b}


@dataclass(frozen=True)
class AffineOp:
    """``x (+|-|*|/) constant``."""

    x: fx.Node
    family: str  # "add" | "mul"
    inverse: bool  # sub / div
    constant: fx.Node | float | int


def constant_expr(arg) -> bool:
    """A constant, or a pure op on constants not evaluated yet (a fold node, a merged constant).

    Walks the producers iteratively, each once, and stops at the first non-constant one
    (a recursive walk overflowed the stack on ResNet-152's depth)."""
    if not isinstance(arg, fx.Node):
        return is_constant(arg)
    pending, seen = [arg], set()
    while pending:
        node = pending.pop()
        if node in seen or node.op == "get_attr":
            continue
        seen.add(node)
        if not is_pure(node):
            return False
        pending.extend(node.all_input_nodes)
    return True


def _constant_operand(arg) -> bool:
    return constant_expr(arg) and not isinstance(arg, (bool, list, tuple, type(None)))


def _fits(x: torch.Tensor, constant) -> bool:
    """The constant neither promotes ``x``'s dtype nor broadcasts it to a larger shape."""
    if not isinstance(constant, fx.Node):
        return x.is_floating_point()
    c = tensor_meta(constant)
    if c is None or c.dtype != x.dtype:
        return False
    return keeps_shape(x.shape, c.shape)


def constant_affine(node: fx.Node) -> AffineOp | None:
    """Read ``node`` as a constant affine op on a tensor, or None."""
    if node.op != "call_function" or node.target not in AFFINE_OPS:
        return None
    family, inverse = AFFINE_OPS[node.target]
    args = op_args(node)
    if args.get("alpha", 1) != 1:
        return None
    a, b = args["input"], args["other"]
    if _constant_operand(b) and not _constant_operand(a):
        x, constant = a, b
    elif _constant_operand(a) and not _constant_operand(b) and not inverse:
        x, constant = b, a
    else:
        return None
    if not isinstance(x, fx.Node) or tensor_meta(x) is None or not _fits(tensor_meta(x), constant):
        return None
    return AffineOp(x, family, inverse, constant)


def _known_values(gm: fx.GraphModule, constant, dtype: torch.dtype) -> torch.Tensor | None:
    """The constant's values in ``dtype`` where they are known now (a number, a frozen tensor, a merge of
    two such that this pass made and constant propagation has not yet evaluated), else None."""
    if not isinstance(constant, fx.Node):
        return torch.tensor(constant, dtype=dtype)
    if constant.op == "call_function" and constant.target in _PYTHON_OP and len(constant.args) == 2:
        a, b = (_known_values(gm, arg, dtype) for arg in constant.args)
        return None if a is None or b is None else _PYTHON_OP[constant.target](a, b)
    value = constant_value(gm, constant) if is_constant(constant) else None
    return value.to(dtype) if isinstance(value, torch.Tensor) else None


def _scales_like_eager(values: torch.Tensor | None, inverse: bool) -> bool:
    """Whether multiplying by ``values`` (dividing, for ``inverse``) folds into weights or another scale as
    eager computes it: finite, nonzero values (``y * 0.0`` keeps the sign of y and makes inf NaN, weights times
    0 give +0 everywhere), a divisor's reciprocal finite too; unknown values pass."""
    if values is None:
        return True
    if not bool((torch.isfinite(values) & (values != 0)).all()):
        return False
    return not inverse or bool(torch.isfinite(values.reciprocal()).all())


def _keeps_finite(gm: fx.GraphModule, weights: list, scale: torch.Tensor | None, inverse: bool) -> bool:
    """Whether the weights (and bias) known now stay finite multiplied by ``scale`` (divided, for ``inverse``):
    ``conv(x) * 1e30`` overflows in eager only where the output does, folded ones overflow every weight."""
    if scale is None:
        return True
    factor = (scale.reciprocal() if inverse else scale).abs().amax()
    for weight in weights:
        value = constant_value(gm, weight) if weight is not None and is_constant(weight) else None
        if isinstance(value, torch.Tensor) and value.numel() and not bool(torch.isfinite(value.abs().amax() * factor)):
            return False
    return True


def _moderate(scale: torch.Tensor | None, inverse: bool) -> bool:
    """Whether every nonzero factor ``scale`` multiplies by lies within 2^+-MODERATE_EXPONENT (unknown: yes):
    ``linear(x) * 1e-36`` folded makes weights whose products underflow (4e-36 in eager, 0 folded)."""
    if scale is None:
        return True
    factors = (scale.reciprocal() if inverse else scale).abs().double()
    factors = factors[factors != 0]
    return bool(((factors >= 2.0 ** -MODERATE_EXPONENT) & (factors <= 2.0 ** MODERATE_EXPONENT)).all())


def _as_tensor_node(gm: fx.GraphModule, value, like: torch.Tensor, name: str) -> fx.Node:
    if isinstance(value, fx.Node):
        return value
    return add_constant(gm, torch.tensor(value, dtype=like.dtype), name)


def _channel_miss(out: torch.Tensor, constant, axis: int, producer: fx.Node) -> Miss | None:
    if not isinstance(constant, fx.Node) or tensor_meta(constant).numel() == 1:
        return None
    shape = [1] * (out.dim() - tensor_meta(constant).dim()) + list(tensor_meta(constant).shape)
    if all(s == 1 for i, s in enumerate(shape) if i != axis):
        return None
    return fail(f"the constant %{constant.name} of shape {tuple(tensor_meta(constant).shape)} varies along "
                f"more than the output channels of %{producer.name}, so it cannot fold into its weights")


class FoldAffineIntoProducer(Rule):
    """``conv(x, W, b) * a + c`` -> ``conv(x, fold_scale(W, a), fold_affine_bias(b, a, c))``."""

    name = "affine_into_weights"
    anchors = frozenset(AFFINE_OPS)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        op = constant_affine(node)
        if op is None or op.x.target not in WEIGHTED:
            return None
        producer, args = op.x, op_args(op.x)
        for name in ("weight", "bias"):
            if args[name] is not None and not constant_expr(args[name]):
                return fail(f"the {name} of %{producer.name} is not a constant: freeze_params did not freeze it")
        out = tensor_meta(producer)
        axis = out.dim() - 1 if producer.target in LINEARS else 1
        miss = _channel_miss(out, op.constant, axis, producer) or shared_miss(producer, "its weights cannot change")
        if miss:
            return miss
        if op.family == "mul":
            scale, word = _known_values(gm, op.constant, out.dtype), "divisor" if op.inverse else "scale"
            if not _scales_like_eager(scale, op.inverse):
                return fail(f"the {word} {_constant_text(op.constant)} is not finite or is 0: in the weights of "
                            f"%{producer.name} it would not give eager's infinities, NaN and signed zeros")
            if not _keeps_finite(gm, [args["weight"], args["bias"]], scale, op.inverse):
                return fail(f"the {word} {_constant_text(op.constant)} would scale the weights of %{producer.name} "
                            f"past the largest {out.dtype}")
            if not _moderate(scale, op.inverse):
                return fail(f"the {word} {_constant_text(op.constant)} is beyond 2^+-{MODERATE_EXPONENT}: in the weights "
                            f"of %{producer.name} their products could leave {out.dtype}'s range where eager's do not")
        return Match({"op": op, "args": args, "channels": out.shape[axis]})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        op, args, channels = match["op"], match["args"], match["channels"]
        producer = op.x
        node.prepend(producer)  # after every operand of ``node``: the constant may be defined late
        graph = gm.graph
        with graph.inserting_before(producer):
            constant = _as_tensor_node(gm, op.constant, tensor_meta(producer), f"{node.name}_constant")
            if op.inverse:
                constant = insert_op(graph, aten.reciprocal.default if op.family == "mul" else aten.neg.default,
                                     (constant,))
            weight, bias = args["weight"], args["bias"]
            if op.family == "mul":
                channel_dim, groups = output_channel_layout(producer.target, args)
                extra = (channel_dim, groups) if channel_dim else ()
                weight = insert_op(graph, FOLD_SCALE, (weight, constant, *extra), f"{producer.name}_weight_scaled")
                bias = insert_op(graph, FOLD_AFFINE_BIAS, (bias, constant, None, channels), f"{producer.name}_bias_scaled")
            else:
                bias = insert_op(graph, FOLD_AFFINE_BIAS, (bias, None, constant, channels), f"{producer.name}_bias_shifted")
        set_args(producer, tuple({**args, "weight": weight, "bias": bias}.values()))
        replace_node(node, producer)


class MergeAffine(Rule):
    """``(x + c1) + c2`` -> ``x + (c1 + c2)`` (and sub, mul, div: see the module docstring)."""

    name = "merge_affine"
    anchors = frozenset(AFFINE_OPS)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        outer = constant_affine(node)
        inner = constant_affine(outer.x) if outer is not None else None
        if inner is None or inner.family != outer.family:
            return None
        miss = shared_miss(outer.x, "its constant cannot merge with the next one", f"%{outer.x.name}")
        if miss:
            return miss
        combine = _TENSOR_OP[outer.family, outer.inverse != inner.inverse]
        literal = not isinstance(inner.constant, fx.Node) and not isinstance(outer.constant, fx.Node)
        dtype = tensor_meta(inner.x).dtype
        if outer.family == "mul" and not _merges_like_eager(gm, inner, outer, combine, dtype):
            return None
        if outer.family == "add" and not _adds_like_eager(gm, inner, outer, combine, dtype):
            return None
        return Match({"inner": inner, "outer": outer, "combine": combine, "literal": literal})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        inner, outer, combine = match["inner"], match["outer"], match["combine"]
        like = tensor_meta(inner.x)
        with gm.graph.inserting_before(node):
            if match["literal"]:
                constant = _PYTHON_OP[combine](inner.constant, outer.constant)
            else:
                c1 = _as_tensor_node(gm, inner.constant, like, f"{node.name}_c1")
                c2 = _as_tensor_node(gm, outer.constant, like, f"{node.name}_c2")
                constant = insert_op(gm.graph, combine, (c1, c2), f"{node.name}_merged")
            merged = insert_op(gm.graph, _TENSOR_OP[inner.family, inner.inverse], (inner.x, constant), node.name)
        replace_node(node, merged)
        gm.graph.erase_node(outer.x)


def _merges_like_eager(gm: fx.GraphModule, inner: AffineOp, outer: AffineOp, combine, dtype: torch.dtype) -> bool:
    """Whether ``(x * a1) * a2`` (or ``/``) may run as ``x * (a1 * a2)``: each scale as eager rounds it
    (:func:`_scales_like_eager`), and their merge, in ``dtype``, finite and nonzero (no overflow or underflow
    the two steps would not have)."""
    a1, a2 = (_known_values(gm, op.constant, dtype) for op in (inner, outer))
    if not all(_scales_like_eager(a, op.inverse) and _moderate(a, op.inverse) for a, op in ((a1, inner), (a2, outer))):
        return False
    if a1 is None or a2 is None:
        return True
    merged = _PYTHON_OP[combine](a1, a2)
    return bool(torch.isfinite(merged).all() and (merged != 0).all())


def _adds_like_eager(gm: fx.GraphModule, inner: AffineOp, outer: AffineOp, combine, dtype: torch.dtype) -> bool:
    """Whether ``(x + c1) + c2`` (or ``-``) may run as ``x + (c1 + c2)``: known terms, with a finite sum, that
    are at most 1 in float32 or do not cancel, ``|c1 + c2| >= max(|c1|, |c2|) / 2`` (eager's first step rounds x
    at the scale of ``c1``, by up to half its ulp; merged, at the scale of the sum)."""
    c1, c2 = (_known_values(gm, op.constant, dtype) for op in (inner, outer))
    if c1 is None or c2 is None:
        return False
    merged = _PYTHON_OP[combine](c1, c2)
    larger = torch.maximum(c1.abs(), c2.abs()).double()
    small = (larger <= 1) & (dtype == torch.float32)  # in bf16, ulp(1) is 8e-3
    return bool(torch.isfinite(merged).all() and (small | (merged.double().abs() >= larger / 2)).all())


def _constant_text(constant) -> str:
    return f"%{constant.name}" if isinstance(constant, fx.Node) else repr(constant)


FOLD_AFFINE_RULES: tuple[Rule, ...] = (FoldAffineIntoProducer(), MergeAffine())


def fold_constant_affine(gm: fx.GraphModule) -> PassResult:
    """Apply :data:`FOLD_AFFINE_RULES` once over the graph (the pass manager repeats it to a fixed point)."""
    return apply_rules(gm, FOLD_AFFINE_RULES)
