"""How many threads a call runs with when the caller pinned no count: the fastest of ``n, n/2, ..., 1``
as measured on recent calls (``n``: the caller's thread count).

Why: on CPUs that other work keeps busy, OpenMP's threads spin at every barrier for a team-mate that
is not running, and a call with ``n`` threads can take 3x its quiet time where a fair share is 2x;
one thread fewer then waits for nobody.

How: each call's seconds update an average for the count it ran with,
``average += (seconds - average) / 4``, and ``best`` is the lowest average seen.  The active count
changes only when a *probe* (one call run with a neighbouring count) takes under ``SWITCH`` times the
active count's average.  A probe comes

- when most recent calls took over ``LOAD_SIGNAL`` times the active count's best: each slow call adds 1
  to a score that decays by ``SLOW_DECAY`` per call, and the score reaching ``SLOW_SCORE`` (three slow
  calls in a row, or three of the last four) means the CPUs got busier, where one slow call is noise.
  The probe is of the next lower count, its program built then if it never was;
- every ``interval`` calls, to a neighbour whose program exists, the higher one first.  The interval
  starts at ``FIRST_INTERVAL`` calls and doubles after every probe that loses, up to ``TOP_CAP`` calls
  at the full count and ``BELOW_CAP`` calls below it, where a CPU that became free must be noticed
  soon: there a probe also comes ``BELOW_CAP_SECONDS`` after the last one.

Every probe waits as many calls after the last one as keep the probes' extra time under
``PROBE_SHARE`` of the calls', judged by the count's last measured time: a count that took ``k`` times
the active average waits ``(k - 1) / PROBE_SHARE`` calls (a 2-thread call of a 4 ms model under load
took 90 ms), and ``FIRST_INTERVAL`` at least; one never measured waits ``FIRST_INTERVAL``; one that
took under ``SWITCH`` times what the calls take now is tried again at once.
So a lasting slowdown that no other count beats costs its probes at most ``PROBE_SHARE`` of the time
(or a ``FIRST_INTERVAL``-th of a call's where the probes are nearly as fast).  On a quiet machine
nothing below the full count is built; once one is, its probes cost at most
``(probe / active - 1) / interval`` of the time, under 0.1% at the full count's cap.
"""
from __future__ import annotations

import math
from collections.abc import Container

LOAD_SIGNAL = 1.3
SLOW_DECAY = 0.75
SLOW_SCORE = 2.0          # 1 + 0.75 + 0.5625 = 2.31 after three slow calls; 1.75 after two
SWITCH = 0.9
FIRST_INTERVAL = 8
TOP_CAP = 1024            # calls between probes at the full count, at most
BELOW_CAP = 64            # and below it (unless PROBE_SHARE asks for more)
BELOW_CAP_SECONDS = 5.0
PROBE_SHARE = 0.02


