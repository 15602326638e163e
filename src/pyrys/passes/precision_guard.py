"""The bf16 accuracy guard: how far ``precision="bf16"`` moves the outputs from float32's, and which ops
go back to float32 when that is more than ``accuracy_budget`` (the search: :mod:`pyrys.numerics.budget`), the
ops that move the outputs the most first.

    error(K)  = max over the samples of relative_error(graph lowered with the ops K kept in float32, float32 graph)
    effect(op) = how far the op on its float32 arguments rounded to bfloat16 moves the outputs, to first order
                (:mod:`pyrys.numerics.sensitivity`)

both on the reference backend, ``effect`` on the float32 graph's activations (one run and a few backward
passes per sample for all ops: each op evaluated once more on its arguments rounded where the graph with
every op lowered reads them in bfloat16, its result too where that is bfloat16).  Each evaluation of
``error`` lowers a copy of the graph (its constants shared) and runs it; the graph itself is lowered once,
with the ops chosen.  With the budget kept by everything in bf16 (the usual case: ~4e-3 on CNNs and
encoders) the guard costs one float32 and one bf16 run of the graph per sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from pyrys.backends.reference import ReferenceProgram
from pyrys.ir.graph import trial_copy
from pyrys.ir.ops import PYTHON_IMPLS
from pyrys.numerics.budget import (GUARD_MEASURE_KEY, GuardMeasure, accuracy_note, check_measurable, keep_fewest,
                                   kept_reason, max_error)
from pyrys.numerics.sensitivity import Sensitivity, sensitivities


Rounding = Callable[[fx.GraphModule, set[str]], dict[str, tuple[frozenset[str], bool]]]  # (lowered graph, op names)
# -> for each op: the names of the values it reads in bfloat16, and whether its result is bfloat16


@dataclass
class Bf16Guard:
    """What the guard measures on: ``samples`` (each one call's flat inputs), ``budget`` (None: measure
    only), ``data`` (the samples in words, for the note); after the pass, ``error`` (the outputs' error
    against float32 with the ops ``kept`` in float32) and ``kept`` (``{node name: why}``)."""

    samples: list[list]
    budget: float | None
    data: str
    error: float | None = None
    kept: dict[str, str] = field(default_factory=dict)
    failure: str = ""  # why the graph could not be measured (the model then runs with every op in bf16)
    fallback: tuple[list[list], str] | None = None  # samples (and words) to measure on where ``samples`` fail
    # to run: the inputs compiled for, where the samples were cut to a capture's size-1 dims

    def keep(self, gm: fx.GraphModule, lower: Callable[[fx.GraphModule, frozenset[str]], set[str]],
             rounding: Rounding) -> dict[str, str]:
        """:meth:`choose`, or nothing kept where the graph cannot be measured on the reference backend (the
        failure is noted: a guard never stops a compile); measured on ``fallback`` where the samples fail."""
        try:
            return self.choose(gm, lower, rounding)
        except Exception as error:  # noqa: BLE001 -- say why, compile as without a guard
            if self.fallback is not None:  # samples cut to a size of 1 may not run (an input indexing the cut dim)
                (self.samples, self.data), self.fallback = self.fallback, None
                return self.keep(gm, lower, rounding)
            self.error, self.kept = None, {}
            self.failure = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
            return {}

    def choose(self, gm: fx.GraphModule, lower: Callable[[fx.GraphModule, frozenset[str]], set[str]],
               rounding: Rounding) -> dict[str, str]:
        """The ops of ``gm`` (float32, not lowered yet) to keep in float32; ``lower(graph, kept)`` lowers a
        graph in place keeping the ops named in ``kept``, and returns the names of the compute ops it moved;
        ``rounding(lowered graph, names)``: what lowering rounds at each op named (the values it reads in
        bfloat16, and whether its result is)."""
        reference = ReferenceProgram(gm)
        expected, run = [], []
        for sample in self.samples:  # (one the model refuses, a text past its position table, is left out)
            try:
                expected.append(reference(sample))
                run.append(sample)
            except Exception:  # noqa: BLE001 -- eager fails on it too; where every one fails, keep() says why
                if self.fallback is not None or (sample is self.samples[-1] and not run):
                    raise  # (samples cut to fit: the cut's failure, not the model's; measured on its fallback)
        if len(run) < len(self.samples):
            self.data = f"{len(run)} of the {self.data} (the model fails on the rest)"
            self.samples = run

        def error(kept: frozenset[str], limit: float = float("inf")) -> tuple[float, set[str], fx.GraphModule]:
            trial = trial_copy(gm)
            moved = lower(trial, kept)
            return max_error(ReferenceProgram(trial), self.samples, expected, limit), moved, trial

        total, moved, lowered = error(frozenset())
        if moved:  # (nothing lowered, a float64 model: nothing to measure, nothing to say)
            check_measurable(expected)
        self.error = total if moved else None
        if self.budget is None or not moved:
            return {}
        measured = GuardMeasure("bf16", self.samples, expected, total, self.budget, self.data)
        gm.meta[GUARD_MEASURE_KEY] = measured  # the backend's program is measured on them too (compiled.py)
        if total <= self.budget:
            return {}
        sensitive = sensitivity(gm, rounding(lowered, moved), self.samples)  # (rounded as with every op lowered)
        del lowered
        ordered = sensitive.order()
        count, self.error = keep_fewest(len(ordered), lambda k: error(frozenset(ordered[:k]), self.budget)[0],
                                        self.budget)
        self.kept = {name: kept_reason("bf16", sensitive, name, total, self.budget, self.data, count)
                     for name in ordered[:count]}
        measured.error = self.error
        return self.kept

    def note(self, error: float | None = None) -> str:
        """What the guard measured, in ``opt.notes`` (``error``: the compiled program's, measured alike)."""
        if self.failure:
            return (f"precision='bf16': the accuracy guard could not measure the graph on {self.data} "
                    f"({self.failure}); every op that can runs in bf16")
        if self.error is None:
            return ""
        return accuracy_note("bf16", self.error if error is None else error, self.budget, len(self.kept), self.data)


def sensitivity(gm: fx.GraphModule, roundings: dict[str, tuple[frozenset[str], bool]],
                samples: list[list]) -> Sensitivity:
    """Each op named in ``roundings``' own error and first-order effect on the outputs in bf16
    (:mod:`pyrys.numerics.sensitivity`): the op run on its float32 arguments rounded to bfloat16 where the
    lowered graph reads them so (``roundings[name]``: those values' names, and whether its result is bfloat16:
    rounded too), on the float32 graph's activations."""
    program = ReferenceProgram(gm)
    nodes = {node.name: node for node in gm.graph.nodes if node.name in roundings}
    reads = {arg.name for node in nodes.values() for arg in node.all_input_nodes if arg.op != "get_attr"}

    def rounded(name: str, value):
        node, (arguments, result_rounded) = nodes[name], roundings[name]
        args, kwargs = fx.map_arg((node.args, node.kwargs),
                                  lambda a: _rounded(value(a)) if a.name in arguments else value(a))
        result = PYTHON_IMPLS.get(node.target, node.target)(*args, **kwargs)
        return _rounded(result) if result_rounded else result

    return sensitivities(program.gm, program.arguments, samples, rounded, set(nodes), reads)


def _rounded(value):
    """A float32 tensor rounded to bfloat16's precision (kept float32, so the op runs as it did); else itself."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return value.to(torch.bfloat16).to(torch.float32)
    return value
