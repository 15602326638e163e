"""Interleaved timing of several systems on one model, in one process.

Every system is prepared first; then come R rounds, and in each round every system
(in an order rotated by one each round) is warmed up for ``warmup_s`` and timed for
a block of iterations. Warming up before each block matters: ONNX Runtime's worker
threads keep spinning ~50 ms after a run and slow whatever runs next.

What is recorded per system:
- latency: median and p10/p90 over every timed iteration of every round;
- compile time: ``prepare()`` plus the first call (torch.compile compiles lazily);
- memory: peak resident-set growth during ``prepare()`` and the first call. The
  kernel's peak counter (``VmHWM``) is reset through ``/proc/self/clear_refs``
  just before, so the figure is ``VmHWM after - VmRSS before``: what the system adds
  (weight copies, compiled code, transient export buffers) on top of the eager model
  already in memory. Where the reset is not allowed it falls back to the growth
  of the current RSS (``/proc/self/statm``), which misses transient peaks.
- error vs eager: :func:`pyrys.relative_error`, ``max|y - y_eager| / max|y_eager|`` (the worst
  output), the measure ``pyrys.FP32_TOLERANCE`` bounds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from pyrys.bench.peers import Inputs, Peer, Runner
from pyrys.numerics import relative_error

MIB = 1024 * 1024


@dataclass
class TimingPlan:
    """How long to measure: rounds, warm-up per block, target seconds per timed block."""

    rounds: int = 5
    warmup_s: float = 0.25
    block_s: float = 1.0
    min_iters: int = 3
    max_iters: int = 2000


@dataclass
class SystemResult:
    """One system's measurements on one model and batch size."""

    system: str
    status: str = "ok"  # "ok", "skipped" or "error"
    note: str = ""
    compile_s: float | None = None
    peak_rss_mib: float | None = None
    max_rel_error: float | None = None
    samples_s: list[float] = field(default_factory=list)
    runner: Runner | None = field(default=None, repr=False)

    def percentile_ms(self, q: float) -> float | None:
        """The q-th percentile of the per-iteration latency, in ms."""
        return float(np.percentile(self.samples_s, q) * 1e3) if self.samples_s else None


def pin_threads(threads: int) -> int:
    """Set torch's intra-op thread count and return what torch reports."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def current_rss_bytes() -> int:
    """Resident set size from ``/proc/self/statm``."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def in_fresh_process(code: str, *args: str) -> Any:
    """Run ``code`` (a script that prints one JSON line last) in a new Python process, tuning cache off,
    and return that line's value: RSS only grows within a process, and a first compile is what is timed."""
    env = {**os.environ, "PYRYS_CACHE_DIR": ""}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code, *args], check=True, capture_output=True,
                         text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter; False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """``VmHWM`` from ``/proc/self/status``: the peak RSS since the last reset."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM missing from /proc/self/status")


def as_tensors(output: Any) -> list[torch.Tensor]:
    """Flatten a model output (tensor, array, tuple, list, dict) into float tensors."""
    if isinstance(output, torch.Tensor):
        return [output.detach().float()]
    if isinstance(output, np.ndarray):
        return [torch.from_numpy(np.array(output)).float()]
    if isinstance(output, dict):
        output = list(output.values())
    return [tensor for item in output for tensor in as_tensors(item)]


def error_vs_eager(output: Any, reference: Any) -> float:
    """:func:`pyrys.relative_error` of a system's output (arrays, lists, dicts) against eager's ``reference``,
    both as float tensors in eager's shapes."""
    got, want = as_tensors(output), as_tensors(reference)
    if len(got) != len(want):
        raise ValueError(f"{len(got)} outputs, eager gives {len(want)}")
    return relative_error([g.reshape(w.shape) for g, w in zip(got, want)], want)


def error_text(error: BaseException) -> str:
    """The first line of an exception, short enough for a table cell."""
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0]}"[:300]


