"""Lower precision: the ops with fast bfloat16 kernels run in bfloat16, every other op in float32.

With ``precision="bf16"`` the ops of :data:`COMPUTE_OPS` (convolutions, linears, matmuls, attention) run
in bfloat16, and so do the cheap ops of :data:`BETWEEN_OPS` that read only bfloat16 activations: an
activation input is converted (``aten::to(%x, torch.bfloat16)``), a constant input (a weight, a
bias, a residual constant) becomes a bfloat16 constant (constant propagation evaluates its
conversion once), and the output is bfloat16.  An op that stays float32 and reads a bfloat16 value
reads it converted back, and so do the graph's outputs: the caller gets float32 as before.  A value
is converted at most once each way, and never between two bf16 ops, so every conversion left is a
node of the graph and a line of the program text.  A fused op's float32 residual operand stays
float32, and so does its result: a transformer's residual stream, between float32 layer norms, is
never rounded to bfloat16; nor is a float32 value no bf16 op computed (a position embedding added
to the input, the angles of a rotary embedding).

    %y = conv(%x, %W) ; %z = softmax(%y)
    ->  %x_bf16 = to(%x, bf16) ; %y = conv(%x_bf16, %W_bf16) ; %y_f32 = to(%y, f32) ; %z = softmax(%y_f32)

The kernels accumulate in float32 (oneDNN's bf16 convolution, inner product and matmul do, and so
do torch's); what bfloat16 loses is the 8-bit mantissa of each stored value, about 4e-3 relative.
Ops kept in float32 (normalizations, softmax, reductions, everything not listed) are the ones
whose result depends on summing or exponentiating many values, or that oneDNN has no bf16 path
for here.
"""
from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from pyrys.ir.edit import insert_op
from pyrys.ir.meta import settle_meta
from pyrys.ir.provenance import copies
from pyrys.ir.fused import FUSED_MATMUL, FUSED_OPS, Fused, read_fused
from pyrys.ir.graph import op_args
from pyrys.ir.post_ops import ACTIVATIONS
from pyrys.ir.vocabulary import ATTENTION, MATRIX_PRODUCTS, PERMUTES, VIEWS, WEIGHTED, is_pure
from pyrys.passes.constant_propagation import constant_propagation
from pyrys.passes.precision_guard import Bf16Guard
from pyrys.passes.rewrite import Miss, PassResult

aten = torch.ops.aten
PRECISIONS = ("fp32", "bf16", "int8")  # int8: passes/quantize.py
LOW = torch.bfloat16
HIGH = torch.float32
CONVERT = aten.to.dtype  # to(x, dtype): the one conversion op this pass writes

# the ops worth running in bfloat16: a conv or linear when its weight is a constant; a matrix product of
# two activations when one of them is bfloat16 already (attention's q @ k^T after the projections, not
# the float32 angles of a rotary embedding)
MATMULS = MATRIX_PRODUCTS | {FUSED_MATMUL}
# attention likewise, on bfloat16 query, key and value; its mask stays as it is (float32 or boolean)
COMPUTE_OPS = frozenset({*WEIGHTED, *FUSED_OPS, *MATMULS, ATTENTION})
# the cheap ops between them: each moves only when every activation it reads is bfloat16 already, so
# float32 values are never rounded for nothing (a position embedding added to the input, angles
# computed for a rotary embedding, a residual stream added to a linear's result stay float32)
BETWEEN_OPS = frozenset({
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.avg_pool1d.default, aten.avg_pool2d.default,  # not avg_pool3d: torch 2.14 has no bfloat16 kernel for it
    aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
    *ACTIVATIONS, aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor,
    aten.cat.default, *VIEWS, *PERMUTES, aten.clone.default, aten.contiguous.default,
    aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
    aten.pad.default, aten.constant_pad_nd.default,  # a TF-style "same" pad between convs (folded into the next)
})
BF16_OPS = COMPUTE_OPS | BETWEEN_OPS
# sums stay float32 where a float32 op reads them: a norm would read them converted back anyway, and the
# residual stream between norms is never rounded to bfloat16 (the fused ops' float32 residuals keep it so)
SUMS = frozenset({aten.add.Tensor, aten.sub.Tensor})


