"""``pyrys.bisect``: the first stage of a compile whose output crosses a tolerance, and what it changed.

    >>> print(pyrys.bisect(model, (x,), tolerance=1e-4).render())
    first over 1e-04: step 8, fold_conv_bn (error 8.5e-03; 0 before it)
    what fold_conv_bn changed in the graph:
    - %batch_norm : Float(1, 8, 6, 6) = aten::batch_norm(%conv2d, ...)
    + %w_bn_folded : Float(8, 3, 3, 3) = pyrys::fold_weight(...)
    ...

Stages are the captured graph (``capture``: torch.export's or the TorchScript import's graph
against the model itself), then every pass in pipeline order, each run on the reference
backend, then the backend's program; for the program, the layers over the tolerance are
listed instead of a graph change (:mod:`pyrys.numerics.layers`).
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

import torch

from pyrys.numerics import FP32_TOLERANCE, checked_tolerance
from pyrys.numerics.layers import LayerError
from pyrys.numerics.report import NumericsReport, format_error, format_tolerance
from pyrys.numerics.trace import RANDOM_MODEL
from pyrys.passes.pipeline import Step


@dataclass
class Bisection:
    """Where a compile first crosses ``tolerance`` (``stage`` None: nowhere) and the evidence."""

    tolerance: float
    report: NumericsReport
    stage: str | None = None
    index: int = -1  # the stage's row in the report (and its step in ``opt.history`` for a pass)
    error: float = 0.0
    error_before: float = 0.0
    changed: list[str] = field(default_factory=list)  # the graph lines the stage removed (-) and added (+)
    layers: list[LayerError] = field(default_factory=list)  # the program's layers over the tolerance

    def render(self, lines_shown: int = 40) -> str:
        if self.stage is None:
            worst = max((error for _, error in self.report.rows), default=0.0)
            return f"every stage within {format_tolerance(self.tolerance)} (worst {format_error(worst)})"
        lines = [f"first over {format_tolerance(self.tolerance)}: step {self.index}, {self.stage} "
                 f"(error {format_error(self.error)}; {format_error(self.error_before)} before it)"]
        if self.stage == "capture" and any(problem.startswith(RANDOM_MODEL) for problem in self.report.problems):
            lines.append("the model itself is random: its own two runs differ (see below)")
        elif self.stage == "capture":
            lines.append("the captured graph itself differs from the model (the capture changed the arithmetic)")
        program = self.index == len(self.report.passes)
        if 0 < self.index and not program and not self.changed:
            lines.append(f"{self.stage} left the graph's text as it was: it changed the values of constants")
        if program and not self.layers:
            lines.append("no compared layer is over the tolerance: see the report's problems, or outputs that are "
                         "not the value of any one op")
        if self.changed:
            lines.append(f"what {self.stage} changed in the graph:")
            lines += [f"  {line}" for line in self.changed[:lines_shown]]
            if len(self.changed) > lines_shown:
                lines.append(f"  ... {len(self.changed) - lines_shown} more lines")
        if self.layers:
            lines.append(f"layers over {format_tolerance(self.tolerance)}, worst first:")
            lines += [f"  {format_error(layer.error):>9}  {layer.describe()}" for layer in self.layers]
        lines += [f"! {problem}" for problem in self.report.problems]
        return "\n".join(lines)


def locate(history: list[Step], report: NumericsReport, tolerance: float = FP32_TOLERANCE) -> Bisection:
    """The first stage of ``report`` over ``tolerance``, with the graph lines it changed (``history``: the
    steps the report's pass rows were measured on, in the same order).  The bisection's report is
    ``report`` judged by ``tolerance``."""
    report = dataclasses.replace(report, tolerance=tolerance)
    first = report.first_over(tolerance)
    if first is None:
        return Bisection(tolerance, report)
    index, stage, error = first
    before = report.rows[index - 1][1] if index else 0.0
    if index >= len(history):  # the program
        layers = [layer for layer in report.layers if not layer.error <= tolerance]
        return Bisection(tolerance, report, stage, index, error, before, layers=layers)
    changed = graph_change(history[index - 1].graph, history[index].graph) if index else []
    return Bisection(tolerance, report, stage, index, error, before, changed)


def graph_change(before: str, after: str) -> list[str]:
    """The lines of ``before`` a pass removed (``- ``) and the lines it added (``+ ``)."""
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return [f"{line[0]} {line[1:].strip()}" for line in diff
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def bisect(model: Any, example_inputs: Any = None, example_kwargs: dict | None = None, *,
           tolerance: float | None = None, **options) -> Bisection:
    """Optimize ``model`` with ``numerics=True`` (``options``: :func:`pyrys.optimize`'s) and name the first
    stage whose output's relative error against eager crosses ``tolerance`` (default: that of the precision
    run, as ``pyrys.explain``'s: 1e-4 for fp32, so that ``precision="int8"`` does not always name ``quantize``)."""
    from pyrys.optimize import optimize

    if tolerance is not None:
        tolerance = checked_tolerance(tolerance, "pyrys.bisect")
    options.pop("numerics", None)
    with torch.no_grad():
        opt = optimize(model, example_inputs, example_kwargs, numerics=True, **options)
    return locate(opt.history, opt.numerics, opt.numerics.tolerance if tolerance is None else tolerance)


