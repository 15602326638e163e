"""Writing int8 where the one reader of an op's result quantizes it (``passes/quantize.py``).

The op computes in float32 as before and its primitive rounds the result on the way out:

    q = saturate(round(y / s))      an eltwise ``linear`` post-op (alpha = 1 / s), then a u8/s8 destination

so the quantize node costs nothing (it is the same bytes) and the result is written in a quarter of the
bytes.  A conv or linear writes int8 through its own dst scale instead (``lower_int8.py``).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.constants import AlgKind, DataType
from pyrys.backends.dnnl.primitives import PostOps, PrimitiveAttr
from pyrys.backends.dnnl.builder import Builder
from pyrys.backends.dnnl.values import Value
from pyrys.quantization import DEQUANTIZE, QUANTIZE, TensorQuant

INT8_DTYPES = frozenset({DataType.u8, DataType.s8})


# ops that commute with quantization (monotonic, no arithmetic): between an int8 op and the quantize of its
# result they run on the int8 values, and their result has the data type of what they read
COMMUTING = frozenset({torch.ops.aten.max_pool1d.default, torch.ops.aten.max_pool2d.default,
                       torch.ops.aten.max_pool3d.default})


def int8_quant(node: fx.Node) -> TensorQuant | None:
    """The quantization a quantize or dequantize node spells, where the kernels here run it: u8 or s8 over the
    type's whole range, zero point 0 (what ``passes/quantize.py`` writes); else None."""
    quant = TensorQuant.of_node(node)
    full = tuple(node.args[3:5]) == quant.bounds if quant.dtype in (torch.uint8, torch.int8) else False
    return quant if full and quant.zero_point == 0 else None


def quantized_reader(node: fx.Node) -> TensorQuant | None:
    """The quantization of ``node``'s one reader when that is a quantize node the kernels run, else None."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not QUANTIZE:
        return None
    return int8_quant(users[0])


def quantizing_attr(quant: TensorQuant | None, factor: float = 1.0, scales: dict[int, int] | None = None
                    ) -> PrimitiveAttr | None:
    """Post-ops multiplying the result by ``factor`` (an int8 source's scale, for a linear op) and dividing it
    by ``quant``'s scale (the destination's data type then rounds); ``scales``: runtime scales (arg -> mask)."""
    alpha = factor / (quant.scale if quant is not None else 1.0)
    if alpha == 1.0 and not scales:
        return None
    post_ops = None
    if alpha != 1.0:
        post_ops = PostOps()
        post_ops.append_eltwise(AlgKind.eltwise_linear, alpha, 0.0)
    return PrimitiveAttr(post_ops, scales=scales)


def read_quantized(builder: Builder, arg) -> tuple[Value, float | None]:
    """What an op reads for ``arg``: a dequantize node's int8 value as it is and its scale (``passes/quantize.py``
    quantizes what int8 layers and these ops share), or the value of anything else and None."""
    if isinstance(arg, fx.Node) and arg.target is DEQUANTIZE and int8_quant(arg) is not None:
        value = builder.value_of(arg.args[0])
        if value.md is not None and value.md.dtype in INT8_DTYPES:
            return value, int8_quant(arg).scale
    return builder.value_of(arg), None


def scale_value(builder: Builder, scale: float, name: str) -> Value:
    """A runtime scale, as a constant value."""
    return builder.constant_value(torch.tensor([scale], dtype=torch.float32), None, name)


def quantizing_note(quant: TensorQuant | None) -> str:
    return "" if quant is None else f", dst={'u8' if quant.bounds[0] == 0 else 's8'}, dst_scale={quant.scale:.6g}"


def with_int8_dst(create: Callable, quant: TensorQuant | None) -> tuple:
    """``(create(quant), quant)``, or ``(create(None), None)`` where oneDNN has no kernel writing int8 for it
    (the quantize node then converts, as a reorder)."""
    if quant is not None:
        try:
            return create(quant), quant
        except DnnlError:
            pass
    return create(None), None
