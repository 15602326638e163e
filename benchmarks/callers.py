"""Throughput of concurrent callers: 2 threads calling one module with ``threads=1`` each,
against 1 thread calling a module with ``threads=2``, and 2 threads calling one with the default
(each caller's own thread count, 2, or fewer while that is faster: ``opt.thread_choice()``),
interleaved in one process.

On a 2-core machine both use both cores; what differs is where the parallelism is: inside
each call (OpenMP teams of 2) or across calls (two frames of the same program running at
once).  Each round times both configurations for ``--seconds`` each, order alternating,
after a 0.25 s warm-up; reported: calls per second (median over rounds) and the median
latency of a call.

    python benchmarks/callers.py --models resnet50 mobilenet_v3_large --rounds 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

import pyrys
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.report import cpu_info


def timed_calls(opt, inputs: tuple, callers: int, seconds: float) -> tuple[float, float]:
    """(calls per second over all callers, median latency in ms) with ``callers`` threads for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(callers)]
    barrier = threading.Barrier(callers + 1)

    def caller(index: int, deadline_box: list) -> None:
        barrier.wait()
        while time.perf_counter() < deadline_box[0]:
            start = time.perf_counter()
            opt(*inputs)
            latencies[index].append(time.perf_counter() - start)

    deadline = [float("inf")]
    threads = [threading.Thread(target=caller, args=(i, deadline)) for i in range(callers)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds
    start = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    every = sorted(t for per in latencies for t in per)
    return len(every) / elapsed, every[len(every) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    cpu = " ".join([cpu_info()[0], "/".join(cpu_info()[1])])
    print(f"# {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, pyrys {pyrys.__version__}")
    print("| model | 1 caller, threads=2: calls/s | 2 callers, threads=1: calls/s | ratio | "
          "2 callers, default threads: calls/s | / 2 callers, threads=1 | latency ms (1x2 / 2x1 / 2x default) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    configs = {"1x2": (2, 1), "2x1": (1, 2), "2xd": (None, 2)}  # name -> (threads per call, callers)
    for name in args.models:
        model = build_model(name)
        inputs = example_inputs(name, 1, model)
        with torch.no_grad():
            modules = {key: pyrys.optimize(model, inputs, threads=threads) for key, (threads, _) in configs.items()}
            results: dict[str, list[tuple[float, float]]] = {key: [] for key in configs}
            for round_index in range(args.rounds):
                order = list(configs) if round_index % 2 == 0 else list(reversed(configs))
                for key in order:
                    _, callers = configs[key]
                    timed_calls(modules[key], inputs, callers, 0.25)
                    results[key].append(timed_calls(modules[key], inputs, callers, args.seconds))
        rate = {key: statistics.median(r[0] for r in rows) for key, rows in results.items()}
        latency = {key: statistics.median(r[1] for r in rows) for key, rows in results.items()}
        print(f"| {name} | {rate['1x2']:.1f} | {rate['2x1']:.1f} | {rate['2x1'] / rate['1x2']:.2f} | "
              f"{rate['2xd']:.1f} | {rate['2xd'] / rate['2x1']:.2f} | "
              f"{latency['1x2']:.2f} / {latency['2x1']:.2f} / {latency['2xd']:.2f} |")
        print(f"# {name}, 2 callers with default threads, at the end: {modules['2xd'].thread_choice()}")


if __name__ == "__main__":
    main()
