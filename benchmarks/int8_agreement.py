"""int8 error against eager, of the dnnl program and of the graph it runs (the reference backend), and
the two against each other: `python benchmarks/int8_agreement.py [model ...]` (torchvision models,
random weights, calibrated on `samples_like`, no accuracy guard).  Results: RESULTS.md."""
from __future__ import annotations

import sys

import torch

import pyrys
from pyrys.quantization.calibration import samples_like
from pyrys.testing import torchvision_model


def main(names: list[str]) -> None:
    print(f"{'model':20s} {'dnnl/eager':>10s} {'graph/eager':>11s} {'dnnl/graph':>10s}")
    for name in names:
        model, x = torchvision_model(name), torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        calibration = samples_like((x,))
        dnnl, graph = (pyrys.optimize(model, (x,), backend=backend, precision="int8", calibration=calibration,
                                      accuracy_budget=None) for backend in ("dnnl", "reference"))
        expected = model(x)
        print(f"{name:20s} {pyrys.relative_error(dnnl(x), expected):10.1e} "
              f"{pyrys.relative_error(graph(x), expected):11.1e} {pyrys.relative_error(dnnl(x), graph(x)):10.1e}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet18", "mobilenet_v3_large", "efficientnet_b0"])
