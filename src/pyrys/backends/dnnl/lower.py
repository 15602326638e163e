"""Lowering an optimized pyrys graph to a dnnl program.

For each node, the lowering table (``LOWERINGS``) builds oneDNN primitive descriptors and
primitives once; an op with no lowering, or one oneDNN cannot run, falls back to torch.
Then the memory plan assigns activation buffers by liveness, every value gets its memory,
and each step is pre-bound into the flat run loop.  The layout policy (channels-last or
channel-blocked) is chosen by building the program under each candidate and timing it.
"""
from __future__ import annotations

import time

import torch
import torch.fx as fx

from pyrys.backends.dnnl import binding
from pyrys.backends.options import BackendOptions, ThreadPinned
from pyrys.backends.dnnl.builder import Builder, Unsupported
from pyrys.backends.dnnl.constants import ARG_FROM, ARG_TO
from pyrys.backends.dnnl.fallback import lower_fallback
from pyrys.backends.dnnl.layout import candidate_policies, plain_md
from pyrys.backends.dnnl.lower_conv import FUSED_CONV_TRANSPOSE, lower_conv, lower_deconv, lower_linear
from pyrys.backends.dnnl.lower_ops import LOWERINGS as OP_LOWERINGS
from pyrys.backends.dnnl.memory_plan import plan_memory
from pyrys.backends.dnnl.primitives import Engine, Stream, reorder_pd
from pyrys.backends.dnnl.program import DnnlProgram, FreshOutput
from pyrys.backends.dnnl.values import ALIAS, CONSTANT, DYNAMIC, PLANNED, Value
from pyrys.ir.ops import FUSED_CONV, FUSED_LINEAR
from pyrys.ir.printer import format_type

aten = torch.ops.aten
CONVOLUTIONS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, FUSED_CONV}
DECONVOLUTIONS = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
                  FUSED_CONV_TRANSPOSE} - {None}
LOWERINGS = {**{t: lower_conv for t in CONVOLUTIONS}, **{t: lower_deconv for t in DECONVOLUTIONS},
             aten.linear.default: lower_linear, FUSED_LINEAR: lower_linear, **OP_LOWERINGS}


def available() -> tuple[bool, str]:
    return binding.is_available()


def _lower_node(builder: Builder, node: fx.Node) -> None:
    rule = LOWERINGS.get(node.target)
    if rule is None:
        return lower_fallback(builder, node, "no oneDNN lowering")
    snapshot = builder.snapshot()
    try:
        rule(builder, node)
    except (Unsupported, binding.DnnlError) as error:
        builder.restore(snapshot, node)
        lower_fallback(builder, node, str(error).splitlines()[0][:120])


def _define_input(builder: Builder, node: fx.Node) -> Value:
    meta = node.meta["val"]
    md = plain_md(meta.shape, meta.dtype) if isinstance(meta, torch.Tensor) and meta.dtype == torch.float32 else None
    return builder.define(node, md, DYNAMIC)


def _output(builder: Builder, arg, fresh: list[FreshOutput]):
    """What the program returns for one graph output: a Value whose ``current`` is a fresh tensor, or a constant."""
    constant = builder.constant(arg)
    if constant is not None or not isinstance(arg, fx.Node):
        return constant if constant is not None else arg
    value = builder.values[arg]
    if value.kind == DYNAMIC:
        return value
    meta = arg.meta["val"]
    strides = tuple(meta.stride())
    md = plain_md(meta.shape, meta.dtype, strides)
    if value.kind == PLANNED and value.md == md and not _read_after_written(builder, value):
        value.kind = DYNAMIC  # the producer writes straight into the caller's fresh tensor
        fresh.append(FreshOutput(value, tuple(meta.shape), strides, meta.dtype))
        return value
    out = Value(f"{arg.name}.out", md, DYNAMIC)
    pd = reorder_pd(builder.engine, value.md, out.md)
    text = (f"%{out.name} : {format_type(meta)} = dnnl::reorder[format_info=[{value.layout()} -> "
            f"{out.layout()}]](%{value.name})")
    builder.add_primitive(text, pd, {ARG_FROM: value, ARG_TO: out}, [value], [out])
    fresh.append(FreshOutput(out, tuple(meta.shape), strides, meta.dtype))
    return out


def _read_after_written(builder: Builder, value: Value) -> bool:
    """Whether a step other than its producer touches ``value`` (reads it, or writes into it in place)."""
    touching = [step for step in builder.steps if any(v.root is value for v in [*step.reads, *step.writes])]
    return len(touching) > 1


