"""The CPUs pyrys plans for: affinity, capped by a cgroup CPU quota."""
from __future__ import annotations

import os

import pytest

from pyrys.backends.threads import current_threads
from pyrys.machine import available_cpus, other_runnable_tasks, runnable_tasks


def affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "100000 100000\n"}, 1),              # cgroup v2: one CPU per period
    ({"cpu.max": "150000 100000\n"}, 2),              # 1.5 CPUs: two threads, one of them part-time
    ({"cpu.max": "max 100000\n"}, None),              # no quota: the affinity mask
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no quota
    ({}, None),                                       # no cgroup files at all
])
def test_a_cgroup_quota_caps_the_cpus(tmp_path, files, expected):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    want = affinity() if expected is None else min(expected, affinity())
    assert available_cpus(tmp_path) == want


def test_calls_never_plan_more_threads_than_the_process_may_run():
    assert 1 <= current_threads() <= available_cpus() <= affinity()


def test_runnable_tasks_reads_the_fourth_field_of_loadavg(tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("1.22 1.40 1.41 3/82 16687\n")
    assert runnable_tasks(loadavg) == 3
    loadavg.write_text("garbage\n")
    assert runnable_tasks(loadavg) is None
    assert runnable_tasks(tmp_path / "missing") is None


def test_other_runnable_tasks_leaves_out_this_process_own_running_threads(tmp_path):
    loadavg, tasks = tmp_path / "loadavg", tmp_path / "task"
    loadavg.write_text("1.22 1.40 1.41 4/82 16687\n")
    for tid, state in ((1, "R"), (2, "S"), (3, "R")):
        (tasks / str(tid)).mkdir(parents=True)
        (tasks / str(tid) / "stat").write_text(f"{tid} (python (x)) {state} 1 2 3\n")
    assert other_runnable_tasks(loadavg, tasks) == 2
    assert other_runnable_tasks(tmp_path / "missing", tasks) is None
