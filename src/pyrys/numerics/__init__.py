"""How pyrys measures agreement with eager PyTorch, and where a disagreement comes from.

    relative_error(y, y_eager) = max |y - y_eager| / max |y_eager|

The stated fp32 tolerance is ``FP32_TOLERANCE = 1e-4``: the largest deviation may be
at most 1e-4 of the output's magnitude.  Nested outputs (tuples, dicts) are compared
leaf by leaf and the worst leaf counts.  Where both hold the same infinity, or both a NaN,
they agree; a NaN on one side only is an infinite error (so ``error > budget`` holds and ``max`` keeps
it); the magnitude is that of the finite values; an empty tensor agrees with itself.

``optimize(..., numerics=True)`` measures this after every pass and for every layer of the
backend's program (``trace.py``, ``layers.py``; the result is ``opt.numerics``, a
:class:`~pyrys.numerics.report.NumericsReport`); :func:`pyrys.bisect` names the first pass
that crosses a tolerance (``bisect.py``).
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_leaves

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2  # bfloat16 keeps 8 bits of mantissa: ~4e-3 per stored value, compounding over layers
INT8_TOLERANCE = 5e-2  # 8-bit activations and weights: OpenVINO int8 errs 1.5-2.8e-2 on torchvision CNNs
TOLERANCES = {"fp32": FP32_TOLERANCE, "bf16": BF16_TOLERANCE, "int8": INT8_TOLERANCE}  # by ``optimize(precision=...)``


def _leaf_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"output type differs: {actual.dtype}{tuple(actual.shape)} "
                             f"vs eager {expected.dtype}{tuple(expected.shape)}")
    if not expected.is_floating_point():
        return float((actual != expected).any())
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.double(), expected.double()
    difference = (actual - expected).abs()
    agree = (actual == expected) | (actual.isnan() & expected.isnan())  # the same inf, or NaN in both
    difference = difference.masked_fill(agree, 0.0).nan_to_num(nan=float("inf"))  # NaN on one side only: inf
    finite = expected[expected.isfinite()].abs()
    scale = (finite.max() if finite.numel() else expected.new_tensor(1.0)).clamp_min(1e-12)
    return float(difference.max() / scale)


def relative_error(actual, expected) -> float:
    """Worst relative error over all tensor leaves of two outputs with the same structure."""
    got, want = tree_leaves(actual), tree_leaves(expected)
    if len(got) != len(want):
        raise AssertionError(f"output structure differs: {len(got)} leaves vs eager's {len(want)}")
    errors = [_leaf_error(a, e) for a, e in zip(got, want) if isinstance(e, torch.Tensor)]
    return max(errors, default=0.0)


def error_or_reason(actual, expected) -> tuple[float, str]:
    """``(relative_error, "")``, or ``(inf, why)`` when the two cannot be compared (structure, shape, dtype)."""
    try:
        return relative_error(actual, expected), ""
    except AssertionError as error:
        return float("inf"), str(error)
