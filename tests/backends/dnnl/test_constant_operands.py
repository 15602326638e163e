"""A constant operand of a binary post-op (a norm's weight and bias after a residual add: MobileBERT's
NoNorm) is packed once in the destination's layout; the fused op used to fall back to torch whole."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pyrys
from pyrys.backends.dnnl import binding
from pyrys.numerics import relative_error
from tests.conftest import TOLERANCE

available, reason = binding.is_available()
pytestmark = pytest.mark.skipif(not available, reason=f"oneDNN unavailable: {reason}")


class ResidualThenAffine(nn.Module):
    """``(op(x) + x) * w + b`` with constant ``w`` and ``b``: nothing folds into the op's weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.linear, self.matmul_by = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 8), nn.Linear(8, 8)
        self.channel_scale, self.channel_shift = nn.Parameter(torch.randn(8, 1, 1)), nn.Parameter(torch.randn(8, 1, 1))
        self.vector, self.per_row = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(5, 8))
        self.scores_scale = nn.Parameter(torch.randn(5, 5))  # broadcast over the batch: expanded once
        self.eval()

    def forward(self, image, tokens):
        y = (self.conv(image) + image) * self.channel_scale + self.channel_shift
        z = (self.linear(tokens) + tokens) * self.vector + self.per_row
        w = torch.bmm(tokens, self.matmul_by(tokens).transpose(1, 2)) * self.scores_scale
        return y, z, w


def test_constant_operands_fuse_and_run_in_onednn():
    model, args = ResidualThenAffine(), (torch.randn(2, 8, 6, 6), torch.randn(3, 5, 8))
    opt = pyrys.optimize(model, args)
    for out, expected in zip(opt(*args), model(*args)):
        assert relative_error(out, expected) <= TOLERANCE
    text = opt.program_text()
    for label in ("dnnl::conv2d_add_mul_add", "dnnl::linear_add_mul_add", "dnnl::matmul_mul"):
        assert label in text, text
    assert "fallback" not in text, text
    other = (torch.randn(1, 8, 4, 4), torch.randn(2, 5, 8))  # another shape: the constants packed again for it
    for out, expected in zip(opt(*other), model(*other)):
        assert relative_error(out, expected) <= TOLERANCE
