"""Capture an ``nn.Module`` with ``torch.export`` into pyrys's IR.

The exported program is functionalized (``run_decompositions({})``: in-place ops become
their functional forms, eval-mode dropout disappears) and then normalized:

* parameters and buffers become state reads (``prim::GetAttr``) until ``freeze_params``;
* ``_native_batch_norm_legit_*`` + ``getitem 0`` is raised back to ``aten::batch_norm``
  whose ``training`` argument is a read of the owning module's ``training`` flag,
  so ``freeze_flags`` has a flag to freeze and BN folding can tell why it may not fold;
* outputs that only update buffers (BN running statistics in train mode) are dropped:
  the optimized module never modifies state.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils._pytree import TreeSpec

from pyrys.ir.graph import STATE_KEY, StateRef, add_constant, insert_call

aten = torch.ops.aten
_BN_VARIANTS = {
    aten._native_batch_norm_legit_no_training.default: (5, 6),  # (momentum, eps) positions
    aten._native_batch_norm_legit_functional.default: (6, 7),
}
_STATE_KINDS = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer"}


@dataclass
class Captured:
    """A captured graph plus what is needed to call it like the original module."""

    gm: fx.GraphModule
    in_spec: TreeSpec
    out_spec: TreeSpec
    class_name: str
    notes: list[str] = field(default_factory=list)


def export_module(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> ExportedProgram:
    """``torch.export`` at ATen level, functionalized; the model itself is not modified."""
    with torch.no_grad():
        return torch.export.export(model, args, kwargs).run_decompositions({})


def capture_module(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Captured:
    return from_exported(export_module(model, args, kwargs), model)


def from_exported(ep: ExportedProgram, model: torch.nn.Module | None = None) -> Captured:
    """Turn an ``ExportedProgram`` into pyrys IR (``model`` supplies module flags such as ``training``)."""
    gm = fx.GraphModule(torch.nn.Module(), _copy_graph(ep.graph_module))
    _bind_inputs(gm, ep)
    notes = _drop_state_updates(gm, ep)
    _raise_batch_norms(gm, model)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    signature = ep.module_call_graph[0].signature
    class_name = type(model).__name__ if model is not None else "ExportedProgram"
    return Captured(gm, signature.in_spec, signature.out_spec, class_name, notes)


def _copy_graph(graph_module: fx.GraphModule) -> fx.Graph:
    graph = fx.Graph()
    output = graph.graph_copy(graph_module.graph, {})
    graph.output(output)
    return graph


def _bind_inputs(gm: fx.GraphModule, ep: ExportedProgram) -> None:
    """Mark state placeholders with a :class:`StateRef`; lifted tensor constants become constants.

    Placeholders are matched by position: copying the graph may rename one (an input named
    ``input`` becomes ``input_1``, since FX avoids Python builtins)."""
    specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    originals = [n.name for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    for node, original in zip([n for n in gm.graph.nodes if n.op == "placeholder"], originals):
        spec = specs[original]
        if spec.kind in _STATE_KINDS:
            value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            node.meta[STATE_KEY] = StateRef(spec.target, _STATE_KINDS[spec.kind], value)
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            _inline_constant(gm, node, ep.constants[spec.target])


def _inline_constant(gm: fx.GraphModule, node: fx.Node, value) -> None:
    with gm.graph.inserting_before(node):
        const = add_constant(gm, value, node.name)
    node.replace_all_uses_with(const)
    gm.graph.erase_node(node)


def _drop_state_updates(gm: fx.GraphModule, ep: ExportedProgram) -> list[str]:
    """Keep only the user outputs: the optimized module never writes module state or inputs."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    kinds = [spec.kind for spec in ep.graph_signature.output_specs]
    values = output.args[0]
    kept = tuple(v for v, kind in zip(values, kinds) if kind == OutputKind.USER_OUTPUT)
    output.args = (kept,)
    dropped = [s.target for s in ep.graph_signature.output_specs if s.kind != OutputKind.USER_OUTPUT]
    return [f"state updates dropped (inference never writes them): {', '.join(dropped)}"] if dropped else []


def _raise_batch_norms(gm: fx.GraphModule, model: torch.nn.Module | None) -> None:
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _BN_VARIANTS]:
        _raise_batch_norm(gm, node, model)


def _raise_batch_norm(gm: fx.GraphModule, node: fx.Node, model: torch.nn.Module | None) -> None:
    """``getitem(_native_batch_norm_legit_*(x, w, b, mean, var, ...), 0)`` -> ``aten::batch_norm``."""
    outputs = [u for u in node.users if u.target is operator.getitem]
    if any(u.args[1] != 0 and u.users for u in outputs):
        return  # saved mean/rstd are used: keep the low-level op
    momentum_at, eps_at = _BN_VARIANTS[node.target]
    flag = _training_flag(gm, node, model)
    x, w, b, mean, var = node.args[:5]
    with gm.graph.inserting_before(node):
        bn_args = (x, w, b, mean, var, flag, node.args[momentum_at], node.args[eps_at], False)
        bn = insert_call(gm.graph, aten.batch_norm.default, bn_args)
    bn.meta.update(node.meta)
    for user in outputs:
        if user.args[1] == 0:
            user.replace_all_uses_with(bn)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _training_flag(gm: fx.GraphModule, node: fx.Node, model: torch.nn.Module | None):
    """The ``training`` flag of the module that owns ``node``, as a state read (a literal if unknown)."""
    path = _owner_path(node)
    captured_value = node.target is aten._native_batch_norm_legit_functional.default
    if path is None:
        return captured_value
    target = f"{path}.training" if path else "training"
    for existing in gm.graph.nodes:
        ref = existing.meta.get(STATE_KEY)
        if existing.op == "placeholder" and ref is not None and ref.target == target:
            return existing
    value = model.get_submodule(path).training if model is not None else captured_value
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    with gm.graph.inserting_before(first):
        flag = gm.graph.placeholder("".join(c if c.isalnum() else "_" for c in target))
    flag.meta[STATE_KEY] = StateRef(target, "flag", bool(value))
    flag.meta["val"] = bool(value)
    return flag


def _owner_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]
