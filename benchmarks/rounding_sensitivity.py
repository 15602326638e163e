"""How far the bench's random models move with their input rounded: by 1e-6 (noise of that relative size),
to bfloat16, and against float64 eager; relative errors of the outputs (``max|dy| / max|y|``).

    python benchmarks/rounding_sensitivity.py resnet18 mobilenet_v3_large efficientnet_b0
"""
from __future__ import annotations

import sys

import torch

from pyrys.bench.models import build_model, example_inputs


def main(names: list[str]) -> None:
    torch.set_num_threads(2)
    for name in names:
        model = build_model(name).eval()
        (x,) = example_inputs(name, 1, model)
        with torch.no_grad():
            y = model(x)
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
            moved = model(x * (1 + 1e-6 * noise))
            rounded = model(x.bfloat16().float())
            exact = model.double()(x.double()).float()

        def relative(other: torch.Tensor) -> float:
            return float((other - y).abs().max() / y.abs().max())

        print(f"{name:20s} 1e-6 input: {relative(moved):.1e}  bf16 input: {relative(rounded):.1e}  "
              f"float64: {relative(exact):.1e}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
                          "convnext_tiny", "regnet_y_800mf"])
