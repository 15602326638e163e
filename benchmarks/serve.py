"""Serving on Ray Serve: requests/s and p50/p99 latency of pyrys replicas (from ``pyrys.save``) against
the same model in eager PyTorch, 1 and 2 replicas, dynamic batching on and off, all in one run.

One Ray runtime and one Serve proxy; each configuration is deployed as the ``pyrys`` application
(the same :mod:`pyrys.ray.serve_app` code for both: bodies, batching, threads), then ``--clients``
closed-loop clients (threads with keep-alive HTTP connections, in this process) send one-image
``.npy`` requests for ``--seconds`` after a warm-up.  Every configuration runs once per round,
the order reversed on odd rounds; reported: the median over rounds.  Replicas x threads = the CPUs
(``--threads`` per replica = CPUs / replicas); the clients share those CPUs, as they would on one host.

    python benchmarks/serve.py --model resnet18 --rounds 2 --seconds 8
"""
from __future__ import annotations

import argparse
import functools
import http.client
import io
import os
import statistics
import tempfile
import threading
import time

import numpy as np
import torch

import pyrys
from pyrys.bench.models import build_model, example_inputs
from pyrys.bench.report import cpu_info
from pyrys.machine import available_cpus


class Eager:
    """The model in eager PyTorch, ``threads`` threads per call: the baseline replica."""

    def __init__(self, name: str, threads: int):
        torch.set_num_threads(threads)
        self.model = build_model(name)

    def __call__(self, *inputs):
        with torch.no_grad():
            return self.model(*inputs)


def serve_config(system: str, name: str, path: str, replicas: int, batching: bool):
    from pyrys.ray.serve_app import application

    threads = max(1, available_cpus() // replicas)
    load = functools.partial(pyrys.load, path, threads=threads) if system == "pyrys" else functools.partial(Eager, name, threads)
    return application(load, replicas=replicas, cpus_per_replica=threads, max_batch=8 if batching else 1,
                       batch_wait_s=0.005)


def load_test(port: int, body: bytes, clients: int, seconds: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) of ``clients`` closed-loop clients for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    deadline = time.perf_counter() + seconds
    failures: list[str] = []

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            connection.request("POST", "/", body=body)
            answer = connection.getresponse()
            answer.read()
            if answer.status != 200:
                failures.append(f"HTTP {answer.status}")
                return
            latencies[index].append(time.perf_counter() - start)
        connection.close()

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"requests failed: {failures[:3]}")
    every = sorted(t for per in latencies for t in per)
    return len(every) / elapsed, every[len(every) // 2] * 1e3, every[min(len(every) - 1, int(len(every) * 0.99))] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    import ray
    from ray import serve

    model = build_model(args.model)
    x = example_inputs(args.model, 1, model)
    buffer = io.BytesIO()
    np.save(buffer, x[0].numpy())
    body = buffer.getvalue()
    folder = tempfile.mkdtemp(prefix="pyrys_serve_bench_")
    opt = pyrys.optimize(model, x, dynamic=True)
    for rows in range(2, 9):  # every batch a replica can form: saved, so no replica compiles while timed
        opt(example_inputs(args.model, rows, model)[0])
    path = str(pyrys.save(opt, os.path.join(folder, "model.pyrys")))
    del opt
    configs = [(system, replicas, batching) for system in ("pyrys", "eager") for replicas in (1, 2)
               for batching in (False, True)]
    results: dict[tuple, list[tuple[float, float, float]]] = {c: [] for c in configs}
    ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False, logging_level="ERROR")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        for round_index in range(args.rounds):
            for config in configs if round_index % 2 == 0 else list(reversed(configs)):
                system, replicas, batching = config
                serve.run(serve_config(system, args.model, path, replicas, batching), name="pyrys", route_prefix="/")
                load_test(args.port, body, args.clients, 1.0)  # warm-up: every replica's first calls
                results[config].append(load_test(args.port, body, args.clients, args.seconds))
                serve.delete("pyrys")  # before the next one: a rolling update would need both sets of CPUs
                print(f"# round {round_index}: {config}: {results[config][-1]}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    cpu = " ".join([cpu_info()[0], "/".join(cpu_info()[1])])
    print(f"\n# {args.model}, 1 image per request, {args.clients} clients, {args.seconds:g} s x {args.rounds} rounds; "
          f"{cpu}, {available_cpus()} CPUs, torch {torch.__version__}, ray {ray.__version__}")
    print("| system | replicas x threads | batching | requests/s | p50 ms | p99 ms | requests/s vs eager |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for config in configs:
        system, replicas, batching = config
        rate, p50, p99 = (statistics.median(r[i] for r in results[config]) for i in range(3))
        eager_rate = statistics.median(r[0] for r in results[("eager", replicas, batching)])
        print(f"| {system} | {replicas} x {max(1, available_cpus() // replicas)} | "
              f"{'up to 8 within 5 ms' if batching else 'off'} | {rate:.1f} | {p50:.1f} | {p99:.1f} | "
              f"{rate / eager_rate:.2f} |")


if __name__ == "__main__":
    main()
