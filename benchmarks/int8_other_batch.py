"""int8 at another batch size than the one calibrated.

torchvision's ViT-B/16 (random weights, its zero-initialized head randomized) is optimized at batch 1 on 8
one-row calibration samples, then called at batch 2: how many of its int8 layers run in int8 there, the
error against eager float32, and the median latency of 15 calls. Run two trees alternately, each in a fresh
process, to compare them (the label is printed):

    PYTHONPATH=<other tree>/src python benchmarks/int8_other_batch.py before
    python benchmarks/int8_other_batch.py after
"""
from __future__ import annotations

import sys
import time
import warnings

import torch
import torchvision

import pyrys
from pyrys.precision_notes import int8_layers
from pyrys.signature import signature_of


def main(label: str) -> None:
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.05)
    calibration = [(torch.randn(1, 3, 224, 224),) for _ in range(8)]
    opt = pyrys.optimize(model, (torch.randn(1, 3, 224, 224),), precision="int8", calibration=calibration)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        error = pyrys.relative_error(opt(x), model(x))
        for _ in range(3):
            opt(x)
        times = []
        for _ in range(15):
            start = time.perf_counter()
            opt(x)
            times.append(time.perf_counter() - start)
    layers = int8_layers(opt._programs[signature_of((x,), {})[0]].run)
    print(f"{label}: batch 2 runs {layers} of {int8_layers(opt._first.run)} int8 layers in int8, error {error:.2e}, "
          f"median {sorted(times)[len(times) // 2] * 1e3:.1f} ms")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pyrys")
