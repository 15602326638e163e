"""What keeping NaN costs: each model compiled with pyrys's NaN-keeping activation chains
(``backends/dnnl/post_ops.py``) and with oneDNN's single relu / clip / hardsigmoid eltwise
(which drop NaN), in one process, timed interleaved; the ratio chains / single is reported.

    python benchmarks/activation_cost.py --models mobilenet_v2 resnet50 --rounds 6
"""
from __future__ import annotations

import argparse
import statistics

import torch

import pyrys
from pyrys.backends.dnnl import post_ops
from pyrys.backends.dnnl.constants import AlgKind
from pyrys.bench.measure import interleaved_ms
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.report import cpu_info

SINGLE = {  # oneDNN's own kernels for the activations pyrys builds as NaN-keeping chains
    "relu": lambda: [(AlgKind.eltwise_relu, 0.0, 0.0)],
    "clamp": lambda lo, hi: [(AlgKind.eltwise_clip, lo, hi)],
    "hardsigmoid": lambda: [(AlgKind.eltwise_hardsigmoid, 1 / 6, 0.5)],
}


def compiled(name: str, table: dict, layout: str):
    saved = dict(post_ops.ELTWISE)
    post_ops.ELTWISE.update(table)
    try:
        model = build_model(name)
        inputs = example_inputs(name, 1, model)
        return pyrys.optimize(model, inputs, layout=layout), inputs
    finally:
        post_ops.ELTWISE.clear()
        post_ops.ELTWISE.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--layout", default="auto", help="the dnnl layout policy (auto: measured per build)")
    args = parser.parse_args()
    cpu = " ".join([cpu_info()[0], "/".join(cpu_info()[1])])
    print(f"# {cpu}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        for name in args.models:
            systems = {"chains": compiled(name, {}, args.layout), "single": compiled(name, SINGLE, args.layout)}
            times = interleaved_ms(systems, args.rounds, args.seconds)
            ratios = [c / s for c, s in zip(times["chains"], times["single"])]
            print(f"{name} ({args.layout}): chains {statistics.median(times['chains']):.3f} ms, single "
                  f"{statistics.median(times['single']):.3f} ms, chains/single {statistics.median(ratios):.3f} "
                  f"(rounds {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
