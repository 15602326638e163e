"""What the compile-time check against torch costs (``src/pyrys/backends/dnnl/self_check.py``): optimize +
first call in fresh processes, alternating with the check disabled, medians.

    python benchmarks/self_check_cost.py [--models resnet50 bert4] [--rounds 3]

Results: RESULTS.md ("a check against torch at compile time")."""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def one(model: str, check: bool) -> float:
    import torch

    import pyrys
    from pyrys.backends.dnnl import self_check

    if not check:
        self_check.checkable = lambda gm, inputs: False
    if model == "bert4":
        from pyrys.bench.models import bert4

        net = bert4()
        inputs = tuple(net.example_inputs(1))
    else:
        from pyrys.testing import torchvision_model

        net, inputs = torchvision_model(model), (torch.rand(1, 3, 224, 224),)
    warm = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    pyrys.optimize(warm, (torch.rand(1, 3, 8, 8),))(torch.rand(1, 3, 8, 8))  # the libraries loaded first
    start = time.perf_counter()
    pyrys.optimize(net, inputs)(*inputs)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "bert4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "on|off"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(one(args.one[0], args.one[1] == "on"))
        return
    env = {**os.environ, "PYRYS_CACHE_DIR": ""}  # the tuning cache off: every compile measures
    seconds: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for model in args.models:
            for mode in ("on", "off"):
                out = subprocess.run([sys.executable, __file__, "--one", model, mode], env=env, check=True,
                                     capture_output=True, text=True).stdout
                seconds.setdefault((model, mode), []).append(float(out.strip().splitlines()[-1]))
    for model in args.models:
        on, off = (statistics.median(seconds[model, mode]) for mode in ("on", "off"))
        print(f"{model:12s} check on {on:.2f} s, off {off:.2f} s ({on / off:.2f}x)")


if __name__ == "__main__":
    main()
