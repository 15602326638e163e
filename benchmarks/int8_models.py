"""int8 on many torchvision models with the default accuracy guard: the error on a held-out input, how many
convs and linears run in int8 and how many stay float32, and the torch fallbacks left in the program.

    python benchmarks/int8_models.py resnet50 convnext_tiny swin_t

Random weights (``pyrys.testing.torchvision_model``: BatchNorm statistics randomized), 8 ``samples_like``
calibration samples of one ``torch.rand`` image, the error (``pyrys.relative_error`` against eager) on
another ``torch.rand`` image.  A model that fails prints the error instead.  Results: RESULTS.md.
"""
from __future__ import annotations

import sys
import time

import torch

import pyrys
from pyrys.quantization.calibration import samples_like
from pyrys.testing import torchvision_model

DEFAULT_MODELS = ["squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet0_5", "regnet_y_800mf", "resnext50_32x4d",
                  "convnext_tiny", "densenet121", "googlenet", "vgg11", "alexnet", "mobilenet_v2",
                  "efficientnet_v2_s", "swin_t", "vit_b_16", "maxvit_t"]


def main(names: list[str]) -> None:
    print("| model | compile s | held-out error | int8 ops | kept float32 | torch steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        try:
            model = torchvision_model(name)
            generator = torch.Generator().manual_seed(0)
            x, held_out = (torch.rand(1, 3, 224, 224, generator=generator) for _ in range(2))
            start = time.perf_counter()
            opt = pyrys.optimize(model, (x,), precision="int8", calibration=samples_like((x,), count=8))
            seconds = time.perf_counter() - start
            with torch.no_grad():
                error = pyrys.relative_error(opt(held_out), model(held_out))
            in_int8 = sum(step.fired.get("int8", 0) for step in opt.history)
            kept = sum(1 for miss in opt.misses if miss.rule == "int8")
            print(f"| {name} | {seconds:.1f} | {error:.1e} | {in_int8} | {kept} | "
                  f"{opt.program_text().count('torch::')} |", flush=True)
        except Exception as failure:  # noqa: BLE001 -- a sweep: say what failed and go on
            print(f"| {name} | failed: {type(failure).__name__}: {str(failure)[:200]} | | | | |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or DEFAULT_MODELS)
