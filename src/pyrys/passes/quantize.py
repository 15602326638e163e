"""int8: convolutions and linears read 8-bit activations and weights (post-training, calibrated).

With ``precision="int8"`` every convolution and linear with a constant float32 weight reads its input
through a quantize/dequantize pair (the input's scale from calibration, one pair per value however many
ops read it) and its weight through a dequantize of an int8 constant (per output channel); the math is
in :mod:`pyrys.quantization`:

    %y = pyrys::conv2d_relu(%x, %W, %b, ...)
    ->  %x_q = quantized_decomposed::quantize_per_tensor(%x, 0.0187, 0, 0, 255, torch.uint8)
        %x_dq = quantized_decomposed::dequantize_per_tensor(%x_q, 0.0187, 0, 0, 255, torch.uint8)
        %W_dq = quantized_decomposed::dequantize_per_channel(%W_int8, %W_scale, %W_zero_point, 0, -127, 127, torch.int8)
        %y = pyrys::conv2d_relu(%x_dq, %W_dq, %b, ...)

The first compile calibrates (:mod:`pyrys.quantization.calibration`) and runs the accuracy guard
(:mod:`pyrys.quantization.guard`); the compiles of other input shapes reuse its plan by node name.  Every
conv or linear left in float32 is a miss with its reason (``opt.report()``, ``pyrys explain``).  This runs
last: constant propagation must not fold the weight's dequantize back into a float32 constant.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from pyrys.ir.edit import insert_op
from pyrys.ir.fused import (FUSED_BY_BASE, FUSED_CONV_TRANSPOSE, FUSED_OPS, Fused, fused_form_miss, read_fused,
                            to_fused)
from pyrys.ir.graph import add_constant, op_args
from pyrys.ir.provenance import copies
from pyrys.passes import cleanup
from pyrys.passes.rewrite import Miss, PassResult
from pyrys.quantization import DEQUANTIZE, DEQUANTIZE_WEIGHT, QUANTIZE, TensorQuant, quantize_weight, weight_max
from pyrys.quantization.calibration import Calibration, QuantizationPlan, observe
from pyrys.quantization.guard import GUARD_SAMPLES, Switch, guard

RULE = "int8"
aten = torch.ops.aten
# ops that read an int8 layer's result as it is, with its scale (the dnnl backend's binary and pooling
# kernels take int8 sources): the full-shape operand of an elementwise mul or add (a squeeze-and-excitation
# scale), an average pooling.  Where every reader of a layer's result is one of these or another layer,
# the result is quantized and the layer writes int8 (:func:`_shared_results`).
INT8_READERS = frozenset({aten.mul.Tensor, aten.add.Tensor, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default})
COMMUTATIVE = frozenset({aten.mul.Tensor, aten.add.Tensor})


def quantize(gm: fx.GraphModule, precision: str, calibration: Calibration | None) -> PassResult:
    """Quantize every conv and linear it can when ``precision == "int8"`` (see the module docstring);
    ``fired["int8"]`` counts the ops in int8, misses name those left in float32."""
    result = PassResult()
    if precision != "int8":
        return result
    if calibration is None:
        raise ValueError("pyrys: precision='int8' needs calibration= (input samples to measure activations on)")
    layers = _candidates(gm, result)
    with calibration.lock:
        if calibration.plan is None:
            samples = calibration.samples
            quants, expected = observe(gm, _observed(layers) | {v.name for v in _shared_results(layers)}, samples,
                                       GUARD_SAMPLES)
            switches = _rewrite(gm, layers, quants, result)
            kept = {}
            if calibration.accuracy_budget is not None and switches:
                kept = guard(gm, switches, samples[:GUARD_SAMPLES], expected, calibration.accuracy_budget)
            calibration.plan, calibration.samples = QuantizationPlan(quants, kept), None
        else:
            switches = _rewrite(gm, layers, calibration.plan.activations, result)
    for name, why in calibration.plan.kept.items():
        if name in switches:
            switches[name].set(False)
            result.misses.append(Miss(RULE, name, why))
    result.fired[RULE] = sum(switch.int8 for switch in switches.values())
    cleanup.dead_code_elimination(gm)  # the quantize/dequantize nodes and constants of ops kept in float32
    return result


def _candidates(gm: fx.GraphModule, result: PassResult) -> list[fx.Node]:
    """The convs and linears that can run in int8 (in their fused form); a miss for each other one."""
    layers = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or (node.target not in FUSED_BY_BASE and node.target not in FUSED_OPS):
            continue
        why = _why_float(node)
        if why:
            result.misses.append(Miss(RULE, node.name, f"stays float32: {why}"))
        else:
            layers.append(to_fused(gm, node, in_place=True))
    return layers


def _why_float(node: fx.Node) -> str:
    """Why ``node`` cannot run in int8 ("" if it can)."""
    if node.target not in FUSED_OPS and fused_form_miss(node):
        return fused_form_miss(node)
    fused = read_fused(node) if node.target in FUSED_OPS else Fused(FUSED_BY_BASE[node.target], op_args(node))
    if fused.kind.op is FUSED_CONV_TRANSPOSE:
        return "transposed convolutions have no int8 lowering here yet"
    x, weight = fused.args["input"], fused.args["weight"]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or weight.meta["val"].dtype != torch.float32:
        return "its weight is not a float32 constant"
    if not isinstance(x, fx.Node) or x.op == "get_attr" or x.meta["val"].dtype != torch.float32:
        return "its input is not a float32 activation"
    if node.meta["val"].dtype != torch.float32:
        return f"it makes {node.meta['val'].dtype}"
    return ""


def _observed(layers: list[fx.Node]) -> set[str]:
    """The values calibration measures: every layer's input, and the residual a layer adds when its own
    result is another layer's input (the sum is then made in int8: :func:`_residuals`)."""
    inputs = {read_fused(layer).args["input"].name for layer in layers}
    return inputs | {r.name for layer in layers if layer.name in inputs for r in _residuals(layer)}