def lower_precision(gm: fx.GraphModule, precision: str, output_dtype: torch.dtype | None = None,
                    guard: Bf16Guard | None = None) -> PassResult:
    """Run :data:`BF16_OPS` in bfloat16 when ``precision == "bf16"`` (see the module docstring);
    ``fired["bf16"]`` counts the ops moved, ``fired["conversion"]`` the conversions written.  The graph's
    floating-point outputs come back as eager gives them, or all in ``output_dtype`` when it is given (a
    bfloat16 result is then returned as it is, no conversion back).  ``guard``: measure the outputs' error
    against float32 and keep in float32 the ops it chooses (:mod:`pyrys.passes.precision_guard`), each a miss."""
    kept: dict[str, str] = {}
    if precision == "bf16" and guard is not None:  # measured without output_dtype: no op choice changes that
        kept = guard.keep(gm, lambda trial, names: _lower(trial, precision, None, names)[1], rounded_when_lowered)
    result, _ = _lower(gm, precision, output_dtype, frozenset(kept))
    result.misses = [Miss("bf16", name, why) for name, why in kept.items()]
    return result


def run_in_bf16(gm: fx.GraphModule, names: set[str] | frozenset[str]) -> PassResult:
    """Run the compute ops named in ``names`` in bfloat16 (and the cheap ops between them, and a matmul or
    attention reading their bfloat16 results, as :func:`lower_precision` does), every other weighted op as it
    is: with int8 on a CPU with native bf16, the guard's kept layers and attention.  Their constants'
    conversions are folded here (the int8 pass runs after constant propagation); ``fired["bf16"]`` counts
    the ops moved, ``fired["conversion"]`` the conversions left."""
    result, _ = _lower(gm, "bf16", None, frozenset(), frozenset(names))
    folded = constant_propagation(gm, only=frozenset({CONVERT})).fired["folded"]
    result.fired["conversion"] -= folded
    return result


def _lower(gm: fx.GraphModule, precision: str, output_dtype: torch.dtype | None,
           kept: frozenset[str], chosen: frozenset[str] | None = None) -> tuple[PassResult, set[str]]:
    """:func:`lower_precision` with the compute ops named in ``kept`` left in float32 (and with ``chosen``,
    only the weighted ops named there moved, and a matmul or attention named there even on float32
    activations: one reading bfloat16 moves anyway, as always); also the names of the compute ops it moved."""
    result, moved = PassResult(), set()
    if precision != "bf16" and output_dtype is None:
        return result, moved
    low: set[fx.Node] = set()  # nodes whose value is bfloat16 now
    converted: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}

    def convert(node: fx.Node, dtype: torch.dtype, first_user: fx.Node) -> fx.Node:
        """``node`` converted to ``dtype``, once: before its first user (nodes are visited in order)."""
        if (node, dtype) not in converted:
            with gm.graph.inserting_before(first_user):
                converted[node, dtype] = insert_op(gm.graph, CONVERT, (node, dtype), f"{node.name}_{_SHORT[dtype]}")
            copies(converted[node, dtype], node)
            result.fired["conversion"] += 1
        return converted[node, dtype]

    for source in _attention_sources(gm, chosen):  # converted once where it is made, not each head's view
        converted_source = convert(source, LOW, source.next)  # right after it
        source.replace_all_uses_with(converted_source, delete_user_cb=lambda user, c=converted_source: user is not c)
        low.add(converted_source)
    rewired: list[fx.Node] = []  # their values are inferred once every op is rewired (each in turn would
    for node in list(gm.graph.nodes):  # see a bfloat16 input next to the float32 weights of the op after it)
        if node.op not in ("call_function", "output"):
            continue
        if node.op == "output" and output_dtype is not None:
            node.args = tree_map(lambda a: _as_dtype(a, output_dtype, low, convert, node), node.args)
            rewired.append(node)
        elif precision == "bf16" and node.op == "call_function" and node.name not in kept and _runs_low(node, low,
                                                                                                     chosen):
            fused = read_fused(node)
            residuals = _float32_residuals(fused, low)
            if residuals:  # y = op(x_bf16, W_bf16) + r in float32: the sum is never rounded to bfloat16
                own = {name: _as_low(arg, low, convert, node) for name, arg in fused.args.items()}
                operands = tuple(p if p in residuals else _as_low(p, low, convert, node) for p in fused.post_inputs)
                node.args, node.kwargs = replace(fused, args=own, post_inputs=operands).node_args(), {}
            elif node.target is ATTENTION:
                node.args = (*(_as_low(a, low, convert, node) for a in node.args[:3]), *node.args[3:])
                low.add(node)
            else:
                node.args, node.kwargs = tree_map(lambda a: _as_low(a, low, convert, node), (node.args, node.kwargs))
                low.add(node)
            rewired.append(node)
            result.fired["bf16"] += node.target is not operator.getitem
            if node.target in COMPUTE_OPS:
                moved.add(node.name)
        elif any(a in low for a in node.all_input_nodes):
            node.args, node.kwargs = tree_map(lambda a: convert(a, HIGH, node) if a in low else a,
                                              (node.args, node.kwargs))
            rewired.append(node)
    settle_meta(rewired)  # in graph order: each node after the nodes it reads
    gm.graph.lint()
    gm.recompile()
    return result, moved


