"""Memory while more input shapes take turns than ``max_shapes`` holds: the packed bytes and RSS after each
round of lengths, which should stay flat once a dropped signature's constants go with it.

A model whose capture folds a constant per length (``linear(x + pos[:T])``: each length its own slice of a
position table), called at 40 lengths a round, 4 rounds, ``max_shapes=1``, under ``dynamic=False`` (each length
captured on its own) and ``dynamic=None`` (a branch on the length makes a third of them captures of their own).

    python benchmarks/rotating_shapes.py
"""
from __future__ import annotations

import ctypes
import gc
import os
import warnings

import torch
from torch import nn

import pyrys


def rss_mib() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Positions(nn.Module):
    def __init__(self, branch: bool):
        super().__init__()
        self.branch, self.pos, self.linear = branch, nn.Parameter(torch.randn(256, 4096)), nn.Linear(4096, 8)

    def forward(self, x):
        length = x.shape[1]
        if self.branch and length % 3 == 0:
            return self.linear(x * self.pos[:length])
        return self.linear(x + self.pos[:length])


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    for dynamic, branch in ((False, False), (None, True)):
        model = Positions(branch).eval()
        opt = pyrys.optimize(model, (torch.randn(1, 4, 4096),), dynamic=dynamic, max_shapes=1)
        start, worst = rss_mib(), 0.0
        for round_ in range(4):
            for length in range(5, 45):
                x = torch.randn(1, length, 4096)
                with torch.no_grad():
                    worst = max(worst, pyrys.relative_error(opt(x), model(x)))
            print(f"dynamic={dynamic}, round {round_ + 1} (40 lengths): packed "
                  f"{opt.memory()['packed_weights'] / 2**20:.1f} MiB, RSS +{rss_mib() - start:.0f} MiB, "
                  f"worst error {worst:.1e}", flush=True)


if __name__ == "__main__":
    main()
