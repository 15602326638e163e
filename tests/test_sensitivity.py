"""The accuracy guards' order (:mod:`pyrys.numerics.sensitivity`): each op's first-order effect on the outputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
from torch import nn

from pyrys.numerics.budget import kept_reason
from pyrys.numerics.sensitivity import Sensitivity, sensitivities


class Chain(nn.Module):
    """``first`` feeds ``amplify`` (its result times 100 in the output), ``second`` goes straight out."""

    def __init__(self):
        super().__init__()
        self.first, self.amplify, self.second = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        with torch.no_grad():
            self.amplify.weight.mul_(100)

    def forward(self, x):
        return self.amplify(self.first(x)) + self.second(x)


def measure(gm: fx.GraphModule, samples, shifts: dict[str, torch.Tensor]) -> Sensitivity:
    """Each op's "rounded" result is its float32 one plus ``shifts[name]`` (a known e_k)."""
    def rounded(name: str, value):
        (node,) = [n for n in gm.graph.nodes if n.name == name]
        module = gm.get_submodule(node.target)
        return module(value(node.args[0])) + shifts[name]

    reads = {node.name for node in gm.graph.nodes if node.op not in ("get_attr", "output")}
    return sensitivities(gm, lambda sample: sample, samples, rounded, set(shifts), reads)


def assert_effects_near(measured: Sensitivity, exact: dict[str, torch.Tensor], y: torch.Tensor) -> None:
    """Each op's effect within [0.5, 1.6] of c ||move||_2 / (sqrt(n) max|y|), ``exact[name]`` its first-order move
    of the output ``y``."""
    for name, moved in exact.items():
        expected = float(moved.norm() / y.abs().max()) * (2 * math.log(y.numel()) / y.numel()) ** 0.5
        assert 0.5 * expected < measured.effect[name] < 1.6 * expected, (name, measured.effect, expected)


def test_the_effect_estimates_the_largest_move_of_the_outputs():
    """effect(k) = c ||J_k e_k||_2 / (sqrt(n) max|y|), c = sqrt(2 ln n): the root mean square of the outputs'
    first-order move (exact here: every op is linear), times where n Gaussian values of it peak, from random
    directions; it is near the budget's measure, the largest move relative to the largest value."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Chain().eval())
    x = torch.randn(4, 8)
    shifts = {"first": 1e-3 * torch.randn(4, 8), "second": 1e-3 * torch.randn(4, 8)}
    measured = measure(gm, [[x]], shifts)
    y = gm(x).detach()
    exact = {"first": shifts["first"] @ gm.amplify.weight.detach().T, "second": shifts["second"]}
    assert_effects_near(measured, exact, y)
    for name, moved in exact.items():
        largest = float(moved.abs().max() / y.abs().max())
        assert 0.4 * largest < measured.effect[name] < 2.5 * largest, (name, measured.effect, largest)
    # own: the same relative error on each (1e-3 of results ~1), yet "first" moves the outputs ~100x more
    assert measured.own["first"] == pytest.approx(measured.own["second"], rel=1)
    assert measured.order() == ["first", "second"]


def test_the_caller_s_random_numbers_are_untouched_and_the_measure_repeats():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Chain().eval())
    x, shifts = torch.randn(4, 8), {"first": torch.full((4, 8), 1e-3), "second": torch.full((4, 8), 1e-3)}
    state = torch.get_rng_state()
    first, again = measure(gm, [[x]], shifts), measure(gm, [[x]], shifts)
    assert torch.equal(torch.get_rng_state(), state)
    assert first == again


class WritesWhatBackwardReads(nn.Module):
    """``exp`` keeps its result for its derivative, which the in-place add then changes: no backward pass."""

    def __init__(self):
        super().__init__()
        self.small, self.large = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.small(x).exp()
        y.add_(1)
        return y + self.large(x)


def test_a_graph_without_a_derivative_is_ordered_by_own_error_and_says_so():
    torch.manual_seed(0)
    gm = fx.symbolic_trace(WritesWhatBackwardReads().eval())
    x = torch.randn(4, 8)
    measured = measure(gm, [[x], [x + 1]], {"small": torch.full((4, 8), 1e-4), "large": torch.full((4, 8), 1e-1)})
    assert measured.effect is None
    assert measured.order() == ["large", "small"]
    reason = kept_reason("int8", measured, "large", 0.2, 0.01, "the samples", 1)
    assert "int8 moves its own result by" in reason and "the op that moves its own the most" in reason
    assert "outputs by" not in reason


def test_a_measure_under_inference_mode_is_the_same():
    """Under ``torch.inference_mode`` (a caller compiling in it, its inputs made in it) grad mode records nothing:
    the effects were all 0 there."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Chain().eval())
    x, shifts = torch.randn(4, 8), {"first": torch.full((4, 8), 1e-3), "second": torch.full((4, 8), 1e-3)}
    outside = measure(gm, [[x]], shifts)
    with torch.inference_mode():
        inside = measure(gm, [[x.clone()]], shifts)
    assert inside == outside and min(inside.effect.values()) > 0


