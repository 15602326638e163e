"""int8 post-training quantization: the numbers, and the ops that spell them in a graph.

An activation is quantized per tensor, a weight per output channel, symmetrically:

    x ~= s_x * (q_x - z_x),   q_x = clamp(round(x / s_x) + z_x, q_min, q_max)    u8 if x >= 0 seen, else s8 (z_x = 0)
    W[o] ~= s_W[o] * q_W[o],  q_W[o] = clamp(round(W[o] / s_W[o]), -w_max, w_max)  s8
    y[o] = s_x * s_W[o] * sum(q_x * q_W[o]) + b[o]                                 int32 sums, then float32

``s_x`` comes from calibration (:mod:`pyrys.quantization.calibration`), ``s_W[o] = max|W[o]| / w_max``.
A graph spells this with torch's ``quantized_decomposed`` ops (as PT2E does): an int8 op reads its input
through a quantize/dequantize pair and its weight through a dequantize of an int8 constant, so the graph
runs as it is on the reference backend (the rounding simulated in float32: the same numbers up to
float32 summation order) and the dnnl backend reads the pattern as one int8 primitive.

``w_max`` is 127 where the CPU has VNNI or AMX int8.  Without (AVX2) the kernels sum two u8 x s8
products in 16 bits, which saturates for 8-bit weights: ops get 7-bit weights (-63..63, oneDNN's
documented workaround), except that a convolution reading s8 has its weights halved by oneDNN itself
(its AVX2 convolutions' s8s8 path: given 7-bit weights it would compute with 6 bits, twice the error),
so it gets the same 7-bit values stored doubled (-126..126 in steps of 2, scales halved): halved
exactly, the kernel computes what the graph says.  (Linears reading s8 run on a gemm that does not
halve them: doubled, they saturate.)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401 -- registers torch.ops.quantized_decomposed

from pyrys.capture.script_builtins import drop_stale_builtins
from pyrys.ir.ops import PYTHON_IMPLS
from pyrys.machine import isa_limit_note, kernel_flags

drop_stale_builtins()  # the ops its second overloads replaced (torch.jit.script would mistake objects for them)

_DECOMPOSED = torch.ops.quantized_decomposed
QUANTIZE = _DECOMPOSED.quantize_per_tensor.default  # (x, scale, zero_point, q_min, q_max, dtype)
DEQUANTIZE = _DECOMPOSED.dequantize_per_tensor.default  # (q, scale, zero_point, q_min, q_max, dtype)
DEQUANTIZE_WEIGHT = _DECOMPOSED.dequantize_per_channel.default  # (q, scales, zero_points, axis, q_min, q_max, dtype)
QUANTIZATION_OPS = frozenset({QUANTIZE, DEQUANTIZE, DEQUANTIZE_WEIGHT})
_BYTE_TYPES = (torch.uint8, torch.int8)


def quantize(x: torch.Tensor, scale: float, zero_point: int, q_min: int, q_max: int,
             dtype: torch.dtype) -> torch.Tensor:
    """:data:`QUANTIZE`'s numbers, ``clamp(round(x * (1 / s)) + z, q_min, q_max)`` as torch's ``_decomposed.py``
    computes them, with one new float32 tensor instead of four: 3.7x faster with :func:`dequantize` on a
    batch of 16 activations, where the accuracy guard's runs of the graph on torch's ops spent 29% of int8's
    compile in the two."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.dtype != torch.float32:
        return QUANTIZE(x, scale, zero_point, q_min, q_max, dtype)  # (its error)
    return (x * (1.0 / scale)).round_().add_(zero_point).clamp_(q_min, q_max).to(dtype)


