"""How pyrys measures agreement with eager PyTorch, and where a disagreement comes from.

    relative_error(y, y_eager) = max |y - y_eager| / max |y_eager|

The stated fp32 tolerance is ``FP32_TOLERANCE = 1e-4``: the largest deviation may be
at most 1e-4 of the output's magnitude.  Nested outputs (tuples, dicts) are compared
leaf by leaf and the worst leaf counts.  Where both hold the same infinity, or both a NaN,
they agree; a NaN on one side only is an infinite error (so ``error > budget`` holds and ``max`` keeps
it); the magnitude is that of the finite values (however small: an output of 1e-14 is measured against
1e-14), or :data:`ZERO_SCALE` where they are all 0; an empty tensor agrees with itself.

``optimize(..., numerics=True)`` measures this after every pass and for every layer of the
backend's program (``trace.py``, ``layers.py``; the result is ``opt.numerics``, a
:class:`~pyrys.numerics.report.NumericsReport`); :func:`pyrys.bisect` names the first pass
that crosses a tolerance (``bisect.py``).
"""
from __future__ import annotations

import numbers

import torch
from torch.utils._pytree import MappingKey, tree_flatten_with_path, tree_leaves

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 3e-2  # bfloat16 keeps 8 bits of mantissa: ~4e-3 per stored value, compounding over layers
INT8_TOLERANCE = 5e-2  # 8-bit activations and weights: OpenVINO int8 errs 1.5-2.8e-2 on torchvision CNNs
ZERO_SCALE = 1e-12  # what an output of zeros is measured against: its differences are absolute ones, over this
TOLERANCES = {"fp32": FP32_TOLERANCE, "bf16": BF16_TOLERANCE, "int8": INT8_TOLERANCE}  # by ``optimize(precision=...)``


def in_dtypes_of(outputs: list, expected: list) -> list:
    """Flat ``outputs`` with each floating-point tensor in the dtype of ``expected``'s at its place (outputs
    asked for in another ``output_dtype``, compared as eager's); as they are where the two differ in number."""
    if len(outputs) != len(expected):  # another structure: relative_error says so
        return outputs
    return [out.to(want.dtype) if isinstance(out, torch.Tensor) and isinstance(want, torch.Tensor)
            and out.is_floating_point() and want.is_floating_point() else out for out, want in zip(outputs, expected)]


def _leaf_error(actual, expected) -> float:
    """One leaf's error: a tensor's (floating or complex: relative, as above; other dtypes: 0 or 1, exact), a
    Python number's as a 0-d tensor's; any other value must be equal (``AssertionError`` otherwise)."""
    if not isinstance(expected, torch.Tensor) and not isinstance(actual, torch.Tensor):
        pair = (actual, expected)  # Python's numbers and NumPy's scalars
        if all(isinstance(v, numbers.Integral) for v in pair):
            return float(actual != expected)
        if all(isinstance(v, numbers.Number) for v in pair):
            convert, wide = (float, torch.float64) if all(isinstance(v, numbers.Real) for v in pair) \
                else (complex, torch.complex128)
            return _leaf_error(torch.tensor(convert(actual), dtype=wide), torch.tensor(convert(expected), dtype=wide))
        if actual == expected:
            return 0.0
        raise AssertionError(f"output value differs: {actual!r} vs eager's {expected!r}")
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        raise AssertionError(f"output type differs: {type(actual).__name__} vs eager's {type(expected).__name__}")
    actual, expected = actual.detach(), expected.detach()
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(f"output type differs: {actual.dtype}{tuple(actual.shape)} "
                             f"vs eager {expected.dtype}{tuple(expected.shape)}")
    if not (expected.is_floating_point() or expected.is_complex()):
        return float((actual != expected).any())
    if expected.numel() == 0:
        return 0.0
    if not expected.is_complex():
        fast = _finite_error(actual, expected)
        if fast is not None:
            return fast
    wide = torch.complex128 if expected.is_complex() else torch.float64
    actual, expected = actual.to(wide), expected.to(wide)
    finite = expected[expected.isfinite()].abs()
    scale = finite.max() if finite.numel() else finite.new_tensor(1.0)
    scale = scale if scale > 0 else scale.new_tensor(ZERO_SCALE)
    difference = (actual / scale - expected / scale).abs()  # scaled first: 1e308 - -1e308 is no overflow
    agree = (actual == expected) | (actual.isnan() & expected.isnan())  # the same inf, or NaN in both
    # NaN on one side only, or an infinity the other side lacks: inf (nan_to_num would make that FLT64_MAX)
    difference = difference.masked_fill(agree, 0.0).nan_to_num(nan=float("inf"), posinf=float("inf"))
    return float(difference.max())


