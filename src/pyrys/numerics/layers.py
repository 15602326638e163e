"""Per-layer attribution: the error of every op of the backend's program against the captured
graph's value it stands for.

The backend's graph is compiled once more with every floating-point op node as an extra
output (a *probe* program, sharing the first program's decisions and packed weights), run
on the example inputs, and each node's value is compared with the value of the captured
node it computes (:mod:`pyrys.ir.provenance`): a fused ``conv2d_relu`` is compared with the
captured ``relu``, after the BatchNorm folded into it.

    error(node) = max |probe(node) - captured(computes(node))| / max |captured(computes(node))|

The captured graph runs eager's ATen ops on the reference backend, so it is eager's own
arithmetic with a name on every intermediate value.  A node pyrys made (a merged op, a
rewritten shape) has no captured twin and is listed as such, not compared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Container

import torch
import torch.fx as fx

from pyrys.ir.graph import copy_graph
from pyrys.ir.printer import op_name
from pyrys.ir.provenance import absorbed, computes
from pyrys.numerics import error_or_reason
from pyrys.quantization import QUANTIZATION_OPS


@dataclass(frozen=True)
class LayerError:
    """One op of the backend's graph against the captured value it computes."""

    node: str  # the node in the backend's graph (``opt.program_text()`` names it)
    op: str  # ``pyrys::conv2d_relu``, ``aten::softmax`` ...
    computes: str  # the captured node whose value it computes
    absorbed: tuple[str, ...]  # every captured node it took over, oldest first
    error: float
    reason: str = ""  # why it could not be compared (then ``error`` is inf)

    def describe(self) -> str:
        """``%conv2d_3 pyrys::conv2d_relu = %relu_3 (+ %batch_norm_3)``."""
        others = [name for name in self.absorbed[:-1] if name != self.node]
        taken = f" (+ {', '.join(f'%{n}' for n in others)})" if others else ""
        twin = "" if self.computes == self.node else f" = %{self.computes}"
        return f"%{self.node} {self.op}{twin}{taken}"


def probed_nodes(gm: fx.GraphModule, captured: Container[str]) -> list[fx.Node]:
    """The op nodes whose floating-point value has a captured twin; not int8's dequantize nodes: they are
    part of the int8 op that reads them (made an output, one would stand alone), the op itself is probed; nor a
    node read only by nodes computing its own twin (a bf16 linear read by its conversion to float32: made an
    output, its bfloat16 value would be written, where the program writes float32 at once), which are probed."""
    return [node for node in gm.graph.nodes
            if node.op == "call_function" and node.target not in QUANTIZATION_OPS
            and _is_float_tensor(node.meta.get("val")) and computes(node) in captured
            and not (node.users and all(user.op == "call_function" and computes(user) == computes(node)
                                        for user in node.users))]


def unmatched_nodes(gm: fx.GraphModule, captured: Container[str]) -> list[str]:
    """The op nodes with a floating-point value that pyrys made: no captured value to compare with."""
    return [node.name for node in gm.graph.nodes
            if node.op == "call_function" and _is_float_tensor(node.meta.get("val")) and computes(node) not in captured]


def probe_graph(gm: fx.GraphModule, nodes: list[fx.Node]) -> fx.GraphModule:
    """A copy of ``gm`` that also returns the value of each of ``nodes`` (after its own outputs)."""
    graph = copy_graph(gm.graph)
    by_name = {node.name: node for node in graph.nodes}
    output = next(node for node in graph.nodes if node.op == "output")
    outputs = list(output.args[0])
    output.args = (tuple(outputs + [by_name[node.name] for node in nodes]),)
    graph.lint()
    return fx.GraphModule(gm, graph, gm.__class__.__name__)


def layer_errors(gm: fx.GraphModule, captured: dict[str, torch.Tensor], inputs: list,
                 compile_probe: Callable[[fx.GraphModule], Callable[[list], list]]) -> list[LayerError]:
    """Every probed node's error, worst first (``compile_probe``: the backend's compile of a probe graph)."""
    nodes = probed_nodes(gm, captured)
    if not nodes:
        return []
    program = compile_probe(probe_graph(gm, nodes))
    values = program(inputs)[-len(nodes):]
    layers = []
    for node, value in zip(nodes, values):
        twin = captured[computes(node)]
        if isinstance(value, torch.Tensor) and value.is_floating_point() and twin.is_floating_point():
            value = value.to(twin.dtype)  # a layer run in lower precision, against its float32 twin
        if isinstance(value, torch.Tensor) and value.dim() == twin.dim() + 1 and value.shape[1:] == twin.shape:
            value = value[0]  # an unbatched convolution, run as a batch of one (passes/legalize.py)
        error, reason = error_or_reason(value, twin)
        layers.append(LayerError(node.name, op_name(node), computes(node), absorbed(node), error, reason))
    return sorted(layers, key=lambda layer: -math.inf if math.isnan(layer.error) else -layer.error)  # NaN: worst


def _is_float_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()
