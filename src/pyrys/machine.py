"""The CPU this process runs on, as benchmarks and saved programs record it, and the memory it holds."""
from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
from functools import cache
from pathlib import Path

# the instruction sets that decide which kernels oneDNN picks (and so a program's layouts and speed)
ISA_FLAGS = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


# oneDNN's ``dnnl_cpu_isa_t``, as ``dnnl_get_effective_cpu_isa`` gives it: each ISA's value holds the bits of
# those below it, so a flag is used where the effective ISA holds all of its ISA's bits
ONEDNN_ISA_BITS = {"avx2": 0x7, "avx_vnni": 0xF, "avx512f": 0x27, "avx512_vnni": 0x67, "avx512_bf16": 0xE7,
                   "amx_tile": 0xFEF, "amx_int8": 0xFEF, "amx_bf16": 0xFEF}


def cpu_info() -> tuple[str, list[str]]:
    """CPU model name and the ISA flags that matter, as oneDNN's kernels use them (:func:`kernel_flags`)."""
    name = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                    break
    except OSError:
        pass
    return name, [flag for flag in ISA_FLAGS if flag in kernel_flags()]


@cache
def cpu_flags() -> frozenset[str]:
    """Every flag of the first CPU in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


@cache
def kernel_flags() -> frozenset[str]:
    """The CPU's flags as oneDNN's kernels use them: :func:`cpu_flags` less those above the ISA oneDNN
    dispatches to (``ONEDNN_MAX_CPU_ISA=AVX2`` on an AMX CPU leaves no AVX-512, VNNI or AMX: int8 weights
    must then fit the AVX2 kernels' 16-bit sums).  :func:`cpu_flags` itself where libdnnl does not load."""
    flags = cpu_flags()
    try:
        from pyrys.backends.dnnl.binding import DnnlUnavailable, effective_cpu_isa

        isa = effective_cpu_isa()
    except DnnlUnavailable:
        return flags
    return flags - {flag for flag, bits in ONEDNN_ISA_BITS.items() if isa & bits != bits}


def isa_limit_note() -> str:
    """`` (ONEDNN_MAX_CPU_ISA=AVX2 withholds avx512f/...)`` where a limit leaves kernels without some of the CPU's
    instructions, else ``""``: for the notes that say what a CPU lacks."""
    withheld = [flag for flag in ONEDNN_ISA_BITS if flag in cpu_flags() - kernel_flags()]
    if not withheld:
        return ""
    for variable in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if os.environ.get(variable):
            return f" ({variable}={os.environ[variable]} withholds the CPU's {'/'.join(withheld)})"
    return f" (oneDNN's kernels here withhold the CPU's {'/'.join(withheld)})"


@cache
def native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 itself (AVX-512 BF16 or AMX-BF16); emulated bf16 is slower than fp32."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()[1]))


def give_back_freed_memory(collect_cycles: bool = True) -> None:
    """Free what only the collector can (objects in reference cycles: a program and its frames) and return
    freed pages to the system (glibc keeps them for reuse). ResNet-50's RSS after a first optimize: 4.8x its
    weights before, 3.8x after (``benchmarks/memory.py``).  ``collect_cycles=False`` only returns the pages
    (a full collection takes 0.2 s once torch is loaded)."""
    if collect_cycles:
        gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass


# An optimized module's graphs are torch.fx graphs, cyclic (a graph and its module refer to each other), and
# hold the constants its program reads as they are: a module freed keeps them until the collector runs, which
# after a few large allocations (a load) may be many modules later (a model loaded, called and freed ten
# times: +673 MiB, 7 copies of its weights; a helper's find).  The next optimize or load collects once the
# modules freed since held this many bytes (a full collection takes 0.2 s once torch is loaded).
COLLECT_AFTER_FREED_BYTES = 32 << 20
_freed_bytes = [0]  # held by the modules freed since the last collection


def note_module_freed(nbytes: int) -> None:
    """An optimized module holding ``nbytes`` of weights (plain and packed) was freed."""
    _freed_bytes[0] += nbytes


def collect_freed_modules() -> None:
    """Collect the cycles of freed modules (:func:`give_back_freed_memory`) where they held
    :data:`COLLECT_AFTER_FREED_BYTES` or more since the last time: what ``optimize`` and ``load`` do first."""
    if _freed_bytes[0] >= COLLECT_AFTER_FREED_BYTES:
        _freed_bytes[0] = 0
        give_back_freed_memory()


def runnable_tasks(loadavg: Path = Path("/proc/loadavg")) -> int | None:
    """How many tasks the whole system has running or ready to run at this instant (the reader included;
    Linux ``/proc/loadavg``'s fourth field, ``"3/412"``); None where there is no such file."""
    try:
        return int(loadavg.read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def other_runnable_tasks(loadavg: Path = Path("/proc/loadavg"), tasks: Path = Path("/proc/self/task")) -> int | None:
    """:func:`runnable_tasks` less this process's own threads in state ``R`` (``/proc/self/task/*/stat``:
    OpenMP's workers spinning after a call count as running); None where Linux does not say."""
    total = runnable_tasks(loadavg)
    if total is None:
        return None
    own = 0
    for stat in tasks.glob("*/stat"):
        try:
            own += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue  # a thread that ended meanwhile
    return max(0, total - own)


def free_cpus() -> int | None:
    """The CPUs this process may use (:func:`available_cpus`) less the other tasks running or ready to run now
    (:func:`other_runnable_tasks`), which may leave fewer than 0; None where Linux does not say."""
    others = other_runnable_tasks()
    return None if others is None else available_cpus() - others


@cache
def available_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (a container given
    2 CPUs on a 64-core host sees 64 cores but runs 2 at a time; OpenMP's default counts the 64)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota else cpus


def _cgroup_quota(cgroup: Path) -> float | None:
    """CPUs per period from cgroup v2 ``cpu.max`` (``"200000 100000"``) or v1 ``cfs_quota_us``/``cfs_period_us``;
    None where there is no quota."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
