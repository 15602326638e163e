"""Multiply-adds from node meta (``pyrys.ir.work``) against torch's own FLOP counter on eager (2 FLOPs per
multiply-add), on the graphs pyrys compiles: convolutions of every rank with groups, strides and dilation,
transposed convolutions, linears, and eager attention that pyrys turns into one attention op."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import pyrys
from pyrys.ir.fused import FUSED_CONV, FUSED_CONV_TRANSPOSE, FUSED_LINEAR
from pyrys.ir.vocabulary import ATTENTION
from pyrys.ir.work import multiply_adds, share_of


class Attention(nn.Module):
    """softmax(q k^T / 8 + mask) v with its projections: pyrys makes it one attention op."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(64, 3 * 64), nn.Linear(64, 64)

    def forward(self, x, mask):
        q, k, v = (t.view(x.shape[0], x.shape[1], 4, 16).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        weights = torch.softmax(q @ k.transpose(-1, -2) / 4.0 + mask, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(x.shape))


CASES = {
    "conv2d groups, stride, dilation": (nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4),
                                                      nn.ReLU(), nn.Conv2d(12, 6, 1)), (torch.randn(2, 8, 15, 13),)),
    "conv1d and conv3d": (nn.Sequential(nn.Conv3d(3, 4, (1, 3, 3)), nn.Flatten(2), nn.Conv1d(4, 5, 7, padding=3)),
                          (torch.randn(1, 3, 2, 9, 9),)),
    "transposed conv": (nn.Sequential(nn.ConvTranspose2d(6, 8, 3, stride=2, groups=2, output_padding=1), nn.ReLU()),
                        (torch.randn(2, 6, 7, 5),)),
    "linear on 3-D rows": (nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16)), (torch.randn(2, 7, 32),)),
    "attention": (Attention(), (torch.randn(2, 10, 64), torch.zeros(2, 1, 10, 10))),
}


def compiled_graph(model: nn.Module, inputs: tuple) -> torch.fx.GraphModule:
    return pyrys.optimize(model.eval(), inputs, backend="reference").graph_module


@pytest.mark.parametrize("name", CASES)
def test_multiply_adds_are_half_of_torch_s_flop_count(name):
    model, inputs = CASES[name]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(*inputs)
    gm = compiled_graph(model, inputs)
    products = {FUSED_CONV, FUSED_CONV_TRANSPOSE, FUSED_LINEAR, ATTENTION}
    assert any(node.target in products for node in gm.graph.nodes)
    assert name != "attention" or any(node.target is ATTENTION for node in gm.graph.nodes)
    assert sum(multiply_adds(node) for node in gm.graph.nodes) * 2 == counter.get_total_flops()


def test_the_share_of_convolutions():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 100)).eval()
    gm = compiled_graph(model, (torch.randn(1, 3, 8, 8),))
    conv, linear = 4 * 6 * 6 * 3 * 9, 100 * 4 * 6 * 6
    assert share_of(gm, frozenset({FUSED_CONV})) == pytest.approx(conv / (conv + linear))
    assert share_of(gm, frozenset({FUSED_LINEAR})) == pytest.approx(linear / (conv + linear))
    assert share_of(compiled_graph(nn.ReLU(), (torch.randn(3),)), frozenset({FUSED_CONV})) is None  # no products
