"""The CPUs pyrys plans for: affinity, capped by a cgroup CPU quota."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyrys.backends.dnnl.binding import is_available
from pyrys.backends.threads import current_threads
from pyrys.machine import available_cpus, cpu_flags, other_runnable_tasks, runnable_tasks


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


KERNEL_VIEW = """
from pyrys.backends.dnnl.layout import native_blocked_policy
from pyrys.machine import cpu_info, native_bf16
from pyrys.precision_notes import effective_precision
from pyrys.quantization import int8_note, vnni, weight_max
print(cpu_info()[1], native_bf16(), vnni(), weight_max(), native_blocked_policy())
print(effective_precision("bf16")[1])
print(int8_note())
"""


@pytest.mark.skipif(not is_available()[0], reason="libdnnl does not load: no ISA of its own to read")
def test_onednn_limited_to_avx2_plans_for_avx2_kernels():
    """``ONEDNN_MAX_CPU_ISA=AVX2`` on an AVX-512/AMX CPU: oneDNN runs AVX2 kernels, so the flags pyrys plans by
    are AVX2's (int8 weights of 7 bits, whose 16-bit sums cannot saturate; bf16 runs fp32), and the notes name
    the limit.  Before, the flags came from /proc/cpuinfo alone: 8-bit weights on AVX2 kernels (ResNet-18
    int8 error 1.2e-2, 6e-3 unlimited) and bf16 on emulated kernels."""
    if "avx2" not in cpu_flags():
        pytest.skip("the CPU has no AVX2")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", KERNEL_VIEW], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    flags, bf16_note, int8_text = out.stdout.splitlines()
    assert flags == "['avx2'] False False 63 blocked8"
    assert "runs in fp32" in bf16_note and "int8: no VNNI here" in int8_text
    withheld = cpu_flags() & {"avx512f", "avx512_vnni", "avx512_bf16", "amx_int8"}
    if withheld:  # the notes name the limit where it hides something this CPU has
        assert "ONEDNN_MAX_CPU_ISA=AVX2 withholds" in int8_text and "ONEDNN_MAX_CPU_ISA=AVX2 withholds" in bf16_note
