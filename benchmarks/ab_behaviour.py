"""pyrys against an earlier pyrys, in one process: the same graphs, the same outputs, the compile time.

For each model both versions optimize it (the same layout policy), then this prints whether the
optimized graph text, every pass's rule counts, the misses and the program text are the same
(``pyrys_old::`` read as ``pyrys::``), the largest difference between the two outputs, and the
compile time new / old (median over ``--rounds``, order alternating).

    git worktree add /tmp/pyrys_old <commit>
    python benchmarks/ab_behaviour.py --old /tmp/pyrys_old/src --models resnet50 mobilenet_v3_large
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from ab_latency import load_old  # noqa: E402


def _same(old: str, new: str) -> bool:
    return old.replace("pyrys_old::", "pyrys::") == new


def _record(opt) -> dict:
    return {"graph": opt.graph, "fired": [(s.name, dict(s.fired)) for s in opt.history],
            "misses": [str(m) for m in opt.misses], "program": opt.program_text()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="src/ folder of the earlier pyrys (a git worktree)")
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layout", default="nhwc", help="the dnnl layout policy of both")
    args = parser.parse_args()
    import pyrys
    from pyrys.bench.models import build_model, example_inputs
    from pyrys.bench.report import cpu_info

    versions = {"old": load_old(Path(args.old)), "new": pyrys}
    print(f"# {cpu_info()[0]}, {torch.get_num_threads()} threads; old={args.old}")
    for name in args.models:
        model = build_model(name)
        inputs = example_inputs(name, 1, model)
        seconds: dict[str, list[float]] = {key: [] for key in versions}
        opts = {}
        for round_index in range(args.rounds):
            order = list(versions) if round_index % 2 == 0 else list(reversed(versions))
            for key in order:
                start = time.perf_counter()
                opts[key] = versions[key].optimize(model, inputs, layout=args.layout)
                with torch.no_grad():
                    opts[key](*inputs)
                seconds[key].append(time.perf_counter() - start)
        records = {key: _record(opt) for key, opt in opts.items()}
        same = {part: _same(str(records["old"][part]), str(records["new"][part])) for part in records["new"]}
        with torch.no_grad():
            outputs = {key: opt(*inputs) for key, opt in opts.items()}
        difference = (outputs["old"] - outputs["new"]).abs().max().item()
        ratio = statistics.median(seconds["new"]) / statistics.median(seconds["old"])
        print(f"{name}: same {same}; max |old - new| {difference:.3g}; compile+first call "
              f"old {statistics.median(seconds['old']):.2f} s, new {statistics.median(seconds['new']):.2f} s, "
              f"new/old {ratio:.2f}")


if __name__ == "__main__":
    main()