def _finite_error(actual: torch.Tensor, expected: torch.Tensor) -> float | None:
    """:func:`_leaf_error` of two real tensors both finite everywhere (None otherwise): ``max |a - e|`` (in float64:
    exact for float32 and narrower) over ``max |e|``, in four passes over the data and one float64 copy, where the general case
    takes about fifteen and ten (the int8 guard measures every op's result: 10% of its compile at batch 16)."""
    if not (torch.isfinite(actual.sum()) and torch.isfinite(expected.sum())):
        return None  # (a sum overflowing from finite values takes the general case too: it is right for both)
    scale = float(torch.linalg.vector_norm(expected, float("inf")))
    if 0 < scale < 1e-290:
        return None  # float64 values whose difference is subnormal, its bits lost: scaled first there
    difference = float(torch.linalg.vector_norm(actual.to(torch.float64, copy=True).sub_(expected), float("inf")))
    if difference == float("inf"):
        return None  # float64 values whose difference overflows (1e308 and -1e308): scaled first there
    return difference / (scale if scale > 0 else ZERO_SCALE)


def relative_error(actual, expected) -> float:
    """Worst relative error over the leaves of two outputs of the same structure, paired by place (a dict's
    by key, in any order); ``AssertionError`` where the structures, a leaf's type or a non-number differ."""
    got, want = _leaves_by_place(actual), _leaves_by_place(expected)
    if got.keys() != want.keys():
        missing, extra = [_path(p) for p in want if p not in got], [_path(p) for p in got if p not in want]
        raise AssertionError(f"output structure differs: {len(got)} leaves vs eager's {len(want)}"
                             + (f"; eager's {', '.join(missing[:4])} missing" if missing else "")
                             + (f"; {', '.join(extra[:4])} not in eager's" if extra else ""))
    return max((_leaf_error(got[place], want[place]) for place in want), default=0.0)


def _leaves_by_place(tree) -> dict:
    try:
        leaves, _ = tree_flatten_with_path(tree)
    except ValueError:  # a class registered with torch's pytree without key paths: its leaves in order
        return {(f"[{i}]",): leaf for i, leaf in enumerate(tree_leaves(tree))}
    return {tuple(_place(key) for key in path): leaf for path, leaf in leaves}


def _path(places: tuple) -> str:
    return "".join(str(place) for place in places) or "the output"


def _place(key):
    """A path entry as a hashable: a dict key itself, any other entry by its text."""
    return key if isinstance(key, MappingKey) and isinstance(key.key, (str, int)) else str(key)


def error_or_reason(actual, expected) -> tuple[float, str]:
    """``(relative_error, "")``, or ``(inf, why)`` when the two cannot be compared (structure, shape, dtype)."""
    try:
        return relative_error(actual, expected), ""
    except AssertionError as error:
        return float("inf"), str(error)


def checked_tolerance(tolerance: object, caller: str) -> float:
    """``tolerance`` as a float; ``ValueError`` naming ``caller`` unless it is a non-negative number."""
    if not isinstance(tolerance, numbers.Real) or isinstance(tolerance, bool) or not tolerance >= 0:
        raise ValueError(f"{caller}: tolerance must be a non-negative number, got {tolerance!r}")
    return float(tolerance)