def rounded_when_lowered(lowered: fx.GraphModule, names: set[str]) -> dict[str, tuple[frozenset[str], bool]]:
    """What a graph :func:`_lower` lowered rounds at each op named in ``names``, by the names the float32 graph
    gives its values (a trial copy keeps them): the values the op reads in bfloat16 (converted for it, or made
    bfloat16 by the ops before it), and whether its result is bfloat16 (not where a fused op adds a float32
    residual).  The accuracy guard measures each op so: lowering's own rule, read off its result."""
    rounding = {}
    for node in lowered.graph.nodes:
        if node.name in names:
            read = {arg.args[0].name if arg.target is CONVERT else arg.name
                    for arg in node.all_input_nodes if _is_low(arg.meta.get("val"))}
            rounding[node.name] = (frozenset(read), _is_low(node.meta.get("val")))
    return rounding


# the ops between a projection and the attention reading it: views of the heads (split, views, permutes)
HEAD_VIEWS = frozenset({*VIEWS, *PERMUTES, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
                        operator.getitem, aten.clone.default, aten.contiguous.default})


def _attention_sources(gm: fx.GraphModule, chosen: frozenset[str] | None) -> list[fx.Node]:
    """The float32 values that the chosen attention ops read as query, key or value through
    :data:`HEAD_VIEWS` only, and that nothing else reads: converted where they are made (one conversion,
    which the int8 projection making it writes itself: ``dst=bf16``), not three times per attention."""
    if not chosen:
        return []
    sources = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.name not in chosen or node.target is not ATTENTION:
            continue
        for arg in node.args[:3]:
            while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in HEAD_VIEWS:
                arg = arg.args[0]
            if (isinstance(arg, fx.Node) and arg.op == "call_function" and arg not in sources
                    and _stays_float32(arg, chosen) and isinstance(arg.meta.get("val"), torch.Tensor)
                    and _is_high(arg.meta["val"]) and _only_heads_of(arg, chosen)):
                sources.append(arg)
    return sources


def _stays_float32(node: fx.Node, chosen: frozenset[str]) -> bool:
    """Whether ``node`` stays float32 when only the compute ops in ``chosen`` move: a weighted op not chosen,
    or an op that never runs in bfloat16 (a cheap op of :data:`BETWEEN_OPS`, a matmul or an attention may
    follow a bfloat16 input)."""
    follows = BETWEEN_OPS | MATMULS | {ATTENTION}
    return node.name not in chosen and node.target not in follows


def _only_heads_of(source: fx.Node, chosen: frozenset[str]) -> bool:
    """Whether every reader of ``source``, through :data:`HEAD_VIEWS`, is a chosen attention's query, key or value."""
    pending = [source]
    while pending:
        node = pending.pop()
        for user in node.users:
            if user.op == "call_function" and user.target in HEAD_VIEWS and user.args[0] is node:
                pending.append(user)
            elif not (user.target is ATTENTION and user.name in chosen and node in user.args[:3]
                      and node not in user.args[3:] and node not in user.kwargs.values()):
                return False
    return True


