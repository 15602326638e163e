"""Whether an int8 linear runs on oneDNN's int8 kernel here, or in float32 on the same numbers.

Without VNNI oneDNN's int8 kernels multiply u8 x s8 pairs into 16 bits, and on some such CPUs that is
slower than their float32 kernel: AMD EPYC Zen 1, 2 threads, 128 x 768 -> 3072, int8 21.4 ms
(``gemm_s8u8s32``) against float32 8.6 ms (``brgemm:avx2``); BERT-base int8 2.3x its float32 time.  On a
Zen 3, with the same ISA flags, int8 is the faster (RESULTS.md): it is the microarchitecture's, so it is
measured.  Where the CPU has no VNNI, each int8 linear is timed once per shape against float32 (no post-ops,
buffers of constant bytes: :func:`measured.best_seconds`); where float32 takes at most :data:`FASTER` of
int8's time it runs in float32 on the numbers the graph names,

    y = post_ops((s_x q_x) (s_W[o] q_W)^T + b)

its input the dequantized int8 value, its weight ``s_W[o] q_W`` made once in float32: the int8 op's answer
up to float32's rounding of the sums (which can move a value written in int8 for the next layer by one step
where it lies at a rounding tie: within int8's own error, which calibration and the accuracy guard measured).
The times are the two kernels' alone; the float32 one also costs a reorder of its int8 input to float32 (and
a quantize of its result where the next op reads int8), a few percent at these sizes, which :data:`FASTER`
leaves room for.  The choice is kept in the tuning cache (kind ``int8_linear``) under the shape, the source
type, the thread count and the CPU.  The first build reading a weight chooses for it (:class:`~pyrys.backends.dnnl.builder.Int8Form`):
every later shape, thread count and layout candidate keeps that form, in int8 or on its one float32 copy,
and notes the choice in its program's ``kernel_choices``, which a save keeps (a load runs what was saved).
With VNNI (AVX-512 VNNI, AVX-VNNI, AMX) an int8 lane does four products where float32's does one: nothing
is measured.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from pyrys.backends.dnnl.binding import DnnlError
from pyrys.backends.dnnl.constants import ARG_ATTR_SCALES, ARG_SRC, ARG_WEIGHTS
from pyrys.backends.dnnl.descriptors import inner_product_pd
from pyrys.backends.dnnl.layout import any_md, plain_md
from pyrys.backends.dnnl.linear_primitive import packed_for_matmul
from pyrys.backends.dnnl.measured import decide, filled_memory, inner_product_seconds, machine_key
from pyrys.backends.dnnl.primitives import PrimitiveAttr
from pyrys.ir.released import values_of
from pyrys.quantization import vnni

if TYPE_CHECKING:
    from pyrys.backends.dnnl.builder import Builder
    from pyrys.backends.dnnl.lower_int8 import Int8Op

FASTER = 0.95  # float32 is chosen where it takes at most this fraction of the int8 kernel's time
RUNS = 7  # calls of each kernel, interleaved (fewer where they are long); the best counts
FIELDS = {"float32": bool, "measured": str}  # what a choice holds (:func:`measured.decide`)
MAX_WEIGHT = 1 << 26  # larger weights are not measured (a copy of each form is timed): they stay int8


def float32_instead(builder: "Builder", int8: "Int8Op", rows: int, has_bias: bool) -> str:
    """Why the int8 linear ``int8`` of ``rows`` rows runs in float32 here ("": it runs in int8); see the
    module docstring.  The choice is noted in ``builder.kernel_choices`` (saved with the program) by every
    build that follows it, the first one's and those of later shapes, thread counts and layout candidates."""
    if vnni() or int8.weight.dim() != 2:
        return ""
    form = builder.packed.int8_form(int8.weight, int8.weight_scales)
    if form is None:
        if builder.packed.layouts_of(int8.weight, plain=True) or packed_for_matmul(int8.weight, builder.packed):
            return ""  # packed in int8 already, nothing chosen (not measured: its choice was let go)
        if int8.weight.numel() > MAX_WEIGHT:
            return ""
        memo, choice = decide("int8_linear", _key(int8, rows, has_bias),
                              lambda: _measure(builder, int8, rows, has_bias), FIELDS)
        if choice is None:
            return ""
        form = builder.packed.choose_int8_form(int8.weight, int8.weight_scales, memo, choice)
    builder.kernel_choices[form.memo] = form.choice
    if not form.choice["float32"]:
        return ""
    return f"measured slower in int8 here ({form.choice['measured']})"  # (at the rows of the first shape built)


