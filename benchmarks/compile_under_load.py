"""Compile time under CPU load: ``optimize`` + first call, quiet and beside busy processes, in fresh processes.

int8 calibration and the accuracy guards run the graph on torch's ops tens of times; beside busy processes
torch's OpenMP teams spin at barriers for a descheduled thread (RESULTS.md, 2026-12-07: running those passes
with the threads left free was 0.61x beside two busy processes, and was taken back: the plan's scales then
depended on the load).  Each compile runs in a new process (nothing cached: ``PYRYS_CACHE_DIR=``) with
``--threads`` threads, beside ``--busy`` processes spinning (unpinned); ``--src`` gives source trees to
compare (each put first on ``PYTHONPATH``), interleaved round by round.

    python benchmarks/compile_under_load.py --models efficientnet_b0 --busy 0 1 2 --rounds 2
    python benchmarks/compile_under_load.py --src /path/to/old/src src --busy 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import time, warnings
warnings.simplefilter("ignore")
import torch
torch.set_num_threads({threads})
import pyrys
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.peers import calibration_data
model = build_model({model!r}).eval()
x = example_inputs({model!r}, 1, model)
options = dict(precision={precision!r})
if {precision!r} == "int8":
    options["calibration"] = calibration_data(x)[:{samples}]
start = time.perf_counter()
pyrys.optimize(model, x, **options)(*x)
print(time.perf_counter() - start)
"""


def compile_seconds(src: str, model: str, precision: str, threads: int, samples: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
               PYRYS_CACHE_DIR="")
    code = CHILD.format(model=model, precision=precision, threads=threads, samples=samples)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["efficientnet_b0"])
    parser.add_argument("--precision", default="int8", choices=["fp32", "bf16", "int8"])
    parser.add_argument("--busy", nargs="+", type=int, default=[0, 2], help="busy processes beside the compile")
    parser.add_argument("--src", nargs="+", default=["src"], help="source trees to compare")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8, help="int8 calibration samples")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"| model | busy processes | {' | '.join(f'{src} (s)' for src in args.src)} |")
    print(f"| --- | ---: | {' | '.join('---:' for _ in args.src)} |")
    for model in args.models:
        for busy in args.busy:
            spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                times: dict[str, list[float]] = {src: [] for src in args.src}
                for _ in range(args.rounds):
                    for src in args.src:
                        times[src].append(compile_seconds(src, model, args.precision, args.threads, args.samples))
            finally:
                for process in spinning:
                    process.kill()
            cells = " | ".join(f"{statistics.median(t):.1f} ({', '.join(f'{s:.1f}' for s in t)})"
                               for t in times.values())
            print(f"| {model} | {busy} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
