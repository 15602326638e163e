"""RSS growth of ``pyrys.optimize`` + first call, against the model's weight bytes, and ``opt.memory()``.

Each model and layout runs in a fresh process (RSS only grows within one), with the tuning cache off,
so the figure is what a server pays for its first optimized model: the libraries pyrys loads, the
capture, the passes and the program.

    python benchmarks/memory.py --models resnet50 resnet18 --layouts auto nhwc
"""
from __future__ import annotations

import argparse

from pyrys.bench.measure import in_fresh_process

CHILD = """
import json, sys, torch, pyrys
from pyrys.bench.measure import current_rss_bytes as rss
from pyrys.bench.models import build_model, example_inputs
name, layout = sys.argv[1], sys.argv[2]
model = build_model(name)
inputs = example_inputs(name, 1, model)
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
before = rss()
with torch.no_grad():
    opt = pyrys.optimize(model, inputs, layout=layout)
    opt(*inputs)
print(json.dumps({"weights": weights, "growth": rss() - before, "memory": opt.memory()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet18"])
    parser.add_argument("--layouts", nargs="+", default=["auto", "nhwc"])
    args = parser.parse_args()
    from pyrys.machine import cpu_info

    print(f"# {cpu_info()[0]} ({'/'.join(cpu_info()[1])})")
    print("| model | layout | weights MiB | RSS growth MiB | growth / weights | opt.memory() MiB |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for name in args.models:
        for layout in args.layouts:
            row = in_fresh_process(CHILD, name, layout)  # "auto" measures both candidates, as a first compile does
            mib = {key: round(value / 2**20, 1) for key, value in row["memory"].items()}
            print(f"| {name} | {layout} | {row['weights'] / 2**20:.1f} | {row['growth'] / 2**20:.0f} | "
                  f"{row['growth'] / row['weights']:.2f} | {mib} |")


if __name__ == "__main__":
    main()
