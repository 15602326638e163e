"""An unbatched input against a batch of one through pyrys, and eager, interleaved in one process.

VGG-11's convolutions, ReLUs and max poolings (no BatchNorm: torch's refuses an unbatched input) on
``[3, 112, 112]`` and on ``[1, 3, 112, 112]``: pyrys runs the unbatched ops as a batch of one
(``passes/legalize.py``), so the two should tie.

    python benchmarks/unbatched.py --rounds 20
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision

import pyrys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = torchvision.models.vgg11().features.eval()
    x = torch.randn(3, 112, 112)
    unbatched, batched = pyrys.optimize(model, (x,)), pyrys.optimize(model, (x[None],))
    calls = {"eager": lambda: model(x), "pyrys unbatched": lambda: unbatched(x),
             "pyrys batch of one": lambda: batched(x[None])}
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    print(f"error of the unbatched program against eager: {pyrys.relative_error(unbatched(x), model(x)):.1e}; "
          f"torch convolutions in its program: {unbatched.program_text().count('torch::conv')}")
    for name, values in times.items():
        print(f"{name}: median {statistics.median(values) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
