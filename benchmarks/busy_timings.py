"""What a kernel choice's timing says quiet and beside a busy process, and the CPU share that tells them apart.

pyrys times some choices at compile time (float32 linear kernels, int8-or-float32 linears, attention kernels,
layout policies) and keeps them in the tuning cache.  This times oneDNN's two float32 inner-product kernels
(its brgemm pick and its gemm on plain weights, ``backends/dnnl/linear_kernels.py``) at a few transformer
shapes, as the compile does (``measured.inner_product_seconds``), in blocks: quiet, then with a child process
spinning on one core; each block prints both kernels' best times, the faster, and the share of a core the
timing's threads got (``backends/cpu_share.py``: under 0.8, the choice is not kept).

    python benchmarks/busy_timings.py --rounds 3
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import time

import torch

from pyrys.backends.cpu_share import QUIET, CpuShare
from pyrys.backends.dnnl.descriptors import inner_product_pd
from pyrys.backends.dnnl.layout import any_md, plain_md
from pyrys.backends.dnnl.measured import inner_product_seconds
from pyrys.backends.dnnl.primitives import Engine, PrimitiveAttr
from pyrys.backends.threads import with_threads
from pyrys.machine import cpu_info

SHAPES = [(197, 768, 3072), (197, 3072, 768), (197, 768, 2304), (128, 768, 3072), (64, 256, 256)]


def _spin(core: int) -> None:
    os.sched_setaffinity(0, {core})
    while True:
        pass


def _time(engine: Engine, rows: int, inputs: int, outputs: int) -> tuple[float, float, float]:
    """(brgemm ms, gemm ms, CPU share) of one timing as a compile makes it."""
    f32 = torch.float32
    x, dst, bias = plain_md([rows, inputs], f32), plain_md([rows, outputs], f32), plain_md([outputs], f32)
    pds = [inner_product_pd(engine, x, w, dst, bias, attr=PrimitiveAttr())
           for w in (any_md([outputs, inputs], f32), plain_md([outputs, inputs], f32))]
    with CpuShare(torch.get_num_threads()) as load:
        brgemm, gemm = inner_product_seconds(engine, [(pd, True, {}) for pd in pds], 7)
    return brgemm * 1e3, gemm * 1e3, load.share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="quiet/busy block pairs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine()
    print(f"CPU {cpu_info()}, {args.threads} threads; a share under {QUIET} is busy (not kept)")
    print("| block | rows x in -> out | brgemm ms | gemm ms | faster | CPU share |")
    print("| --- | --- | ---: | ---: | --- | ---: |")
    for _ in range(args.rounds):
        for block in ("quiet", "busy"):
            spinner = None
            if block == "busy":
                spinner = multiprocessing.Process(target=_spin, args=(0,), daemon=True)
                spinner.start()
                time.sleep(0.5)
            try:
                for rows, inputs, outputs in SHAPES:
                    brgemm, gemm, share = with_threads(args.threads, _time, engine, rows, inputs, outputs)
                    print(f"| {block} | {rows} x {inputs} -> {outputs} | {brgemm:.2f} | {gemm:.2f} | "
                          f"{'gemm' if gemm <= 0.95 * brgemm else 'brgemm'} | {share:.2f} |", flush=True)
            finally:
                if spinner is not None:
                    spinner.terminate()
                    spinner.join()


if __name__ == "__main__":
    main()
