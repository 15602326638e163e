"""How far each op's rounding moves its own result and the outputs, for the accuracy guards' order: every op
measured in one run of the float32 graph and a few backward passes per sample, not a run per op.

With ``a_k`` op k's float32 result and ``e_k`` = (op k on its rounded arguments) - ``a_k``, both on the
float32 graph's activations, and ``J_lk`` = dy_l/da_k for each output y_l (n_l values):

    own(k)    = relative_error(a_k + e_k, a_k)
    effect(k) = sqrt(sum over outputs l of m_l(k)^2),   m_l(k) = c_l ||J_lk e_k||_2 / (sqrt(n_l) max|y_l|)
    c_l       = sqrt(max(2 ln n_l, 1))

``J_lk e_k`` is how far output l moves, to first order, when op k alone rounds; ||.||_2 / sqrt(n_l) is that
move's root mean square, and n values of a Gaussian move of that root mean square peak near c_l times it:
m_l(k) estimates the budget's measure, the largest move relative to the largest value (an L2 norm would put
an op that moves a large output a little before one that moves a small output a lot).  The norms come from
random directions: for r ~ N(0, I), E[(r . J_k e_k)^2] = ||J_k e_k||^2, and r . J_k e_k = (J_k^T r) . e_k,
where one backward pass of r . y gives J_k^T r for every k at once; with every output weighted by
c_l / (sqrt(n_l) max|y_l|) in r . y, the mean of ((J_k^T r) . e_k)^2 over PROBES directions is effect(k)^2
(the largest over samples).

An op no (finite) derivative of a floating-point output reaches (through an argmax, a comparison, an
integer index; a square root at 0) has no first-order effect to measure, though its rounding may flip what
it decides: its effect is taken to be its own error (a gain of 1), and its reason says so; one that only
integer outputs beside floating-point ones are computed from (which the budget does not measure) has none.
An op's own error alone says little: a stem convolution's small error is amplified by every layer after it,
a block scaled by 1e-6 (ConvNeXt's layer scale) moves nothing however large its own.  On GoogLeNet's int8
at a budget of 8e-3 the guard kept 43 ops by ``own``, 8 by ``effect``, 8 by each op's measured effect alone
(a run per op: 13x the time).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

from pyrys.numerics import relative_error

PROBES = 16  # random directions per op measure, spread over the samples (at least 4 per sample)
SEED = 0  # the directions' generator: a compile chooses the same ops each time, the caller's RNG untouched


@dataclass
class Sensitivity:
    """``own`` and ``effect`` of the module docstring for each op, by name; ``effect`` is None where the graph
    has no first-order derivative to take (a write to a value backward reads): the guards then order by
    ``own``, and say so; ``underived``: the ops no output's derivative reaches (their effect is their own)."""

    own: dict[str, float]
    effect: dict[str, float] | None
    underived: frozenset[str] = frozenset()

    def renamed(self, names: dict[str, str]) -> "Sensitivity":
        """The same measure with each op's name ``names[name]``."""
        return Sensitivity({names[k]: v for k, v in self.own.items()},
                           None if self.effect is None else {names[k]: v for k, v in self.effect.items()},
                           frozenset(names[k] for k in self.underived))

    def order(self) -> list[str]:
        """The ops, the largest ``effect`` first (ties, and every op without one, by ``own``)."""
        effect = self.effect or {}
        return sorted(self.own, key=lambda name: (effect.get(name, 0.0), self.own[name]), reverse=True)


