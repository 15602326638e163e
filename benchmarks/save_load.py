"""Compile against load: ``pyrys.optimize`` + first call (with an empty and with a warm tuning cache),
``pyrys.save``, ``pyrys.load`` + first call.

Each model is optimized (empty tuning cache), optimized again (the layout from the cache), saved
and loaded, ``--rounds`` times in this process; the table gives the medians, the ratios to the
first compile, the saved size against the model's weight bytes, and whether the loaded outputs
equal the compiled ones bitwise.

    python benchmarks/save_load.py --models resnet50 mobilenet_v3_large resnet18
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large", "resnet18"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import pyrys
    from pyrys.bench.models import build_model, example_inputs
    from pyrys.machine import cpu_info

    folder = Path(tempfile.mkdtemp(prefix="pyrys_save_load_"))
    print(f"# {cpu_info()[0]} ({'/'.join(cpu_info()[1])}), {torch.get_num_threads()} threads, pyrys {pyrys.__version__}")
    print("| model | compile + first call s | again, tuning cache warm s | ratio | save s | load + first call s | "
          "load / compile | saved MiB | weights MiB | bitwise equal |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with torch.no_grad():
        for name in args.models:
            model = build_model(name)
            inputs = example_inputs(name, 1, model)
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
            compile_s, cached_s, save_s, load_s, equal = [], [], [], [], True
            for round_index in range(args.rounds):
                os.environ["PYRYS_CACHE_DIR"] = str(folder / f"cache_{name}_{round_index}")  # empty
                opt, seconds = _timed(lambda: _called(pyrys.optimize(model, inputs), inputs))
                compile_s.append(seconds)
                cached_s.append(_timed(lambda: _called(pyrys.optimize(model, inputs), inputs))[1])
                path = folder / name
                save_s.append(_timed(lambda: pyrys.save(opt[0], path))[1])
                loaded, seconds = _timed(lambda: _called(pyrys.load(path), inputs))
                load_s.append(seconds)
                equal = equal and torch.equal(loaded[1], opt[1])
            size = sum(f.stat().st_size for f in (folder / name).iterdir()) / 2**20
            c, cc, s, lo = (statistics.median(v) for v in (compile_s, cached_s, save_s, load_s))
            print(f"| {name} | {c:.2f} | {cc:.2f} | {cc / c:.2f} | {s:.2f} | {lo:.2f} | {lo / c:.3f} | {size:.1f} | "
                  f"{weights:.1f} | {equal} |")
    shutil.rmtree(folder, ignore_errors=True)


def _called(module, inputs):
    return module, module(*inputs)


if __name__ == "__main__":
    main()
