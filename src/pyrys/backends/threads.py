"""Thread counts per call, without touching any process-wide setting.

torch and oneDNN share one GNU OpenMP runtime here.  Its thread count is an internal
control variable *of the calling thread*: ``omp_set_num_threads`` on one Python thread
changes nothing for another, and ``torch.get_num_threads()`` reads the calling thread's
value.  So a call that needs ``n`` threads sets them on its own thread and puts the
caller's value back before it returns; concurrent callers never see each other's setting.

Where the OpenMP symbols cannot be found (a torch build without OpenMP) pyrys falls back
to ``torch.set_num_threads``, which is process-wide, under a lock.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Callable, TypeVar

import torch

from pyrys.machine import available_cpus

T = TypeVar("T")


def _omp_set_num_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch loaded, or None.  (A thread's count is read
    through ``torch.get_num_threads()``: :func:`current_threads`.)"""
    try:
        set_ = ctypes.CDLL(None).omp_set_num_threads
    except (OSError, AttributeError):
        return None
    set_.restype, set_.argtypes = None, (ctypes.c_int,)
    return set_


_OMP_SET_NUM_THREADS = _omp_set_num_threads()
# whether a thread count can be set for one caller alone (else each change is process-wide, under a lock,
# and a program's calls do not change their thread count on their own: pyrys.backends.thread_choice)
PER_CALLER_THREADS = _OMP_SET_NUM_THREADS is not None
_AVAILABLE_CPUS = available_cpus()  # read once: every call caps its thread count by it
_TORCH_LOCK = threading.Lock()


def current_threads() -> int:
    """The calling thread's thread count (what ``torch.get_num_threads()`` says on this thread), at most
    the CPUs the process may use (:func:`pyrys.machine.available_cpus`: affinity and cgroup quota).  Read
    through torch, not OpenMP: torch gives a thread its setting at the thread's first call of it, and a new
    thread's OpenMP count is every CPU till then (a worker thread of a process set to 1 ran 2; a helper's
    find)."""
    return min(torch.get_num_threads(), _AVAILABLE_CPUS)


def with_threads(threads: int, function: Callable[..., T], *args) -> T:
    """``function(*args)`` with ``threads`` threads on the calling thread; the caller's count is restored."""
    if _OMP_SET_NUM_THREADS is None:
        return _with_torch_threads(threads, function, *args)
    set_ = _OMP_SET_NUM_THREADS
    previous = torch.get_num_threads()  # (this thread's, as torch sets it: :func:`current_threads`)
    if previous == threads:
        return function(*args)
    set_(threads)
    try:
        return function(*args)
    finally:
        set_(previous)


def _with_torch_threads(threads: int, function: Callable[..., T], *args) -> T:
    with _TORCH_LOCK:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return function(*args)
        finally:
            torch.set_num_threads(previous)


class ThreadPinned:
    """A program run with ``threads`` threads on each calling thread (others are not affected)."""

    def __init__(self, program, threads: int):
        self.program, self.threads = program, threads

    def __call__(self, inputs: list) -> list:
        return with_threads(self.threads, self.program, inputs)

    def describe(self) -> str:
        return self.program.describe()

    def profile(self, inputs: list, runs: int = 20) -> list[tuple[str, float]]:
        return with_threads(self.threads, self.program.profile, inputs, runs)

    def memory(self) -> dict[str, int]:
        return self.program.memory()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)  # copy and pickle protocols must not reach the inner program
        return getattr(self.program, name)

    def __deepcopy__(self, memo: dict) -> "ThreadPinned":
        import copy

        return ThreadPinned(copy.deepcopy(self.program, memo), self.threads)
