"""How each step of a program scales from one thread to two: a bench model optimized with ``threads=1`` and
``threads=2``, each program's steps timed by ``program.profile`` (the best of two rounds, alternating) and
paired by the value each makes (a step only one program has is left out, and counted), the steps that lose
the most against a perfect halving printed first.

    python benchmarks/thread_scaling.py resnet50 --precision int8
    python benchmarks/thread_scaling.py hf_bert --precision bf16 --top 20
"""
from __future__ import annotations

import argparse
import re

import pyrys
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.peers import calibration_data

THREADS = (1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    model = build_model(args.model).eval()
    inputs = example_inputs(args.model, args.batch, model)
    options = {"precision": args.precision}
    if args.precision == "int8":
        options["calibration"] = calibration_data(inputs)
    modules = {threads: pyrys.optimize(model, inputs, threads=threads, **options) for threads in THREADS}
    best: dict[int, dict[str, tuple[str, float]]] = {threads: {} for threads in THREADS}  # by the value made
    for _ in range(2):
        for threads, module in modules.items():
            module(*inputs)
            steps = module._first.program.profile(list(inputs), runs=40)  # (README: "Performance")
            for step, microseconds in steps:
                value = step.split(" : ")[0].split(" = ")[0]
                known = best[threads].get(value)
                best[threads][value] = (step, min(microseconds, known[1]) if known else microseconds)
    one, two = (sum(t for _, t in best[threads].values()) for threads in THREADS)
    unpaired = best[1].keys() ^ best[2].keys()
    print(f"{args.model} {args.precision} batch {args.batch}: 1 thread {one / 1e3:.2f} ms, 2 threads "
          f"{two / 1e3:.2f} ms, speedup {one / two:.2f} (perfect: {one / 2e3:.2f} ms)"
          + (f"; {len(unpaired)} steps in one program only, left out below" if unpaired else ""))
    print(f"{'1 thr us':>9} {'2 thr us':>9} {'speedup':>7} {'lost us':>8}  step")
    rows = sorted(((best[2][i][1] - best[1][i][1] / 2, best[1][i][1], best[2][i][1], best[1][i][0])
                   for i in best[1].keys() & best[2].keys()), reverse=True)
    for lost, t1, t2, step in rows[:args.top]:
        kernel = re.search(r"impl=([^,\]]+)", step)
        print(f"{t1:9.1f} {t2:9.1f} {t1 / t2:7.2f} {lost:8.1f}  {step[:90]}{'  ' + kernel[1] if kernel else ''}")


if __name__ == "__main__":
    main()
