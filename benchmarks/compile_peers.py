"""Compile time of pyrys against ONNX Runtime: fresh processes, alternating, medians and their ratio.

pyrys: ``pyrys.optimize`` + first call. ONNX Runtime: ``torch.onnx.export`` (the bench's exporter:
torch.export-based) + ``InferenceSession`` + first run. Each process first compiles a small model
with the same system, so that loading libraries and warming torch.export's own caches is not
counted (``pyrys bench`` prepares its systems in one process, in order: the first one pays that);
the tuning cache is off (``PYRYS_CACHE_DIR=""``): a first compile.

    python benchmarks/compile_peers.py --models resnet50 hf_bert --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CHILD = r"""
import sys, tempfile, time, warnings
from pathlib import Path
import torch
warnings.simplefilter("ignore")
from pyrys.bench import models
from pyrys.bench.peers import OnnxRuntime

system, name = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)

def compile_and_run(model, inputs):
    with torch.no_grad():
        if system == "pyrys":
            import pyrys
            pyrys.optimize(model, inputs)(*inputs)
        else:
            OnnxRuntime(threads=2).prepare(model, inputs)(*inputs)

tiny = models.tiny_convnet().eval()
compile_and_run(tiny, tiny.example_inputs(1))
model = models.build_model(name).eval()
inputs = models.example_inputs(name, 1, model)
start = time.perf_counter()
compile_and_run(model, inputs)
print(time.perf_counter() - start)
"""
SYSTEMS = ("pyrys", "onnxruntime")


def compile_seconds(system: str, model: str) -> float:
    env = dict(os.environ, PYRYS_CACHE_DIR="")
    out = subprocess.run([sys.executable, "-c", CHILD, system, model], env=env, capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "hf_bert"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| model | pyrys s (runs) | ONNX Runtime s (runs) | pyrys / ORT |")
    print("| --- | --- | --- | ---: |")
    for model in args.models:
        times: dict[str, list[float]] = {system: [] for system in SYSTEMS}
        for round_ in range(args.rounds):
            for system in SYSTEMS if round_ % 2 == 0 else reversed(SYSTEMS):
                times[system].append(compile_seconds(system, model))
        medians = {system: statistics.median(values) for system, values in times.items()}
        runs = {system: ", ".join(f"{t:.2f}" for t in values) for system, values in times.items()}
        print(f"| {model} | {medians['pyrys']:.2f} ({runs['pyrys']}) | {medians['onnxruntime']:.2f} "
              f"({runs['onnxruntime']}) | {medians['pyrys'] / medians['onnxruntime']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
