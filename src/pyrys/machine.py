"""The CPU this process runs on, as benchmarks and saved programs record it, and the memory it holds."""
from __future__ import annotations

import ctypes
import gc
import platform

# the instruction sets that decide which kernels oneDNN picks (and so a program's layouts and speed)
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_info() -> tuple[str, list[str]]:
    """CPU model name and the ISA flags that matter, from ``/proc/cpuinfo``."""
    name, flags = platform.processor() or "unknown", []
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = [flag for flag in ISA_FLAGS if flag in value.split()]
                break
    return name, flags


def give_back_freed_memory() -> None:
    """Free what only the collector can (objects in reference cycles: a program and its frames) and return
    freed pages to the system (glibc keeps them for reuse). ResNet-50's RSS after a first optimize: 4.8x its
    weights before, 3.8x after (``benchmarks/memory.py``)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to ask
        pass
