"""The op vocabulary: op groups and small predicates, defined once for the passes and the backends.

    CONVOLUTIONS     conv1d/2d/3d (explicit or string padding)     y = conv(x, W) + b
    CONV_TRANSPOSES  conv_transpose1d/2d/3d                         y = conv_transpose(x, W) + b
    LINEARS          linear                                         y = x W^T + b
    WEIGHTED         all of the above: a constant weight, one bias value per output channel
    MATRIX_PRODUCTS  mm, bmm, matmul                                y[..., m, n] = sum_k a[..., m, k] b[..., k, n]
    VIEWS            the same bytes under another shape: view, reshape, flatten, squeeze, unsqueeze, alias
    PERMUTES         the same bytes with the dims reordered: permute, transpose
    INT8             the 8-bit dtypes int8 activations and weights are stored in (uint8, int8)

A pass or a backend that needs one of these names imports it from here, never from another pass.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.ir.control_flow import has_effects
from pyrys.ir.graph import op_args

aten = torch.ops.aten

CONVOLUTIONS = frozenset({aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding})
CONV_TRANSPOSES = frozenset({aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                             aten.conv_transpose3d.input})
LINEARS = frozenset({aten.linear.default})
WEIGHTED = CONVOLUTIONS | CONV_TRANSPOSES | LINEARS
MATRIX_PRODUCTS = frozenset({aten.mm.default, aten.bmm.default, aten.matmul.default})
VIEWS = frozenset({aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
                   aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.unsqueeze.default,
                   aten.alias.default})
PERMUTES = frozenset({aten.permute.default, aten.transpose.int})
ZERO_PADS = frozenset({aten.pad.default, aten.constant_pad_nd.default})  # (zeros: their mode and value say)
ATTENTION = aten.scaled_dot_product_attention.default  # (q, k, v, mask, ...): softmax(q k^T * scale + mask) v
# pooling ops by their number of spatial dims: the input is (N, C, spatial...), or (C, spatial...) unbatched
POOLS = {aten.max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool3d.default: 3,
         aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3,
         aten.adaptive_avg_pool1d.default: 1, aten.adaptive_avg_pool2d.default: 2,
         aten.adaptive_avg_pool3d.default: 3}


INT8 = frozenset({torch.uint8, torch.int8})


def precision_of(gm: fx.GraphModule) -> str:
    """The lowest precision the graph computes in: ``"int8"`` where it quantizes (``quantized_decomposed``
    ops: a model's own cast to uint8 is not int8 arithmetic), ``"bf16"`` where an op makes bfloat16 (the
    passes' conversions, or the model's own), else ``"fp32"``."""
    ops = [node for node in gm.graph.nodes if node.op == "call_function"]
    if any(getattr(node.target, "namespace", None) == "quantized_decomposed" for node in ops):
        return "int8"
    return "bf16" if any(getattr(node.meta.get("val"), "dtype", None) == torch.bfloat16 for node in ops) else "fp32"


def is_pure(node: fx.Node) -> bool:
    """Same arguments, same result, no effect: a constant, or a call that is neither impure nor random.

    Such a node may be merged with its twin, evaluated at compile time, or dropped when unused."""
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or has_effects(node):
        return False
    return torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ())


def draws_random_numbers(node: fx.Node) -> bool:
    """Whether ``node`` draws from torch's random generator (attention is tagged so for its dropout, which is
    0 at inference: it draws nothing then)."""
    if node.op != "call_function" or torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    if node.target is torch.ops.aten.scaled_dot_product_attention.default:
        dropout = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return dropout != 0.0
    return True


def single_user(node: fx.Node) -> bool:
    """Exactly one node reads ``node``'s value: a rewrite may consume it."""
    return len(node.users) == 1


def permutation(node: fx.Node) -> list[int]:
    """The dims order of a ``permute`` or ``transpose`` node: output dim ``i`` is input dim ``order[i]``.

        permute(x, [0, 2, -1, 1]) -> [0, 2, 3, 1]        transpose(x, 1, 2) (4-d) -> [0, 2, 1, 3]
    """
    rank = node.meta["val"].dim()
    args = op_args(node)
    if node.target is aten.permute.default:
        return [d % rank for d in args["dims"]]
    order = list(range(rank))
    a, b = args["dim0"] % rank, args["dim1"] % rank
    order[a], order[b] = order[b], order[a]
    return order


def output_channel_layout(target, args: dict) -> tuple[int, int]:
    """``(channel_dim, groups)``: where a weight keeps its output channels, as ``fold_weight`` takes them.

    Dim 0 for conv and linear weights ``(out, in/g, k...)``; dim 1, split over ``groups`` blocks,
    for transposed conv weights ``(in, out/g, k...)``."""
    return (1, args["groups"]) if target in CONV_TRANSPOSES else (0, 1)
