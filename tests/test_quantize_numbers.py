"""pyrys's quantize and dequantize (what graphs on torch's ops call: the accuracy guard's, the reference
backend's) give torch's ``quantized_decomposed`` numbers bit for bit, on any layout, dtype and value."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrys.ir.ops import PYTHON_IMPLS
from pyrys.quantization import DEQUANTIZE, QUANTIZE, dequantize, quantize

_TYPES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _values(seed: int, magnitude: float, scale: float) -> torch.Tensor:
    """Random values, the ties halfway between two steps, both zeros, both infinities, NaN and the extremes."""
    generator = torch.Generator().manual_seed(seed)
    ties = (torch.arange(-300, 300) + 0.5) * scale
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3e38, -3e38, 1e-40])
    return torch.cat([torch.randn(500, generator=generator) * magnitude, ties, special])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), magnitude=st.floats(1e-6, 1e4), divisor=st.floats(100.0, 300.0),
       exact_float32_scale=st.booleans(), dtype=st.sampled_from(sorted(_TYPES, key=str)),
       zero_point=st.integers(0, 255), layout=st.sampled_from(["plain", "transposed", "bf16", "strided"]))
def test_quantize_and_dequantize_give_torchs_numbers(seed, magnitude, divisor, exact_float32_scale, dtype,
                                                      zero_point, layout):
    scale = magnitude * 4 / divisor
    if exact_float32_scale:
        scale = float(torch.tensor(scale, dtype=torch.float32))
    q_min, q_max = _TYPES[dtype]
    zero_point = zero_point if dtype is torch.uint8 else 0
    x = _values(seed, magnitude, scale)
    x = {"plain": x, "transposed": x[:1092].reshape(28, 39).t(), "bf16": x.bfloat16(), "strided": x[::3]}[layout]
    args, before = (scale, zero_point, q_min, q_max, dtype), x.clone()
    q = quantize(x, *args)
    assert torch.equal(q, QUANTIZE(x, *args)) and q.stride() == QUANTIZE(x, *args).stride()
    for out_dtype in (None, torch.float64):
        got, want = dequantize(q, *args, out_dtype=out_dtype), DEQUANTIZE(q, *args, out_dtype=out_dtype)
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(x, before) or torch.equal(x.isnan(), before.isnan())  # the input untouched
    assert torch.equal(x.nan_to_num(), before.nan_to_num())


def test_they_are_what_graphs_on_torchs_ops_call_and_refuse_alike():
    assert PYTHON_IMPLS[QUANTIZE] is quantize and PYTHON_IMPLS[DEQUANTIZE] is dequantize
    with pytest.raises(AssertionError, match="float32"):
        quantize(torch.ones(3, dtype=torch.float64), 0.1, 0, 0, 255, torch.uint8)
    with pytest.raises(AssertionError, match="torch.uint8"):
        dequantize(torch.ones(3, dtype=torch.int8), 0.1, 0, 0, 255, torch.uint8)
