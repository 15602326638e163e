"""Helpers for tests, the demo and the benchmarks: realistic random models."""
from __future__ import annotations

import inspect

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
    """A torchvision model by name, as the tests, the demo, the zoo and the benchmarks use it, in eval mode.

    Random weights, the backbone's too (``weights_backbone=None`` where the model has one): nothing
    is downloaded.  Randomized BatchNorm (:func:`randomize_batchnorm`), whose running statistics are then
    those of the activations of random images (:func:`_measure_batchnorm_statistics`): statistics unrelated
    to the activations shrank them layer after layer, and MobileNet's, EfficientNet's or GoogLeNet's outputs
    came out the same, to 1e-7, for any input (a program that ignored its input passed every comparison).  No all-zero weight tensors
    (ViT's head starts at zero, which would make every output 0 and every comparison vacuous):
    each gets ``N(0, 0.02)`` values.  ``kwargs`` go to the torchvision builder.
    """
    import torchvision

    torch.manual_seed(seed)
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs.setdefault("weights_backbone", None)
    model = randomize_batchnorm(builder(weights=None, **kwargs), seed).eval()
    _fill_all_zero_weights(model, torch.Generator().manual_seed(seed))
    _measure_batchnorm_statistics(model, seed, input_size(name))
    return model


def _fill_all_zero_weights(model: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() > 1 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


INPUT_SIZES = {"inception_v3": 299}  # a torchvision model's usual image size; every other model's: 224
STATISTICS_BATCH = 2  # images the BatchNorm statistics are measured on (seeded uniform noise), at that size


def input_size(name: str) -> int:
    """The height and width of the images ``name`` takes (the zoo's and the statistics')."""
    return INPUT_SIZES.get(name, 224)


def _measure_batchnorm_statistics(model: torch.nn.Module, seed: int, size: int) -> None:
    """Set every tracked BatchNorm's running mean and variance to those of its input on seeded random images of
    ``size`` (its affine parameters stay random), the rest of ``model`` in eval mode: measured at another size
    (128 for 224), EfficientNet-B6's outputs reached 1e4 and eager float32 erred 0.15 against float64.  Where
    the model does not take such images (a video or detection model), the random statistics stay."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if not norms:
        return
    kept = [(m, m.momentum, {k: v.clone() for k, v in m.state_dict().items() if k.startswith(("running", "num"))})
            for m in norms]
    images = torch.rand(STATISTICS_BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one batch gives its statistics
        norm.train()
    try:
        with torch.no_grad():
            model(images)
    except Exception:  # noqa: BLE001 -- not an image model: its random statistics stay
        for norm, _, statistics in kept:
            norm.load_state_dict(statistics, strict=False)
    finally:
        for norm, momentum, *_ in kept:
            norm.momentum = momentum
            norm.eval()
