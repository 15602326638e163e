"""pyrys against an earlier pyrys, in one process: the same models, timed interleaved, ratios reported.

The earlier source tree is copied to a temporary folder as the package ``pyrys_old`` (imports,
``torch.ops`` namespace and the dynamo backend name renamed), so both versions load into one
process and share its libdnnl.  Each round times every version for ``--seconds`` after a short
warm-up, order alternating; the reported ratio is the median over rounds of new / old in the
same round, which a slow drift of the shared machine does not move.  Within ~5% of 1 is a tie.

    git worktree add /tmp/pyrys_old <commit>
    python benchmarks/ab_latency.py --old /tmp/pyrys_old/src --models resnet50 pyrys.bench.models:conv_chain
"""
from __future__ import annotations

import argparse
import importlib
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

RENAMES = [  # (pattern, replacement) applied to every .py file of the old tree
    (r"\bpyrys\.", "pyrys_old."), (r"from pyrys import", "from pyrys_old import"), (r"import pyrys\b", "import pyrys_old"),
    (r'"pyrys::', '"pyrys_old::'), (r"torch\.ops\.pyrys\b", "torch.ops.pyrys_old"),
    (r'BACKEND_NAME = "pyrys"', 'BACKEND_NAME = "pyrys_old"'),
]


def load_old(src: Path):
    """The package at ``src/pyrys`` imported as ``pyrys_old``."""
    folder = Path(tempfile.mkdtemp(prefix="pyrys_old_"))
    shutil.copytree(src / "pyrys", folder / "pyrys_old")
    for path in (folder / "pyrys_old").rglob("*.py"):
        text = path.read_text()
        for pattern, replacement in RENAMES:
            text = re.sub(pattern, replacement, text)
        path.write_text(text)
    sys.path.insert(0, str(folder))
    return importlib.import_module("pyrys_old")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="src/ folder of the earlier pyrys (a git worktree)")
    parser.add_argument("--models", nargs="+", default=["resnet50", "pyrys.bench.models:conv_chain"])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--layout", default="auto", help="the dnnl layout policy of both (auto: each measures its own)")
    args = parser.parse_args()
    import pyrys
    from pyrys.bench.measure import interleaved_ms
    from pyrys.bench.models import build_model, example_inputs
    from pyrys.bench.report import cpu_info

    versions = {"old": load_old(Path(args.old)), "new": pyrys}
    cpu = " ".join([cpu_info()[0], "/".join(cpu_info()[1])])
    print(f"# {cpu}, {torch.get_num_threads()} threads; old={args.old}, new={Path(pyrys.__file__).parent}")
    with torch.no_grad():
        for name in args.models:
            model = build_model(name)
            inputs = example_inputs(name, 1, model)
            opts = {key: package.optimize(model, inputs, layout=args.layout) for key, package in versions.items()}
            policies = {key: opt._first.program.policy.split(" ")[0] for key, opt in opts.items()}
            times = interleaved_ms({key: (opt, inputs) for key, opt in opts.items()}, args.rounds, args.seconds)
            ratios = [new / old for new, old in zip(times["new"], times["old"])]
            print(f"{name}: old {statistics.median(times['old']):.4f} ms, new {statistics.median(times['new']):.4f} ms, "
                  f"new/old {statistics.median(ratios):.3f} (rounds: {min(ratios):.3f}-{max(ratios):.3f}; "
                  f"layouts {policies['old']} / {policies['new']})")


if __name__ == "__main__":
    main()
