"""Latency under CPU load: pyrys and ONNX Runtime quiet, then with a busy loop on one core, in one process.

A server shares its CPUs.  Each system runs ``--threads`` threads per call; a child process spins on
one core (``--busy-cores``; a fair share of a 2-core machine is then 2x slower).  Quiet and loaded blocks
alternate, systems interleaved within each block, each system called unmeasured for ``--settle`` seconds
after the load starts; the table gives the medians and loaded / quiet.  pyrys runs fewer threads while
that is faster (``pyrys.backends.thread_choice``): "recovery s" is how long after the busy loop ends its
calls took to come back within 1.2x the quiet median (the median over rounds; ``pyrys threads`` what
``opt.thread_choice()`` said at the end of the last loaded block).  pyrys is measured as set up by the
environment (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` are read when OpenMP loads, so set them on the command
line to compare).

    python benchmarks/under_load.py --models resnet50 --rounds 4
    OMP_WAIT_POLICY=PASSIVE python benchmarks/under_load.py --models resnet50
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time

import torch

from pyrys.bench.measure import interleaved_ms
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.peers import OnnxRuntime, PyrysPeer


def _spin(core: int) -> None:
    os.sched_setaffinity(0, {core})
    while True:
        pass


def _settle(runs: dict, seconds: float) -> None:
    """Call every system for ``seconds`` in all, unmeasured."""
    for runner, inputs in runs.values():
        end = time.perf_counter() + seconds / len(runs)
        while time.perf_counter() < end:
            runner(*inputs)


def _recovery_s(runner, inputs, quiet_ms: float, limit: float = 30.0) -> float:
    """Seconds of back-to-back calls until one takes at most 1.2x ``quiet_ms`` (``limit`` if none does)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        call = time.perf_counter()
        runner(*inputs)
        if (time.perf_counter() - call) * 1e3 <= 1.2 * quiet_ms:
            return call - start
    return limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="quiet/loaded block pairs")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per system per block")
    parser.add_argument("--settle", type=float, default=2.0, help="unmeasured calls after the load starts")
    parser.add_argument("--busy-cores", type=int, nargs="+", default=[1], help="a busy loop pinned to each")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1 and --seconds more than 0")
    from pyrys.machine import cpu_info

    torch.set_num_threads(args.threads)
    env = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS") if k in os.environ}
    print(f"# {cpu_info()[0]}, {os.cpu_count()} cores, {args.threads} threads per call; env {env or 'default'}; "
          f"busy loops on cores {args.busy_cores}")
    print("| model | system | quiet ms | loaded ms | loaded / quiet | loaded / ORT loaded | recovery s |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
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
            recovery: list[float] = []
            pyrys_runner = runs[peers[0].name][0]
            for _ in range(args.rounds):
                for n, times in interleaved_ms(runs, 1, args.seconds).items():
                    quiet[n] += times
                busy = [multiprocessing.Process(target=_spin, args=(core,), daemon=True) for core in args.busy_cores]
                for process in busy:
                    process.start()
                try:
                    _settle(runs, args.settle)
                    for n, times in interleaved_ms(runs, 1, args.seconds).items():
                        loaded[n] += times
                    choice = pyrys_runner.thread_choice()
                finally:
                    for process in busy:
                        process.terminate()
                        process.join()
                recovery.append(_recovery_s(pyrys_runner, inputs, statistics.median(quiet[peers[0].name])))
        ort = statistics.median(loaded[OnnxRuntime.name]) if OnnxRuntime.name in loaded else float("nan")
        for n in runs:
            q, l_ = statistics.median(quiet[n]), statistics.median(loaded[n])
            back = f"{statistics.median(recovery):.2f}" if runs[n][0] is pyrys_runner else ""
            print(f"| {name} | {n} | {q:.2f} | {l_:.2f} | {l_ / q:.2f} | {l_ / ort:.2f} | {back} |")
        print(f"# {name}: pyrys threads at the end of the last loaded block: {choice}")


if __name__ == "__main__":
    main()
