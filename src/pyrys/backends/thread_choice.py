"""How many threads a call runs with when the caller pinned no count: the fastest of ``n, n/2, ..., 1``
as measured on recent calls (``n``: the caller's thread count).

Why: on CPUs that other work keeps busy, OpenMP's threads spin at every barrier for a team-mate that
is not running, and a call with ``n`` threads can take 3x its quiet time where a fair share is 2x;
one thread fewer then waits for nobody.

How: each call's seconds update an average for the count it ran with,
``average += (seconds - average) / 4``, and ``best`` is the lowest average seen (for a count only
probed, its fastest probe).  The active count changes only when a *probe* (one call run with a
neighbouring count) takes under ``SWITCH`` times the active count's average.  A probe comes

- to the next lower count when recent calls are slow: each call over ``LOAD_SIGNAL`` times the
  active count's best adds 1 to a score that decays by ``SLOW_DECAY`` per call, and a score of
  ``SLOW_SCORE`` (three slow calls in a row; about half of recent calls) means the CPUs got busier,
  where one slow call is noise.  That count's program is built then if it never was (and its first,
  cold call counts only if it wins: else the next call probes again);
- below the full count, to the next higher count ``interval`` calls (at most ``BELOW_CAP``) or
  ``BELOW_CAP_SECONDS`` after its last probe, so that the calls come back when a CPU frees up;
- at the full count, to the next lower count if its program exists, ``interval`` calls (at most
  ``TOP_CAP``) after its last probe.

The interval starts at ``FIRST_INTERVAL`` calls and doubles after every probe that loses.  Each count's
probes are counted apart (probes of the lower count never hold back the higher one's).  Every probe
also waits ``FIRST_INTERVAL`` calls after that count's last probe (or the last switch), and as long
as keeps the probes' extra time under ``PROBE_SHARE`` of the time: a count whose last measured call
took ``extra`` seconds more than the active average is probed ``extra / PROBE_SHARE`` seconds after its
last probe at the earliest (a 2-thread call of a 4 ms model under load took 90 ms: 4 s),
``LONGEST_WAIT`` at the latest (one outlier must not keep a count untried for long).  A count last measured under ``SWITCH`` times the active
average, or never measured, waits for nothing but the calls.  On a quiet machine nothing below the
full count is built.

A process that starts under load never sees its calls slow down (its best is a loaded time).  So at
the full count's calls, while no lower count has been measured, it reads how many other tasks the system
is running or ready to run (:func:`pyrys.machine.other_runnable_tasks`): ``EXPLORE_READINGS`` readings,
each ``EXPLORE_CALLS`` calls or ``EXPLORE_SECONDS`` after the one before (the first: after the start of the first call),
whichever comes first: a few seconds apart for a fast model, a call apart for one whose loaded calls take
seconds (BERT-base took 2 s a call with 2 threads under a load where 1 thread took 0.7 s).  If every
reading leaves fewer free CPUs than its threads (a neighbour that stays, not one that passes), the next
lower count is probed once.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Container

from pyrys.machine import free_cpus

LOAD_SIGNAL = 1.3
SLOW_DECAY = 0.75
SLOW_SCORE = 2.0          # 1 + 0.75 + 0.5625 = 2.31 after three slow calls; 1.75 after two
SWITCH = 0.9
FIRST_INTERVAL = 8
TOP_CAP = 1024            # calls between periodic probes at the full count, at most
BELOW_CAP = 64            # and below it
BELOW_CAP_SECONDS = 5.0
PROBE_SHARE = 0.02
LONGEST_WAIT = 60.0
EXPLORE_READINGS = 3
EXPLORE_CALLS = 64
EXPLORE_SECONDS = 1.0


def crowded(threads: int) -> bool:
    """Whether other tasks, running or ready to run, leave fewer free CPUs of this process's than ``threads``."""
    free = free_cpus()
    return free is not None and free < threads


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
    between two callers costs at most a stale average or a probe (never a wrong result: every count runs
    the same graph).  A call that picks nothing new costs about half a microsecond here."""

    def __init__(self, threads: int, now: float = 0.0, crowded: Callable[[int], bool] = crowded):
        self.counts = thread_counts(threads)
        self.crowded, self.crowded_readings, self.explore_due = crowded, 0, False
        self.readings, self.reading_call, self.reading_at = 0, 0, now  # readings taken; the last one's call and time
        self.average: dict[int, float] = {}
        self.best: dict[int, float] = dict.fromkeys(self.counts, math.inf)
        self.probed_at: dict[int, float] = dict.fromkeys(self.counts, now)  # each count's last probe
        self.calls = 0          # calls run with the active count, all told
        self.probe_call: dict[int, int] = dict.fromkeys(self.counts, 0)  # ``calls`` at each count's last probe
        self.interval = FIRST_INTERVAL
        self.slow_score = 0.0   # recent calls over LOAD_SIGNAL x the active count's best, decaying
        self.probing: int | None = None
        self.active = self.counts[0]
        self._activate(self.active)

    def pick(self, built: Container[int], now: float) -> int:
        """The thread count for the next call; ``built``: the counts whose programs exist; ``now``:
        ``time.perf_counter()``."""
        lower, higher, calls = self.lower, self.higher, self.calls
        if lower is not None:
            since = calls - self.probe_call[lower]
            if self.explore_due or self.slow_score >= SLOW_SCORE and self._affordable(lower, since, now):
                return self._probe(lower)  # (the readings that set explore_due were spaced already)
            if higher is None and since >= self.due_calls and lower in built and self._affordable(lower, since, now):
                return self._probe(lower)
        if higher is not None:
            since = calls - self.probe_call[higher]
            if ((since >= self.due_calls or now - self.probed_at[higher] >= BELOW_CAP_SECONDS)
                    and self._affordable(higher, since, now)):
                return self._probe(higher)
        return self.active

    def _affordable(self, count: int, since: int, now: float) -> bool:
        """Whether a probe of ``count`` now keeps the probes' extra time under ``PROBE_SHARE``, judged by
        ``count``'s last measured time against the active average (see the module docstring)."""
        expected, average = self.average.get(count), self.active_average
        if expected is not None and average and expected < SWITCH * average:
            return since >= 1
        if since < FIRST_INTERVAL:
            return False
        if expected is None or not average:
            return True
        return now - self.probed_at[count] >= min((expected - average) / PROBE_SHARE, LONGEST_WAIT)

    def record(self, count: int, seconds: float, now: float, first: bool = False) -> None:
        """What a call with ``count`` threads took, ending at ``now``; ``first``: the first call of a
        program just built (cold: its buffers fault in), which counts only if it wins; otherwise the
        count may be probed again at the next call."""
        if first and count == self.probing and not seconds < SWITCH * (self.active_average or math.inf):
            self.probing, self.slow_score = None, SLOW_SCORE
            self.probe_call[count] = self.calls - FIRST_INTERVAL
            return
        if count == self.active:
            average, best = self.active_average, self.active_best
            average = seconds if average is None else average + (seconds - average) * 0.25
            self.active_average = average
            if average < best:
                self.active_best = average
            self.slow_score = self.slow_score * SLOW_DECAY + (seconds > LOAD_SIGNAL * best)
            calls = self.calls = self.calls + 1
            if self.readings < EXPLORE_READINGS and (calls - self.reading_call >= EXPLORE_CALLS
                                                     or now - self.reading_at >= EXPLORE_SECONDS):
                self._explore(calls, now)
        elif count == self.probing:
            self._judge(count, seconds, now)

    def _explore(self, calls: int, now: float) -> None:
        """A reading at the full count's call ``calls``, ending at ``now`` (see the module docstring)."""
        lower, full = self.lower, self.counts[0]
        if self.active != full or lower is None or lower in self.average:
            self.readings = EXPLORE_READINGS  # measured already: no reading is needed again
            return
        self.readings, self.reading_call, self.reading_at = self.readings + 1, calls, now
        self.crowded_readings += bool(self.crowded(full))
        if self.readings == EXPLORE_READINGS and self.crowded_readings == EXPLORE_READINGS:
            self.explore_due = True

    def cancel(self, count: int) -> None:
        """The probe of ``count`` did not run (its program was being built by another caller)."""
        if self.probing == count:
            self.probing = None

    def _probe(self, count: int) -> int:
        self.probing, self.slow_score, self.explore_due = count, 0.0, False
        return count

    def _judge(self, count: int, seconds: float, now: float) -> None:
        self.probing = None
        self.probed_at[count], self.probe_call[count] = now, self.calls
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
        if count != self.active:  # a switch: the new neighbours wait their calls again
            for neighbour in (self.lower, self.higher):
                if neighbour is not None:
                    self.probe_call[neighbour] = self.calls
        self.due_calls = min(self.interval, TOP_CAP if i == 0 else BELOW_CAP)
        self.active = count

    def describe(self) -> str:
        """The active count and the latest average (or probe) time of every count measured."""
        active, average = self.active, self.active_average
        averages = {**self.average, active: average}
        seen = ", ".join(f"{c}: {averages[c] * 1e3:.2f} ms" for c in self.counts if averages.get(c) is not None)
        return f"{active} of up to {self.counts[0]} threads (recent call times by thread count: {seen or 'none yet'})"
