"""Traced torchvision CNNs: pyrys with a trace's ``aten::_convolution`` as the named conv (after) and as a torch
fallback (before, the mapping switched off in the same process), against eager and the ``nn.Module`` way in;
one process, the four interleaved, medians of rounds.

    python benchmarks/traced_cnns.py resnet18 resnet50 mobilenet_v3_large
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

import pyrys
from pyrys.bench.measure import interleaved_ms
import pyrys.capture.torchscript as torchscript
from pyrys.testing import torchvision_model

ROUNDS, SECONDS = 3, 1.0  # rounds of interleaved_ms, seconds timed a system a round


def compiled(model, x: torch.Tensor) -> tuple[pyrys.OptimizedModule, float]:
    """``pyrys.optimize`` and its first call; the seconds they took."""
    start = time.perf_counter()
    opt = pyrys.optimize(model, (x,))
    opt(x)
    return opt, time.perf_counter() - start


def compare(name: str) -> str:
    model, x = torchvision_model(name).eval(), torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,))
        after, after_s = compiled(traced, x)
        spellings, torchscript.CONVOLUTION_SPELLINGS = torchscript.CONVOLUTION_SPELLINGS, frozenset()
        before, before_s = compiled(traced, x)
        torchscript.CONVOLUTION_SPELLINGS = spellings
        systems = {"eager": model, "traced before": before, "traced after": after,
                   "nn.Module": pyrys.optimize(model, (x,))}
        times = interleaved_ms({label: (run, (x,)) for label, run in systems.items()}, ROUNDS, SECONDS)
        errors = [pyrys.relative_error(opt(x), model(x)) for opt in (after, before)]
    ms = {label: statistics.median(values) for label, values in times.items()}
    return (f"{name}: " + ", ".join(f"{label} {value:.2f} ms" for label, value in ms.items())
            + f"; after/before {ms['traced after'] / ms['traced before']:.2f}, after/nn.Module "
            f"{ms['traced after'] / ms['nn.Module']:.2f}; compile s before {before_s:.1f} after {after_s:.1f}; "
            f"errors after/before {errors[0]:.1e}/{errors[1]:.1e}")


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # tracing's warnings
    torch.manual_seed(0)
    for model_name in sys.argv[1:] or ["resnet18"]:
        print(compare(model_name), flush=True)
