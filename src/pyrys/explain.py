"""What the passes did to a model, and why each fold or fusion that could have happened did not.

    >>> print(pyrys.explain(model, (x,)).render())
    fold_conv_bn: 53 folded (conv_bn: 53)
    fuse_post_ops: 65 fused (conv_activation: 49, binary_add: 16)
    ...
    misses: none

Misses are grouped by rule and reason, with node names and shapes taken out of the
reason so that the same cause in many places is one line with a count.
"""
from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pyrys.numerics import checked_tolerance
from pyrys.numerics.bisect import locate
from pyrys.numerics.report import NumericsReport
from pyrys.passes.pipeline import Step
from pyrys.passes.rewrite import Miss

# what a firing of each pass means, for the per-pass counts
VERBS = {
    "freeze_params": "frozen", "freeze_flags": "frozen", "constant_propagation": "evaluated",
    "dead_code_elimination": "removed", "common_subexpression_elimination": "merged", "simplify": "simplified",
    "fold_conv_bn": "folded", "fold_constant_affine": "folded", "fuse_post_ops": "fused",
    "lower_precision": "changed", "quantize": "quantized",
}
_NODE = re.compile(r"%[\w.]+")
_SHAPE = re.compile(r"\(\d+(?:, \d+)*,?\)")


def reason_template(reason: str) -> str:
    """``"the output of %conv2d_3 (1, 8, 4, 4) has 2 users"`` -> ``"the output of %… (…) has 2 users"``."""
    return _SHAPE.sub("(…)", _NODE.sub("%…", reason))


@dataclass
class Explanation:
    """Per-pass counts and grouped misses of one optimization."""

    title: str
    history: list[Step]
    misses: list[Miss]
    notes: list[str] = field(default_factory=list)
    numerics: NumericsReport | None = None  # explain(..., numerics=True)

    def pass_counts(self) -> list[tuple[str, int, dict[str, int]]]:
        """``(pass, total, {rule: count})`` per pass name, in pipeline order (repeated passes summed)."""
        totals: dict[str, dict[str, int]] = {}
        for step in self.history[1:]:
            counts = totals.setdefault(step.name, {})
            for rule, n in step.fired.items():
                counts[rule] = counts.get(rule, 0) + n
        return [(name, sum(counts.values()), counts) for name, counts in totals.items()]

    def misses_by_reason(self) -> dict[tuple[str, str], list[str]]:
        """``(rule, reason template) -> [node names]``, most frequent first."""
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for miss in self.misses:
            groups[miss.rule, reason_template(miss.reason)].append(miss.node)
        return dict(sorted(groups.items(), key=lambda item: -len(item[1])))

    def render(self, examples: int = 4) -> str:
        lines = [self.title, ""]
        for name, total, counts in self.pass_counts():
            detail = ", ".join(f"{rule}: {n}" for rule, n in counts.items())
            lines.append(f"{name}: {total} {VERBS.get(name, 'changed')}" + (f" ({detail})" if detail else ""))
        groups = self.misses_by_reason()
        lines += ["", f"misses: {len(self.misses) or 'none'}"]
        for (rule, reason), nodes in groups.items():
            shown = ", ".join(f"%{n}" for n in nodes[:examples]) + (", …" if len(nodes) > examples else "")
            lines.append(f"  {len(nodes):4d} x {rule}: {reason}")
            lines.append(f"         at {shown}")
        lines += [f"note: {note}" for note in self.notes]
        if self.numerics is not None:
            lines += ["", self.numerics.render()]
            crossing = locate(self.history, self.numerics, self.numerics.tolerance)
            if crossing.stage is not None:
                lines += ["", crossing.render()]
        return "\n".join(lines)


def explain(model: torch.nn.Module, example_inputs: Any = None, *, backend: str = "reference",
            dump_dir: str | Path | None = None, title: str | None = None, numerics: bool = False,
            tolerance: float | None = None, **options) -> Explanation:
    """Optimize ``model`` (see :func:`pyrys.optimize` for ``options``; an ``ExportedProgram`` needs no
    ``example_inputs``) and explain what happened (``title``: its first line, ``{backend}`` in it the backend
    that ran, the one ``"auto"`` picked); ``numerics``: also the error after every pass and of
    every layer, and the first stage over ``tolerance`` with what it changed (:mod:`pyrys.numerics`);
    ``tolerance`` defaults to that of the precision run (``pyrys.numerics.TOLERANCES``: 1e-4 for fp32; bf16's
    for half-precision outputs)."""
    from pyrys.optimize import optimize

    if tolerance is not None:
        tolerance = checked_tolerance(tolerance, "pyrys.explain")
        if not numerics:
            raise ValueError("pyrys.explain: tolerance= is the error numerics=True flags; without it nothing reads it")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"pyrys.explain: title must be a str (its first line; '{{backend}}' in it names the backend), "
                        f"got {type(title).__name__}")
    opt = optimize(model, example_inputs, backend=backend, dump_dir=dump_dir, numerics=numerics, **options)
    title = (title or f"{type(model).__name__} on the {{backend}} backend").replace("{backend}", opt.backend)
    report = opt.numerics  # measured against the tolerance of what runs (bf16 asked where the CPU has none: fp32's)
    if report is not None and tolerance is not None:
        report = dataclasses.replace(report, tolerance=tolerance)
    return Explanation(title, opt.history, opt.misses, list(opt.notes), report)
