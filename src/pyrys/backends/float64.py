"""The graph on torch ops in float64: a result near the exact one, that a float32 program and torch's float32
ops are each measured against (``dnnl/self_check.py``: which of the two is off where they differ).

Every float32 constant, state value and input becomes float64, and every op's ``dtype=torch.float32`` (a
``.to``, a ``torch.full``) float64; other dtypes stay (integer ops, a model's own casts to half precision).
float64 rounds 2^29 times finer than float32, so its outputs are float32's exact result to well within what
any float32 run is off it, unless the graph amplifies rounding by 1e9 or more.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.backends.reference import ReferenceProgram
from pyrys.ir.graph import copy_graph, named_constants


def float64_outputs(reference: ReferenceProgram, inputs: list) -> list | None:
    """``reference``'s graph run in float64 on ``inputs`` (its floating-point outputs float64); None where it
    cannot be (a module call, whose own weights stay float32; an op without a float64 kernel; a floating-point
    output that is not float64, computed in a dtype the graph names itself)."""
    gm = reference.gm
    if any(node.op == "call_module" for node in gm.graph.nodes):
        return None
    graph = copy_graph(gm.graph)
    for node in graph.nodes:
        node.args, node.kwargs = fx.node.map_aggregate((node.args, node.kwargs), _wide_dtype)
    wide = fx.GraphModule(gm, graph)
    for name, value in [*named_constants(wide), *wide.named_parameters(recurse=False)]:
        wide._parameters.pop(name, None)
        wide.register_buffer(name, _widened(value))
    try:
        with torch.no_grad():
            outputs = list(wide.forward(*map(_widened, reference.arguments(inputs))))
    except Exception:  # noqa: BLE001 -- no float64 kernel, or float64 meeting a float32 the graph made
        return None
    if any(isinstance(y, torch.Tensor) and y.is_floating_point() and y.dtype != torch.float64 for y in outputs):
        return None
    return outputs


def _wide_dtype(arg):
    return torch.float64 if arg is torch.float32 else arg


def _widened(value):
    """A float32 tensor as float64 (its layout kept); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.detach().to(torch.float64)
    return value
