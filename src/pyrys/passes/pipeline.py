"""The pass pipeline: one ordered, named list, and the pass manager that runs it.

Every pass can be disabled by name; instruments print the graph after each pass,
dump it to ``NNN_<pass>.txt`` files, time it, and (in tests) verify it.  A pass marked
``fixed_point`` is repeated until a sweep changes nothing (rules stay single sweeps);
its step counts every firing and keeps the misses of the last sweep, which are the
ones still standing.

Shapes and dtypes (``meta["val"]``) are propagated once at capture; after that each pass
keeps them current for what it rewrites (:mod:`pyrys.ir.edit`), and nothing recomputes
them behind its back: the verifier compares them with a fresh propagation after every
pass and names the pass and the node whose record is wrong.

With a ``measure`` instrument (``optimize(..., numerics=True)``) each step also records the
error of its graph against eager (:mod:`pyrys.numerics.trace`).

After the pipeline, :func:`legalize_for_backends` gives every conv and linear its fused
form (``passes/legalize.py``), outside the history: ``opt.graph`` is the pipeline's result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.fx as fx

from pyrys.ir.meta import refresh_meta
from pyrys.ir.printer import format_graph
from pyrys.ir.verify import VerificationError
from pyrys.passes import (cleanup, constant_propagation, fold_batch_norm, fold_constant_affine, freeze,
                          fuse_post_ops, legalize, simplify)
from pyrys.passes import control_flow, precision, quantize
from pyrys.passes.precision_guard import Bf16Guard
from pyrys.passes.rewrite import Miss, PassResult
from pyrys.quantization.calibration import Calibration


@dataclass(frozen=True)
class PassOptions:
    """User choices the passes read: which attributes to freeze, the precision to run in."""

    freeze_params: tuple[str, ...] | None = freeze.ALL  # None: every parameter and buffer
    freeze_flags: tuple[str, ...] | None = freeze.ALL  # None: every flag
    precision: str = "fp32"  # "bf16": the ops of precision.BF16_OPS run in bfloat16; "int8": passes/quantize.py
    calibration: Calibration | None = field(default=None, compare=False)  # precision="int8": samples, then the plan
    output_dtype: torch.dtype | None = None  # every floating-point output in this dtype (None: as eager gives it)
    guard: Bf16Guard | None = field(default=None, compare=False)  # precision="bf16": what the accuracy guard measures on
    frozen_check: Callable[[str, torch.Tensor, torch.Tensor], None] | None = field(default=None, compare=False)
    # (a later capture's: each copy freeze_params makes, checked against the weights at optimize)


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[fx.GraphModule, PassOptions], PassResult]
    fixed_point: bool = False  # repeat until nothing fires


MAX_SWEEPS = 10  # a fixed-point pass stops after this many sweeps even if rules still fire


PIPELINE: tuple[Pass, ...] = (
    Pass("freeze_params", lambda gm, o: freeze.freeze_params(gm, o.freeze_params, o.frozen_check)),
    Pass("freeze_flags", lambda gm, o: freeze.freeze_flags(gm, o.freeze_flags)),
    Pass("constant_propagation", lambda gm, o: constant_propagation.constant_propagation(gm)),
    Pass("inline_constant_ifs", lambda gm, o: control_flow.inline_constant_ifs(gm)),
    Pass("dead_code_elimination", lambda gm, o: cleanup.dead_code_elimination(gm)),
    Pass("common_subexpression_elimination", lambda gm, o: cleanup.common_subexpression_elimination(gm)),
    Pass("simplify", lambda gm, o: simplify.simplify(gm), fixed_point=True),
    Pass("fold_conv_bn", lambda gm, o: fold_batch_norm.fold_conv_bn(gm)),
    Pass("fold_constant_affine", lambda gm, o: fold_constant_affine.fold_constant_affine(gm), fixed_point=True),
    Pass("fuse_post_ops", lambda gm, o: fuse_post_ops.fuse_post_ops(gm), fixed_point=True),
    Pass("lower_precision", lambda gm, o: precision.lower_precision(gm, o.precision, o.output_dtype, o.guard)),
    Pass("constant_propagation", lambda gm, o: constant_propagation.constant_propagation(gm)),
    Pass("dead_code_elimination", lambda gm, o: cleanup.dead_code_elimination(gm)),
    Pass("quantize", lambda gm, o: quantize.quantize(gm, o.precision, o.calibration)),
)
PASS_NAMES = tuple(dict.fromkeys(p.name for p in PIPELINE))
_PASS_BY_NAME = {p.name: p for p in PIPELINE}


def select_passes(*names: str) -> tuple[Pass, ...]:
    """A custom pipeline of the named passes, in the given order (for tests and experiments)."""
    return tuple(_PASS_BY_NAME[name] for name in check_pass_names(names))


@dataclass
class Step:
    """The record of one pass: its graph afterwards, what fired, what was missed, its time, and (when
    measured) the relative error of its graph's outputs against eager."""

    name: str
    graph: str
    fired: dict[str, int]
    misses: list[Miss]
    seconds: float
    error: float | None = None

    def summary(self) -> str:
        fired = ", ".join(f"{k}: {v}" for k, v in self.fired.items()) or "nothing"
        error = f" [error {self.error:.1e}]" if self.error is not None else ""
        return f"{self.name}: {fired}" + (f" ({len(self.misses)} missed)" if self.misses else "") + error


