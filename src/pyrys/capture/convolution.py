"""TorchScript's low-level spellings of a convolution, as the ops the passes and backends know.

``torch.jit.trace`` records ``F.conv2d`` (and ``nn.Conv2d``) as the op it dispatches to:

    _convolution(x, W, b, stride, padding, dilation, transposed, output_padding, groups, ...flags)
    convolution(x, W, b, stride, padding, dilation, transposed, output_padding, groups)
    _convolution_mode(x, W, b, stride, "same" or "valid", dilation, groups)

which computes, with N = W.dim() - 2 spatial dims,

    conv{N}d(x, W, b, stride, padding, dilation, groups)                                transposed False
    conv_transpose{N}d(x, W, b, stride, padding, output_padding, groups, dilation)      transposed True
    conv{N}d.padding(x, W, b, stride, "same" or "valid", dilation, groups)              _convolution_mode

Left as they are (a torch fallback): an N other than 1, 2 or 3, and a ``transposed`` flag computed at run time.
"""
from __future__ import annotations

from typing import Any

import torch

aten = torch.ops.aten

SPELLINGS = frozenset({"aten::_convolution", "aten::convolution", "aten::_convolution_mode"})
PLAIN = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
BY_MODE = {1: aten.conv1d.padding, 2: aten.conv2d.padding, 3: aten.conv3d.padding}
TRANSPOSED = {1: aten.conv_transpose1d.default, 2: aten.conv_transpose2d.input, 3: aten.conv_transpose3d.input}


def named_convolution(values: list, weight: Any) -> tuple[torch._ops.OpOverload, list] | None:
    """The named op and its arguments for the arguments ``values`` of a spelling above (``weight``: the
    weight's value, a tensor or fake tensor), or None where it has none."""
    spatial = weight.dim() - 2 if isinstance(weight, torch.Tensor) else None
    if spatial not in PLAIN:
        return None
    if len(values) == 7:  # _convolution_mode: padding "same" or "valid"
        return BY_MODE[spatial], list(values)
    x, w, b, stride, padding, dilation, transposed, output_padding, groups = values[:9]
    if not isinstance(transposed, bool):
        return None
    if transposed:
        return TRANSPOSED[spatial], [x, w, b, stride, padding, output_padding, groups, dilation]
    return PLAIN[spatial], [x, w, b, stride, padding, dilation, groups]
