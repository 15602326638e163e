"""The thread count a call runs with, chosen from measured call times (``pyrys.backends.thread_choice``)."""
from __future__ import annotations

import pytest

from pyrys.backends.thread_choice import (BELOW_CAP, EXPLORE_CALLS, EXPLORE_READINGS, EXPLORE_SECONDS, FIRST_INTERVAL, LONGEST_WAIT, PROBE_SHARE, TOP_CAP,
                                         ThreadChooser, thread_counts)

SLOW_CALLS = 3  # slow calls in a row that signal busier CPUs


def never(threads: int) -> bool:
    """A machine that never looks crowded (the default reads this machine's task count)."""
    return False


class Clock:
    now = 0.0


def run(chooser: ThreadChooser, seconds_at: dict[int, float], calls: int, built: set[int],
        clock: Clock | None = None) -> list[int]:
    """``calls`` calls, each taking ``seconds_at[count]``; the counts picked, in order; ``built`` grows as a
    runtime's programs do (a picked count gets its program); each call advances ``clock`` (the chooser's own
    if none is given)."""
    picked, clock = [], clock or vars(chooser).setdefault("test_clock", Clock())
    for _ in range(calls):
        count = chooser.pick(built, clock.now)
        built.add(count)
        picked.append(count)
        clock.now += seconds_at[count]
        chooser.record(count, seconds_at[count], clock.now)
    return picked


@pytest.mark.parametrize("threads, counts", [(1, [1]), (2, [2, 1]), (6, [6, 3, 1]), (8, [8, 4, 2, 1])])
def test_thread_counts_halve_down_to_one(threads, counts):
    assert thread_counts(threads) == counts


def test_a_quiet_machine_runs_every_call_with_all_threads_and_builds_nothing_else():
    chooser, built = ThreadChooser(2, crowded=never), {2}
    assert run(chooser, {2: 0.040, 1: 0.075}, 3000, built) == [2] * 3000
    assert built == {2}


def test_busy_cpus_move_the_calls_to_fewer_threads_and_a_freed_cpu_moves_them_back():
    chooser, built = ThreadChooser(2, crowded=never), {2}
    run(chooser, {2: 0.040, 1: 0.075}, 50, built)
    loaded = run(chooser, {2: 0.130, 1: 0.076}, 200, built)     # OpenMP spinning for a descheduled thread
    assert loaded.index(1) == SLOW_CALLS                         # three slow calls in a row, then a probe
    assert loaded[8:].count(2) <= 200 // FIRST_INTERVAL          # once the average caught up: 1, but probes
    assert chooser.active == 1
    quiet = run(chooser, {2: 0.040, 1: 0.075}, BELOW_CAP + 1, built)
    assert chooser.active == 2 and quiet[BELOW_CAP // 2:].count(2) > BELOW_CAP // 3   # back within 64 calls or 5 s


def test_a_probe_far_slower_than_the_active_count_waits_longer():
    chooser, built = ThreadChooser(2, crowded=never), {2, 1}
    chooser._activate(1)
    picked = run(chooser, {2: 0.090, 1: 0.013}, 2000, built)          # 2 threads under load: 7x
    probes = [i for i, count in enumerate(picked) if count == 2]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert min(gaps) > (0.090 / 0.013 - 1) / PROBE_SHARE           # past BELOW_CAP: the extra time stays under 2%


def test_probes_that_lose_come_less_often_up_to_the_cap():
    clock = Clock()
    chooser, built = ThreadChooser(2, crowded=never), {2, 1}                 # both programs exist already
    picked = run(chooser, {2: 1.0, 1: 1.9}, 4000, built, clock)       # long calls: no time cap up here
    probes = [i for i, count in enumerate(picked) if count == 1]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] == TOP_CAP + 1
    assert chooser.active == 2


