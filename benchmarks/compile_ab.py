"""Compile time (and peak memory) of pyrys against an earlier pyrys: ``optimize`` + first call, fresh processes,
alternating.

Each run is a fresh process (a compile warms caches a second one would find), with the tuning
cache off and a small model optimized first, so that loading the libraries is not counted.
The models come from this tree's ``pyrys.bench.models`` (loaded by path, so the earlier tree
compiles the same model); rounds alternate the two trees; medians and their ratio are printed, and the
median peak RSS growth of the compile (the most resident memory during it, less what was resident before).

    git worktree add /tmp/pyrys_old <commit>
    python benchmarks/compile_ab.py --old /tmp/pyrys_old/src --models bert4 bert_base --rounds 3
    python benchmarks/compile_ab.py --old /tmp/pyrys_old/src --models efficientnet_b0 --precision int8 --batch 16

With ``--precision int8`` both trees calibrate on ``pyrys.bench.peers.calibration_data`` of the example
(what ``pyrys bench`` gives every int8 system), with the default accuracy guard.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import importlib.util, sys, time, torch, pyrys
try:
    import pyrys.model_specs
except ImportError:  # a tree before it: this tree's, by path (this tree's models.py reads it)
    spec = importlib.util.spec_from_file_location("pyrys.model_specs", sys.argv[5])
    sys.modules["pyrys.model_specs"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sys.modules["pyrys.model_specs"])
spec = importlib.util.spec_from_file_location("models_here", sys.argv[1])
models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(models)
model = (getattr(models, sys.argv[2]) if hasattr(models, sys.argv[2]) else lambda: models.build_model(sys.argv[2]))()
precision, batch = sys.argv[3], int(sys.argv[4])
x = models.example_inputs(sys.argv[2], batch, model)
options = {"precision": precision}
if precision == "int8":
    from pyrys.bench.peers import calibration_data
    options["calibration"] = calibration_data(x)
tiny = models.tiny_convnet().eval()
pyrys.optimize(tiny, tiny.example_inputs(1))(*tiny.example_inputs(1))
from pyrys.bench.measure import current_rss_bytes, peak_rss_bytes, reset_peak_rss
before, peak_known = current_rss_bytes(), reset_peak_rss()
start = time.perf_counter()
with torch.no_grad():
    pyrys.optimize(model.eval(), x, **options)(*x)
print(time.perf_counter() - start, ((peak_rss_bytes() if peak_known else current_rss_bytes()) - before) / 2**20,
      int(peak_known))
"""
MODELS = Path(__file__).resolve().parents[1] / "src" / "pyrys" / "bench" / "models.py"
MODEL_SPECS = MODELS.parents[1] / "model_specs.py"


def compile_seconds(src: str, model: str, precision: str = "fp32", batch: int = 1) -> tuple[float, float, bool]:
    """Seconds to optimize ``model`` and call it once, the peak RSS growth meanwhile in MiB, and whether it was
    the peak (where the kernel lets the process reset it) or only the growth at the end."""
    env = dict(os.environ, PYTHONPATH=src, PYRYS_CACHE_DIR="")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", CHILD, str(MODELS), model, precision, str(batch),
                          str(MODEL_SPECS)], env=env, capture_output=True, text=True, check=True)
    seconds, mib, peak = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(mib), peak == "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the earlier tree's src folder")
    parser.add_argument("--models", nargs="+", default=["bert4", "bert_base", "resnet50"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    trees = {"old": args.old, "new": str(MODELS.parents[2])}
    print("| model | old s (runs) | new s (runs) | new / old | peak RSS growth MiB, old / new |")
    print("| --- | --- | --- | ---: | ---: |")
    ends_only = False
    for model in args.models:
        times: dict[str, list[float]] = {label: [] for label in trees}
        peaks: dict[str, list[float]] = {label: [] for label in trees}
        for _ in range(args.rounds):
            for label, src in trees.items():
                seconds, mib, peak = compile_seconds(src, model, args.precision, args.batch)
                times[label].append(seconds)
                peaks[label].append(mib)
                ends_only = ends_only or not peak
        old, new = statistics.median(times["old"]), statistics.median(times["new"])
        runs = {label: ", ".join(f"{t:.2f}" for t in values) for label, values in times.items()}
        print(f"| {model} | {old:.2f} ({runs['old']}) | {new:.2f} ({runs['new']}) | {new / old:.3f} | "
              f"{statistics.median(peaks['old']):.0f} / {statistics.median(peaks['new']):.0f} |")
    if ends_only:
        print("(the peak could not be reset here (/proc/self/clear_refs): RSS growth at the end, not the peak)")


if __name__ == "__main__":
    main()
