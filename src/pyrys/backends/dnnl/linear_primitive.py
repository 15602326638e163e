"""Which oneDNN primitive a bfloat16 or int8 linear runs as: an inner product, or a matmul.

oneDNN 3.2's inner product handles a row count that is not a multiple of its blocking, and large
ones, far worse than its matmul on the same brgemm kernels; a linear with at least
:data:`MATMUL_MIN_ROWS` rows runs as ``matmul(x, W^T)`` where the CPU runs these types natively.
Measured per primitive (Sapphire Rapids, 2 threads, weights in the layout each asks for;
matmul / inner product time), rows x in -> out:

==================  ==========  ==========  ============================  ===========
rows x in -> out    bf16 (AMX)  u8s8 (AMX)  bf16 (AVX-512 BF16, no AMX)   u8s8 (VNNI)
==================  ==========  ==========  ============================  ===========
3152 x 768 -> 3072  0.39        0.44        0.99                          0.73
197 x 768 -> 3072   0.66        0.62        0.78                          0.72
197 x 3072 -> 768   0.65        0.71        0.77                          0.74
128 x 768 -> 2304   1.02        0.80        1.01                          0.99
64 x 768 -> 3072    0.99        0.95        1.03                          0.99
16 x 768 -> 3072    0.99        1.05        1.02                          1.04
1 x 2048 -> 1000    0.97        1.17        0.96                          1.07
==================  ==========  ==========  ============================  ===========

From 64 rows on the matmul ties or wins; below, it ties or loses (int8 up to 1.17).  float32 is left
to :mod:`linear_kernels` (the two tie within 0.97-1.07 on AVX-512).  The rule is fixed, not measured,
so that a saved program rebuilds the same kernels.  A weight already packed for one primitive keeps it
for every later shape (packed once): the first shape built decides, so a 1-row shape compiled after a
197-row one runs as a matmul too (at most 1.17x, the table's worst).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pyrys.machine import native_bf16
from pyrys.quantization import vnni

if TYPE_CHECKING:
    from pyrys.backends.dnnl.builder import PackedWeights

MATMUL_MIN_ROWS = 64


def packed_for_matmul(weight: torch.Tensor, packed: "PackedWeights") -> bool:
    """Whether ``weight`` (``[out, in]``) is packed already as a matmul's ``W^T``, in any layout.  A ``1 x 1``
    weight is its own transpose, the same bytes, shape and strides: packed, it is taken as the inner product's
    ``W`` it was packed for."""
    return weight.dim() == 2 and weight.shape != (1, 1) and bool(packed.layouts_of(weight.t(), plain=True))


def as_matmul(rows: int, weight: torch.Tensor, packed: "PackedWeights") -> bool:
    """Whether a linear of ``rows`` rows reading ``weight`` (bf16, or int8 after quantization) runs as a
    oneDNN matmul on ``W^T`` rather than an inner product on ``W`` (module docstring)."""
    if weight.dim() != 2:
        return False
    if packed_for_matmul(weight, packed):
        return True
    if packed.layouts_of(weight) or rows < MATMUL_MIN_ROWS:
        return False
    if weight.dtype == torch.bfloat16:
        return native_bf16()
    return weight.dtype == torch.int8 and vnni()
