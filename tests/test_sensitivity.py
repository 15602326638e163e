"""The accuracy guards' order (:mod:`pyrys.numerics.sensitivity`): each op's first-order effect on the outputs."""
from __future__ import annotations

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

    reads = {node.name for node in gm.graph.nodes if node.op in ("placeholder", "call_module")}
    return sensitivities(gm, lambda sample: sample, samples, rounded, set(shifts), reads)


def test_the_effect_is_the_norm_of_the_outputs_first_order_move():
    """effect(k) estimates ||J_k e_k||_2 / max|y| (exact here: every op is linear) from random directions."""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(Chain().eval())
    x = torch.randn(4, 8)
    shifts = {"first": 1e-3 * torch.randn(4, 8), "second": 1e-3 * torch.randn(4, 8)}
    measured = measure(gm, [[x]], shifts)
    y = gm(x).detach()
    exact = {"first": gm.amplify.weight.detach() @ shifts["first"].T, "second": shifts["second"]}
    for name, moved in exact.items():
        expected = float(moved.norm() / y.abs().max())
        assert 0.5 * expected < measured.effect[name] < 1.6 * expected, (name, measured.effect, expected)
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
