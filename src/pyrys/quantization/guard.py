"""The accuracy guard: the int8 ops that cost the most accuracy go back to float32 until the outputs on
the calibration data are within ``accuracy_budget`` of float32's.

    error(S)  = max over the guard's samples of relative_error(outputs with the ops S in int8, float32 outputs)
    effect(op) = how far the op's own quantization moves the outputs, to first order, on the float32 graph's
                activations (:mod:`pyrys.numerics.sensitivity`; the op's own error where the graph has no
                derivative)

If error(every op) > budget, the fewest ops with the largest ``effect`` go back to float32 so that
error(the rest) <= budget (the search: :mod:`pyrys.numerics.budget`).  Where the CPU has native bf16 they
go back to bf16 instead (``keep_in_bf16``: about 10x float32's speed on AMX, 2x on AVX-512 BF16), and the
ops with no int8 kernel that run faster in bf16 (attention) run so too, error(S) measured so; all float32
only if even every op in bf16 breaks the budget (measured after the first op alone: one run where the
search would take about 2 log2(k); one more than the search where bf16 holds it with more than one op
kept).  Every op's ``effect`` comes from one run of the float32
graph per sample (each op evaluated once more on its quantized arguments) and four backward passes (each
about two runs' work), so the guard costs about ten runs of the graph (on the reference backend, the
rounding simulated) per sample plus about 2 log2(k) more for k ops put back, on the first
:data:`~pyrys.numerics.budget.GUARD_SAMPLES` calibration samples and the one of the next ones (up to :data:`SCREENED`)
whose outputs every op in int8 moves the most (:func:`most_moved`: a run of each in int8, its float32 outputs
calibration's); one run of the int8 graph per sample when the budget holds with every op in int8.
(Measuring each op's effect on the outputs alone took a run per op: 200 s for BERT-base's 73 linears.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from pyrys.backends.reference import ReferenceProgram
from pyrys.ir.graph import add_constant, nodes_in, trial_copy
from pyrys.ir.ops import PYTHON_IMPLS
from pyrys.numerics.budget import check_measurable, keep_fewest, kept_reason, max_error
from pyrys.numerics.sensitivity import Sensitivity, sensitivities
from pyrys.quantization import DEQUANTIZE_WEIGHT

SCREENED = 16  # the calibration samples of which the guard measures the one int8 moves the most besides the first


def calibration_data(first: int, screened: int) -> str:
    """What int8's reasons and note say the guard measured on: the ``first`` samples, and where ``screened``
    more follow them, the one of those that int8 moves the most (not "the calibration data": a note said so of
    8 samples, within 2.3e-03 on the 4 measured, 3.0e-03 on all 8; nor "its first 4 samples and the one of its
    first 16" of one sample)."""
    if screened <= 1:
        count = first + screened
        return "the calibration data's one sample" if count == 1 else f"the calibration data's {count} samples"
    return (f"the calibration data's first {first} sample{'s' * (first != 1)} and the one of its first "
            f"{first + screened} int8 moves the most")


FLOAT32, BF16 = "float32", "bf16"  # what the guard keeps ops in


@dataclass
class Switch:
    """One int8 op: its arguments in float32 and in int8 (reading the quantize/dequantize nodes); ``readers``:
    other ops reading its result in int8 while it is in int8, each with the result and its dequantized form
    (a reader of two ops' results reads each as its own op is set, whatever the order)."""

    layer: fx.Node
    float_args: tuple
    int8_args: tuple
    readers: list[tuple[fx.Node, fx.Node, fx.Node]] = field(default_factory=list)

    def set(self, int8: bool) -> None:
        self.layer.args = self.int8_args if int8 else self.float_args  # the value's type is the same either way
        for reader, value, dequantized in self.readers:
            old, new = (value, dequantized) if int8 else (dequantized, value)
            reader.args = tuple(new if arg is old else arg for arg in reader.args)

    @property
    def int8(self) -> bool:
        return self.layer.args == self.int8_args


def guard(gm: fx.GraphModule, switches: dict[str, Switch], samples: list[list], expected: list[list],
          budget: float, keep_in_bf16: Callable[[fx.GraphModule, set[str]], object] | None = None,
          in_bf16: frozenset[str] = frozenset(),
          data: str = "the calibration data", weights: dict[str, torch.Tensor] | None = None,
          ) -> tuple[dict[str, str], float, str]:
    """Put ops of ``switches`` back into floating point (see the module docstring); ``{op name: why}`` for each,
    the outputs' error with the rest in int8, and the precision the floating-point ops run in: ``"bf16"``
    where ``keep_in_bf16(graph, op names)`` (running those ops of a graph in bf16) is given and the budget
    holds so, the ops named in ``in_bf16`` (attention: no int8 kernel) in bf16 too; else ``"float32"``.
    ``data``: what the reasons say ``samples`` are (:func:`calibration_data`); ``weights``:
    :func:`dequantized_weights`, where the caller holds them already."""
    check_measurable(expected)
    lowered: set[str] = set()  # names of the ops a trial runs in bf16

    weights = dequantized_weights(gm) if weights is None else weights

    def error(limit: float = float("inf")) -> float:
        trial = with_weights(gm, weights)
        if lowered:
            keep_in_bf16(trial, lowered)
        return max_error(ReferenceProgram(trial), samples, expected, limit)

    def keep(k: int, precision: str) -> None:
        """Every op in int8, then the first k back in ``precision``."""
        for switch in switches.values():
            switch.set(True)
        for name in ordered[:k]:
            switches[name].set(False)
        lowered.clear()
        if precision == BF16:
            lowered.update(in_bf16, (switches[name].layer.name for name in ordered[:k]))

    ordered: list[str] = []
    total = None
    for precision in (BF16, FLOAT32) if keep_in_bf16 is not None else (FLOAT32,):
        keep(0, precision)
        if total is None or in_bf16:  # (else float32's every op in int8 is bf16's: measured already)
            total = error()
        if total <= budget:
            return {}, total, precision
        if not ordered:
            measured = sensitivity(gm, switches, samples, weights)
            ordered = measured.order()
        known: dict[int, float] = {}
        if precision == BF16:  # the first op in bf16 (the search's first step), then, where that breaks the
            for k in dict.fromkeys((1, len(ordered))):  # budget, every op: where that does too, no k holds it
                keep(k, BF16)
                known[k] = error(budget)
                if known[k] <= budget:
                    break
            if min(known.values()) > budget:
                continue  # float32 then
        count, final = keep_fewest(len(ordered), lambda k: keep(k, precision) or error(budget), budget, known)
        if final <= budget:
            break  # else even every op in float32 breaks the budget (the last try's then)
    keep(count, FLOAT32)  # the switches as chosen (the search may have tried others last); bf16 is the pass's
    return {name: kept_reason("int8", measured, name, total, budget, data, count, precision)
            for name in ordered[:count]}, final, precision


def most_moved(gm: fx.GraphModule, switches: dict[str, Switch], samples: list[list],
               expected: list[list], weights: dict[str, torch.Tensor] | None = None) -> tuple[list, list] | None:
    """Of ``samples``, the one whose outputs every op of ``switches`` in int8 moves the most from float32's
    (``expected``: calibration's run of the graph before quantization, which is every op in float32), with
    those (None where ``samples`` is empty): the guard measures it beside the first ones.  A rare value moves
    one sample alone: a BERT whose [CLS] channel was -557 in 31 of 32 rows and +557 in one erred 0.17 on that
    row's sample, the 14th, under a budget of 1e-3 the first four held (a helper's find).  ``weights``: as
    :func:`guard`'s."""
    if not samples:
        return None
    for switch in switches.values():
        switch.set(True)
    weights = dequantized_weights(gm) if weights is None else weights
    program, errors = ReferenceProgram(with_weights(gm, weights)), []
    for sample, want in zip(samples, expected):
        got = program(sample)
        errors.append(max_error(lambda _: got, [None], [want]))  # noqa: B023 -- called at once
    worst = max(range(len(samples)), key=lambda i: errors[i])
    return samples[worst], expected[worst]


def sensitivity(gm: fx.GraphModule, switches: dict[str, Switch], samples: list[list],
                weights: dict[str, torch.Tensor] | None = None) -> Sensitivity:
    """Each op of ``switches``' own error and first-order effect on the outputs (:mod:`pyrys.numerics.sensitivity`),
    by key, every op in float32 (so left on return); ``weights``: :func:`dequantized_weights`, where the caller
    holds them already."""
    program, weights, by_layer, reads = _float32_run(gm, switches, weights)

    def rounded(layer: str, value):
        switch = switches[by_layer[layer]]
        arguments = fx.map_arg((switch.int8_args, switch.layer.kwargs),
                               lambda arg: weights[arg.name] if arg.name in weights else value(arg))
        return PYTHON_IMPLS.get(switch.layer.target, switch.layer.target)(*arguments[0], **arguments[1])

    return sensitivities(program.gm, program.arguments, samples, rounded, set(by_layer), reads).renamed(by_layer)


def on_float32_activations(gm: fx.GraphModule, switches: dict[str, Switch], samples: list[list], measure,
                           float_arguments: bool = False, weights: dict[str, torch.Tensor] | None = None) -> None:
    """Run the graph with every op of ``switches`` in float32 (so left) on each sample; as each op's result is
    made, ``measure(name, arguments, result)``, where ``arguments(args)`` gives the tensors an argument tuple
    of that op (its int8 one; its float32 one too with ``float_arguments``) reads.  Only those tensors are kept."""
    program, weights, by_layer, read = _float32_run(gm, switches, weights, float_arguments)

    def value(arg: fx.Node):
        if arg.name in weights:
            return weights[arg.name]
        return getattr(program.gm, arg.target) if arg.op == "get_attr" else values[arg.name]

    def arguments(args):
        return fx.map_arg(args, value)

    for sample in samples:
        values: dict = {}

        def visit(node_name: str, tensor) -> None:
            if node_name in read:
                values[node_name] = tensor
            name = by_layer.get(node_name)
            if name is not None:
                measure(name, arguments, tensor)

        program.observe(sample, visit)


def _float32_run(gm: fx.GraphModule, switches: dict[str, Switch], weights: dict[str, torch.Tensor] | None,
                 float_arguments: bool = False) -> tuple[ReferenceProgram, dict, dict[str, str], set[str]]:
    """Every op of ``switches`` set to float32 (the quantize/dequantize nodes stay in the graph, unread: each run
    computes them, but the weights' once: ``weights``, made here where None), and the graph's program; each op's
    key by its layer's name, and the names of the activations the ops' int8 arguments (and with
    ``float_arguments`` their float32 ones) read."""
    for switch in switches.values():
        switch.set(False)
    weights = dequantized_weights(gm) if weights is None else weights
    program = ReferenceProgram(with_weights(gm, weights))
    by_layer = {switch.layer.name: name for name, switch in switches.items()}
    reads = {arg.name for switch in switches.values()
             for arg in nodes_in((switch.int8_args, switch.float_args if float_arguments else (), switch.layer.kwargs))
             if arg.op != "get_attr" and arg.name not in weights}
    return program, weights, by_layer, reads


def dequantized_weights(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every int8 weight's float32 value (its dequantize evaluated), by the dequantize node's name: the
    guard's and bias correction's runs read these instead of dequantizing every weight on every run."""
    return {node.name: node.target(*fx.map_arg(node.args, lambda a: getattr(gm, a.target)))
            for node in gm.graph.nodes if node.op == "call_function" and node.target is DEQUANTIZE_WEIGHT
            and all(arg.op == "get_attr" for arg in node.all_input_nodes)}


def with_weights(gm: fx.GraphModule, weights: dict[str, torch.Tensor]) -> fx.GraphModule:
    """A trial copy of ``gm`` (:func:`~pyrys.ir.graph.trial_copy`) whose weight dequantize nodes read the
    values of ``weights`` (:func:`dequantized_weights`) as constants."""
    trial = trial_copy(gm)
    for node in list(trial.graph.nodes):
        if node.name in weights and node.op == "call_function":
            with trial.graph.inserting_before(node):
                constant = add_constant(trial, weights[node.name], f"{node.name}_value")
            node.replace_all_uses_with(constant)
            trial.graph.erase_node(node)
    trial.recompile()
    return trial
