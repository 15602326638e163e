"""The accuracy budget a lower precision keeps (``optimize(..., accuracy_budget=)``), for bf16
(:mod:`pyrys.passes.precision_guard`) and int8 (:mod:`pyrys.quantization.guard`) alike.

    error(K) = max over the guard's samples of relative_error(outputs with the ops K kept in float32,
               float32 outputs)
    own(op)  = the error an op's own rounding makes in its result, on the float32 graph's activations

When error(nothing kept) > budget, the ops are ordered by their first-order effect on the outputs
(:mod:`pyrys.numerics.sensitivity`; by ``own`` where the graph has no derivative), largest first, and the fewest first
k of them with error(first k) <= budget go back to float32.  k is found by doubling, then bisection
(:func:`fewest`): about 2 log2(k) evaluations of error instead of k.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._pytree import tree_leaves

from pyrys.numerics import TOLERANCES, in_dtypes_of, relative_error
from pyrys.numerics.sensitivity import Sensitivity

AUTO = "auto"  # optimize's default accuracy_budget: the precision's own (DEFAULT_BUDGETS)
DEFAULT_BUDGETS = {p: TOLERANCES[p] for p in ("bf16", "int8")}  # each lower precision's tolerance
GUARD_SAMPLES = 4  # samples the guards measure on (the first ones of calibration=, else the example inputs)
GUARD_MEASURE_KEY = "pyrys_guard_measure"  # a graph's meta, from its guard until its program is checked


@dataclass
class GuardMeasure:
    """What an accuracy guard of ``precision`` ("bf16", "int8") measured on: ``samples`` (each one call's flat
    inputs; ``data``: them in words, for a note), ``expected`` (the float32 graph's outputs on them), the
    outputs' ``error`` it found there on torch's ops with the ops it chose kept, and the ``budget`` it held."""

    precision: str
    samples: list[list]
    expected: list[list]
    error: float
    budget: float
    data: str


def program_error(measure: GuardMeasure, program, flat: list) -> tuple[float | None, bool]:
    """The backend's ``program`` (built for ``flat``'s shapes) measured as the guard measured torch's ops: its
    outputs' largest relative error on the guard's samples of those shapes, and whether those are every sample
    (the data an accuracy note names); None where none is of them, or it fails (a check, never a compile's
    failure: the example inputs ran on it)."""
    same = [(sample, want) for sample, want in zip(measure.samples, measure.expected)
            if _same_shapes(sample, flat)]
    if not same:
        return None, False
    try:
        error = max(max_error(lambda inputs: in_dtypes_of(program(inputs), want), [sample], [want])
                    for sample, want in same)  # (bfloat16 outputs asked for: compared as the guard compared)
    except Exception:  # noqa: BLE001
        return None, False
    return error, len(same) == len(measure.samples)


def program_over_budget(measure: GuardMeasure, error: float | None, rounding: float = 0.0) -> str:
    """The accuracy note for a program that errs ``error`` (:func:`program_error`) where that is more than the
    budget (plus ``rounding``: what an ``output_dtype`` adds) while the guard, measuring torch's ops, found
    the budget held; else "".  Two kernels round a value apart by one step, and an output that jumps at a
    threshold of it (a comparison, a mask, a rounding to integers) moves by the jump: rare, and no op the guard
    could keep would show it."""
    if error is None or measure.error > measure.budget or error <= measure.budget + rounding:
        return ""  # (over already: the guard's own note says so)
    return (f"{ACCURACY_NOTE % measure.precision}{error:.1e} of float32's (max relative error on {measure.data}, "
            f"of the compiled program), over accuracy_budget={measure.budget:g}: the guard measured "
            f"{measure.error:.1e} there on torch's ops, and oneDNN's kernels round some value otherwise; an output "
            "that jumps at a threshold of it (a comparison, a mask, a rounding to integers) moved by the jump, "
            "and matches float32's only in float32")


def _same_shapes(sample: list, flat: list) -> bool:
    """Whether ``sample``'s tensors have ``flat``'s shapes (a program built for those takes it)."""
    return len(sample) == len(flat) and all(
        not isinstance(b, torch.Tensor) or (isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype)
        for a, b in zip(sample, flat))


def budget_for(precision: str, accuracy_budget: float | str | None) -> float | None:
    """The budget ``optimize`` keeps: ``accuracy_budget`` as a float, the precision's default for ``"auto"``,
    None (no guard) for None or for a precision without one (fp32)."""
    if accuracy_budget == AUTO:
        return DEFAULT_BUDGETS.get(precision)
    if accuracy_budget is None or precision not in DEFAULT_BUDGETS:
        return None
    return float(accuracy_budget)


def check_budget(accuracy_budget) -> None:
    """``"auto"``, None or a finite positive number (inf would measure for nothing: None measures nothing);
    anything else raises ``ValueError`` naming what it takes."""
    if accuracy_budget == AUTO or accuracy_budget is None:
        return
    if isinstance(accuracy_budget, bool) or not isinstance(accuracy_budget, numbers.Real) or \
            not 0 < accuracy_budget < float("inf"):
        raise ValueError(f"pyrys.optimize: accuracy_budget must be a finite positive number, 'auto' or None (no "
                         f"guard), got {accuracy_budget!r}")


def check_measurable(expected: list[list]) -> None:
    """``ValueError`` where the float32 outputs a guard measures against hold no finite number but 0 (an
    all-NaN, all-inf or all-zero example): every error is 0 against them, and a guard reading 0 kept nothing
    (a model erring 0.23 on other data was said to be within 0; a helper's find)."""
    tensors = [t for t in tree_leaves(expected) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if tensors and not any(bool((torch.isfinite(t) & (t != 0)).any()) for t in tensors):
        raise ValueError("its float32 outputs on them are all 0 or not finite, so any error against them is 0: "
                         "pass calibration= samples like the inputs served")


def max_error(program, samples: list[list], expected: list[list], limit: float = float("inf")) -> float:
    """The largest relative error of ``program``'s outputs on ``samples`` against ``expected``; the first one
    over ``limit`` as soon as it is seen (a trial that breaks the budget needs no more samples run).  Where
    the outputs hold floating-point tensors, those alone are measured: an integer output computed from them
    (a classifier's argmax beside its logits) flips at a near tie in any precision, and counted it would be
    an error of 1 that keeps every op in float32."""
    largest = 0.0
    for sample, want in zip(samples, expected):
        error = relative_error(*_floating(program(sample), want))
        largest = max(largest, error) if error == error else float("inf")  # NaN breaks any budget
        if largest > limit:
            break
    return largest


def _floating(actual, expected) -> tuple[list, list]:
    """The leaves of ``actual`` and ``expected`` where ``expected`` holds a floating-point (or complex)
    tensor; all of them where it holds none."""
    got, want = tree_leaves(actual), tree_leaves(expected)
    if len(got) != len(want):
        return got, want  # (relative_error says how they differ)
    kept = [i for i, e in enumerate(want) if isinstance(e, torch.Tensor) and (e.is_floating_point() or e.is_complex())]
    return ([got[i] for i in kept], [want[i] for i in kept]) if kept else (got, want)


def keep_fewest(count: int, error_keeping: Callable[[int], float], budget: float,
                known: dict[int, float] | None = None) -> tuple[int, float]:
    """How many of ``count`` ops (largest own error first) to keep in float32, and the outputs' error then:
    the fewest first k with ``error_keeping(k) <= budget`` (:func:`fewest`), each k measured once (those of
    ``known``, ``{k: error}``, not again)."""
    errors: dict[int, float] = dict(known or {})

    def holds(k: int) -> bool:
        if k not in errors:
            errors[k] = error_keeping(k)
        return errors[k] <= budget

    kept = fewest(count, holds)
    return kept, errors[kept] if kept in errors else error_keeping(kept)


def fewest(count: int, holds: Callable[[int], bool]) -> int:
    """The smallest k in 1..count with ``holds(k)``, for ``holds`` false below some k and true from it on
    (``holds(count)`` is taken as true, not asked): doubling k until it holds, then bisecting."""
    low, high = 0, 1  # holds(low) is false (nothing kept breaks the budget: why the guard runs)
    while high < count and not holds(high):
        low, high = high, high * 2
    high = min(high, count)
    while high - low > 1:
        middle = (low + high) // 2
        if holds(middle):
            high = middle
        else:
            low = middle
    return high


def kept_reason(precision: str, measured: Sensitivity, name: str, total: float, budget: float, data: str,
                kept: int, kept_in: str = "float32") -> str:
    """Op ``name``'s miss reason (kept in ``kept_in``), from what :mod:`~pyrys.numerics.sensitivity` ``measured``."""
    own = f"{precision} moves its own result by {measured.own[name]:.1e}"
    if measured.effect is None:  # (the graph has no derivative: ordered by own error)
        moves, what = f"{own} (relative, on {data})", ("its own", "theirs")
    elif name in measured.underived:
        moves = (f"{own} (relative, on {data}; no finite derivative of the outputs reaches it: that is taken as "
                 "its effect on them)")
        what = ("the outputs", "the outputs")
    else:
        moves = f"{own} and, to first order, the outputs by about {measured.effect[name]:.1e} (relative, on {data})"
        what = ("the outputs", "the outputs")
    which = f"the op that moves {what[0]} the most" if kept == 1 else f"one of the {kept} ops that move {what[1]} the most"
    return (f"kept in {kept_in} {KEPT_BY_GUARD}: {moves}, {which}; with every op in {precision} the outputs moved "
            f"{total:.1e}, over accuracy_budget={budget:g}")


ACCURACY_NOTE = "precision='%s': outputs within "  # how accuracy_note begins
KEPT_BY_GUARD = "by the accuracy guard"  # in every kept op's reason (kept_reason)


def accuracy_note(precision: str, error: float, budget: float | None, kept: int, data: str,
                  kept_in: str = "float32") -> str:
    """The note saying how far the outputs are from float32's, and what the guard kept (in ``kept_in``)."""
    held = "" if budget is None else f" (accuracy_budget={budget:g}" + (
        f": {kept} op{'s' * (kept != 1)} kept in {kept_in}, see misses)" if kept else ")")
    return f"{ACCURACY_NOTE % precision}{error:.1e} of float32's (max relative error on {data}){held}"