def prepare_system(peer: Peer, model: torch.nn.Module, inputs: Inputs, reference: Any) -> SystemResult:
    """Prepare one system, timing compile and memory; never raises."""
    ok, reason = peer.available()
    if not ok:
        return SystemResult(peer.name, status="skipped", note=reason)
    try:
        return _prepare_and_check(peer, model, inputs, reference)
    except Exception as error:  # a failing peer is a result, not a crash
        return SystemResult(peer.name, status="error", note=error_text(error))


def _prepare_and_check(peer: Peer, model: torch.nn.Module, inputs: Inputs, reference: Any) -> SystemResult:
    start_rss, peak_known = current_rss_bytes(), reset_peak_rss()
    start = time.perf_counter()
    with torch.no_grad():
        runner = peer.prepare(model, inputs)
        output = runner(*inputs)
    compile_s = time.perf_counter() - start
    end_rss = peak_rss_bytes() if peak_known else current_rss_bytes()
    return SystemResult(peer.name, compile_s=compile_s, peak_rss_mib=(end_rss - start_rss) / MIB,
                        max_rel_error=error_vs_eager(output, reference), runner=runner, note=peer.note(runner))


def warm_up(runner: Runner, inputs: Inputs, seconds: float) -> float:
    """Call ``runner`` for at least ``seconds`` (at least once); return the mean latency."""
    calls, start = 0, time.perf_counter()
    while calls == 0 or time.perf_counter() - start < seconds:
        runner(*inputs)
        calls += 1
    return (time.perf_counter() - start) / calls


def time_block(runner: Runner, inputs: Inputs, iterations: int) -> list[float]:
    """Per-iteration latencies, in seconds, of ``iterations`` calls."""
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        runner(*inputs)
        samples.append(time.perf_counter() - start)
    return samples


def median_ms(runner: Runner, inputs: Inputs, seconds: float, warm_seconds: float = 0.2) -> float:
    """Median latency in ms of a block of calls lasting about ``seconds``, after a warm-up."""
    mean = warm_up(runner, inputs, warm_seconds)
    return statistics.median(time_block(runner, inputs, max(5, int(seconds / max(mean, 1e-9))))) * 1e3


def interleaved_ms(runs: dict[str, tuple[Runner, Inputs]], rounds: int, seconds: float) -> dict[str, list[float]]:
    """Per name, the :func:`median_ms` of each round; the order alternates between rounds, so a slow
    drift of a shared machine weighs on every name alike (compare the rounds' ratios)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(rounds):
        order = list(runs) if round_index % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(median_ms(*runs[name], seconds))
    return times


def measure_block(result: SystemResult, inputs: Inputs, plan: TimingPlan) -> None:
    """Warm one system up, then time one block of iterations; errors mark the result."""
    try:
        with torch.no_grad():
            estimate = warm_up(result.runner, inputs, plan.warmup_s)
            iterations = int(min(plan.max_iters, max(plan.min_iters, plan.block_s / estimate)))
            result.samples_s += time_block(result.runner, inputs, iterations)
    except Exception as error:
        result.status, result.note, result.runner = "error", error_text(error), None


def rotated(items: list, shift: int) -> list:
    """``items`` rotated left by ``shift``."""
    shift = shift % len(items) if items else 0
    return items[shift:] + items[:shift]


def time_rounds(results: list[SystemResult], inputs: Inputs, plan: TimingPlan,
                on_block: Callable[[str], None] = lambda name: None) -> None:
    """Interleave timing blocks of every prepared system over ``plan.rounds`` rounds."""
    for round_index in range(plan.rounds):
        for result in rotated(results, round_index):
            if result.status == "ok":
                measure_block(result, inputs, plan)
            on_block(result.system)


def benchmark_model(peers: list[Peer], model: torch.nn.Module, inputs: Inputs, plan: TimingPlan,
                    on_block: Callable[[str], None] = lambda name: None) -> list[SystemResult]:
    """Prepare every system on ``model``, then time them interleaved; runners are dropped after."""
    with torch.no_grad():
        reference = model(*inputs)
    results = []
    for peer in peers:
        results.append(prepare_system(peer, model, inputs, reference))
        on_block(peer.name)
    time_rounds(results, inputs, plan, on_block)
    for result in results:
        result.runner = None
    return results