@dataclass
class Instruments:
    """What the pass manager does around each pass."""

    print_after_each: bool = False
    dump_dir: Path | None = None
    verify: Callable[[fx.GraphModule], None] | None = None
    class_name: str = "Module"
    measure: Callable[[str, fx.GraphModule], float] | None = None  # (step name, graph) -> error against eager


@dataclass
class PipelineRun:
    history: list[Step] = field(default_factory=list)

    @property
    def misses(self) -> list[Miss]:
        return [m for step in self.history for m in step.misses]


def check_pass_names(names: Iterable[str]) -> tuple[str, ...]:
    unknown = sorted(set(names) - set(PASS_NAMES))
    if unknown:
        raise ValueError(f"unknown pass name(s) {unknown}; the pipeline's passes are {list(PASS_NAMES)}")
    return tuple(names)


def run_pipeline(
    gm: fx.GraphModule,
    options: PassOptions = PassOptions(),
    disable: Iterable[str] = (),
    instruments: Instruments = Instruments(),
    pipeline: tuple[Pass, ...] | None = None,
) -> PipelineRun:
    """Run every enabled pass of ``pipeline`` (default: :data:`PIPELINE` as it is at the call, so a test
    may plant a pass in it) on ``gm`` in place, recording a :class:`Step` for each."""
    pipeline = PIPELINE if pipeline is None else pipeline
    disabled = set(check_pass_names(disable))
    run = PipelineRun()
    refresh_meta(gm)
    _record(run, "capture", gm, PassResult(), 0.0, instruments)
    for p in pipeline:
        if p.name in disabled:
            continue
        start = time.perf_counter()
        result = _run_pass(p, gm, options)
        _record(run, p.name, gm, result, time.perf_counter() - start, instruments)
    return run


def apply_passes(gm: fx.GraphModule, passes: tuple[Pass, ...], options: PassOptions = PassOptions()) -> None:
    """Run ``passes`` on ``gm`` in place (each to its fixed point where marked), recording nothing: for a
    graph the pipeline has already run on (``passes/specialize.py``)."""
    for p in passes:
        _run_pass(p, gm, options)


def legalize_for_backends(gm: fx.GraphModule, instruments: Instruments = Instruments()) -> PassResult:
    """The one form every backend takes (``passes/legalize.py``), verified like a pass; not in the history."""
    result = legalize.legalize(gm)
    _verify("legalize", gm, instruments)
    return result


def _run_pass(p: Pass, gm: fx.GraphModule, options: PassOptions) -> PassResult:
    """One sweep, or sweeps until nothing fires for a fixed-point pass."""
    total = PassResult()
    for _ in range(MAX_SWEEPS if p.fixed_point else 1):
        result = p.run(gm, options)
        total.fired.update(result.fired)
        total.misses = result.misses
        if not result.fired:
            break
    return total


def _verify(name: str, gm: fx.GraphModule, instruments: Instruments) -> None:
    if instruments.verify is None:
        return
    try:
        instruments.verify(gm)
    except VerificationError as error:
        raise VerificationError(f"after {name}: {error}") from error


def _record(run: PipelineRun, name: str, gm: fx.GraphModule, result: PassResult, seconds: float,
            instruments: Instruments) -> None:
    _verify(name, gm, instruments)
    text = format_graph(gm, instruments.class_name)
    error = instruments.measure(name, gm) if instruments.measure is not None else None
    step = Step(name, text, dict(result.fired), list(result.misses), seconds, error)
    run.history.append(step)
    if instruments.print_after_each:
        print(f"== after {name} ==\n{text}\n")
    if instruments.dump_dir is not None:
        path = Path(instruments.dump_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / f"{len(run.history) - 1:03d}_{name}.txt").write_text(text + "\n")
