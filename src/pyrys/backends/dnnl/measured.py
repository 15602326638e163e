"""Choices the dnnl backend measures: each made once per process and kept in the tuning cache.

    memo, choice = decide("attention_kernel", {**inputs, **machine_key(threads)}, measure)

``measure()`` returns the choice (a JSON-able dict), or None where it could not measure (nothing is
kept then).  A choice is looked up in this process first, then in the tuning cache
(``pyrys.tuning_cache``), and measured only where neither has it.  While a saved program is built
(:func:`saved`), the save's choices answer first.  A choice timed on a busy CPU (:mod:`pyrys.backends.cpu_share`)
serves this process only: the next process times it again.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from pyrys import tuning_cache
from pyrys.backends.cpu_share import CpuShare, busy_said, is_quiet, timed_quietly
from pyrys.backends.dnnl import binding
from pyrys.backends.dnnl.constants import ARG_BIAS, ARG_DST, ARG_SRC, ARG_WEIGHTS
from pyrys.backends.dnnl.primitives import Engine, Memory, MemoryDesc, Primitive, PrimitiveDesc, Stream
from pyrys.backends.threads import current_threads
from pyrys.machine import cpu_info

_DECIDED: dict[str, dict] = {}  # this process's choices by kind and key (the tuning cache may be off), last asked last
MAX_DECIDED = 4096  # choices _DECIDED keeps, the least recently asked dropped (each new sequence length adds 2)
_LOCK = threading.Lock()
MEASURE_SECONDS = 1.0  # timed rounds of one choice stop short where a round would take longer in all
MIN_RUNS = 2
_SAVED: contextvars.ContextVar["SavedChoices | None"] = contextvars.ContextVar("pyrys_saved_choices", default=None)
# the CPU shares of the timings made while one choice is measured (:func:`decide`)
_SHARES: contextvars.ContextVar["list[float] | None"] = contextvars.ContextVar("pyrys_cpu_shares", default=None)


def machine_key(threads: int) -> dict:
    """What every measured choice depends on besides its own inputs: the thread count the program runs
    with, the CPU, its ISA flags (and a limit set on them), the pyrys and oneDNN versions."""
    from pyrys import __version__

    cpu, isa = cpu_info()
    return {"threads": threads, "cpu": cpu, "isa": isa,
            "isa_limit": os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA")),
            "pyrys": __version__, "onednn": binding.version()}


def decide(kind: str, key: dict, measure: Callable[[], dict | None],
           fields: dict[str, type] | None = None) -> tuple[str, dict | None]:
    """The choice of ``kind`` for ``key`` and the memo it is remembered under (and saved under, with a program).
    ``fields``: what a choice holds, by name and type; a tuning-cache record without them (written by
    something else, or edited) is measured again."""
    memo = json.dumps({"kind": kind, **key}, sort_keys=True)
    saved_choices = _SAVED.get()
    answer = _saved_choice(saved_choices, memo) if saved_choices is not None else None
    if answer is not None:
        return answer
    with _LOCK:
        choice = _DECIDED.get(memo) or _well_formed(tuning_cache.lookup(kind, key), {**(fields or {}), **_TIMED})
        if choice is None:
            choice = _timed(measure)
            if choice is None:
                return memo, None
            if is_quiet(choice["cpu_share"]):
                tuning_cache.store(kind, key, choice)
        _DECIDED.pop(memo, None)
        _DECIDED[memo] = choice
        if len(_DECIDED) > MAX_DECIDED:
            del _DECIDED[next(iter(_DECIDED))]
    return memo, choice


_TIMED = {"cpu_share": float}  # what every kept choice holds besides its kind's fields


def _timed(measure: Callable[[], dict | None]) -> dict | None:
    """``measure()``'s choice with the least CPU share of its timings (1.0 where it timed nothing), and where
    that was busy, its ``measured`` text saying so."""
    shares: list[float] = []
    token = _SHARES.set(shares)
    try:
        choice = measure()
    finally:
        _SHARES.reset(token)
    if choice is None:
        return None
    share = round(min(shares, default=1.0), 2)
    said = busy_said(share)
    return {**choice, "cpu_share": share, **({"measured": f"{choice.get('measured', '')}{said}"} if said else {})}


def _well_formed(choice: object, fields: dict[str, type]) -> dict | None:
    """``choice`` where it holds ``fields`` and was timed on a quiet CPU (a record of an older pyrys, which
    kept busy timings, is timed again), else None."""
    if not isinstance(choice, dict) or any(not isinstance(choice.get(name), kind) for name, kind in fields.items()):
        return None
    return choice if timed_quietly(choice) else None


@dataclass(frozen=True)
class SavedChoices:
    """A save's kernel choices (by memo), indexed by their keys without the thread count."""

    choices: dict[str, dict]
    by_key: dict[str, list[tuple[int, str]]]  # key without threads -> [(threads, memo)]
    kinds: frozenset[str]

    @classmethod
    def of(cls, choices: dict[str, dict]) -> "SavedChoices":
        by_key: dict[str, list[tuple[int, str]]] = {}
        kinds = set()
        for memo in choices:
            key, threads = _split(memo)
            if key is not None:
                by_key.setdefault(json.dumps(key, sort_keys=True), []).append((threads, memo))
                kinds.add(key.get("kind"))
        return cls(dict(choices), by_key, frozenset(kinds))


