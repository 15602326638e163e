"""NaN and infinities through an int8 graph: the call that holds them takes the float path.

A quantize maps ``x`` to ``clamp(round(x / s) + z, q_min, q_max)``: +inf to ``q_max``, -inf to ``q_min``
and NaN to whatever the cast makes of it, so an int8 graph would answer a NaN input with numbers where
eager gives NaN.  A call whose floating-point inputs are not all finite runs :func:`float_path` instead:
the same graph with every activation's quantize/dequantize pair skipped (the weights stay rounded), on
torch ops, where NaN and infinities travel as in eager.
"""
from __future__ import annotations

import torch.fx as fx

from pyrys.ir.control_flow import has_effects
from pyrys.ir.graph import copy_graph
from pyrys.quantization import DEQUANTIZE, QUANTIZE


def rounds_activations(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` quantizes a value it computes or reads (an int8 graph)."""
    return any(node.op == "call_function" and node.target is QUANTIZE for node in gm.graph.nodes)


def float_path(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (constants shared) in which every ``dequantize(quantize(x))`` reads ``x`` itself."""
    graph = copy_graph(gm.graph)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is DEQUANTIZE and _is_quantize(node.args[0]):
            node.replace_all_uses_with(node.args[0].args[0])
    graph.eliminate_dead_code(is_impure_node=has_effects)  # pyrys's effects: a pyrys::If may raise
    return fx.GraphModule(gm, graph, gm.__class__.__name__)


def _is_quantize(value) -> bool:
    return isinstance(value, fx.Node) and value.op == "call_function" and value.target is QUANTIZE
