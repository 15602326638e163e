"""pyrys's own graph ops, registered with ``torch.library`` so every graph stays runnable.

Fold ops (inserted by ``fold_conv_bn``, evaluated by ``constant_propagation``).
With BatchNorm statistics ``mu, var``, affine ``gamma, beta`` and ``eps``:

    s   = gamma / sqrt(var + eps)              (per output channel)
    W'  = W * s                                 (``pyrys::fold_weight``)
    b'  = (b - mu) * s + beta                   (``pyrys::fold_bias``)

so that ``bn(conv(x, W, b)) == conv(x, W', b')``.  The arithmetic runs in
float64 and is cast back to the weight's dtype.

Grouped transposed convolutions keep their weight as ``(in, out/groups, k...)``:
output channel ``o = g * (out/groups) + j`` lives at ``W[g*(in/groups):(g+1)*(in/groups), j]``,
so ``fold_weight(..., channel_dim=1, groups=g)`` views ``W`` as ``(g, in/g, out/g, k...)``.

Constant affine ops after a conv/linear (``y * a + c``, ``a`` and ``c`` scalars or
per-output-channel tensors) fold the same way:

    W' = W * a                                  (``pyrys::fold_scale``)
    b' = b * a + c                              (``pyrys::fold_affine_bias``)

BatchNorm *before* a convolution without padding, ``conv(x * s + t)`` with ``s, t``
per input channel ``i``:

    W'[o, i] = W[o, i] * s[i]                   (``pyrys::fold_input_weight``)
    b'[o]    = b[o] + sum_{i,k} W[o, i, k] * t[i]   (``pyrys::fold_input_bias``)

The fused ops (``pyrys::conv``, ``pyrys::conv_transpose``, ``pyrys::linear``) are registered
from their table in :mod:`pyrys.ir.fused`, through :func:`pyrys_op` as well.
"""
from __future__ import annotations

from typing import Optional

import torch

# every pyrys op -> the plain Python function behind it.  Running it directly skips torch's
# custom-op dispatch, whose dynamo wrapper reads and writes torch.export's process-wide
# state: a call on one thread while another thread exports (a new input shape compiling)
# failed with KeyError: 'custom'.  (torch's quantize/dequantize ops too, computed faster:
# :func:`pyrys.quantization.quantize`.)
PYTHON_IMPLS: dict = {}


def pyrys_op(name: str, schema: str | None = None):
    """Decorator: ``fn`` becomes the op ``torch.ops.pyrys.<name>`` and stays in :data:`PYTHON_IMPLS`."""

    def register(fn):
        op = torch.library.custom_op(f"pyrys::{name}", fn, mutates_args=(), schema=schema)
        PYTHON_IMPLS[getattr(torch.ops.pyrys, name).default] = fn
        return op

    return register


