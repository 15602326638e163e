"""Legalize: an unbatched (transposed) convolution runs as a batch of one, chained through the squeezes
it makes, its binary post-op operands read as they are; on the dnnl backend the convolutions then run
in oneDNN (before, oneDNN refused their 3-D input and torch ran them)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pyrys
from pyrys.ir.fused import FUSED_CONV, FUSED_CONV_TRANSPOSE
from pyrys.passes.legalize import legalize
from tests.conftest import TOLERANCE

aten = torch.ops.aten


class Unbatched(nn.Module):
    """conv -> relu -> conv + residual -> transposed conv, on ``[C, H, W]``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.up(self.b(y) + y)


def test_unbatched_convolutions_are_a_chain_of_batches_of_one():
    opt = pyrys.optimize(Unbatched().eval(), (torch.randn(3, 12, 12),), backend="reference", verify=True)
    gm = opt.graph_module
    convs = [n for n in gm.graph.nodes if n.target in (FUSED_CONV, FUSED_CONV_TRANSPOSE)]
    assert [tuple(n.meta["val"].shape) for n in convs] == [(1, 8, 10, 10), (1, 8, 10, 10), (1, 2, 20, 20)]
    first, second, up = convs
    assert first.args[0].target is aten.unsqueeze.default  # the input, batched once
    assert second.args[0] is first and second.args[-1] == [first]  # read batched: no squeeze between
    assert up.args[0] is second
    squeezes = [n for n in gm.graph.nodes if n.target is aten.squeeze.dims]
    assert [s.args[0] for s in squeezes] == [up]  # only what the graph returns is squeezed
    assert legalize(gm).fired == {}  # once batched, nothing more to do


@pytest.mark.parametrize("shape", [(3, 12, 12), (3, 17, 9)])
def test_unbatched_convolutions_run_in_onednn_with_eager_s_outputs(shape):
    if "dnnl" not in pyrys.available_backends():
        pytest.skip("the dnnl backend does not load here")
    model = Unbatched().eval()
    opt = pyrys.optimize(model, (torch.randn(3, 12, 12),), backend="dnnl", verify=True)
    x = torch.randn(*shape)
    assert opt(x).shape == model(x).shape
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    text = opt.program_text()
    assert "dnnl::conv2d_relu" in text and "dnnl::conv2d_add" in text and "dnnl::conv_transpose2d" in text
    assert "torch::conv" not in text


def test_an_unbatched_conv1d_with_a_per_channel_operand_keeps_its_broadcast():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(4, 6, 5, padding=2)
            self.shift = nn.Parameter(torch.randn(6, 1))

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y + torch.sigmoid(y).mean(-1, keepdim=True) + self.shift), y.sum()

    model, x = Scaled().eval(), torch.randn(4, 30)
    for backend in ("reference", "dnnl"):
        if backend not in pyrys.available_backends():
            continue
        opt = pyrys.optimize(model, (x,), backend=backend, verify=True)
        for inputs in (x, torch.randn(4, 19)):
            for got, want in zip(opt(inputs), model(inputs)):
                assert got.shape == want.shape and pyrys.relative_error(got, want) <= TOLERANCE