def _all_values(builder: Builder, extra: list) -> list[Value]:
    seen: dict[int, Value] = {}
    for step in builder.steps:
        for value in [*step.reads, *step.writes]:
            seen.setdefault(id(value), value)
    for value in [*builder.values.values(), *extra]:
        if isinstance(value, Value):
            seen.setdefault(id(value), value)
    return list(seen.values())


def _attach_memories(builder: Builder, values: list[Value], plan) -> list[torch.Tensor]:
    """Give every value its dnnl memory: planned ones in their buffer, dynamic ones unbound."""
    arena = [torch.empty(max(size, 64), dtype=torch.uint8) for size in plan.buffer_sizes]
    unwritten: dict[Value, torch.Tensor] = {}  # planned values no step writes (read as they are)
    for value in values:
        if value.kind == CONSTANT or value.md is None:
            continue
        root = value.root
        if root.kind == PLANNED:
            if root in plan.assignment:
                storage = arena[plan.assignment[root]]
            else:
                storage = unwritten.setdefault(root, torch.zeros(max(root.nbytes, 64), dtype=torch.uint8))
            value.attach(builder.engine, storage.data_ptr())
            value.current = value.torch_view(storage)
        else:
            value.attach(builder.engine, 0)  # no memory of its own: bound to each call's tensor
            if value.kind == ALIAS:
                root.aliases.append(value)
    return arena + list(unwritten.values())


def build_program(gm: fx.GraphModule, policy: str, engine: Engine, stream: Stream) -> DnnlProgram:
    builder = Builder(gm, policy, engine, stream)
    inputs = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(_define_input(builder, node))
        elif node.op == "call_function":
            _lower_node(builder, node)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    fresh: list[FreshOutput] = []
    results = [_output(builder, arg, fresh) for arg in output.args[0]]
    plan = plan_memory(builder.steps)
    arena = _attach_memories(builder, _all_values(builder, results), plan)
    calls = [step.make_call(stream) for step in builder.steps]
    text = _program_text(gm, builder, results)
    return DnnlProgram(engine, stream, inputs, fresh, results, calls, text, plan, builder.weight_bytes, policy, arena,
                       [step.text for step in builder.steps])


def _program_text(gm: fx.GraphModule, builder: Builder, results: list) -> str:
    header = ", ".join(f"%{n.name} : {format_type(n.meta.get('val'))}" for n in gm.graph.nodes if n.op == "placeholder")
    body = [f"  {step.text}" for step in builder.steps]
    returns = ", ".join(f"%{r.name}" if isinstance(r, Value) else "<constant>" for r in results)
    return f"graph({header}):\n" + "\n".join(body + [f"  return ({returns})"])


def _time_policies(programs: list[DnnlProgram], inputs: list, budget: float = 0.2, min_rounds: int = 5) -> list[float]:
    """Median seconds per call of each program, timed interleaved (one call each per round).

    A program whose first call is over 3x the fastest one's is not timed further: it has lost,
    and timing it again could take minutes (a primitive left on oneDNN's reference code)."""
    first = []
    for program in programs:
        start = time.perf_counter()
        program(inputs)
        first.append(time.perf_counter() - start)
    contenders = [i for i, seconds in enumerate(first) if seconds <= 3 * min(first)]
    samples: dict[int, list[float]] = {i: [] for i in contenders}
    deadline = time.perf_counter() + budget
    while time.perf_counter() < deadline or len(samples[contenders[0]]) < min_rounds:
        for i in contenders:
            start = time.perf_counter()
            programs[i](inputs)
            samples[i].append(time.perf_counter() - start)
    return [sorted(samples[i])[len(samples[i]) // 2] if i in samples else first[i] for i in range(len(programs))]


def compile_program(gm: fx.GraphModule, example_inputs: list, options: BackendOptions = BackendOptions()):
    """Build the program under each candidate layout policy and keep the fastest (or the chosen one)."""
    program = _best_program(gm, example_inputs, options.layout)
    return ThreadPinned(program, options.threads) if options.threads else program


def _best_program(gm: fx.GraphModule, example_inputs: list, layout: str) -> DnnlProgram:
    engine = Engine()
    stream = Stream(engine)
    policies = candidate_policies() if layout == "auto" else [layout]
    programs = [build_program(gm, name, engine, stream) for name in policies]
    if len(programs) == 1:
        return programs[0]
    inputs = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in example_inputs]
    seconds = _time_policies(programs, inputs)
    best = min(range(len(programs)), key=lambda i: seconds[i])
    timings = ", ".join(f"{name} {s * 1e3:.2f} ms" for name, s in zip(policies, seconds))
    programs[best].policy = f"{policies[best]} (measured: {timings})"
    return programs[best]