def _residuals(layer: fx.Node) -> list[fx.Node]:
    """The float32 activations of the layer's shape a fused op adds to its result (``conv(x) + r``)."""
    fused, shape = read_fused(layer), layer.meta["val"].shape
    operands = iter(fused.post_inputs)
    added = [next(operands) if p.binary else None for p in fused.post_ops]
    return [r for p, r in zip(fused.post_ops, added) if p.name == "add" and r.op != "get_attr"
            and r.meta["val"].dtype == torch.float32 and r.meta["val"].shape == shape]


def _rewrite(gm: fx.GraphModule, layers: list[fx.Node], quants: dict[str, TensorQuant],
             result: PassResult) -> dict[str, Switch]:
    """Give each layer whose input has a quantization its int8 arguments (and its residual, when its result
    is quantized too); the switches, set to int8."""
    pairs: dict[fx.Node, fx.Node] = {}  # input -> its dequantized form
    switches = {}
    shared = _shared_results(layers)  # before the layers read their inputs' dequantized forms

    def dequantized(x: fx.Node) -> fx.Node:
        if x not in pairs:
            pairs[x] = _quantize_dequantize(gm, x, quants[x.name])
        return pairs[x]

    for layer in layers:
        fused = read_fused(layer)
        x = fused.args["input"]
        if x.name not in quants:
            result.misses.append(Miss(RULE, layer.name, f"stays float32: its input %{x.name} was not calibrated "
                                                        "(not in the graph the calibration ran on)"))
            continue
        with gm.graph.inserting_before(layer):
            weight = _dequantized_weight(gm, fused.args["weight"])
            residuals = {r: dequantized(r) for r in _residuals(layer) if r.name in quants}
            operands = tuple(residuals.get(p, p) for p in fused.post_inputs)
            int8 = replace(fused, args={**fused.args, "input": dequantized(x), "weight": weight},
                           post_inputs=operands).node_args()
        switches[layer.name] = Switch(layer, tuple(layer.args), tuple(int8))
        switches[layer.name].set(True)
    for value, readers in shared.items():
        if value.name in quants and value.name in switches:
            with gm.graph.inserting_before(readers[0]):
                source = dequantized(value)
            for reader in readers:  # the same value, rounded as the layers read it
                int8_args = tuple(source if arg is value else arg for arg in reader.args)
                switches[value.name].readers.append((reader, tuple(reader.args), int8_args))
                reader.args = int8_args
    return switches


def _shared_results(layers: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """The layers' results read only by :data:`INT8_READERS` (a pooling's input, a full-shape operand of mul or add)
    and by layers (as their
    input), each reader reading it once, with the readers of the first kind: quantized once, read in int8 by
    every one."""
    layer_set = set(layers)
    shared = {}
    for layer in layers:
        readers = [user for user in layer.users if user.target in INT8_READERS and _reads_once(user, layer) and (
            user.args[0] is layer if user.target not in COMMUTATIVE  # a pooling's input; either operand of mul, add
            else layer in user.args[:2] and user.meta["val"].shape == layer.meta["val"].shape)]
        if readers and all(user in readers or (user in layer_set and read_fused(user).args["input"] is layer
                                               and _reads_once(user, layer)) for user in layer.users):
            shared[layer] = readers
    return shared


def _quantize_dequantize(gm: fx.GraphModule, x: fx.Node, quant: TensorQuant) -> fx.Node:
    q = insert_op(gm.graph, QUANTIZE, (x, *quant.node_args()), f"{x.name}_q")
    dq = insert_op(gm.graph, DEQUANTIZE, (q, *quant.node_args()), f"{x.name}_dq")
    copies(dq, x)  # it stands for x (numerics compare it with x's value)
    return dq


def _dequantized_weight(gm: fx.GraphModule, weight: fx.Node) -> fx.Node:
    q, scales = quantize_weight(getattr(gm, weight.target))
    w_max = weight_max()
    nodes = [add_constant(gm, value, f"{weight.target}_{suffix}") for value, suffix in
             ((q, "int8"), (scales, "scale"), (torch.zeros(scales.shape, dtype=torch.int64), "zero_point"))]
    dq = insert_op(gm.graph, DEQUANTIZE_WEIGHT, (*nodes, 0, -w_max, w_max, torch.int8), f"{weight.target}_dq")
    copies(dq, weight)
    return dq


def _reads_once(user: fx.Node, value: fx.Node) -> bool:
    return sum(1 for arg in tree_leaves((user.args, user.kwargs)) if arg is value) == 1
