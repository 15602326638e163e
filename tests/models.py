"""Small models shared by the tests."""
from __future__ import annotations

import torch

from pyrys.testing import randomize_batchnorm


class ConvBnRelu(torch.nn.Module):
    def __init__(self, relu: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU() if relu else torch.nn.Identity()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def conv_bn_relu(relu: bool = True) -> torch.nn.Module:
    return randomize_batchnorm(ConvBnRelu(relu)).eval()


def image(batch: int = 1, channels: int = 3, size: int = 6) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1))


class Fn(torch.nn.Module):
    """A module around ``fn(module, *xs)``, with optional submodules (seed torch before building them)."""

    def __init__(self, fn, **modules):
        super().__init__()
        self.fn = fn
        for name, module in modules.items():
            setattr(self, name, module)

    def forward(self, *xs):
        return self.fn(self, *xs)
