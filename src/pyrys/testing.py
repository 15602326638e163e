"""Helpers for tests, the demo and the benchmarks: realistic random models."""
from __future__ import annotations

import torch


def randomize_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding is really exercised.

    running_mean ~ N(0, 0.1), running_var ~ U(0.5, 1.5), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1).
    Modifies ``model`` in place and returns it.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
                _randomize(module, generator)
    return model


def _randomize(bn: torch.nn.Module, generator: torch.Generator) -> None:
    n = bn.running_mean.numel()
    bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
    bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
    if bn.affine:
        bn.weight.copy_(torch.rand(n, generator=generator) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=generator) * 0.1)


def torchvision_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A torchvision model with random weights (no download) and randomized BatchNorm, in eval mode."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return randomize_batchnorm(model, seed).eval()
