"""The accuracy budget both lower precisions keep: its search, its default, and bad values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyrys
from pyrys.numerics import BF16_TOLERANCE, INT8_TOLERANCE
from pyrys.numerics.bisect import checked_tolerance
from pyrys.numerics.budget import budget_for, check_budget, fewest, max_error
from tests.models import conv_bn_relu, image


@given(count=st.integers(1, 300), data=st.data())
def test_fewest_finds_the_threshold_in_a_logarithmic_number_of_asks(count, data):
    threshold = data.draw(st.integers(1, count))
    asked = []

    def holds(k: int) -> bool:
        asked.append(k)
        return k >= threshold

    assert fewest(count, holds) == threshold
    assert all(1 <= k <= count for k in asked) and len(set(asked)) == len(asked)  # each k asked once at most
    assert len(asked) <= 2 * math.ceil(math.log2(threshold + 1)) + 1


def test_fewest_does_not_ask_beyond_one_when_one_holds():
    asked = []
    assert fewest(50, lambda k: asked.append(k) or True) == 1 and asked == [1]


def test_the_default_budget_is_each_precisions_tolerance():
    assert budget_for("bf16", "auto") == BF16_TOLERANCE and budget_for("int8", "auto") == INT8_TOLERANCE
    assert budget_for("fp32", "auto") is None and budget_for("bf16", None) is None
    assert budget_for("int8", 1e-3) == 1e-3


def test_a_numpy_budget_and_tolerance_are_numbers():
    check_budget(np.float32(1e-2))  # was refused as not "a finite positive number"
    assert checked_tolerance(np.float32(1e-4), "pyrys.bisect") == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="must be a finite positive number"):
        check_budget(np.float32("nan"))


@pytest.mark.parametrize("budget", [0, -1.0, "1e-2", True, float("nan"), float("inf")])
def test_a_bad_budget_is_refused(budget):
    with pytest.raises(ValueError, match="accuracy_budget must be a finite positive number, 'auto' or None"):
        pyrys.optimize(conv_bn_relu(), (image(),), precision="bf16", accuracy_budget=budget)


def test_a_nan_output_breaks_any_budget():
    """A trial whose outputs hold NaN is over every budget (``max`` alone would skip a NaN error)."""
    expected = [[torch.ones(3)], [torch.ones(3)]]
    samples = [[0], [1]]

    def program(sample):
        return [torch.tensor([1.0, float("nan"), 1.0])] if sample[0] == 1 else [torch.ones(3)]

    assert max_error(program, samples, expected) == float("inf")
    assert max_error(program, samples, expected, limit=1e-2) == float("inf")
    assert max_error(lambda sample: [torch.ones(3)], samples, expected) == 0.0