def _runs_low(node: fx.Node, low: set[fx.Node], chosen: frozenset[str] | None = None) -> bool:
    """Whether ``node`` runs in bfloat16: an op of :data:`COMPUTE_OPS` (see there; named in ``chosen`` where
    given) or of :data:`BETWEEN_OPS` (reading bfloat16 activations only) on float32 or bfloat16 tensors,
    making float32 tensors; a ``getitem`` follows its source."""
    if node.target is operator.getitem:
        return node.args[0] in low
    if node.target not in BF16_OPS or not _is_high(node.meta.get("val")):
        return False
    tensors = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), (torch.Tensor, tuple, list))]
    if node.target is ATTENTION:  # query, key and value; the mask (boolean, or float32) stays as it is
        tensors = [a for a in node.args[:3] if isinstance(a, fx.Node)]
    if not all(a in low or _is_high(a.meta.get("val")) for a in tensors):
        return False  # an integer or float64 tensor among its inputs
    activations = [a for a in tensors if a.op != "get_attr"]
    if node.target in MATMULS or node.target is ATTENTION:
        if node.target is FUSED_MATMUL:  # its own operands: a bfloat16 residual or mask moves no product
            operands = list(read_fused(node).args.values())
            activations = [a for a in activations if a in operands]
        return any(a in low for a in activations) or (chosen is not None and node.name in chosen)
    if node.target in COMPUTE_OPS:
        return (chosen is None or node.name in chosen) and _weight_is_constant(node)
    if node.target in SUMS and any(_reads_float32(user) for user in node.users):
        return False  # a residual stream a norm reads (ViT's embeddings: a conv's result plus positions)
    return bool(activations) and all(a in low for a in activations)


def _reads_float32(user: fx.Node) -> bool:
    """Whether ``user`` stays float32 whatever it reads (a norm, a softmax, a graph output)."""
    return user.op == "output" or (user.op == "call_function" and user.target not in BF16_OPS
                                   and user.target is not operator.getitem)


def _weight_is_constant(node: fx.Node) -> bool:
    """A conv's, transposed conv's or linear's weight is a constant, or computed from constants only (a fold
    the next constant propagation evaluates); an unfrozen one would be converted on every call, and the
    backends take constant weights only."""
    fused = read_fused(node)
    if fused is not None:
        return _from_constants(fused.args["weight"])
    return _from_constants(op_args(node)["weight"])


def _from_constants(arg) -> bool:
    if not isinstance(arg, fx.Node):
        return True
    if arg.op == "get_attr":
        return True
    return arg.op == "call_function" and is_pure(arg) and all(_from_constants(a) for a in arg.all_input_nodes)


def _float32_residuals(fused: Fused | None, low: set[fx.Node]) -> set[fx.Node]:
    """The binary post-op operands of a fused op that are float32 activations (a transformer's residual
    stream, between float32 norms): they stay float32, and so does the op's result (the kernel adds in
    float32 and writes float32).  Not the op's own input: that one is converted."""
    if fused is None:
        return set()
    return {p for p in fused.post_inputs if p not in low and p.op != "get_attr" and _is_high(p.meta.get("val"))
            and p.meta["val"].dim() > 0 and p is not fused.args["input"]}  # a 0-dim one would not promote


def _as_low(arg, low: set[fx.Node], convert, user: fx.Node):
    """``arg`` as bfloat16: itself if it is bfloat16 already (or not a float32 tensor), else converted."""
    if not isinstance(arg, fx.Node) or arg in low or not _is_high(arg.meta.get("val")):
        return arg
    return convert(arg, LOW, user)


def _as_dtype(arg, dtype: torch.dtype, low: set[fx.Node], convert, user: fx.Node):
    """``arg`` in ``dtype`` if it is a floating-point tensor (converted where it is not), else as it is."""
    if not isinstance(arg, fx.Node) or not isinstance(arg.meta.get("val"), torch.Tensor):
        return arg
    current = LOW if arg in low else arg.meta["val"].dtype
    return convert(arg, dtype, user) if current.is_floating_point and current != dtype else arg


def _is_low(value) -> bool:
    """A bfloat16 tensor."""
    return isinstance(value, torch.Tensor) and value.dtype == LOW


def _is_high(value) -> bool:
    """A float32 tensor, or a tuple or list of them (a split's value)."""
    if isinstance(value, (tuple, list)):
        return bool(value) and all(_is_high(v) for v in value)
    return isinstance(value, torch.Tensor) and value.dtype == HIGH


_SHORT = {LOW: "bf16", HIGH: "f32"}
