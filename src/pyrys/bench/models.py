"""Models to benchmark: torchvision by name (random weights) or ``module:attr``.

There is no network, so torchvision models are built with ``weights=None``. Random
BatchNorm statistics of mean 0 and variance 1 are unrealistic (they make folding
trivial), so every BatchNorm gets seeded random running stats and affine params.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

INPUT_SIZE = {"inception_v3": 299}


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm realistic random stats and affine params, seeded."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                _randomize_one(module, generator)
    return model


def _randomize_one(bn: nn.modules.batchnorm._BatchNorm, generator: torch.Generator) -> None:
    """mean ~ N(0, 0.1), var ~ U(0.5, 1.5), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1)."""
    n = bn.num_features
    if bn.running_mean is not None:
        bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
        bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    if bn.affine:
        bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def build_model(name: str) -> nn.Module:
    """A torchvision model by name, or ``pkg.module:factory`` returning an nn.Module."""
    if ":" in name:
        module_name, attr = name.split(":", 1)
        model = getattr(importlib.import_module(module_name), attr)()
    else:
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    return randomize_batchnorm(model).eval()


def example_inputs(name: str, batch_size: int, model: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Seeded random image inputs; a model may override with ``example_inputs(batch)``."""
    if model is not None and hasattr(model, "example_inputs"):
        return tuple(model.example_inputs(batch_size))
    size = INPUT_SIZE.get(name, 224)
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch_size, 3, size, size, generator=generator),)


class TinyConvNet(nn.Module):
    """A few conv/BN/ReLU layers and a classifier: the ``--quick`` model."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


def tiny_convnet() -> nn.Module:
    """The ``--quick`` model, seeded."""
    torch.manual_seed(0)
    return TinyConvNet()


class ConvChain(nn.Module):
    """20 tiny 3x3 convolutions (16 channels, 8x8): per-op overhead dominates, not arithmetic."""

    def __init__(self, length: int = 20, channels: int = 16) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[nn.Conv2d(channels, channels, 3, padding=1) for _ in range(length)])
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, self.channels, 8, 8, generator=torch.Generator().manual_seed(1)),)


def conv_chain() -> nn.Module:
    """``pyrys bench --models pyrys.bench.models:conv_chain``: divide the median by 20 for µs per op."""
    torch.manual_seed(0)
    return ConvChain()