def test_below_the_full_count_a_probe_comes_every_5_s_once_8_calls_ran():
    clock = Clock()
    chooser, built = ThreadChooser(2, crowded=never), {2, 1}
    chooser._activate(1)
    chooser.interval = chooser.due_calls = BELOW_CAP                  # after probes that lost
    picked = run(chooser, {2: 0.52, 1: 0.5}, 40, built, clock)       # 0.5 s calls: 10 in 5 s
    assert [i for i, count in enumerate(picked) if count == 2] == [10, 21, 32]   # every 5 s (10 calls and a bit)
    spaced, clock = ThreadChooser(2, crowded=never), Clock()
    spaced._activate(1)
    picked = run(spaced, {2: 61.0, 1: 60.0}, 45, built, clock)       # a call a minute: not all probes
    assert picked.count(2) == 5                                     # one in 9: 8 calls, then a probe


def test_a_lasting_slowdown_no_count_beats_costs_its_probes_under_2_percent():
    chooser, built = ThreadChooser(2, crowded=never), {2}
    run(chooser, {2: 0.040, 1: 0.075}, 20, built)
    picked = run(chooser, {2: 0.060, 1: 0.150}, 2000, built)        # slower everywhere: 2 threads still best
    assert chooser.active == 2
    extra = picked.count(1) * (0.150 - 0.060)
    assert 1 <= picked.count(1) and extra / (len(picked) * 0.060) <= PROBE_SHARE * 1.1


def test_one_slow_call_on_a_quiet_machine_builds_nothing():
    chooser, built = ThreadChooser(2, crowded=never), {2}
    for _ in range(20):
        run(chooser, {2: 0.040}, 50, built)
        run(chooser, {2: 0.200}, SLOW_CALLS - 1, built)             # a pause, a page fault, a tick
        run(chooser, {2: 0.040}, 1, built)
        run(chooser, {2: 0.200}, 1, built)
    assert built == {2}


def test_a_load_that_comes_and_goes_between_calls_is_seen():
    chooser, built = ThreadChooser(2, crowded=never), {2}
    run(chooser, {2: 0.040}, 20, built)
    picked = []
    for _ in range(3):
        picked += run(chooser, {2: 0.130, 1: 0.076}, 2, built) + run(chooser, {2: 0.045, 1: 0.076}, 1, built)
    assert 1 in picked


def test_a_probe_another_caller_is_building_is_cancelled():
    chooser = ThreadChooser(2, crowded=never)
    run(chooser, {2: 0.040}, 10, {2})
    run(chooser, {2: 0.200}, SLOW_CALLS, {2})
    assert chooser.pick({2}, 0.0) == 1
    chooser.cancel(1)
    chooser.record(1, 0.001, 0.0)                                  # a late record of the cancelled probe
    assert chooser.active == 2 and chooser.probing is None


def test_a_lucky_probe_is_undone_by_the_next_one():
    chooser, built = ThreadChooser(2, crowded=never), {2, 1}
    run(chooser, {2: 0.040, 1: 0.075}, FIRST_INTERVAL + 1, built)   # a probe of 1 thread lost
    picked = run(chooser, {2: 0.040, 1: 0.030}, 60, built)            # the next probe, 1.9x: 44 calls on
    assert picked[-1] == 1 and chooser.active == 1                  # one fast outlier at 1 thread won
    run(chooser, {2: 0.040, 1: 0.075}, 3 * FIRST_INTERVAL, built)
    assert chooser.active == 2


def test_four_threads_step_down_one_halving_at_a_time():
    chooser, built = ThreadChooser(4, crowded=never), {4}
    run(chooser, {4: 0.020, 2: 0.035, 1: 0.065}, 30, built)
    run(chooser, {4: 0.090, 2: 0.050, 1: 0.066}, 60, built)
    assert chooser.active == 2 and built == {4, 2}                  # 2 beat 4; 2 stays as fast: 1 is not built
    assert "2 of up to 4 threads" in chooser.describe()


