"""Graphs that hand back bool, int64 and 0-dim tensors: what graph breaks give pyrys.

``if y.sum() > 0:`` in forward makes dynamo hand pyrys a graph returning a 0-dim bool
(and the feature map), then one graph per branch; a value computed before a break comes
back as a 0-dim input of the next graph.  Every case runs on each backend, through
``torch.compile`` and, for single graphs, through ``pyrys.optimize``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pyrys
from tests.conftest import TOLERANCE

class ConvThen(nn.Module):
    """A conv, then ``tail``: the part that makes the graph end in another dtype or rank, or break."""

    def __init__(self, tail):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)
        self.tail = tail

    def forward(self, x):
        return self.tail(self.conv(x))


def branch_on_sum(y):
    if y.sum() > 0:  # a graph returning (bool 0-dim, y), then one graph per branch
        return y.relu()
    return y


def zero_dim_across_a_break(y):
    s = y.sum()
    torch._dynamo.graph_break()  # s is a 0-dim input of the next graph
    return y * s


TAILS = {
    "branch_on_sum": (branch_on_sum, True),
    "zero_dim_across_a_break": (zero_dim_across_a_break, True),
    "argmax_int64": (lambda y: y.argmax(1), False),
    "greater_bool": (lambda y: y > 0, False),
    "sum_zero_dim": (lambda y: y.sum(), False),
    "zero_dim_arithmetic": (lambda y: y.sum() * 2 + 1, False),
}
DNNL_MISSING = pytest.mark.skipif("dnnl" not in pyrys.available_backends(), reason="the dnnl backend does not load")


def cases(way: str):
    for name, (_, breaks) in TAILS.items():
        if breaks and way == "optimize":
            continue  # torch.export cannot capture a break: tests/test_capture_errors.py
        yield pytest.param(name, "reference", id=f"{name}-reference")
        yield pytest.param(name, "dnnl", marks=[DNNL_MISSING], id=f"{name}-dnnl")


def inputs():
    """Both signs, so that a branch on the sum takes both ways."""
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return [x, -100 * x]


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.is_floating_point():
        assert pyrys.relative_error(actual, expected) <= TOLERANCE
    else:
        assert torch.equal(actual, expected)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("tail, backend", list(cases("compile")))
def test_torch_compile(tail, backend):
    model = ConvThen(TAILS[tail][0]).eval()
    compiled = torch.compile(model, backend="pyrys", options={"backend": backend})
    for x in inputs():
        with torch.no_grad():
            assert_same(compiled(x), model(x))


@pytest.mark.parametrize("tail, backend", list(cases("optimize")))
def test_optimize(tail, backend):
    model = ConvThen(TAILS[tail][0]).eval()
    opt = pyrys.optimize(model, (inputs()[0],), backend=backend)
    for x in inputs():
        with torch.no_grad():
            assert_same(opt(x), model(x))


class ViewedAfterABreak(nn.Module):
    """A conv, a graph break, then a view of its output's channels-last layout (eager's for a channels-last
    image)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        torch._dynamo.graph_break()
        return y.permute(0, 2, 3, 1).view(x.shape[0], -1)


def test_torch_compile_gives_a_channels_last_output_as_eager_does():
    """A helper's find: a program's outputs are contiguous, so a channels-last image's conv output came back
    contiguous where eager's (and inductor's) is channels-last, and the view after the graph break failed."""
    model = ViewedAfterABreak().eval()
    x = torch.rand(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.compile(model.conv, backend="pyrys")(x).stride() == model.conv(x).stride()
        torch._dynamo.reset()
        assert pyrys.relative_error(torch.compile(model, backend="pyrys")(x), model(x)) <= TOLERANCE
