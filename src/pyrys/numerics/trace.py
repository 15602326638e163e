"""Measuring one compile: the graph after every pass, and the backend's program, against eager.

``optimize(..., numerics=True)`` makes a :class:`NumericsTrace` that computes the model's own
outputs at its first measurement (:mod:`pyrys.numerics.eager`); the pass manager calls
:meth:`NumericsTrace.measure` after every pass (its ``measure`` instrument), which runs that
graph on the reference backend on the example inputs; at the captured graph it also keeps every intermediate value, which
:meth:`NumericsTrace.report` compares with the backend program's layers
(:mod:`pyrys.numerics.layers`) and then lets go.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.fx as fx

from pyrys.backends.reference import ReferenceProgram
from pyrys.ir.graph import STATE_KEY, copy_graph, state_ref
from pyrys.ir.vocabulary import precision_of
from pyrys.numerics import BF16_TOLERANCE, FP32_TOLERANCE, TOLERANCES, error_or_reason, in_dtypes_of
from pyrys.numerics.layers import layer_errors, unmatched_nodes
from pyrys.numerics.report import NumericsReport
from pyrys.passes.pipeline import Step

HALF_PRECISION = (torch.bfloat16, torch.float16)
# a problem said where the capture seems over the tolerance because the model itself is random at inference
RANDOM_MODEL = "the model gives other outputs on a second run with the same inputs"



class NumericsTrace:
    """The errors of one compile on one set of example inputs (``run_eager``: the model's flat outputs on
    them, computed once, at the first measurement: after the capture).  With ``output_dtype`` (the outputs
    asked for in that dtype) outputs are compared as eager's dtype: the rounding to it counts.  Outputs in
    half precision (asked for so, or the model's own: a bfloat16 model) round every op they come from
    another way than eager does: ``tolerance`` is then at least :data:`BF16_TOLERANCE`."""

    def __init__(self, run_eager: Callable[[], list], tolerance: float = FP32_TOLERANCE,
                 output_dtype: torch.dtype | None = None):
        self.run_eager, self.tolerance, self.output_dtype = run_eager, tolerance, output_dtype
        self.half_outputs = output_dtype in HALF_PRECISION
        if self.half_outputs:
            self.tolerance = max(tolerance, BF16_TOLERANCE)
        self._eager: list | None = None
        self.captured: dict[str, torch.Tensor] | None = None
        self.problems: list[str] = []

    @property
    def eager(self) -> list:
        """The model's flat outputs, computed at the first measurement (after the capture)."""
        if self._eager is None:
            self._eager = self.run_eager()
            if any(isinstance(v, torch.Tensor) and v.dtype in HALF_PRECISION for v in self._eager):
                self.half_outputs = True
                self.tolerance = max(self.tolerance, BF16_TOLERANCE)
        return self._eager

    def measure(self, step: str, gm: fx.GraphModule, inputs: list) -> float:
        """The error of ``gm`` (the graph after ``step``) on ``inputs``, run on the reference backend."""
        eager = self.eager  # outside the try: a model that does not run eagerly is the user's error to see
        if step == "capture":  # a new capture (the symbolic one may have failed and been done again)
            self.captured, self.problems = None, []
        try:
            program = ReferenceProgram(with_own_state(gm))
            if step == "capture":
                outputs, self.captured = program.activations(inputs)
            else:
                outputs = program(inputs)
        except Exception as error:  # noqa: BLE001 -- a graph that cannot run is a finding, not a crash
            self.problems.append(f"after {step}: the graph did not run on the reference backend "
                                 f"({type(error).__name__}: {str(error).strip()[:200]})")
            return float("inf")
        error, reason = error_or_reason(self._comparable(outputs), eager)
        if reason:
            self.problems.append(f"after {step}: {reason}")
        if step == "capture" and error > self.tolerance and self._random():
            self.problems.append(f"{RANDOM_MODEL} (random at inference: dropout in training mode, rand_like, ...): "
                                 "no stage can agree with it; call model.eval() or measure without the random ops")
        return error

    def _random(self) -> bool:
        """Whether the model's outputs on the example inputs differ from one run to the next (one run more)."""
        try:
            again = self.run_eager()
        except Exception:  # noqa: BLE001 -- it ran once: a second failure says nothing of randomness
            return False
        error, reason = error_or_reason(again, self.eager)
        return bool(reason) or error > 0

    def report(self, history: list[Step], gm: fx.GraphModule, program: Callable[[list], list], backend: str,
               inputs: list, compile_probe: Callable[[fx.GraphModule], Callable[[list], list]]) -> NumericsReport:
        """The report for the program compiled from ``gm``: its error, and every layer's (``compile_probe``
        compiles ``gm`` with extra outputs like ``program`` was compiled); frees the captured values."""
        captured, self.captured = self.captured or {}, None
        error, reason = error_or_reason(self._comparable(program(inputs)), self.eager)
        problems = self.problems + ([f"the {backend} program: {reason}"] if reason else [])
        try:
            layers = layer_errors(gm, captured, inputs, compile_probe)
        except Exception as failure:  # noqa: BLE001 -- the program's own error above still stands
            layers = []
            problems.append(f"per-layer errors unavailable: the probe program failed "
                            f"({type(failure).__name__}: {str(failure).strip()[:200]})")
        passes = [(step.name, step.error if step.error is not None else float("nan")) for step in history]
        return NumericsReport(self.tolerance_ran_in(gm), passes, backend, error, layers, unmatched_nodes(gm, captured),
                              problems)

    def tolerance_ran_in(self, gm: fx.GraphModule) -> float:
        """The tolerance of the precision ``gm`` (the optimized graph) computes in where it is tighter than the
        one asked for (``precision="bf16"`` whose guard kept every op in float32, int8 with no op quantized:
        held to 1e-4), never below :data:`BF16_TOLERANCE` for half-precision outputs."""
        ran = TOLERANCES[precision_of(gm)]
        return min(self.tolerance, max(ran, BF16_TOLERANCE) if self.half_outputs else ran)

    def _comparable(self, outputs: list) -> list:
        """``outputs`` with the floating-point ones asked for in ``output_dtype`` back in eager's dtype."""
        return outputs if self.output_dtype is None else in_dtypes_of(outputs, self.eager)


def with_own_state(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` whose constants and module state are clones: some ops write what they read
    (``aten::batch_norm`` in training mode updates its running statistics, and its schema does not say so),
    and a measuring run must write neither the user's tensors nor the ones the program is built from."""
    copied = fx.GraphModule(gm, copy_graph(gm.graph), gm.__class__.__name__)
    for name, tensor in [*copied.named_buffers(), *copied.named_parameters()]:
        owner, _, leaf = name.rpartition(".")
        module = copied.get_submodule(owner)
        if owner and module is gm.get_submodule(owner):
            continue  # a submodule the copy shares (a branch's graph): left as it is
        value = tensor.detach().clone()
        setattr(module, leaf, torch.nn.Parameter(value, requires_grad=False) if isinstance(tensor, torch.nn.Parameter)
                else value)
    for node in copied.graph.nodes:
        ref = state_ref(node)
        if ref is not None and isinstance(ref.value, torch.Tensor):
            node.meta = {**node.meta, STATE_KEY: dataclasses.replace(ref, value=ref.value.clone())}
    return copied
