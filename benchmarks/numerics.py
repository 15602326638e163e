"""Numerics over a list of models: each one optimized with ``numerics=True`` on the default backend.

    python benchmarks/numerics.py resnet18 vit_b_16 pyrys.bench.models:bert4

Per model: the program's error against eager, the first stage over 1e-4 (none expected), how
many layers were compared and how many pyrys made (no captured twin), the worst layer, the
compile time with measuring, and any problem a stage reported.  A ``module:attr`` model's own
``example_inputs(1)`` are used where it has them.
"""
from __future__ import annotations

import sys
import time

import torch

import pyrys
from pyrys.explain_cli import example_inputs, load_model
from pyrys.machine import cpu_info


def measure(spec: str) -> str:
    model = load_model(spec)
    inputs = example_inputs(model, spec, None)
    start = time.perf_counter()
    opt = pyrys.optimize(model, inputs, numerics=True)
    seconds = time.perf_counter() - start
    report = opt.numerics
    worst = report.layers[0] if report.layers else None
    over = report.first_over()
    return (f"| {spec} | {report.backend_error:.1e} | {over[1] if over else 'none'} | {len(report.layers)} | "
            f"{len(report.unmatched)} | {f'{worst.error:.1e} `{worst.describe()}`' if worst else '-'} | "
            f"{seconds:.1f} | {'; '.join(report.problems) or '-'} |")


def main(specs: list[str]) -> None:
    name, flags = cpu_info()
    print(f"CPU: {name} ({', '.join(flags)}), torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | program error | first over 1e-4 | layers | made by pyrys | worst layer | compile s | problems |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for spec in specs:
        print(measure(spec), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet18", "pyrys.bench.models:bert4"])