def dequantize(q: torch.Tensor, scale: float, zero_point: int, q_min: int, q_max: int, dtype: torch.dtype, *,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """:data:`DEQUANTIZE`'s numbers, ``(q - z) * s`` in ``out_dtype`` (float32 unless given), on one new tensor."""
    if q.dtype != dtype or dtype not in _BYTE_TYPES:
        return DEQUANTIZE(q, scale, zero_point, q_min, q_max, dtype, out_dtype=out_dtype)  # (its error)
    return q.to(out_dtype or torch.float32).sub_(zero_point).mul_(scale)


PYTHON_IMPLS.update({QUANTIZE: quantize, DEQUANTIZE: dequantize})  # what graphs run on torch's ops call

VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
SMALLEST_SCALE = torch.finfo(torch.float32).tiny  # a scale's floor: its inverse (``1 / s``, quantizing) is finite


@dataclass(frozen=True)
class TensorQuant:
    """One activation's quantization: ``x ~= scale * (q - zero_point)``, ``q`` a ``dtype`` (uint8 or int8)."""

    scale: float
    zero_point: int
    dtype: torch.dtype

    @property
    def bounds(self) -> tuple[int, int]:
        info = torch.iinfo(self.dtype)
        return info.min, info.max

    def node_args(self) -> tuple:
        """The arguments after the tensor of a quantize or dequantize node."""
        return (self.scale, self.zero_point, *self.bounds, self.dtype)

    @classmethod
    def of_node(cls, node) -> "TensorQuant":
        """Read back from a quantize or dequantize node's arguments."""
        _, scale, zero_point, _, _, dtype = node.args[:6]
        return cls(float(scale), int(zero_point), dtype)


@cache
def vnni() -> bool:
    """Whether the CPU multiplies u8 x s8 into 32 bits in one instruction (AVX-512 VNNI, AVX-VNNI or AMX int8)."""
    return bool(set(VNNI_FLAGS) & kernel_flags())


def weight_max(src_dtype: torch.dtype = torch.uint8, convolution: bool = False) -> int:
    """The largest |q_W| of an op reading ``src_dtype`` activations: 127 with VNNI; without, 63, and 126 (in
    steps of :func:`weight_step`) for a convolution reading s8 (see the module docstring)."""
    if vnni():
        return 127
    return 63 * weight_step(src_dtype, convolution)


def weight_step(src_dtype: torch.dtype = torch.uint8, convolution: bool = False) -> int:
    """The step between the int8 weight values of an op: 2 for a convolution reading s8 without VNNI, else 1."""
    return 2 if convolution and src_dtype == torch.int8 and not vnni() else 1


SEVEN_BIT_WEIGHTS = "7-bit weights"  # what the note says of weights quantized for AVX2's kernels


def int8_note(saved_seven_bit: bool = False) -> str:
    """What ``opt.notes`` says about the int8 kernels this CPU gets; ``saved_seven_bit``: of a program loaded
    here whose weights were quantized to 7 bits on a CPU without VNNI (these kernels run them as they are)."""
    weights = (f"{SEVEN_BIT_WEIGHTS}, as quantized on the CPU it was saved on, which had no VNNI: optimize again "
               "here for 8-bit ones") if saved_seven_bit else "8-bit weights"
    if "amx_int8" in kernel_flags():
        return f"int8: oneDNN's AMX int8 kernels ({weights})"
    if vnni():
        return f"int8: oneDNN's VNNI int8 kernels ({weights})"
    return (f"int8: no VNNI here{isa_limit_note()}: oneDNN's AVX2 int8 kernels, with {SEVEN_BIT_WEIGHTS} so that their "
            "16-bit intermediate sums cannot saturate (-63..63; a convolution reading s8 gets them doubled: oneDNN halves those)")


def quantize_weight(weight: torch.Tensor, src_dtype: torch.dtype = torch.uint8,
                    convolution: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q_W int8, s_W float32 per output channel)`` of a float32 weight (output channels first), for an op
    reading ``src_dtype`` activations: values up to :func:`weight_max` in steps of :func:`weight_step`."""
    step = weight_step(src_dtype, convolution)
    levels = weight_max(src_dtype, convolution) // step
    observer = torch.ao.quantization.PerChannelMinMaxObserver(
        ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-levels, quant_max=levels,
        eps=SMALLEST_SCALE)  # (its default, float32's eps, made weights under ~1e-5 all 0)
    observer(weight.detach())
    scales, _ = observer.calculate_qparams()
    scales = scales.to(torch.float32)
    zero_points = torch.zeros(scales.shape, dtype=torch.int64)
    q = _DECOMPOSED.quantize_per_channel(weight.detach(), scales, zero_points, 0, -levels, levels, torch.int8)
    return q * step, scales / step
