"""Whether a timing ran on a busy CPU: the share of a core each of its threads got.

    share = process CPU seconds / (wall seconds x threads)

On a quiet machine a timed oneDNN kernel keeps each of its threads on a core (computing, or spinning at
OpenMP's barriers): the share is near 1.  Where another process holds cores, the OS deschedules some of
them and the rest wait at every barrier: 2 threads on 2 cores beside one busy process get 0.5 each, and
a 0.2 ms inner product takes 8 ms (a time slice) in one run and 0.2 in the next, so which of two kernels
is faster is noise (AMD EPYC Zen 1, 2026-12-06: the tuning cache held float32 linear choices made while
the test suite ran in two processes, several the other way round from the same CPU's quiet timings).
A choice timed on a busy CPU serves the process that timed it and is not kept in the tuning cache.
The share counts every thread of the process: other Python threads working at the same time make a
busy CPU look quiet, never a quiet one busy.
"""
from __future__ import annotations

import time

QUIET = 0.75  # a timing whose threads each got at least this share of a core ran on a quiet CPU


class CpuShare:
    """``with CpuShare(threads) as load: ...`` times the block; then ``load.share`` (see the module
    docstring), ``load.quiet`` and ``load.said`` (what a measured choice's text adds where it is busy)."""

    def __init__(self, threads: int):
        self.threads = max(int(threads), 1)
        self.share = 1.0

    def __enter__(self) -> "CpuShare":
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        if wall > 0:
            self.share = (time.process_time() - self._cpu) / (wall * self.threads)

    @property
    def quiet(self) -> bool:
        return is_quiet(self.share)

    @property
    def said(self) -> str:
        return busy_said(self.share)


def is_quiet(share: float) -> bool:
    return share >= QUIET


def timed_quietly(record: dict) -> bool:
    """Whether a tuning-cache record says it was timed on a quiet CPU (older records say nothing: no)."""
    share = record.get("cpu_share")
    return isinstance(share, float) and is_quiet(share)


def busy_said(share: float) -> str:
    """What a choice timed at ``share`` adds to its text: "" where the CPU was quiet."""
    if is_quiet(share):
        return ""
    return f"; timed on a busy CPU ({share:.2f} of a core per thread): not kept in the tuning cache"
