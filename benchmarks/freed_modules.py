"""RSS of a process that optimizes (or loads) a model, calls it and drops it, again and again, without
``gc.collect()``: what a freed module leaves until the next one is made.

One process per loop (RSS only grows within one); after each round, the RSS above the process's before the
loop (glibc's free pages returned first).

    python benchmarks/freed_modules.py --rounds 8      # a 96 MiB MLP: optimize, call, del; load, call, del
"""
from __future__ import annotations

import argparse

from pyrys.bench.measure import in_fresh_process

CHILD = r"""
import ctypes, gc, json, sys, tempfile, warnings, torch, pyrys
from pyrys.bench.measure import current_rss_bytes as rss
warnings.simplefilter("ignore")
how, rounds = sys.argv[1], int(sys.argv[2])
trim = ctypes.CDLL(None).malloc_trim
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096),
                            torch.nn.ReLU(), torch.nn.Linear(4096, 1024)).eval()
x = torch.rand(4, 1024)
path = tempfile.mkdtemp() + "/saved"
pyrys.save(pyrys.optimize(model, (x,)), path)
pyrys.optimize(model, (x,))(x)
gc.collect(); trim(0); start = rss()
grown = []
for _ in range(rounds):
    opt = pyrys.load(path) if how == "load" else pyrys.optimize(model, (x,))
    opt(x)
    del opt
    trim(0)
    grown.append((rss() - start) / 2**20)
print(json.dumps(grown))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    for how in ("optimize", "load"):
        grown = in_fresh_process(CHILD, how, str(args.rounds))
        print(f"{how}, call, del: RSS +" + ", +".join(f"{mib:.0f}" for mib in grown) + " MiB")


if __name__ == "__main__":
    main()
