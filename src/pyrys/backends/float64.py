"""The graph on torch ops in float64: a result near the exact one, that a program and the graph on torch ops
are each measured against (``dnnl/self_check.py``: which of the two is off where they differ).

Every float32 constant, state value and input becomes float64, every op's ``dtype=torch.float32`` (a ``.to``,
a ``torch.full``) float64, and every Python float an op reads the float32 number float32 kernels read
(``x > 0.3`` compares with 0.3f); other dtypes stay (integer ops, a model's own casts to half precision).
A bf16 or int8 graph (``lower=``) runs so without rounding its activations: its bf16 values and casts
float64 too, its quantize/dequantize pairs skipped, its weights as rounded (bf16, or int8 times their
scales): the exact result of the model it computes, from which its graph on torch ops and its program are
each off by their own roundings.  float64 rounds 2^29 times finer than float32, so its outputs are the exact
result to well within what a float32 run is off it, but where a value meets a threshold (a comparison, a
``floor``, a ``where``) within float32's rounding of it: there float32 and float64 may decide otherwise.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.backends.reference import ReferenceProgram, without_dispatch
from pyrys.ir.graph import copy_graph, named_constants
from pyrys.ir.post_ops import as_float32
from pyrys.quantization import DEQUANTIZE, DEQUANTIZE_WEIGHT
from pyrys.quantization.nonfinite import float_path


def float64_outputs(reference: ReferenceProgram, inputs: list, lower: bool = False) -> list | None:
    """``reference``'s graph run in float64 on ``inputs`` (its floating-point outputs float64); None where it
    cannot be (a module call, whose own weights stay float32; an op without a float64 kernel; a floating-point
    output that is not float64, computed in a dtype the graph names itself).  ``lower``: a bf16 or int8 graph,
    run without rounding its activations (its bf16 values and casts float64 too, its int8 ones' quantize and
    dequantize pairs skipped: :func:`~pyrys.quantization.nonfinite.float_path`), its rounded weights as they are."""
    gm = float_path(reference.source) if lower else reference.source  # (its ops as torch's: the targets read here)
    wide_dtypes = WIDENED_LOWER if lower else WIDENED
    if any(node.op == "call_module" for node in gm.graph.nodes):
        return None
    graph = copy_graph(gm.graph)
    for node in graph.nodes:
        node.args, node.kwargs = fx.node.map_aggregate((node.args, node.kwargs),
                                                       lambda arg: _widened_arg(arg, wide_dtypes))
        if node.op == "call_function" and node.target in (DEQUANTIZE, DEQUANTIZE_WEIGHT):
            node.kwargs = {**node.kwargs, "out_dtype": torch.float64}  # (an int8 weight's, float32 by default)
    wide = without_dispatch(fx.GraphModule(gm, graph))
    for name, value in [*named_constants(wide), *wide.named_parameters(recurse=False)]:
        wide._parameters.pop(name, None)
        wide.register_buffer(name, _widened(value, wide_dtypes))
    try:
        with torch.no_grad():
            outputs = list(wide.forward(*[_widened(value, wide_dtypes) for value in reference.arguments(inputs)]))
    except Exception:  # noqa: BLE001 -- no float64 kernel, or float64 meeting a float32 the graph made
        return None
    finally:  # (a graph module is a reference cycle: its float64 copies would live until a full collection)
        for module in wide.modules():
            module._buffers.clear()
            module._parameters.clear()
    if any(isinstance(y, torch.Tensor) and y.is_floating_point() and y.dtype != torch.float64 for y in outputs):
        return None
    return outputs


WIDENED = frozenset({torch.float32})  # the dtypes a float32 graph's float64 run widens
WIDENED_LOWER = frozenset({torch.float32, torch.bfloat16})  # a bf16 or int8 graph's


def _widened_arg(arg, dtypes: frozenset):
    """An op's argument in the float64 run: a dtype of ``dtypes`` float64; a Python float as float32 holds it,
    the number torch's float32 (and bf16) kernels read (``x > 0.3`` compares with 0.3f: with 0.3 itself an
    input of 0.3f flipped, and a program 50% off passed as rounding; a review's find)."""
    if isinstance(arg, torch.dtype):
        return torch.float64 if arg in dtypes else arg
    return as_float32(arg) if type(arg) is float else arg


def _widened(value, dtypes: frozenset):
    """A tensor of one of ``dtypes`` as float64 (its layout kept); anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dtype in dtypes:
        return value.detach().to(torch.float64)
    return value