def thread_counts(threads: int) -> list[int]:
    """``threads`` halved down to 1, highest first: 8 -> [8, 4, 2, 1], 6 -> [6, 3, 1], 1 -> [1]."""
    counts = [threads]
    while counts[-1] > 1:
        counts.append(counts[-1] // 2)
    return counts


class ThreadChooser:
    """The thread count for each call of one program family (a program per count), from measured calls.

    Use: ``count = chooser.pick(built, now)``; run the call with ``count`` threads; ``chooser.record(count,
    seconds, now)`` (or ``chooser.cancel(count)`` if the call did not run with it).  Safe from many
    threads: each update is a few attribute writes, each attribute read once per decision, and a race
    between two callers costs at most one stale average (never a wrong result: every count runs the same
    graph).  A call that picks nothing new costs about half a microsecond here."""

    def __init__(self, threads: int, now: float = 0.0):
        self.counts = thread_counts(threads)
        self.average: dict[int, float] = {}
        self.best: dict[int, float] = dict.fromkeys(self.counts, math.inf)
        self.interval, self.since_probe, self.last_probe = FIRST_INTERVAL, 0, now
        self.slow_score = 0.0   # recent calls over LOAD_SIGNAL x the active count's best, decaying
        self.probing: int | None = None
        self._activate(self.counts[0])

    def pick(self, built: Container[int], now: float) -> int:
        """The thread count for the next call; ``built``: the counts whose programs exist; ``now``:
        ``time.perf_counter()``."""
        lower, higher, since = self.lower, self.higher, self.since_probe
        if self.slow_score >= SLOW_SCORE and lower is not None and self._affordable(lower, since):
            return self._probe(lower)
        if since >= self.due_calls or (higher is not None and now - self.last_probe >= BELOW_CAP_SECONDS):
            for count in (higher, lower):
                if count is not None and count in built and self._affordable(count, since):
                    return self._probe(count)
        return self.active

    def _affordable(self, count: int, since: int) -> bool:
        """Whether a probe of ``count`` now keeps the probes' extra time under ``PROBE_SHARE`` of the calls',
        judged by ``count``'s last measured time against the active average: at once if that was faster
        than the calls take now, else ``FIRST_INTERVAL`` calls after the last probe at least (a count
        never measured) or ``(expected / average - 1) / PROBE_SHARE``."""
        expected, average = self.average.get(count), self.active_average
        if expected is not None and average is not None and expected < SWITCH * average:
            return since >= 1
        if since < FIRST_INTERVAL:
            return False
        return expected is None or average is None or since * PROBE_SHARE >= expected / average - 1

    def record(self, count: int, seconds: float, now: float) -> None:
        """What a call with ``count`` threads took, ending at ``now``."""
        if count == self.active:
            average, best = self.active_average, self.active_best
            average = seconds if average is None else average + (seconds - average) * 0.25
            self.active_average = average
            if average < best:
                self.active_best = average
            self.slow_score = self.slow_score * SLOW_DECAY + (seconds > LOAD_SIGNAL * best)
            self.since_probe += 1
        elif count == self.probing:
            self._judge(count, seconds, now)

    def cancel(self, count: int) -> None:
        """The probe of ``count`` did not run (its program was being built by another caller)."""
        if self.probing == count:
            self.probing = None

    def _probe(self, count: int) -> int:
        self.probing, self.slow_score = count, 0.0
        return count

    def _judge(self, count: int, seconds: float, now: float) -> None:
        self.probing, self.since_probe, self.last_probe = None, 0, now
        active, average = self.active, self.active_average
        average = math.inf if average is None else average
        self._keep_active()
        self.average[count] = seconds
        self.best[count] = min(self.best[count], seconds)
        if seconds < SWITCH * average:
            self.interval = FIRST_INTERVAL
            self._activate(count)
        else:
            self.interval = min(2 * self.interval, TOP_CAP)
            self._activate(active)

    def _keep_active(self) -> None:
        """Store the active count's average and best with the others'."""
        if self.active_average is not None:
            self.average[self.active] = self.active_average
        self.best[self.active] = self.active_best

    def _activate(self, count: int) -> None:
        """Make ``count`` the active count: its average and best, its neighbours, and how many calls
        until the next periodic probe."""
        i = self.counts.index(count)
        self.active_average, self.active_best = self.average.get(count), self.best[count]
        self.lower = self.counts[i + 1] if i + 1 < len(self.counts) else None
        self.higher = self.counts[i - 1] if i > 0 else None
        self.due_calls = min(self.interval, TOP_CAP if i == 0 else BELOW_CAP)
        self.active = count

    def describe(self) -> str:
        active, average = self.active, self.active_average
        averages = {**self.average, active: average}
        seen = ", ".join(f"{c}: {averages[c] * 1e3:.2f} ms" for c in self.counts if averages.get(c) is not None)
        return f"{active} of up to {self.counts[0]} threads (recent call times by thread count: {seen or 'none yet'})"
