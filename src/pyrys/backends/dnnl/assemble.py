"""Assembly: a lowered graph (values and steps) becomes an immutable :class:`DnnlProgram`.

The graph's outputs are decided first (a value whose producer can write straight into the
caller's fresh tensor does; anything else is reordered into one), then the memory plan
assigns activation buffers by liveness, and every value gets a *slot*: where its bytes
live in each frame.  Outputs never share memory with anything the program keeps: a torch
fallback's result that may view an activation buffer or a constant is copied when it does.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from torch._prims_common import is_non_overlapping_and_dense_or_false

from pyrys.backends.dnnl.builder import Builder, md_type
from pyrys.backends.dnnl.constants import ARG_FROM, ARG_TO
from pyrys.backends.dnnl.descriptors import reorder_pd
from pyrys.backends.dnnl.frame import Frame
from pyrys.backends.dnnl.layout import plain_md
from pyrys.backends.dnnl.memory_plan import plan_memory
from pyrys.backends.dnnl.program import DnnlProgram, Slot
from pyrys.backends.dnnl.values import ALIAS, CONSTANT, DYNAMIC, PLANNED, Value
from pyrys.backends.program import constant_for_caller
from pyrys.ir.printer import format_type


def assemble(builder: Builder, gm: fx.GraphModule, inputs: list[Value], threads: int) -> DnnlProgram:
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    fresh: list[Value] = []
    results = [_decide_output(builder, arg, fresh) for arg in output_node.args[0]]
    plan = plan_memory(builder.steps, [r for r in results if isinstance(r, Value)])
    values = _all_values(builder, [*inputs, *[r for r in results if isinstance(r, Value)]])
    for index, value in enumerate(values):
        value.slot = index
    buffers = [(size, False) for size in plan.buffer_sizes]
    slots = [_slot(value, plan, buffers) for value in values]
    dynamic = [v for v in values if v.root.kind == DYNAMIC]
    aliases: dict[int, list[tuple[int, tuple | None, int]]] = {}
    for value in dynamic:
        if value.kind == ALIAS:
            aliases.setdefault(value.root.slot, []).append((value.slot, value.view_shape(), value.byte_offset))
    return DnnlProgram(
        engine=builder.engine, steps=list(builder.steps), slots=slots, buffers=buffers,
        scratchpad_bytes=builder.scratchpad_bytes, input_slots=[v.slot for v in inputs],
        fresh=[(v.slot, *_fresh_layout(v)) for v in fresh],
        outputs=[_output(r, _torch_result_strides(arg, r)) for arg, r in zip(output_node.args[0], results)],
        released=[v.slot for v in dynamic], dynamic_aliases=aliases,
        constant_storages=_constant_storages(gm, builder, values), text=_program_text(gm, builder, results), plan=plan,
        weight_bytes=builder.weight_bytes, policy=builder.policy, threads=threads,
        kernel_choices=dict(builder.kernel_choices))


def _decide_output(builder: Builder, arg: Any, fresh: list[Value]):
    """What the program returns for one graph output: a Value, a constant tensor, or a literal."""
    constant = builder.constant_values(arg)
    if constant is not None or not isinstance(arg, fx.Node):
        return constant if constant is not None else arg
    value = builder.values[arg]
    meta = arg.meta["val"]
    if value.kind == DYNAMIC and not _laid_out_otherwise(value, meta):
        return value
    md = plain_md(meta.shape, meta.dtype, tuple(meta.stride()))
    if value.kind == PLANNED and value.md == md and not _read_after_written(builder, value):
        value.kind = DYNAMIC  # the producer writes straight into the caller's fresh tensor
        value.output_meta = meta
        fresh.append(value)
        return value
    root = value.root
    if value.kind == ALIAS and value.plain and value.md == md and root.kind == PLANNED and root.plain and \
            root.nbytes == value.nbytes and not _read_after_written(builder, root):
        root.kind = DYNAMIC  # a reshape of what its producer writes (a linear's rows): the same, as a view
        root.output_meta = torch.empty(root.md.dims, dtype=meta.dtype, device="meta")
        fresh.append(root)
        return value
    out = Value(f"{arg.name}.out", md, DYNAMIC)
    out.output_meta = meta
    pd = reorder_pd(builder.engine, value.md, out.md)
    text = (f"%{out.name} : {format_type(meta)} = dnnl::reorder[format_info=[{value.layout()} -> "
            f"{out.layout()}]](%{value.name})")
    builder.add_primitive(text, pd, {ARG_FROM: value, ARG_TO: out}, [value], [out])
    fresh.append(out)
    return out


def _laid_out_otherwise(value: Value, meta) -> bool:
    """Whether a torch fallback's result (contiguous: ``fallback.py``) is laid out otherwise than eager's
    dense ``meta`` (``exp`` of a permuted activation keeps its strides in eager): reordered into eager's."""
    return value.md is not None and _dense(meta) and not _same_strides(meta.shape, value.md.strides, meta.stride())