def bn_scale(bn_weight: Optional[torch.Tensor], running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """``gamma / sqrt(var + eps)`` in float64 (``gamma = 1`` when BN has no affine weight)."""
    scale = torch.rsqrt(running_var.double() + eps)
    return scale if bn_weight is None else scale * bn_weight.double()


def scale_output_channels(weight: torch.Tensor, scale: torch.Tensor, channel_dim: int = 0,
                          groups: int = 1) -> torch.Tensor:
    """``weight * scale`` per output channel, in float64 (``scale``: one value or one per channel).

    ``channel_dim`` is 0 for conv and linear weights, 1 for transposed conv weights,
    whose output channels are split over ``groups`` blocks of the input dimension.
    """
    w, scale = weight.double(), scale.double().reshape(-1)
    if scale.numel() == 1:
        return (w * scale).to(weight.dtype)
    if channel_dim == 0:
        return (w * scale.reshape(-1, *[1] * (w.dim() - 1))).to(weight.dtype)
    grouped = w.reshape(groups, w.shape[0] // groups, *w.shape[1:])  # (g, in/g, out/g, k...)
    per_group = scale.reshape(groups, 1, -1, *[1] * (w.dim() - 2))
    return (grouped * per_group).reshape(weight.shape).to(weight.dtype)


@pyrys_op("fold_weight")
def fold_weight(
    weight: torch.Tensor, bn_weight: Optional[torch.Tensor], running_var: torch.Tensor, eps: float,
    channel_dim: int = 0, groups: int = 1
) -> torch.Tensor:
    """``W' = W * s`` with ``s`` along the output channels (``channel_dim`` 1 and ``groups``: transposed conv)."""
    return scale_output_channels(weight, bn_scale(bn_weight, running_var, eps), channel_dim, groups)


@fold_weight.register_fake
def _(weight, bn_weight, running_var, eps, channel_dim=0, groups=1):
    return torch.empty_like(weight)


@pyrys_op("fold_bias")
def fold_bias(
    bias: Optional[torch.Tensor],
    bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor],
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``b' = (b - mu) * s + beta`` (``b = 0`` and ``beta = 0`` when absent)."""
    centered = -running_mean.double() if bias is None else bias.double() - running_mean.double()
    folded = centered * bn_scale(bn_weight, running_var, eps)
    if bn_bias is not None:
        folded = folded + bn_bias.double()
    return folded.to(running_mean.dtype)


@fold_bias.register_fake
def _(bias, bn_weight, bn_bias, running_mean, running_var, eps):
    return torch.empty_like(running_mean)


@pyrys_op("fold_scale")
def fold_scale(weight: torch.Tensor, scale: torch.Tensor, channel_dim: int = 0, groups: int = 1) -> torch.Tensor:
    """``W' = W * a``: a constant scale (one value or one per output channel) folded into a weight."""
    return scale_output_channels(weight, scale, channel_dim, groups)


@fold_scale.register_fake
def _(weight, scale, channel_dim=0, groups=1):
    return torch.empty_like(weight)


@pyrys_op("fold_affine_bias")
def fold_affine_bias(
    bias: Optional[torch.Tensor], scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], channels: int
) -> torch.Tensor:
    """``b' = b * a + c`` over ``channels`` outputs (``b = 0``, ``a = 1``, ``c = 0`` when absent)."""
    dtype = next(t.dtype for t in (bias, shift, scale) if t is not None)
    folded = torch.zeros(channels, dtype=torch.float64) if bias is None else bias.double()
    if scale is not None:
        folded = folded * scale.double().reshape(-1)
    if shift is not None:
        folded = folded + shift.double().reshape(-1)
    return folded.expand(channels).to(dtype).contiguous()


@fold_affine_bias.register_fake
def _(bias, scale, shift, channels):
    dtype = next(t.dtype for t in (bias, shift, scale) if t is not None)
    return torch.empty(channels, dtype=dtype)


def _input_channel_values(values: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Per input channel values laid out like ``weight`` (``(out, in/g, k...)``): value of ``W[o, i]``'s channel."""
    out, in_per_group = weight.shape[0], weight.shape[1]
    group_of_output = torch.arange(out) // (out // groups)
    channel = group_of_output[:, None] * in_per_group + torch.arange(in_per_group)[None, :]
    return values.double()[channel].reshape(out, in_per_group, *([1] * (weight.dim() - 2)))


def bn_shift(bn_weight, bn_bias, running_mean, running_var, eps) -> torch.Tensor:
    """``beta - mu * s`` in float64: BatchNorm is ``x * s + shift``."""
    shift = -running_mean.double() * bn_scale(bn_weight, running_var, eps)
    return shift if bn_bias is None else shift + bn_bias.double()


@pyrys_op("fold_input_weight")
def fold_input_weight(
    weight: torch.Tensor, bn_weight: Optional[torch.Tensor], running_var: torch.Tensor, eps: float, groups: int
) -> torch.Tensor:
    """``W'[o, i] = W[o, i] * s[i]``: a BatchNorm before the conv folded into its input channels."""
    scale = _input_channel_values(bn_scale(bn_weight, running_var, eps), weight, groups)
    return (weight.double() * scale).to(weight.dtype)


@fold_input_weight.register_fake
def _(weight, bn_weight, running_var, eps, groups):
    return torch.empty_like(weight)


@pyrys_op("fold_input_bias")
def fold_input_bias(
    bias: Optional[torch.Tensor], weight: torch.Tensor, bn_weight: Optional[torch.Tensor],
    bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor, running_var: torch.Tensor, eps: float, groups: int
) -> torch.Tensor:
    """``b'[o] = b[o] + sum_{i,k} W[o, i, k] * t[i]`` with ``t = beta - mu * s``."""
    shift = _input_channel_values(bn_shift(bn_weight, bn_bias, running_mean, running_var, eps), weight, groups)
    folded = (weight.double() * shift).flatten(1).sum(1)
    if bias is not None:
        folded = folded + bias.double()
    return folded.to(weight.dtype)


@fold_input_bias.register_fake
def _(bias, weight, bn_weight, bn_bias, running_mean, running_var, eps, groups):
    return weight.new_empty(weight.shape[0])


FOLD_WEIGHT = torch.ops.pyrys.fold_weight.default
FOLD_BIAS = torch.ops.pyrys.fold_bias.default
FOLD_SCALE = torch.ops.pyrys.fold_scale.default
FOLD_AFFINE_BIAS = torch.ops.pyrys.fold_affine_bias.default
FOLD_INPUT_WEIGHT = torch.ops.pyrys.fold_input_weight.default
FOLD_INPUT_BIAS = torch.ops.pyrys.fold_input_bias.default


def __getattr__(name: str):
    """The fused ops' constants (``FUSED_CONV`` ...) live in :mod:`pyrys.ir.fused`, which imports this
    module; ``from pyrys.ir.ops import FUSED_CONV`` still works."""
    if name.startswith("FUSED_"):
        from pyrys.ir import fused

        return getattr(fused, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
