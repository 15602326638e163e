"""Bias correction: each int8 op's mean output shift, measured on the calibration data, added to its bias.

Rounding a layer's weights (and clipping its input at the calibrated range) shifts the mean of each
output channel: ``E[W_q x_q] != E[W x]``, and a shift passes through every layer after it (on
random-weight torchvision models it was most of the int8 error: ResNet-50's 5.9e-2 -> 1.1e-2 with 7-bit
weights on AVX2, ``benchmarks/RESULTS.md``).  On the float32 graph's activations, with ``op`` the layer's
convolution or linear before its post-ops:

    c[o] = mean over samples and positions of ( op(x, W, b) - op(dq(q(x)), dq(W_q), b) )[o]   (finite ones)
    b'[o] = b[o] + c[o]                                       (b = 0 for a layer without a bias)

so the int8 op's output has the float32 op's mean per channel (the empirical bias correction of Nagel
et al., "Data-Free Quantization", 2019; OpenVINO NNCF's "fast bias correction").  It runs on the first
:data:`BIAS_SAMPLES` calibration samples: one run of the float32 graph per sample, each int8 op computed
twice more on its activations.  The op is linear in its input, so the sum of the shifts is the shift of
the summed input (summed in float64: exact up to rounding):

    sum over rows of (x W^T - x_q W_q^T) = (sum over rows of x) W^T - (sum over rows of x_q) W_q^T
    sum over the batch of conv(x_n, W) = conv(sum over the batch of x_n, W)

so a linear costs two vector-matrix products instead of two matrix products (BERT-base at batch 8: bias
correction 49 -> 23 s), a conv two of one image instead of the batch's.  (A non-finite sum falls
back to the shifts themselves, dropping the non-finite ones.)

The mean is measured on :data:`BIAS_SAMPLES` samples' worth of rows: as many samples as hold that many
rows of the batch (dim 0 of every input, where the inputs share it), at least :data:`BIAS_MIN_SAMPLES`.
A model called at batch 1 measures on 16 samples; at batch 8 or 16 on 4, each op then seeing at least
as many positions per channel as at batch 1 (int8 compile, SPR: ResNet-50 at batch 16 52 -> 39 s,
ViT-base at batch 8 58 -> 35 s, BERT-base at batch 8 36 -> 26 s; errors within their spread over inputs).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.ir.fused import FUSED_CONV, read_fused
from pyrys.ir.graph import add_constant
from pyrys.quantization.calibration import common_rows
from pyrys.quantization.guard import on_float32_activations

BIAS_SAMPLES = 16  # rows (samples of one row) the mean shift is measured on (a per-channel mean over every position)
BIAS_MIN_SAMPLES = 4  # samples it is measured on at least, however many rows each holds


def bias_corrections(gm: fx.GraphModule, switches: dict, samples: list[list],
                     weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """``c`` of the module docstring for every op of ``switches`` (:class:`~pyrys.quantization.guard.Switch`,
    by layer key; left as they were on return), float32, one value per output channel; ``weights``:
    :func:`~pyrys.quantization.guard.dequantized_weights`, where the caller holds them already."""
    was_int8 = {name: switch.int8 for name, switch in switches.items()}
    sums: dict[str, torch.Tensor] = {}  # per channel: the shifts' sum, and how many (finite) were summed
    counts: dict[str, torch.Tensor] = {}

    def measure(name: str, arguments, result) -> None:
        switch = switches[name]
        fused = read_fused(switch.layer)
        own = len(fused.kind.arguments)  # the op's own arguments: no post-ops
        float_args, int8_args = arguments(switch.float_args[:own]), arguments(switch.int8_args[:own])
        summed = _summed_shift(fused, float_args, int8_args, result)
        if summed is not None:
            sums[name] = sums.get(name, 0) + summed[0]
            counts[name] = counts.get(name, 0) + summed[1]
            return
        shift = fused.kind.compute(*float_args) - fused.kind.compute(*int8_args)
        channel = _channel_dim(fused, shift)
        others = [d for d in range(shift.dim()) if d != channel]
        finite = shift.isfinite()  # an overflowing activation says nothing about the mean shift
        if not bool(finite.all()):
            shift = shift.where(finite, 0)
        # (an empty dim list would sum every dim: a linear on one vector has no other dim)
        sums[name] = sums.get(name, 0) + (shift.sum(others, dtype=torch.float64) if others else shift.double())
        counts[name] = counts.get(name, 0) + (finite.sum(others) if others else finite.long())

    on_float32_activations(gm, switches, measured_samples(samples), measure, float_arguments=True, weights=weights)
    for name, switch in switches.items():
        switch.set(was_int8[name])
    return {name: (total / counts[name].clamp_min(1)).float() for name, total in sums.items()}


def measured_samples(samples: list[list]) -> list[list]:
    """The first samples, as many as hold :data:`BIAS_SAMPLES` rows (at least :data:`BIAS_MIN_SAMPLES`); a
    sample without common rows (:func:`~pyrys.quantization.calibration.common_rows`) counts as one row."""
    if not samples:
        return []
    rows = max(common_rows([tuple(x.shape) for x in samples[0] if isinstance(x, torch.Tensor)]) or 1, 1)
    return samples[:max(BIAS_MIN_SAMPLES, -(-BIAS_SAMPLES // rows))]


def _summed_shift(fused, float_args: tuple, int8_args: tuple, result: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The shifts' sum per output channel (float64) and how many were summed, from the summed inputs (see the
    module docstring); None where nothing is saved (one row, a conv on one image) or a sum is not finite.
    With ``L`` the op without its bias, ``L(x, W) - L(x_q, W_q) = L(x - x_q, W) + L(x_q, W - W_q)``: each term
    is as small as the shift, so float32 products lose nothing to cancellation."""
    channel = _channel_dim(fused, result)
    convolution = fused.kind.op is FUSED_CONV
    x = float_args[0]
    if (x.shape[0] if convolution and channel == 1 else x.shape[:-1].numel() if not convolution else 1) <= 1:
        return None
    count = result.numel() // result.shape[channel]  # positions per channel
    position = fused.kind.arguments.index("bias")

    def summed_input(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return x.sum(0, keepdim=True) if convolution else x.reshape(-1, x.shape[-1]).sum(0, keepdim=True)

    def summed_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """sum over positions of L(x, W), in float64."""
        own = list(float_args)
        own[0], own[1], own[position] = x.float(), weight, None
        y = fused.kind.compute(*own)
        return y.double().sum([d for d in range(y.dim()) if d != _channel_dim(fused, y)])

    x_float, x_int8 = summed_input(float_args[0]), summed_input(int8_args[0])
    shift = summed_op(x_float - x_int8, float_args[1]) + summed_op(x_int8, float_args[1] - int8_args[1])
    float_bias, int8_bias = (0 if b is None else b.double() for b in (float_args[position], int8_args[position]))
    shift += count * (float_bias - int8_bias)
    return (shift, torch.full(shift.shape, count)) if bool(shift.isfinite().all()) else None


def _channel_dim(fused, result: torch.Tensor) -> int:
    """The output-channel dim of a conv's or linear's result: a conv's is after the batch (none when its input
    is unbatched: ``[C, H, W]``), a linear's is the last."""
    if fused.kind.op is FUSED_CONV:
        return result.dim() - fused.args["weight"].meta["val"].dim() + 1
    return result.dim() - 1


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
