"""Lowering an optimized pyrys graph to a dnnl program.

For each node, the lowering table (``LOWERINGS``) builds oneDNN primitive descriptors and
primitives once; an op with no lowering, or one oneDNN cannot run, falls back to torch.
Then ``assemble`` plans memory and seals the program.  oneDNN sizes a primitive's work
split for the thread count of the thread that creates it, so a program is built for one
thread count, with that many threads set on the building thread.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from pyrys.backends.dnnl import binding
from pyrys.backends.dnnl.assemble import assemble
from pyrys.backends.dnnl.builder import F32_OR_BF16, Builder, PackedWeights, Unsupported
from pyrys.backends.dnnl.fallback import lower_fallback
from pyrys.backends.dnnl.lower_attention import LOWERINGS as ATTENTION_LOWERINGS
from pyrys.backends.dnnl.layout import plain_md
from pyrys.backends.dnnl.lower_conv import lower_conv, lower_deconv, lower_linear
from pyrys.backends.dnnl.lower_int8 import LOWERINGS as INT8_LOWERINGS
from pyrys.backends.dnnl.lower_matmul import LOWERINGS as MATMUL_LOWERINGS
from pyrys.backends.dnnl.lower_ops import LOWERINGS as OP_LOWERINGS, lower_max_pool
from pyrys.backends.dnnl.primitives import Engine
from pyrys.backends.dnnl.program import DnnlProgram
from pyrys.backends.dnnl.values import DYNAMIC, Value
from pyrys.backends.threads import with_threads
from pyrys.backends.dnnl.post_ops import DROPS_NAN
from pyrys.ir.finite import makes_nonfinite, nonfinite_values
from pyrys.ir.fused import FUSED_CONV, FUSED_CONV_TRANSPOSE, FUSED_LINEAR, read_fused
from pyrys.ir.graph import op_args, state_ref
from pyrys.ir.post_ops import ACTIVATIONS, NoPostOp, activation_post_op

# op -> its lowering.  Convolutions, linears and matrix products arrive in their fused form only (passes/legalize.py).
LOWERINGS = {FUSED_CONV: lower_conv, FUSED_CONV_TRANSPOSE: lower_deconv, FUSED_LINEAR: lower_linear, **OP_LOWERINGS,
             **INT8_LOWERINGS, **ATTENTION_LOWERINGS, **MATMUL_LOWERINGS}
MAX_POOLINGS = frozenset(target for target, rule in OP_LOWERINGS.items() if rule is lower_max_pool)
# the lowerings that read the layout policy: every other op takes the layout its inputs come in
LAYOUT_CHOOSERS = frozenset({FUSED_CONV, FUSED_CONV_TRANSPOSE})


def layout_applies(gm: fx.GraphModule) -> bool:
    """Whether the layout policy can change ``gm``'s program (it has a convolution to lay out)."""
    return any(node.op == "call_function" and node.target in LAYOUT_CHOOSERS for node in gm.graph.nodes)


def _lower_node(builder: Builder, node: fx.Node, nonfinite: dict[fx.Node, str]) -> None:
    rule = LOWERINGS.get(node.target)
    if rule is None:
        return lower_fallback(builder, node, "no oneDNN lowering")
    if _has_zero_size(node):
        return lower_fallback(builder, node, "a tensor with no elements (oneDNN takes none)")
    dropped = _drops_nan(node) if node in nonfinite else None
    if dropped:
        return lower_fallback(builder, node, f"oneDNN's {dropped} turns NaN into a number, and a NaN may come from "
                                             f"{nonfinite[node]}")
    snapshot = builder.snapshot()
    builder.sees_nonfinite = node in nonfinite  # (its relu then maps -inf to 0: post_ops.eltwise_steps)
    try:
        rule(builder, node)
    except (Unsupported, binding.DnnlError) as error:
        builder.restore(snapshot, node)
        lower_fallback(builder, node, str(error).splitlines()[0][:120])
    finally:
        builder.sees_nonfinite = False


def _post_op_names(node: fx.Node) -> list[str]:
    """The post-ops ``node`` runs: a fused op's, or its own as an activation."""
    if node.target in ACTIVATIONS:
        try:
            return [activation_post_op(node.target, op_args(node)).name]
        except NoPostOp:
            return []
    fused = read_fused(node)
    return [post_op.name for post_op in fused.post_ops] if fused is not None else []


def _drops_nan(node: fx.Node) -> str | None:
    """What in ``node`` gives a number for NaN where eager keeps it, if anything: max pooling, or a post-op in
    :data:`DROPS_NAN`."""
    if node.target in MAX_POOLINGS:
        return "max pooling"
    return next((name for name in _post_op_names(node) if name in DROPS_NAN), None)


def _has_zero_size(node: fx.Node) -> bool:
    values = [node.meta.get("val")] + [n.meta.get("val") for n in node.all_input_nodes]
    return any(isinstance(v, torch.Tensor) and v.numel() == 0 for v in tree_flatten(values)[0])


def _define_input(builder: Builder, node: fx.Node) -> Value:
    meta = node.meta["val"]
    in_memory = isinstance(meta, torch.Tensor) and meta.dtype in F32_OR_BF16 and meta.dim() > 0
    md = plain_md(meta.shape, meta.dtype) if in_memory else None
    return builder.define(node, md, DYNAMIC)


def _lower(gm: fx.GraphModule, policy: str, engine: Engine, packed: PackedWeights, threads: int,
           reuse_packed: bool) -> DnnlProgram:
    builder = Builder(gm, policy, engine, packed, reuse_packed)
    inputs = []
    # the analysis reads every constant's numbers (BERT-base: 0.3 s): only where a step could drop a NaN, or a
    # relu meet an infinity the graph makes (``log(x).relu()`` at x = 0)
    calls = [node for node in gm.graph.nodes if node.op == "call_function"]
    drops = any(_drops_nan(node) for node in calls)
    relu_after_source = any("relu" in _post_op_names(node) for node in calls) and makes_nonfinite(gm)
    nonfinite = nonfinite_values(gm) if drops or relu_after_source else {}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and state_ref(node) is None:
            inputs.append(_define_input(builder, node))
        elif node.op == "call_function":
            _lower_node(builder, node, nonfinite)
    return assemble(builder, gm, inputs, threads)


def build_program(gm: fx.GraphModule, policy: str, engine: Engine, threads: int,
                  packed: PackedWeights | None = None, reuse_packed: bool = False) -> DnnlProgram:
    """The program of ``gm`` under a layout policy, for ``threads`` threads per call; ``reuse_packed``:
    weights read in the layouts ``packed`` holds them in where oneDNN takes that (another input shape)."""
    return with_threads(threads, _lower, gm, policy, engine, packed or PackedWeights(), threads, reuse_packed)
