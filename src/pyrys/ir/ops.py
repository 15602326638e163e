"""pyrys's own graph ops, registered with ``torch.library`` so every graph stays runnable.

Fold ops (inserted by ``fold_conv_bn``, evaluated by ``constant_propagation``).
With BatchNorm statistics ``mu, var``, affine ``gamma, beta`` and ``eps``:

    s   = gamma / sqrt(var + eps)              (per output channel)
    W'  = W * s                                 (``pyrys::fold_weight``)
    b'  = (b - mu) * s + beta                   (``pyrys::fold_bias``)

so that ``bn(conv(x, W, b)) == conv(x, W', b')``.  The arithmetic runs in
float64 and is cast back to the weight's dtype.

Fused ops (``pyrys::conv``, ``pyrys::linear``) compute the op and then its
post-op chain (see :mod:`pyrys.ir.post_ops`) as one node.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pyrys.ir.post_ops import apply_post_ops

_CONV_BY_RANK = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def bn_scale(bn_weight: Optional[torch.Tensor], running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """``gamma / sqrt(var + eps)`` in float64 (``gamma = 1`` when BN has no affine weight)."""
    scale = torch.rsqrt(running_var.double() + eps)
    return scale if bn_weight is None else scale * bn_weight.double()


@torch.library.custom_op("pyrys::fold_weight", mutates_args=())
def fold_weight(
    weight: torch.Tensor, bn_weight: Optional[torch.Tensor], running_var: torch.Tensor, eps: float, channel_dim: int = 0
) -> torch.Tensor:
    """``W' = W * s`` with ``s`` broadcast along ``channel_dim`` (0 for conv and linear weights)."""
    shape = [1] * weight.dim()
    shape[channel_dim] = -1
    return (weight.double() * bn_scale(bn_weight, running_var, eps).reshape(shape)).to(weight.dtype)


@fold_weight.register_fake
def _(weight, bn_weight, running_var, eps, channel_dim=0):
    return torch.empty_like(weight)


@torch.library.custom_op("pyrys::fold_bias", mutates_args=())
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


def _conv_then_post_ops(input, weight, bias, stride, padding, dilation, groups, post_ops, post_inputs):
    conv = _CONV_BY_RANK[weight.dim() - 2]
    y = conv(input, weight, bias, stride, padding, dilation, groups)
    return apply_post_ops(y, post_ops, post_inputs)


@torch.library.custom_op(
    "pyrys::conv",
    mutates_args=(),
    schema="(Tensor input, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, int groups, "
    "str[] post_ops, Tensor[] post_inputs) -> Tensor",
)
def conv(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    post_ops: list[str],
    post_inputs: list[torch.Tensor],
) -> torch.Tensor:
    """Convolution (1d/2d/3d by the weight's rank) followed by its post-op chain."""
    return _conv_then_post_ops(input, weight, bias, stride, padding, dilation, groups, post_ops, post_inputs)


conv.register_fake(_conv_then_post_ops)


def _linear_then_post_ops(input, weight, bias, post_ops, post_inputs):
    return apply_post_ops(F.linear(input, weight, bias), post_ops, post_inputs)


@torch.library.custom_op(
    "pyrys::linear",
    mutates_args=(),
    schema="(Tensor input, Tensor weight, Tensor? bias, str[] post_ops, Tensor[] post_inputs) -> Tensor",
)
def linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    post_ops: list[str],
    post_inputs: list[torch.Tensor],
) -> torch.Tensor:
    """``input @ weight.T + bias`` followed by its post-op chain."""
    return _linear_then_post_ops(input, weight, bias, post_ops, post_inputs)


linear.register_fake(_linear_then_post_ops)

FOLD_WEIGHT = torch.ops.pyrys.fold_weight.default
FOLD_BIAS = torch.ops.pyrys.fold_bias.default
FUSED_CONV = torch.ops.pyrys.conv.default
FUSED_LINEAR = torch.ops.pyrys.linear.default
