"""What a new input shape costs: time to the first result at that shape, and RSS, against the first compile.

Each model and ``dynamic=`` setting runs in a fresh process (RSS only grows within one), tuning cache
off: ``optimize`` + first call at the first shape, then one call at each new shape, timed, with the RSS
growth it caused.  ``dynamic=None`` (default) captures with symbolic sizes at the first new shape,
``True`` at ``optimize``, ``False`` never (each shape captured and optimized again, the old behaviour).

    python benchmarks/new_shapes.py                      # resnet18 1 -> 2, 3, 5; a 4-layer BERT 128 -> 32, 64, 77
    python benchmarks/new_shapes.py --models bert4_batch2 # the BERT at batch 2 (a batch of 1 is propagated again)
    python benchmarks/new_shapes.py --models resnet18 --modes none true
    python benchmarks/new_shapes.py --models bert4 --modes true --sizes 128 20 37 45 50 90 100 110 29 53 71 83 97 120 41
"""
from __future__ import annotations

import argparse
import os

from pyrys.bench.measure import in_fresh_process

CHILD = r"""
import json, sys, time, torch, torchvision, pyrys
from pyrys.bench.measure import current_rss_bytes as rss
from pyrys.bench.models import bert4

def inputs(name, size):
    if name.startswith("bert4"):
        return model.example_inputs(2 if name == "bert4_batch2" else 1, size)
    return (torch.rand(size, 3, 224, 224),)

name, mode, sizes = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
dynamic = {"none": None, "true": True, "false": False}[mode]
torch.manual_seed(0)
model = bert4().eval() if name.startswith("bert4") else getattr(torchvision.models, name)().eval()
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
rows = []
with torch.no_grad():
    first = inputs(name, sizes[0])
    before, start = rss(), time.perf_counter()
    opt = pyrys.optimize(model, first, dynamic=dynamic)
    opt(*first)
    rows.append({"size": sizes[0], "seconds": time.perf_counter() - start, "rss": rss() - before})
    for size in sizes[1:]:
        x = inputs(name, size)
        before, start = rss(), time.perf_counter()
        y = opt(*x)
        seconds = time.perf_counter() - start
        rows.append({"size": size, "seconds": seconds, "rss": rss() - before,
                     "error": pyrys.relative_error(y, model(*x))})
print(json.dumps({"weights": weights, "rows": rows, "notes": opt.notes}))
"""

SIZES = {"resnet18": "1,2,3,5", "bert4": "128,32,64,77", "bert4_batch2": "128,32,64,77"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "bert4"], choices=sorted(SIZES))
    parser.add_argument("--modes", nargs="+", default=["none", "true", "false"], choices=["none", "true", "false"])
    parser.add_argument("--sizes", nargs="+", type=int, help="the first shape's size (batch for resnet18, tokens for "
                        "bert4), then each new one's (default: each model's own list)")
    args = parser.parse_args()
    from pyrys.machine import cpu_info

    print(f"# {cpu_info()[0]} ({'/'.join(cpu_info()[1])}), {os.cpu_count()} cores")
    print("| model | dynamic= | first compile s | new shape | s | / first compile | RSS MiB | / weights | error |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models:
        for mode in args.modes:
            sizes = ",".join(map(str, args.sizes)) if args.sizes else SIZES[name]
            result = in_fresh_process(CHILD, name, mode, sizes)
            first, weights = result["rows"][0], result["weights"]
            later = sorted(row["seconds"] for row in result["rows"][1:])
            for row in result["rows"][1:]:
                print(f"| {name} | {mode.capitalize()} | {first['seconds']:.2f} | {row['size']} | {row['seconds']:.2f} | "
                      f"{row['seconds'] / first['seconds']:.3f} | {row['rss'] / 2**20:.1f} | "
                      f"{row['rss'] / weights:.2f} | {row['error']:.1e} |")
            print(f"| {name} | {mode.capitalize()} | | median of {len(later)} | {later[len(later) // 2]:.2f} | "
                  f"{later[len(later) // 2] / first['seconds']:.3f} | | | |")


if __name__ == "__main__":
    main()
