"""The model zoo: every torchvision classifier, three segmentation models and five HuggingFace
transformers (with the ``transformers`` extra), optimized and compared with eager PyTorch.

    pyrys zoo                       # every model, every available backend: one row per model
    pyrys zoo resnet50 vit_b_16     # just these
    pyrys zoo hf_bert hf_gpt2       # transformers (pyrys.bench.transformer_models)
    pyrys zoo --quick               # the subset the default test run checks

Models come from :func:`pyrys.testing.torchvision_model`: random weights (no download),
BatchNorm with random affine parameters and the statistics of random images, and no all-zero weight tensors (ViT's head is
zero-initialized, which would make every output 0 and every comparison vacuous).
A row passes when ``pyrys.relative_error(optimized, eager) <= pyrys.FP32_TOLERANCE``, or, past that, within
:data:`EAGER_MARGIN` times eager's own float32 error against float64 (measured then): a deep network carrying
signal amplifies float32 rounding, and two float32 computations as accurate as each other differ by up to the
sum of their errors (ResNet-152: eager 2.4e-4 off float64, pyrys 2.4e-4 off float64, 4.0e-4 off eager).
"""
from __future__ import annotations

import gc
import importlib.util
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from pyrys.bench.transformer_models import MODELS as TRANSFORMER_MODELS
from pyrys.testing import input_size, torchvision_model

CLASSIFICATION = (
    "alexnet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "densenet121", "densenet161", "densenet169", "densenet201", "googlenet", "inception_v3",
    "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0",
    "squeezenet1_0", "squeezenet1_1",
    "efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3", "efficientnet_b4",
    "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_1_6gf", "regnet_x_3_2gf", "regnet_x_8gf", "regnet_x_16gf",
    "regnet_x_32gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_1_6gf", "regnet_y_3_2gf", "regnet_y_8gf",
    "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_large",
    "vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14",
    "swin_t", "swin_s", "swin_b", "swin_v2_t", "swin_v2_s", "swin_v2_b", "maxvit_t",
)
SEGMENTATION = ("fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large")
# HuggingFace models, each with its own inputs (token ids and a mask, an image, log-mel features)
TRANSFORMERS = tuple(TRANSFORMER_MODELS) if importlib.util.find_spec("transformers") else ()
MODELS = CLASSIFICATION + SEGMENTATION + TRANSFORMERS
QUICK = ("resnet18", "mobilenet_v3_small", "squeezenet1_1", "shufflenet_v2_x0_5")


def input_shape(name: str, batch: int = 1) -> tuple[int, ...]:
    size = input_size(name)
    return (batch, 3, size, size)


def unknown_model(name: str) -> str:
    """Why ``name`` names no model ``build_model`` knows ("" where it does): torchvision's and the zoo transformers."""
    import torchvision

    if name in TRANSFORMER_MODELS or name in torchvision.models.list_models():
        return ""
    return (f"unknown model {name!r}: expected a torchvision model name (resnet50, ...), a zoo transformer "
            f"({', '.join(TRANSFORMER_MODELS)}) or module:factory")


def build_model(name: str) -> torch.nn.Module:
    """A zoo model by name (``pyrys explain`` loads zoo models through this)."""
    if name in TRANSFORMER_MODELS:
        return TRANSFORMER_MODELS[name]()
    return torchvision_model(name)


