"""Bias correction: each int8 op's mean output shift, measured on the calibration data, added to its bias.

Rounding a layer's weights (and clipping its input at the calibrated range) shifts the mean of each
output channel: ``E[W_q x_q] != E[W x]``, and a shift passes through every layer after it (it is most
of the error of depthwise convolutions, and of 7-bit weights on AVX2).  On the float32 graph's
activations, with ``op`` the layer's convolution or linear before its post-ops:

    c[o] = mean over samples and positions of ( op(x, W, b) - op(dq(q(x)), dq(W_q), b) )[o]
    b'[o] = b[o] + c[o]                                       (b = 0 for a layer without a bias)

so the int8 op's output has the float32 op's mean per channel (the empirical bias correction of Nagel
et al., "Data-Free Quantization", 2019; OpenVINO NNCF's "fast bias correction").  It runs on the first
:data:`BIAS_SAMPLES` calibration samples: one run of the float32 graph per sample, each int8 op computed
twice more on its activations.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.ir.fused import FUSED_CONV, read_fused
from pyrys.ir.graph import add_constant
from pyrys.quantization.guard import on_float32_activations

BIAS_SAMPLES = 16  # samples the mean shift is measured on (a per-channel mean over every position of each)


def bias_corrections(gm: fx.GraphModule, switches: dict, samples: list[list]) -> dict[str, torch.Tensor]:
    """``c`` of the module docstring for every op of ``switches`` (:class:`~pyrys.quantization.guard.Switch`,
    by layer key; left as they were on return), float32, one value per output channel."""
    was_int8 = {name: switch.int8 for name, switch in switches.items()}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(switches, 0)

    def measure(name: str, arguments, result) -> None:
        switch = switches[name]
        fused = read_fused(switch.layer)
        own = len(fused.kind.arguments)  # the op's own arguments: no post-ops
        shift = (fused.kind.compute(*arguments(switch.float_args[:own]))
                 - fused.kind.compute(*arguments(switch.int8_args[:own])))
        channels = 1 if fused.kind.op is FUSED_CONV else shift.dim() - 1
        per_channel = shift.double().transpose(0, channels).reshape(shift.shape[channels], -1)
        sums[name] = sums.get(name, 0) + per_channel.sum(1)
        counts[name] += per_channel.shape[1]

    on_float32_activations(gm, switches, samples[:BIAS_SAMPLES], measure, float_arguments=True)
    for name, switch in switches.items():
        switch.set(was_int8[name])
    return {name: (total / counts[name]).float() for name, total in sums.items() if counts[name]}


def correctable(switch) -> bool:
    """Whether the op's bias is a constant or absent (a bias computed by the graph is left as it is)."""
    bias = read_fused(switch.layer).args["bias"]
    return bias is None or bias.op == "get_attr"


def corrected_args(gm: fx.GraphModule, layer: fx.Node, int8_args: tuple, correction: torch.Tensor,
                   key: str) -> tuple:
    """``int8_args`` (a fused op's arguments, its bias :func:`correctable`) with the bias ``b + correction``
    as a new constant."""
    position = read_fused(layer).kind.arguments.index("bias")
    bias = int8_args[position]
    value = correction.clone() if bias is None else getattr(gm, bias.target).detach() + correction
    with gm.graph.inserting_before(layer):
        node = add_constant(gm, value.to(torch.float32), f"{key}_bias_corrected")
    return (*int8_args[:position], node, *int8_args[position + 1:])