def _torch_result_strides(arg: Any, result: Any) -> tuple | None:
    """Eager's strides for an output torch computes in a type oneDNN has not (``h > 0``, ``h.double()``) where
    they are not contiguous: its result is laid out so at each call (:func:`_in_strides`); else None."""
    meta = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    if not isinstance(result, Value) or result.md is not None or not _dense(meta) or meta.is_contiguous():
        return None
    return tuple(meta.stride())


def _dense(meta) -> bool:
    return isinstance(meta, torch.Tensor) and meta.dim() > 0 and is_non_overlapping_and_dense_or_false(meta)


def _same_strides(shape, strides, wanted) -> bool:
    """Equal strides, but for dims of size 1 (which no index steps over)."""
    return all(size == 1 or stride == want for size, stride, want in zip(shape, strides, wanted))


def _in_strides(tensor: torch.Tensor, strides: tuple) -> torch.Tensor:
    if _same_strides(tensor.shape, tensor.stride(), strides):
        return tensor
    return torch.empty_strided(tensor.shape, strides, dtype=tensor.dtype).copy_(tensor)


def _fresh_layout(value: Value) -> tuple[tuple, tuple, torch.dtype]:
    meta = value.output_meta
    return tuple(meta.shape), tuple(meta.stride()), meta.dtype


def _output(result, strides: tuple | None = None) -> Callable[[Frame], Any]:
    """How a frame produces one output: its slot's tensor, a copy where it may view internal memory (or where
    it is not laid out in ``strides``)."""
    if isinstance(result, Value):
        slot = result.slot
        if result.may_view_internal_memory():
            owned = lambda frame: frame.owned(frame.tensors[slot])  # noqa: E731
        else:
            owned = lambda frame: frame.tensors[slot]  # noqa: E731
        return owned if strides is None else lambda frame: _in_strides(owned(frame), strides)
    if isinstance(result, torch.Tensor):
        return lambda frame: constant_for_caller(result)  # the program's constant stays the program's
    return lambda frame: result


def _read_after_written(builder: Builder, value: Value) -> bool:
    """Whether a step other than its producer touches ``value`` (reads it, or writes into it in place)."""
    touching = [step for step in builder.steps if any(v.root is value for v in [*step.reads, *step.writes])]
    return len(touching) > 1


def _all_values(builder: Builder, extra: list[Value]) -> list[Value]:
    seen: dict[int, Value] = {}
    for step in builder.steps:
        for value in [*step.reads, *step.writes, *step.constants]:
            for v in _with_alias_chain(value):
                seen.setdefault(id(v), v)
    for value in [*builder.values.values(), *extra]:
        for v in _with_alias_chain(value):
            seen.setdefault(id(v), v)
    return list(seen.values())


def _with_alias_chain(value: Value) -> list[Value]:
    chain = [value]
    while chain[-1].alias_of is not None:
        chain.append(chain[-1].alias_of)
    return chain


def _slot(value: Value, plan, buffers: list[tuple[int, bool]]) -> Slot:
    """Where ``value``'s bytes live in a frame; a planned value no step writes gets a zero-filled buffer."""
    if value.md is None:
        return Slot(None)
    if value.kind == CONSTANT:
        return Slot(value.md, constant=value.storage)
    root = value.root
    if root.kind != PLANNED:
        return Slot(value.md)
    if root not in plan.assignment:
        plan.assignment[root] = len(buffers)
        buffers.append((max(root.nbytes, 64), True))
    return Slot(value.md, buffer=plan.assignment[root], view_shape=value.view_shape(), offset=value.byte_offset)


def _constant_storages(gm: fx.GraphModule, builder: Builder, values: list[Value]) -> frozenset[int]:
    """Storage addresses of every constant a torch fallback may return a view of."""
    tensors = [*gm.buffers(), *builder.restored.values(), *(v.storage for v in values if v.storage is not None)]
    return frozenset(p for p in (t.untyped_storage().data_ptr() for t in tensors) if p)


def _program_text(gm: fx.GraphModule, builder: Builder, results: list) -> str:
    """The program in the seed's form: a line per step, and a ``view`` line (no call) before the first read of a
    value that is another's bytes seen with another shape or layout (``%flatten``, a ``mean`` without keepdim)."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    header = ", ".join(f"%{n.name} : {format_type(n.meta.get('val'))}" for n in inputs)
    shown = {n.name for n in inputs}
    body = []
    for step in builder.steps:
        for value in step.reads:
            body += _view_lines(value, shown)
        body.append(f"  {step.text}")
        shown.update(value.name for value in step.writes)
    for result in results:
        body += _view_lines(result, shown) if isinstance(result, Value) else []
    returns = ", ".join(f"%{r.name}" if isinstance(r, Value) else "<constant>" for r in results)
    return f"graph({header}):\n" + "\n".join(body + [f"  return ({returns})"])


def _view_lines(value: Value, shown: set[str]) -> list[str]:
    """The ``view`` lines that define ``value`` (and the views it is of) where no line has yet."""
    if value.name in shown or value.kind != ALIAS or value.alias_of is None:
        return []
    shown.add(value.name)
    return _view_lines(value.alias_of, shown) + [f"  %{value.name} : {md_type(value.md)} = view(%{value.alias_of.name})"]