class BigAndSmall(nn.Module):
    """``big`` makes 8192 outputs and moves each a little; ``small`` makes 2 and moves them a lot (relative)."""

    def __init__(self):
        super().__init__()
        self.big, self.small = nn.Linear(8, 8192), nn.Linear(8, 2)

    def forward(self, x):
        return self.big(x), self.small(x)


def test_an_op_that_moves_a_large_output_a_little_comes_after_one_that_moves_a_small_one_a_lot():
    """The budget's measure is each output's largest move relative to its largest value: a norm over every value
    put ``big`` (3e-3 of each of 8192 outputs) before ``small`` (5e-2 of 2) (a helper's find)."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(BigAndSmall().eval())
    x = torch.randn(4, 8)
    y_big, y_small = (y.detach() for y in gm(x))
    shifts = {"big": 3e-3 * y_big.abs().max() * torch.randn(4, 8192).clamp(-1, 1),
              "small": 5e-2 * y_small.abs().max() * torch.randn(4, 2).clamp(-1, 1)}
    measured = measure(gm, [[x]], shifts)
    assert measured.order() == ["small", "big"], measured
    assert measured.effect["big"] < 1e-2 < measured.effect["small"] < 0.2, measured


class Decides(nn.Module):
    """``classify``'s result reaches the output only through an argmax (an index into ``table``): no derivative."""

    def __init__(self):
        super().__init__()
        self.classify, self.other, self.table = nn.Linear(8, 16), nn.Linear(8, 4), nn.Embedding(16, 4)

    def forward(self, x):
        return self.table(self.classify(x).argmax(-1)) + self.other(x)


def test_an_op_no_derivative_reaches_takes_its_own_error_as_its_effect():
    """Ordered by a first-order effect of 0, an op that decides an argmax came last: the guard kept every op
    before it (a helper's find).  Its effect is its own error now, and its reason says why."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Decides().eval())
    x = torch.randn(4, 8)
    measured = measure(gm, [[x]], {"classify": torch.full((4, 16), 0.5), "other": torch.full((4, 4), 1e-4)})
    assert measured.underived == {"classify"} and measured.effect["classify"] == measured.own["classify"] > 0
    assert measured.order() == ["classify", "other"]
    reason = kept_reason("bf16", measured, "classify", 0.2, 0.01, "the samples", 1)
    assert "no finite derivative of the outputs reaches it" in reason and "the op that moves the outputs the most" in reason


class Weighted(nn.Module):
    """``first`` and ``second`` read constants (get_attr nodes, as a captured graph's weights are)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w1", torch.randn(8, 8))
        self.register_buffer("w2", torch.randn(8, 8))

    def forward(self, x):
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.w1), self.w2)


def test_constants_made_under_inference_mode_are_measured():
    """A model built and compiled under ``torch.inference_mode``: its constants are inference tensors, which
    autograd cannot save (the measure fell back to own errors; a helper's find)."""
    torch.manual_seed(0)
    with torch.inference_mode():
        gm = fx.symbolic_trace(Weighted().eval())
        x = torch.randn(4, 8)
        names = [node.name for node in gm.graph.nodes if node.op == "call_function"]

        def rounded(name, value):
            (node,) = [n for n in gm.graph.nodes if n.name == name]
            return torch.nn.functional.linear(value(node.args[0]), value(node.args[1])) + 1e-3

        reads = {node.name for node in gm.graph.nodes if node.op != "get_attr"}
        inside = sensitivities(gm, lambda sample: sample, [[x]], rounded, set(names), reads)
    assert inside.effect is not None and min(inside.effect.values()) > 0, inside


class DecidesBeside(nn.Module):
    """``classify`` feeds an integer output only (an argmax beside a floating-point one)."""

    def __init__(self):
        super().__init__()
        self.classify, self.other = nn.Linear(8, 16), nn.Linear(8, 4)

    def forward(self, x):
        return self.other(x), self.classify(x).argmax(-1)


