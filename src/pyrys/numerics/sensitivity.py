"""How far each op's rounding moves its own result and the outputs, for the accuracy guards' order: every op
measured in one run of the float32 graph and a few backward passes per sample, not a run per op.

With ``a_k`` op k's float32 result and ``e_k`` = (op k on its rounded arguments) - ``a_k``, both on the
float32 graph's activations:

    own(k)    = relative_error(a_k + e_k, a_k)
    effect(k) = ||J_k e_k||_2 / max|y|,   J_k = dy/da_k        (y an output; the largest over outputs)

``J_k e_k`` is how far the outputs move, to first order, when op k alone rounds.  Its norm comes from
random directions: for r ~ N(0, I), E[(r . J_k e_k)^2] = ||J_k e_k||^2, and r . J_k e_k = (J_k^T r) . e_k,
where one backward pass of r . y gives J_k^T r for every k at once.  So

    effect(k) ~ sqrt(mean over PROBES directions r of ((J_k^T r) . e_k)^2)      (max over samples)

An op's own error says little about the outputs: a stem convolution's small error is amplified by every
layer after it, a block scaled by 1e-6 (ConvNeXt's layer scale) moves nothing however large its own.  On
GoogLeNet's int8 at a budget of 8e-3 the guard kept 43 ops by ``own``, 11 by ``effect``, 8 by each op's
measured effect alone (a run per op: 13x the time); ResNet-50 at 6e-3: every op, 43, 41.
"""
from __future__ import annotations

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
    has no first-order derivative to take (an op without one, a write to a value backward reads): the
    guards then order by ``own``, and say so."""

    own: dict[str, float]
    effect: dict[str, float] | None

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
    probes = max(4, -(-PROBES // max(len(samples), 1)))
    generator = torch.Generator().manual_seed(SEED)
    for sample in samples:
        errors: dict[str, torch.Tensor] = {}
        run = _Perturbed(gm, names, reads, rounded, own, errors)
        if effect is not None:
            try:
                with torch.inference_mode(False), torch.enable_grad():  # (a compile under inference_mode too)
                    outputs = run.run(*[_recordable(value) for value in arguments(sample)])
                    found = _effects(outputs, run.deltas, errors, probes, generator)
                for name, value in found.items():
                    effect[name] = max(effect[name], value)
                continue
            except Exception:  # noqa: BLE001 -- no derivative to take (see Sensitivity): own alone
                effect = None
                run = _Perturbed(gm, names, reads, rounded, own, errors)
        with torch.no_grad():
            run.run(*arguments(sample))
    return Sensitivity(own, effect)


def _recordable(value):
    """``value``, or a copy where it is a tensor made under ``torch.inference_mode`` (autograd cannot save those)."""
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


class _Perturbed(fx.Interpreter):
    """Runs the graph; at each measured op, its own error into ``own`` (the largest) and ``errors`` (e_k),
    and, under grad mode, its result plus a zero ``deltas[name]`` whose gradient is J_k^T r."""

    def __init__(self, gm: fx.GraphModule, names: set[str], reads: set[str], rounded, own: dict, errors: dict):
        super().__init__(gm)
        self.names, self.reads, self.rounded, self.own, self.errors = names, reads, rounded, own, errors
        self.kept: dict[str, object] = {}
        self.deltas: dict[str, torch.Tensor] = {}

    def value(self, node: fx.Node):
        """The float32 value of ``node`` (a constant, or named in ``reads``), gradient-free."""
        value = self.fetch_attr(node.target) if node.op == "get_attr" else self.kept[node.name]
        return value.detach() if isinstance(value, torch.Tensor) else value

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if node.name in self.reads:
            self.kept[node.name] = result
        if node.name not in self.names or not isinstance(result, torch.Tensor) or not result.is_floating_point():
            return result
        with torch.no_grad():
            moved = self.rounded(node.name, self.value)
            exact = result.detach()
            self.own[node.name] = max(self.own[node.name], relative_error(moved, exact))
            self.errors[node.name] = (moved - exact).float()
        if torch.is_grad_enabled():
            delta = torch.zeros_like(exact, requires_grad=True)
            self.deltas[node.name] = delta
            result = result + delta
        return result


def _effects(outputs, deltas: dict[str, torch.Tensor], errors: dict[str, torch.Tensor], probes: int,
             generator: torch.Generator) -> dict[str, float]:
    """effect(k) on one sample for every op with a delta (zero for those no output depends on)."""
    leaves = [y for y in tree_leaves(outputs) if isinstance(y, torch.Tensor) and y.requires_grad
              and y.is_floating_point()]
    names = list(deltas)
    squares = dict.fromkeys(names, 0.0)
    scales = [float(y.detach().abs().max()) if y.numel() else 0.0 for y in leaves]
    leaves = [(y, scale) for y, scale in zip(leaves, scales) if scale > 0 and scale == scale and scale != float("inf")]
    if not leaves or not names:
        return squares
    for probe in range(probes):
        directed = sum((y * torch.randn(y.shape, generator=generator, dtype=y.dtype)).sum() / scale
                       for y, scale in leaves)  # every output relative to its largest value
        gradients = torch.autograd.grad(directed, [deltas[name] for name in names], retain_graph=probe + 1 < probes,
                                        allow_unused=True)
        for name, gradient in zip(names, gradients):
            if gradient is not None:
                squares[name] += float((gradient.float() * errors[name]).sum()) ** 2 / probes
    return {name: square ** 0.5 if square == square else float("inf") for name, square in squares.items()}
