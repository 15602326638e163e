"""How many times the int8 accuracy guard runs the graph (its ``max_error`` calls), what ``optimize`` took and
how many ops the guard kept, on a bench model at batch 1, one thread:

    python benchmarks/guard_runs.py mobilenet_v3_large
    PYTHONPATH=<an older tree>/src python benchmarks/guard_runs.py mobilenet_v3_large    # the same, before
"""
from __future__ import annotations

import sys
import time

import torch

import pyrys
import pyrys.quantization.guard as guard
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.peers import calibration_data


def main(name: str) -> None:
    torch.set_num_threads(1)
    runs = 0
    measure = guard.max_error

    def counted(*args, **kwargs):
        nonlocal runs
        runs += 1
        return measure(*args, **kwargs)

    guard.max_error = counted
    model = build_model(name).eval()
    inputs = example_inputs(name, 1, model)
    start = time.perf_counter()
    opt = pyrys.optimize(model, example_inputs=inputs, precision="int8", calibration=calibration_data(inputs))
    kept = sum("by the accuracy guard" in miss.reason for miss in opt.misses)
    print(f"{pyrys.__file__}: {name}: {runs} guard runs, optimize {time.perf_counter() - start:.1f} s, "
          f"{kept} ops kept")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mobilenet_v3_large")