def test_an_op_only_an_unmeasured_integer_output_is_computed_from_has_no_effect():
    """The budget measures the floating-point outputs alone where there are some: an op that only the argmax
    beside them reads moves nothing it measures (taken to move them by its own error, it was kept for nothing;
    a helper's find)."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(DecidesBeside().eval())
    measured = measure(gm, [[torch.randn(4, 8)]], {"classify": torch.full((4, 16), 0.5), "other": torch.full((4, 4), 1e-4)})
    assert measured.underived == frozenset() and measured.effect["classify"] == 0.0 < measured.effect["other"]
    assert measured.order() == ["other", "classify"]


class SquareRootAtZero(nn.Module):
    """``first`` reaches the output through a square root at 0: a derivative of inf * 0, NaN."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return torch.sqrt(self.first(x) * 0) + self.second(x)


def test_an_op_behind_a_nan_derivative_takes_its_own_error_as_its_effect():
    """A NaN derivative is no first-order estimate: it made the op's effect infinite, first in the order (and kept
    for nothing; a helper's find)."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(SquareRootAtZero().eval())
    measured = measure(gm, [[torch.randn(4, 8)]], {"first": torch.full((4, 4), 1e-3), "second": torch.full((4, 4), 1e-3)})
    assert measured.underived == {"first"} and measured.effect["first"] == measured.own["first"] < 1
    assert 0 < measured.effect["second"] < 1


class ThroughASplit(nn.Module):
    """``first``'s result reaches ``second`` through ``chunk`` (a tuple, then its items) and the output beside it."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 16), nn.Linear(8, 8)
        with torch.no_grad():
            self.second.weight.mul_(100)

    def forward(self, x):
        a, b = self.first(x).chunk(2, -1)
        return self.second(a) + b


def test_a_result_is_followed_through_values_that_hold_several_tensors():
    """The backward passes run to the measured results no other comes before and take the rest's gradients on
    the way: ``second`` reads ``first``'s through a split, so it is not one of those (made one, it would cut
    ``first``'s path through it: its effect 100x too small)."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(ThroughASplit().eval())
    x = torch.randn(4, 8)
    shifts = {"first": 1e-3 * torch.randn(4, 16), "second": 1e-3 * torch.randn(4, 8)}
    measured = measure(gm, [[x]], shifts)
    w = gm.second.weight.detach()
    exact = {"first": shifts["first"][:, :8] @ w.T + shifts["first"][:, 8:], "second": shifts["second"]}
    assert_effects_near(measured, exact, gm(x).detach())
    assert measured.order() == ["first", "second"] and not measured.underived


class WritesResultsInPlace(nn.Module):
    """``first``'s result goes through an in-place relu, ``second``'s is tripled in place before ``third``."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.third = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.second(self.relu(self.first(x)))
        return self.third(y.mul_(3))


def test_results_written_in_place_are_measured_at_their_own_values():
    """The gradient at a measured result is taken where the op made it: an in-place write after it (ReLU's
    ``inplace=True``, a scaling) neither stops the measure (the first result a leaf that the relu could not
    write: every op ordered by its own error) nor hands the op the gradient after the write (3x too small)."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(WritesResultsInPlace().eval())
    x = torch.randn(4, 8)
    shifts = {name: 1e-3 * torch.randn(4, 8) for name in ("first", "second", "third")}
    measured = measure(gm, [[x]], shifts)
    assert measured.effect is not None and not measured.underived
    w = {name: getattr(gm, name).weight.detach() for name in shifts}
    passes = (gm.first(x) > 0).float()  # where the relu lets first's move through
    exact = {"first": 3 * ((shifts["first"] * passes) @ w["second"].T) @ w["third"].T,
             "second": 3 * shifts["second"] @ w["third"].T, "third": shifts["third"]}
    assert_effects_near(measured, exact, gm(x.clone()).detach())


class CopiesInto(nn.Module):
    """``first``'s result reaches ``second`` only through an in-place copy into another tensor (no graph edge)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)
        with torch.no_grad():
            self.second.weight.mul_(100)

    def forward(self, x):
        buffer = torch.zeros(4, 8)
        buffer.copy_(self.first(x))
        return self.second(buffer)


def test_a_result_copied_into_another_tensor_is_followed():
    """What starts a derivative is read off the tensors, not the graph's edges: ``second`` reads no node
    computed from ``first``, yet its input requires grad through the copy (followed by edges, ``second``
    started its own and ``first`` moved nothing: a reviewer's find)."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(CopiesInto().eval())
    x = torch.randn(4, 8)
    shifts = {"first": 1e-3 * torch.randn(4, 8), "second": 1e-3 * torch.randn(4, 8)}
    measured = measure(gm, [[x]], shifts)
    exact = {"first": shifts["first"] @ gm.second.weight.detach().T, "second": shifts["second"]}
    assert_effects_near(measured, exact, gm(x).detach())
    assert measured.order() == ["first", "second"]