def sensitivities(gm: fx.GraphModule, arguments: Callable[[list], list], samples: list[list],
                  rounded: Callable[[str, Callable[[fx.Node], object]], object], names: set[str],
                  reads: set[str]) -> Sensitivity:
    """Measure the ops named in ``names`` of ``gm`` (a graph run with plain torch ops, float32) on ``samples``
    (``arguments(sample)``: its placeholders' values); ``rounded(name, value)`` is that op's result on its
    rounded arguments, ``value(node)`` giving the float32 value of a constant or of a node named in ``reads``
    (only those are kept)."""
    own = dict.fromkeys((node.name for node in gm.graph.nodes if node.name in names), 0.0)  # in graph order
    effect: dict[str, float] | None = dict.fromkeys(own, 0.0)
    reached: set[str] = set()  # the ops some output's derivative reaches
    measured: set[str] | None = None  # the nodes the measured outputs are computed from
    probes = max(4, -(-PROBES // max(len(samples), 1)))
    generator = torch.Generator().manual_seed(SEED)
    for sample in samples:
        errors: dict[str, torch.Tensor] = {}
        run = _Perturbed(gm, names, reads, rounded, own, errors)
        if effect is not None:
            try:
                with torch.inference_mode(False), torch.enable_grad():  # (a compile under inference_mode too)
                    outputs = run.run(*[_recordable(value) for value in arguments(sample)])
                    found = _effects(outputs, run, probes, generator)
                for name, value in found.items():
                    effect[name] = max(effect[name], value)
                reached.update(found)
                measured = _measured_sources(gm, outputs) if measured is None else measured
                del outputs  # (its autograd graph holds the hooks, and they e_k: not through the next sample)
                continue
            except Exception:  # noqa: BLE001 -- no derivative to take (see Sensitivity): own alone
                effect = None
                run = _Perturbed(gm, names, reads, rounded, own, errors)
        with torch.no_grad():
            run.run(*arguments(sample))
    if effect is None:
        return Sensitivity(own, None)
    underived = frozenset(name for name in own.keys() - reached if measured is None or name in measured)
    effect.update((name, own[name]) for name in underived)  # (a gain of 1: the module docstring)
    return Sensitivity(own, effect, underived)  # (an op no measured output is computed from: effect 0)


def _measured_sources(gm: fx.GraphModule, outputs) -> set[str]:
    """The names of the nodes the outputs a guard measures are computed from: the floating-point outputs
    (:func:`~pyrys.numerics.budget.max_error` leaves an integer one beside them out), every output where none is."""
    (output,) = [node for node in gm.graph.nodes if node.op == "output"]
    nodes, values = tree_leaves(output.args), tree_leaves(outputs)
    if len(nodes) != len(values):
        return {node.name for node in gm.graph.nodes}
    floating = [node for node, value in zip(nodes, values) if isinstance(node, fx.Node)
                and isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())]
    pending, seen = floating or [node for node in nodes if isinstance(node, fx.Node)], set()
    while pending:
        node = pending.pop()
        if node.name not in seen:
            seen.add(node.name)
            pending.extend(node.all_input_nodes)
    return seen


def _recordable(value):
    """A tensor ``value`` detached (the backward passes run to the measured results alone: a weight or input
    that requires grad is not one), copied where it was made under ``torch.inference_mode`` (autograd cannot
    save those); anything else as it is."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.clone() if value.is_inference() else value.detach()


class _Perturbed(fx.Interpreter):
    """Runs the graph; at each measured op, its own error into ``own`` (the largest) and ``errors`` (e_k), and,
    under grad mode, a hook on its result that puts ``(J_k^T r) . e_k`` into ``dots[name]`` when a backward
    pass makes the result's gradient J_k^T r (which is then dropped: no copy of it is kept).  Only a measured
    result starts a derivative: constants, inputs and a submodule's parameters are read detached, and a result
    that does not already require grad adds the scalar ``zero``, which the backward passes run to.  A hook is
    registered as its result is made, so it sees the gradient there even where a later op writes the result
    in place."""

    def __init__(self, gm: fx.GraphModule, names: set[str], reads: set[str], rounded, own: dict, errors: dict):
        super().__init__(gm)
        self.names, self.reads, self.rounded, self.own, self.errors = names, reads, rounded, own, errors
        self.kept: dict[str, object] = {}
        self.dots: dict[str, float] = {}  # one backward pass's (J_k^T r) . e_k, by op
        self.zero: torch.Tensor | None = None  # what the backward passes run to, where a measured result adds it
        self.copies: dict[str, torch.Tensor] = {}

    def fetch_attr(self, target: str):
        """The constant, under grad mode :func:`_recordable` (a copy made once where one is needed)."""
        value = super().fetch_attr(target)
        if torch.is_grad_enabled() and isinstance(value, torch.Tensor):
            value = self.copies.setdefault(target, _recordable(value))
        return value

    def call_module(self, target, args, kwargs):
        """The submodule run on its parameters and buffers under grad mode :func:`_recordable`."""
        if not torch.is_grad_enabled():
            return super().call_module(target, args, kwargs)
        module = self.fetch_attr(target)
        state = {name: _recordable(value) for name, value in [*module.named_parameters(), *module.named_buffers()]}
        return torch.func.functional_call(module, state, args, kwargs)

    def value(self, node: fx.Node):
        """The float32 value of ``node`` (a constant, or named in ``reads``), gradient-free."""
        value = self.fetch_attr(node.target) if node.op == "get_attr" else self.kept[node.name]
        return value.detach() if isinstance(value, torch.Tensor) else value

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if node.name in self.names and isinstance(result, torch.Tensor) and result.is_floating_point():
            result = self._measured(node.name, result)
        if node.name in self.reads:
            self.kept[node.name] = result
        return result

    def _measured(self, name: str, result: torch.Tensor) -> torch.Tensor:
        """Measure op ``name``'s own error on ``result`` and, under grad mode, hook its gradient (the result to
        run on: one that adds the zero where nothing measured before it reaches it)."""
        with torch.no_grad():
            moved = self.rounded(name, self.value)
            exact = result.detach()
            self.own[name] = max(self.own[name], relative_error(moved, exact))
            self.errors[name] = error = (moved - exact).float()
        if torch.is_grad_enabled():
            if not result.requires_grad:  # (only a measured result starts a derivative)
                if self.zero is None:
                    self.zero = torch.zeros((), requires_grad=True)
                result = result + self.zero
            result.register_hook(_dot_into(self.dots, name, error))
        return result


def _dot_into(dots: dict[str, float], name: str, error: torch.Tensor):
    """A gradient hook putting ``gradient . error`` into ``dots[name]`` (it holds neither the result nor the run)."""
    def take(gradient: torch.Tensor) -> None:
        dots[name] = float((gradient.float() * error).sum())
    return take


def _effects(outputs, run: _Perturbed, probes: int, generator: torch.Generator) -> dict[str, float]:
    """effect(k) on one sample (``run``'s) for every measured op that some output's derivative reaches."""
    leaves = []
    for y in tree_leaves(outputs):
        if isinstance(y, torch.Tensor) and y.requires_grad and y.is_floating_point() and y.numel():
            largest = float(y.detach().abs().max())
            if 0 < largest < float("inf"):  # (NaN fails both)
                leaves.append((y, largest * y.numel() ** 0.5 / max(2 * math.log(y.numel()), 1) ** 0.5))
    squares: dict[str, float] = {}
    for probe in range(probes if leaves and run.zero is not None else 0):
        directed = sum((y * torch.randn(y.shape, generator=generator, dtype=y.dtype)).sum() / scale
                       for y, scale in leaves)  # each output weighted by c_l / (sqrt(n_l) max|y_l|)
        run.dots.clear()
        torch.autograd.grad(directed, [run.zero], retain_graph=probe + 1 < probes, allow_unused=True)
        for name, dot in run.dots.items():
            squares[name] = squares.get(name, 0.0) + dot ** 2 / probes
    return {name: square ** 0.5 for name, square in squares.items() if square == square}  # (NaN: a derivative
    # of 0 * inf, sqrt's at 0: no first-order estimate, the op is taken as underived)
