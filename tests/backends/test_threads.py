"""Thread counts for torch's own work while compiling: fewer where other processes hold CPUs."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pyrys
from pyrys.backends import threads


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def _readings(monkeypatch, others: list[int | None], cpus: int = 2) -> list[int]:
    """Other tasks running: ``others`` in turn (the last one again after them) on ``cpus``; what was read."""
    read = []

    def reading():
        read.append(len(read))
        running = others[min(len(read) - 1, len(others) - 1)]
        return None if running is None else cpus - running

    monkeypatch.setattr(threads, "free_cpus", reading)
    monkeypatch.setattr(threads, "_AVAILABLE_CPUS", cpus)
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: None)
    return read


@pytest.mark.parametrize("others, expected, readings", [
    ([0], 2, 1),           # quiet: one reading
    ([None], 2, 1),        # not Linux: as asked
    ([1, 1, 1], 1, 3),     # a neighbour that stays on one of two CPUs
    ([1, 0], 2, 2),        # one that passes
    ([3, 2, 5], 1, 3),     # every CPU taken: at least 1
])
def test_torch_work_runs_with_the_threads_other_tasks_leave_free(monkeypatch, two_threads, others, expected, readings):
    read = _readings(monkeypatch, others)
    assert threads.threads_for_torch_work() == expected
    assert len(read) == readings


def test_the_most_any_reading_left_free_is_taken(monkeypatch):
    previous = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        _readings(monkeypatch, [6, 3, 5], cpus=8)
        assert threads.threads_for_torch_work() == 5
    finally:
        torch.set_num_threads(previous)


def test_a_crowded_int8_calibration_runs_with_fewer_threads_and_the_program_with_the_callers(monkeypatch, two_threads):
    """Calibration's runs of the graph on torch's ops take the free threads; the program built after the
    passes keeps the caller's count, and the caller's count is the same after the compile."""
    _readings(monkeypatch, [1])
    seen = []
    from pyrys.quantization import calibration

    observe = calibration.observe

    def observed(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return observe(*args, **kwargs)

    monkeypatch.setattr(calibration, "observe", observed)
    monkeypatch.setattr("pyrys.passes.quantize.observe", observed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    opt = pyrys.optimize(model, (torch.randn(2, 16),), precision="int8",
                         calibration=[torch.randn(2, 16) for _ in range(4)])
    assert seen == [1] and torch.get_num_threads() == 2
    assert "2 threads" in opt.program_text(), opt.program_text()


def test_without_per_caller_counts_torch_work_runs_as_it_is(monkeypatch, two_threads):
    """The process-wide fallback would hold its lock through the pass (other threads' pinned calls waiting)
    and set the count for every thread: nothing is changed there, and nothing read."""
    read = _readings(monkeypatch, [1])
    monkeypatch.setattr(threads, "PER_CALLER_THREADS", False)
    assert threads.with_free_threads(torch.get_num_threads) == 2 and read == []


def test_the_callers_count_comes_back_after_a_pass_that_raises(monkeypatch, two_threads):
    _readings(monkeypatch, [1])
    seen = []

    def failing():
        seen.append(torch.get_num_threads())
        raise ValueError("a pass failed")

    with pytest.raises(ValueError, match="a pass failed"):
        threads.with_free_threads(failing)
    assert seen == [1] and torch.get_num_threads() == 2
