"""How many threads a call runs with when the caller pinned no count: the fastest of ``n, n/2, ..., 1``
as measured on recent calls (``n``: the caller's thread count).

Why: on CPUs that other work keeps busy, OpenMP's threads spin at every barrier for a team-mate that
is not running, and a call with ``n`` threads can take 3x its quiet time where a fair share is 2x;
one thread fewer then waits for nobody.

How: each call's seconds update an average for the count it ran with,
``average += (seconds - average) / 4``, and ``best`` is the lowest average seen.  The active count
changes only when a *probe* (one call run with a neighbouring count) takes under ``SWITCH`` times the
active count's average.  A probe comes

- at once when the active average rises above ``LOAD_SIGNAL`` times its best (the CPUs got busier);
  the next lower count, built then if it never was;
- every ``interval`` calls (or ``seconds_cap`` seconds): a neighbour whose program exists, the higher
  one first.  The interval starts at ``FIRST_INTERVAL`` calls and doubles after every probe that
  loses, up to ``TOP_CAP`` calls (60 s) at the full count, and ``BELOW_CAP`` calls (5 s) below it,
  where a CPU that became free must be noticed soon.

A probe that loses makes the active count's current average its best, so a lasting slowdown that no
other count beats does not probe again and again.  On a quiet machine nothing below the full count is
ever built (a program per count costs memory and a build); once built, its probes cost at most
``(probe / active - 1) / interval`` of the time: under 0.1% at the cap.
"""
from __future__ import annotations

import math
from collections.abc import Container

LOAD_SIGNAL = 1.3
SWITCH = 0.9
FIRST_INTERVAL = 8
TOP_CAP = (1024, 60.0)    # (calls, seconds) between probes at the full count
BELOW_CAP = (64, 5.0)     # and below it


def thread_counts(threads: int) -> list[int]:
    """``threads`` halved down to 1, highest first: 8 -> [8, 4, 2, 1], 6 -> [6, 3, 1], 1 -> [1]."""
    counts = [threads]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts


class ThreadChooser:
    """The thread count for each call of one program family (a program per count), from measured calls.

    Use: ``count = chooser.pick(built, now)``; run the call with ``count`` threads; ``chooser.record(count,
    seconds)``.  Safe from many threads: each update is a few attribute writes, and a race between two
    callers costs at most one stale average (never a wrong result: every count runs the same graph).
    A call that picks nothing new costs about a microsecond here."""

    def __init__(self, threads: int, now: float = 0.0):
        self.counts = thread_counts(threads)
        self.average: dict[int, float] = {}
        self.best: dict[int, float] = dict.fromkeys(self.counts, math.inf)
        self.interval, self.since_probe, self.last_probe = FIRST_INTERVAL, 0, now
        self.slower = False    # the active average crossed LOAD_SIGNAL x best: probe lower next call
        self.probing: int | None = None
        self._activate(self.counts[0])

    def pick(self, built: Container[int], now: float) -> int:
        """The thread count for the next call; ``built``: the counts whose programs exist; ``now``:
        ``time.perf_counter()``."""
        if self.slower and self.lower is not None:
            return self._probe(self.lower)
        if self.since_probe >= self.due_calls or now - self.last_probe >= self.due_seconds:
            for count in (self.higher, self.lower):
                if count is not None and count in built:
                    return self._probe(count)
        return self.active

    def record(self, count: int, seconds: float, now: float) -> None:
        """What a call with ``count`` threads took, ending at ``now``."""
        if count == self.active:
            average = self.active_average
            average = seconds if average is None else average + (seconds - average) * 0.25
            self.active_average = average
            if average < self.active_best:
                self.active_best = average
            elif average > LOAD_SIGNAL * self.active_best:
                self.slower = True
            self.since_probe += 1
        elif count == self.probing:
            self._judge(count, seconds, now)

    def _probe(self, count: int) -> int:
        self.probing, self.slower = count, False
        return count

    def _judge(self, count: int, seconds: float, now: float) -> None:
        self.probing, self.since_probe, self.last_probe = None, 0, now
        active = self.active_average if self.active_average is not None else math.inf
        self._keep_active()
        self.average[count] = seconds
        self.best[count] = min(self.best[count], seconds)
        if seconds < SWITCH * active:
            self.interval = FIRST_INTERVAL
            self._activate(count)
        else:
            self.interval = min(2 * self.interval, max(TOP_CAP[0], BELOW_CAP[0]))
            self.best[self.active] = active   # the slowdown no other count beats is the new normal
            self._activate(self.active)

    def _keep_active(self) -> None:
        """Store the active count's average and best with the others'."""
        if self.active_average is not None:
            self.average[self.active] = self.active_average
        self.best[self.active] = self.active_best

    def _activate(self, count: int) -> None:
        """Make ``count`` the active count: its average and best, its neighbours, and when the next
        periodic probe is due."""
        i = self.counts.index(count)
        self.active, self.active_average, self.active_best = count, self.average.get(count), self.best[count]
        self.lower = self.counts[i + 1] if i + 1 < len(self.counts) else None
        self.higher = self.counts[i - 1] if i > 0 else None
        calls, self.due_seconds = TOP_CAP if i == 0 else BELOW_CAP
        self.due_calls = min(self.interval, calls)

    def describe(self) -> str:
        averages = {**self.average, self.active: self.active_average}
        seen = ", ".join(f"{c}: {averages[c] * 1e3:.2f} ms" for c in self.counts if averages.get(c) is not None)
        return f"{self.active} of up to {self.counts[0]} threads (recent call times by thread count: {seen or 'none yet'})"