def test_probes_of_the_lower_count_do_not_keep_the_higher_one_from_being_tried():
    """Four threads, the calls at 2 after a load; 4 last measured under heavy load (200 ms), 1 under load."""
    quiet = {4: 0.020, 2: 0.035, 1: 0.065}
    slow_two = {4: 0.045, 2: 0.060, 1: 0.064}                       # 2 still slow against its best: 1 is probed
    for times, best_two in ((quiet, 0.035), (slow_two, 0.030)):
        chooser, built = ThreadChooser(4, crowded=never), {4, 2, 1}
        chooser._activate(2)
        chooser.average.update({4: 0.200, 1: 0.065})
        chooser.active_best = best_two
        picked = run(chooser, times, 2000, built)
        assert chooser.active == 4, chooser.describe()
        assert picked[-200:].count(4) > 190


def test_one_outlier_probe_keeps_a_count_untried_for_a_minute_at_most():
    clock = Clock()
    chooser, built = ThreadChooser(2, crowded=never), {2, 1}
    chooser._activate(1)
    chooser.average[2] = 100 * 0.010                                # one probe at 100x (a page-fault storm)
    picked = run(chooser, {2: 0.005, 1: 0.010}, 7000, built, clock)  # 70 s of calls at 1 thread
    assert 2 in picked and picked.index(2) * 0.010 <= LONGEST_WAIT + 0.1


def test_a_cold_first_call_of_a_new_program_that_loses_is_tried_again_at_once():
    chooser, built = ThreadChooser(2, crowded=never), {2}
    run(chooser, {2: 0.040}, 20, built)
    run(chooser, {2: 0.130}, 3, built)
    assert chooser.pick(built, 10.0) == 1
    chooser.record(1, 0.400, 10.4, first=True)                      # page faults of a new arena
    assert chooser.active == 2 and chooser.pick(built, 10.5) == 1   # not judged: the next call probes again
    chooser.record(1, 0.076, 10.6)
    assert chooser.active == 1


@pytest.mark.parametrize("readings, probed", [((True, True, True), True), ((True, False, True), False),
                                              ((False, False, False), False)])
@pytest.mark.parametrize("seconds, calls_apart", [(0.004, EXPLORE_CALLS),                    # a fast model: by calls
                                                  (0.4, int(EXPLORE_SECONDS / 0.4) + 1),   # a slow one: by seconds
                                                  (2.0, 1)])                               # BERT-base under load
def test_a_process_started_under_load_looks_at_how_crowded_the_cpus_are(readings, probed, seconds, calls_apart):
    said, asked = iter(readings), []

    def crowded(threads: int) -> bool:
        asked.append(threads)
        return next(said)

    chooser, built = ThreadChooser(2, crowded=crowded), {2}
    last_reading = EXPLORE_READINGS * calls_apart
    picked = run(chooser, {2: seconds, 1: seconds / 2}, last_reading, built)  # loaded from the start: never slower
    assert picked == [2] * last_reading and asked == [2] * EXPLORE_READINGS   # three readings, at the full count
    picked = run(chooser, {2: seconds, 1: seconds / 2}, 300, built)
    assert (chooser.active == 1) is probed and (picked[0] == 1) is probed
    assert len(asked) == EXPLORE_READINGS                                     # never again, after a switch either


def test_the_readings_are_spaced_by_calls_or_seconds_whichever_comes_first():
    asked = []
    chooser, built = ThreadChooser(2, crowded=lambda threads: asked.append(threads) or False), {2}
    run(chooser, {2: 0.004}, EXPLORE_CALLS - 1, built)
    assert asked == []
    run(chooser, {2: 0.004}, 1, built)
    assert asked == [2]                                     # 64 calls of 4 ms: by calls
    run(chooser, {2: EXPLORE_SECONDS}, 1, built)
    assert asked == [2, 2]                                  # one call of a second: by seconds


def test_the_reading_at_the_full_count_is_skipped_once_a_lower_count_was_measured():
    chooser, built = ThreadChooser(2, crowded=lambda threads: pytest.fail("read")), {2}
    run(chooser, {2: 0.040}, 10, built)
    run(chooser, {2: 0.130, 1: 0.140}, 3, built)                     # a probe of 1 that loses, within a second
    run(chooser, {2: 0.040, 1: 0.140}, EXPLORE_READINGS * EXPLORE_CALLS, built)
