"""Latency under CPU load: pyrys and ONNX Runtime quiet, then with a busy loop on one core, in one process.

A server shares its CPUs.  Each system runs ``--threads`` threads per call; a child process spins on
one core (``--busy-core``; a fair share of a 2-core machine is then 2x slower).  Quiet and loaded blocks
alternate, systems interleaved within each block; the table gives the medians and loaded / quiet.
pyrys is measured as set up by the environment (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` are read when
OpenMP loads, so set them on the command line to compare).

    python benchmarks/under_load.py --models resnet50 --rounds 4
    OMP_WAIT_POLICY=PASSIVE python benchmarks/under_load.py --models resnet50
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics

import torch

from pyrys.bench.measure import interleaved_ms
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.peers import OnnxRuntime, PyrysPeer


def _spin(core: int) -> None:
    os.sched_setaffinity(0, {core})
    while True:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="quiet/loaded block pairs")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per system per block")
    parser.add_argument("--busy-core", type=int, default=1)
    args = parser.parse_args()
    from pyrys.machine import cpu_info

    torch.set_num_threads(args.threads)
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS") if k in os.environ}
    print(f"# {cpu_info()[0]}, {os.cpu_count()} cores, {args.threads} threads per call; env {env or 'default'}")
    print("| model | system | quiet ms | loaded ms | loaded / quiet | loaded / ORT loaded |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    peers = [PyrysPeer(args.threads, "dnnl")]
    if OnnxRuntime(args.threads).available()[0]:
        peers.append(OnnxRuntime(args.threads))
    for name in args.models:
        model = build_model(name)
        inputs = example_inputs(name, 1, model)
        with torch.no_grad():
            runs = {peer.name: (peer.prepare(model, inputs), inputs) for peer in peers}
            quiet: dict[str, list[float]] = {n: [] for n in runs}
            loaded: dict[str, list[float]] = {n: [] for n in runs}
            for _ in range(args.rounds):
                for n, times in interleaved_ms(runs, 1, args.seconds).items():
                    quiet[n] += times
                busy = multiprocessing.Process(target=_spin, args=(args.busy_core,), daemon=True)
                busy.start()
                try:
                    for n, times in interleaved_ms(runs, 1, args.seconds).items():
                        loaded[n] += times
                finally:
                    busy.terminate()
                    busy.join()
        ort = statistics.median(loaded[OnnxRuntime.name]) if OnnxRuntime.name in loaded else float("nan")
        for n in runs:
            q, l_ = statistics.median(quiet[n]), statistics.median(loaded[n])
            print(f"| {name} | {n} | {q:.2f} | {l_:.2f} | {l_ / q:.2f} | {l_ / ort:.2f} |")


if __name__ == "__main__":
    main()