@contextlib.contextmanager
def saved(choices: SavedChoices):
    """While a program saved on this CPU is built (by ``pyrys.load``, or for another thread count at a call):
    every choice is the save's, measured nothing (a load runs what was saved, and fast); not this process's
    nor the tuning cache's, which may differ.  The save's choice at the nearest thread count where it has
    none at this one (a save made with 2 threads loaded by a process running 1).  Where the save has no
    choice of that kind at all (a pyrys that did not measure it saved it): None, the kind's unmeasured
    default, which that pyrys ran.  Where it has choices of that kind made elsewhere only (another CPU with
    the same ISA flags, another pyrys or oneDNN): chosen as a compile chooses, here."""
    token = _SAVED.set(choices)
    try:
        yield
    finally:
        _SAVED.reset(token)


def _saved_choice(saved: SavedChoices, memo: str) -> tuple[str, dict | None] | None:
    """``(memo, choice)`` from ``saved`` (see :func:`saved`): ``memo``'s, else the one of the nearest thread
    count under its own memo, else ``(memo, None)``; None where it must be chosen here."""
    if memo in saved.choices:
        return memo, saved.choices[memo]
    key, threads = _split(memo)
    others = saved.by_key.get(json.dumps(key, sort_keys=True), [])
    if others:
        nearest = min(others, key=lambda other: (abs(other[0] - threads), other[0]))[1]
        return nearest, saved.choices[nearest]
    return None if key.get("kind") in saved.kinds else (memo, None)


def _split(memo: str) -> tuple[dict | None, int]:
    """A memo's key without its thread count, and the thread count (0 where it has none)."""
    try:
        key = json.loads(memo)
    except ValueError:
        return None, 0
    if not isinstance(key, dict):
        return None, 0
    threads = key.pop("threads", 0)
    return key, threads if isinstance(threads, int) else 0


def best_seconds(calls: list[Callable[[], object]], runs: int) -> list[float]:
    """The best of ``runs`` timed calls of each, called in turn (a busy moment slows all of them), after
    one warm-up call each.  Calls that are long at the warm-up get fewer rounds, at least :data:`MIN_RUNS`:
    ``rounds = min(runs, max(MIN_RUNS, MEASURE_SECONDS // warm-up seconds of all))`` (Whisper's attention at
    batch 8, 0.3 s a call: 2 rounds, not 5; the best of two such calls is as steady as of five short ones).
    The rounds' CPU share (:mod:`pyrys.backends.cpu_share`) goes to the choice being measured (:func:`decide`)."""
    started = time.perf_counter()
    for call in calls:
        call()
    warm_up = time.perf_counter() - started
    rounds = min(runs, max(MIN_RUNS, int(MEASURE_SECONDS // max(warm_up, 1e-9))))
    best = [float("inf")] * len(calls)
    with CpuShare(current_threads()) as load:
        for _ in range(rounds):
            for i, call in enumerate(calls):
                start = time.perf_counter()
                call()
                best[i] = min(best[i], time.perf_counter() - start)
    shares = _SHARES.get()
    if shares is not None:
        shares.append(load.share)
    return best


def filled_memory(engine: Engine, md: MemoryDesc) -> Memory:
    """A memory of ``md`` over bytes 0x3c (0.0115 as float32 or bfloat16: no NaN, no denormal slowing a
    kernel down)."""
    data = torch.full((max(md.size(), 1),), 0x3C, dtype=torch.uint8)
    return Memory(engine, md, data.data_ptr(), keepalive=data)


def inner_product_seconds(engine: Engine, candidates: list[tuple[PrimitiveDesc, bool, dict]], runs: int) -> list[float]:
    """For each inner product ``(pd, has_bias, further arguments)`` (the runtime scales of an int8 one), the
    best of up to ``runs`` calls (:func:`best_seconds`) on buffers of constant bytes (:func:`filled_memory`)."""
    stream = Stream(engine)  # held here: a bound call keeps only its handle
    calls = []
    for pd, has_bias, further in candidates:
        args = {ARG_SRC: filled_memory(engine, pd.src_md()), ARG_WEIGHTS: filled_memory(engine, pd.weights_md()),
                ARG_DST: filled_memory(engine, pd.dst_md()), **further}
        if has_bias:
            args[ARG_BIAS] = filled_memory(engine, pd.weights_md(1))
        calls.append(Primitive(pd).bind(stream, args).run)
    return best_seconds(calls, runs)