def example_inputs(name: str, model: torch.nn.Module, shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """The model's own ``example_inputs(1)`` where it has that method (the transformers take token ids and a
    mask), each of ``shape`` where one is given (:func:`_like`: of the same dtype, ids among its ids, a mask of
    ones all ones); else one seeded image of ``shape`` (default: the model's usual size; 224 for a ``module:attr``
    model).  ``ValueError`` for a shape of another rank than the model's own inputs, or too large to make."""
    from pyrys.model_specs import describe_inputs, own_example_inputs

    generator = torch.Generator().manual_seed(0)
    own = own_example_inputs(name, model, 1)
    if own is not None:
        if shape is None:
            return own
        if any(not isinstance(t, torch.Tensor) or t.dim() != len(shape) for t in own):
            raise ValueError(f"--input-shape {'x'.join(map(str, shape))} does not fit {name}, whose inputs are "
                             f"{describe_inputs(own)}: give one of their rank (tensors' only)")
        with _made_here(shape):
            return tuple(_like(t, shape, generator) for t in own)
    shape = shape or (input_shape(name) if ":" not in name else (1, 3, 224, 224))
    with _made_here(shape):
        return (torch.rand(shape, generator=generator),)


@contextmanager
def _made_here(shape: tuple[int, ...]):
    """torch's error for an input of ``shape`` too large to make (its bytes overflow, or are more than memory
    gives) as a one-line ``ValueError``."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:
        why = (str(error).splitlines() or [type(error).__name__])[0]
        raise ValueError(f"cannot make an input of shape {'x'.join(map(str, shape))} here: {why}") from None


def _like(example: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A seeded tensor of ``shape`` with ``example``'s dtype: its one value where it holds one (a mask of ones),
    else integers in its range, or floats uniform in [0, 1)."""
    if example.numel() and bool(example.min() == example.max()):
        return torch.full(shape, example.reshape(-1)[0].item(), dtype=example.dtype)
    if example.is_floating_point() or example.numel() == 0:
        return torch.rand(shape, generator=generator).to(example.dtype)
    low, high = int(example.min()), int(example.max())
    return torch.randint(low, high + 1, shape, generator=generator).to(example.dtype)


@dataclass
class ZooRow:
    """One model on one backend."""

    model: str
    backend: str
    nodes_before: int = 0
    nodes_after: int = 0
    folds: int = 0
    fusions: int = 0
    misses: int = 0
    error: float = float("nan")
    seconds: float = 0.0
    failure: str = ""
    eager_error: float | None = None  # eager float32's own error against float64, where error passed the tolerance

    @property
    def tolerance(self) -> float:
        """What ``error`` is held to: :data:`pyrys.FP32_TOLERANCE`, or :data:`EAGER_MARGIN` times eager's own error."""
        from pyrys.numerics import FP32_TOLERANCE

        return max(FP32_TOLERANCE, EAGER_MARGIN * (self.eager_error or 0.0))

    @property
    def passed(self) -> bool:
        return not self.failure and self.error <= self.tolerance


EAGER_MARGIN = 3.0  # errors of two float32 computations add (2x), and a margin


FOLD_PASSES = ("fold_conv_bn", "fold_constant_affine")
FUSE_PASSES = ("fuse_post_ops",)


def count_ops(graph_text: str) -> int:
    """Op nodes in a printed graph: every assignment that is not a constant or a state read."""
    lines = [line for line in graph_text.splitlines() if " = " in line]
    return sum(1 for line in lines if "prim::Constant" not in line and "prim::GetAttr" not in line)


def _fired(history, names) -> int:
    return sum(sum(step.fired.values()) for step in history if step.name in names)


def run_model(name: str, backend: str = "reference", model: torch.nn.Module | None = None) -> ZooRow:
    """Optimize one zoo model on one backend and compare it with eager; failures become the row's reason."""
    import pyrys

    row = ZooRow(name, backend)
    start = time.perf_counter()
    try:
        model = model if model is not None else build_model(name)
        inputs = example_inputs(name, model)
        with torch.no_grad():
            expected = model(*inputs)
        opt = pyrys.optimize(model, inputs, backend=backend)
        with torch.no_grad():
            actual = opt(*inputs)
        history = opt.history
        row.nodes_before, row.nodes_after = count_ops(history[0].graph), count_ops(history[-1].graph)
        row.folds, row.fusions = _fired(history, FOLD_PASSES), _fired(history, FUSE_PASSES)
        row.misses = len(opt.misses)
        row.error = pyrys.relative_error(actual, expected)
        if row.error > pyrys.FP32_TOLERANCE:
            try:
                row.eager_error = _eager_error(model, inputs, expected)
            except Exception:  # noqa: BLE001 -- a model that does not run in float64: held to the tolerance
                traceback.print_exc()
    except Exception as error:  # a zoo row reports the failure; the run goes on
        row.failure = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        traceback.print_exc()
    row.seconds = time.perf_counter() - start
    gc.collect()
    return row


def _eager_error(model: torch.nn.Module, inputs: tuple, expected) -> float:
    """``relative_error(eager float32, eager float64)``: the rounding error of eager itself on these inputs."""
    import copy

    import pyrys

    double = copy.deepcopy(model).double()
    widened = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        exact = double(*widened)
    return pyrys.relative_error(expected, torch.utils._pytree.tree_map(
        lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, exact))


def run_zoo(names, backends, on_row=None) -> list[ZooRow]:
    """Every model on every backend, in order; ``on_row(row)`` is called as each finishes."""
    rows = []
    for name in names:
        model = None
        for backend in backends:
            row = run_model(name, backend, model)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        del model
        gc.collect()
    return rows
