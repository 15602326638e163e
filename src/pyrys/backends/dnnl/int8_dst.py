"""Writing int8 where the one reader of an op's result quantizes it (``passes/quantize.py``).

The op computes in float32 as before and its primitive rounds the result on the way out:

    q = saturate(round(y / s))      an eltwise ``linear`` post-op (alpha = 1 / s), then a u8/s8 destination

so the quantize node costs nothing (it is the same bytes) and the result is written in a quarter of the
bytes.  A conv or linear writes int8 through its own dst scale instead (``lower_int8.py``).
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.constants import AlgKind
from pyrys.backends.dnnl.primitives import PostOps, PrimitiveAttr
from pyrys.quantization import QUANTIZE, TensorQuant


def quantized_reader(node: fx.Node) -> TensorQuant | None:
    """The quantization of ``node``'s one reader when that is a quantize node (zero point 0), else None."""
    users = list(node.users)
    if len(users) != 1 or users[0].target is not QUANTIZE:
        return None
    quant = TensorQuant.of_node(users[0])
    return quant if quant.zero_point == 0 else None


def quantizing_attr(quant: TensorQuant) -> PrimitiveAttr:
    """Post-ops dividing the result by the scale; the destination's data type does the rounding."""
    post_ops = PostOps()
    post_ops.append_eltwise(AlgKind.eltwise_linear, 1.0 / quant.scale, 0.0)
    return PrimitiveAttr(post_ops)


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