def _key(int8: "Int8Op", rows: int, has_bias: bool) -> dict:
    out_features, in_features = int8.weight.shape
    return {"rows": rows, "weight": [out_features, in_features], "src": _SRC[int8.src_quant.dtype], "bias": has_bias,
            "runs": RUNS, "faster": FASTER, **machine_key(torch.get_num_threads())}  # the program's thread count


_SRC = {torch.uint8: "u8", torch.int8: "s8"}


def _measure(builder: "Builder", int8: "Int8Op", rows: int, has_bias: bool) -> dict | None:
    out_features, in_features = int8.weight.shape
    try:
        int8_seconds, float_seconds = _seconds(builder, rows, out_features, in_features, _SRC[int8.src_quant.dtype],
                                               has_bias)
    except DnnlError:
        return None
    return {"float32": float_seconds <= FASTER * int8_seconds,
            "measured": f"{rows} rows: int8 {int8_seconds * 1e3:.3f} ms, float32 {float_seconds * 1e3:.3f} ms"}


IN_FLOAT32 = ", int8=[in float32: "  # how a program line says it (``lower_conv.lower_linear``)


def note(step_texts: list[str]) -> str:
    """What ``opt.notes`` says of a program whose int8 linears some run in float32 ("" where none does)."""
    moved = sum(IN_FLOAT32 in text for text in step_texts)
    if not moved:
        return ""
    count = moved + sum(", int8=[src=" in text and "dnnl::linear" in text for text in step_texts)
    return (f"precision='int8': {moved} of the {count} int8 linears run in float32 on their int8 numbers (the "
            "dequantized input and weight), where oneDNN's int8 kernel was measured slower on "
            "this CPU (no VNNI; each one's times in the program text)")


def float_weight(builder: "Builder", dequantize: fx.Node, int8: "Int8Op") -> torch.Tensor:
    """The float32 weight ``s_W[o] q_W`` of an int8 linear (``dequantize``: its weight's node), computed as
    the graph computes it, once: every program reads the same tensor, so it is packed once."""
    def make() -> torch.Tensor:
        # (values_of, not builder.constant_values: that marks a constant read as it is, never released)
        q, scales, zero_points = (values_of(builder.constant(a)) for a in dequantize.args[:3])
        return dequantize.target(q, scales, zero_points, *dequantize.args[3:]).contiguous()

    return builder.packed.float_copy(builder.packed.int8_form(int8.weight, int8.weight_scales), make)


def _seconds(builder: "Builder", rows: int, out_features: int, in_features: int, src: str,
             has_bias: bool) -> list[float]:
    """The best times of the int8 inner product (scales per output channel) and of the float32 one, each in
    the weight layout oneDNN picks (:func:`measured.inner_product_seconds`)."""
    engine = builder.engine
    src_dtype = torch.uint8 if src == "u8" else torch.int8
    bias_md = plain_md([out_features], torch.float32) if has_bias else None
    candidates = []
    for x_dtype, w_dtype, scales in ((src_dtype, torch.int8, {ARG_SRC: 0, ARG_WEIGHTS: 1}),
                                     (torch.float32, torch.float32, {})):
        pd = inner_product_pd(engine, plain_md([rows, in_features], x_dtype),
                              any_md([out_features, in_features], w_dtype), plain_md([rows, out_features], torch.float32),
                              bias_md, attr=PrimitiveAttr(scales=scales))
        further = {ARG_ATTR_SCALES | ARG_SRC: filled_memory(engine, plain_md([1], torch.float32)),
                   ARG_ATTR_SCALES | ARG_WEIGHTS: filled_memory(engine, plain_md([out_features], torch.float32))
                   } if scales else {}  # (the int8 one's runtime scales)
        candidates.append((pd, has_bias, further))
    return inner_product_seconds(engine, candidates, RUNS)
