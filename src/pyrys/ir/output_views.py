"""Outputs eager returns as views of an input, or of another output, are views at each call too.

A backend gives each output memory of its own where it cannot name it as a view (the dnnl backend copies
``x.t()`` and ``x[:, 1:]`` of an input into a dense buffer), where eager's are views of the caller's tensor
or of the output they come from: a caller writing through one changes the other, and under
``torch.compile`` the graph after a break may write through a view the graph before it returned (a
helper's find: ``flat = y.view(-1)``, a break, ``flat.clamp_(min=0)``; ``return y`` came back unclamped).
Such an output is made again at each call by its view ops, run in torch on what it views: the caller's
input, or the call's output at another position (microseconds: no data is touched).

An output qualifies where, in the graph captured (eager's ops, before any pass), it is reached from its
*base* by ops that alias their input always (:func:`pyrys.ir.output_aliases.aliased_input`: ``view``,
``t``, ``slice``, ``select``, ``expand``, a split's parts ...) or where they can (``reshape``, ``flatten``,
``contiguous``, ``to``: torch decides at the call, as eager's would), the base is a user input or another
position's output, and every other argument of those ops is a literal or a size computed from the inputs'
sizes (a graph with symbolic sizes).  Views of what no output returns (an intermediate, module state) stay
the program's own tensors, as do outputs in another dtype than eager's (``output_dtype``).

The graph was captured on contiguous inputs, where a ``contiguous()`` leaves no op: the replay holds for a
base laid out as in the capture, contiguous.  A call whose base is not (a transposed or channels-last input)
keeps the program's own tensor there (a helper's find: ``x.contiguous().view(-1)`` of a transposed ``x``
replayed as ``view`` raised, ``x.contiguous()[1:]`` aliased the caller's input).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from pyrys.ir.graph import STATE_KEY, user_inputs
from pyrys.ir.output_aliases import SOMETIMES_VIEWS, aliased_input
from pyrys.ir.symbolic import is_symbolic_scalar_op

aten = torch.ops.aten
_SIZES = frozenset({aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default, aten.sym_storage_offset.default})


@dataclass(frozen=True)
class OutputView:
    """The flat output at ``position``: ``replay(*call's flat inputs, base)``, where ``base`` is the call's
    output at position ``of_output``, or its input at ``of_input`` (then ``replay`` reads it among the inputs)."""

    position: int
    of_output: int | None
    of_input: int | None
    replay: fx.GraphModule

    def base(self, outputs: list, flat: list) -> object:
        return outputs[self.of_output] if self.of_output is not None else flat[self.of_input]


def output_views(gm: fx.GraphModule) -> tuple[OutputView, ...]:
    """The outputs of ``gm`` (as captured: before the passes) that are views of an input or of another output,
    each after the one it views (see the module docstring)."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    values = tree_flatten(output.args[0])[0]
    inputs = user_inputs(gm.graph)
    first_at: dict[fx.Node, int] = {}
    for position, value in enumerate(values):
        if isinstance(value, fx.Node):
            first_at.setdefault(value, position)
    views = {}
    for position, value in enumerate(values):
        view = _view(value, position, inputs, first_at) if isinstance(value, fx.Node) else None
        if view is not None:
            views[position] = view
    ordered, placed = [], set()
    while len(ordered) < len(views):  # each after the output it views (a view of a view)
        for position, view in views.items():
            if position not in placed and (view.of_output not in views or view.of_output in placed):
                ordered.append(view)
                placed.add(position)
    return tuple(ordered)


def state_views(gm: fx.GraphModule) -> tuple[int, ...]:
    """The flat outputs of ``gm`` (as captured) that are module state or views of it (``return self.cache[i]``):
    eager's are the state's own memory, a pyrys program's a copy (``torch.compile`` runs such a graph in torch:
    the graph after a break may write through it)."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    positions = []
    for position, value in enumerate(tree_flatten(output.args[0])[0]):
        node = value if isinstance(value, fx.Node) else None
        while node is not None and node.op != "get_attr" and STATE_KEY not in node.meta:
            node = _viewed_input(node)  # (a reshape of it too: eager's may be a view)
        if node is not None:
            positions.append(position)
    return tuple(positions)


def with_views(outputs: list, flat: list, views: tuple[OutputView, ...]) -> list:
    """``outputs`` (a program's fresh list, changed in place) with each view made again on what it views: an
    input where it is contiguous (as captured: see the module docstring), an output as the program lays it out
    (eager's layout: ``exp`` of a permuted activation is permuted), where the view ops take it (a ``view``
    that its strides refuse raises; the program's own tensor then)."""
    for view in views:
        base = view.base(outputs, flat)
        if not isinstance(base, torch.Tensor):
            continue
        if view.of_output is None:
            if base.is_contiguous():
                outputs[view.position] = view.replay.forward(*flat, None)
            continue
        try:
            outputs[view.position] = view.replay.forward(*flat, base)
        except RuntimeError:
            pass
    return outputs


def _view(value: fx.Node, position: int, inputs: list[fx.Node], first_at: dict[fx.Node, int]) -> OutputView | None:
    chain, node = [], value
    while node not in inputs and not (node is not value and node in first_at):
        step = _aliasing_step(node)
        if step is None:
            return None
        node, made = step
        chain += made
    if not chain:
        return None  # an input returned as it is: the program returns the caller's tensor
    graph = fx.Graph()
    env = {placeholder: graph.placeholder(placeholder.name) for placeholder in inputs}
    base = graph.placeholder("viewed_output")
    if node not in inputs:
        env[node] = base
    for made in reversed(chain):
        if not all(_copy_size(arg, graph, env) for arg in made.all_input_nodes if arg not in env):
            return None
        env[made] = graph.node_copy(made, env.__getitem__)
    graph.output(env[value])
    of_input = inputs.index(node) if node in inputs else None
    return OutputView(position, None if of_input is not None else first_at[node], of_input,
                      fx.GraphModule(torch.nn.Module(), graph))


def _aliasing_step(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The value ``node`` views and the nodes that make it from that value (a split's part: the part and the
    split), else None."""
    source = _viewed_input(node)
    if source is None:
        return None
    if node.target is operator.getitem:
        parent = node.args[0]
        if not isinstance(parent, fx.Node) or parent.op != "call_function" or parent.args[0] is not source:
            return None
        return source, [node, parent]
    return source, [node]


def _viewed_input(node: fx.Node) -> fx.Node | None:
    """What ``node``'s result is, or may be, a view of (a ``reshape`` too: eager's is one where torch can)."""
    if node.op == "call_function" and getattr(node.target, "overloadpacket", None) in SOMETIMES_VIEWS \
            and node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return aliased_input(node, as_backends_run=False)


def _copy_size(node: fx.Node, graph: fx.Graph, env: dict) -> bool:
    """Copy ``node`` (and what it reads) into ``graph`` where it is a size of the inputs (``sym_size``,
    arithmetic on sizes); False for anything else."""
    if node in env:
        return True
    if node.op != "call_function" or not (node.target in _SIZES or is_symbolic_scalar_op(node.target)):
        return False
    if not all(_copy_size(arg, graph, env) for arg in node.all_input_nodes):
        return False
    env[node] = graph.node_copy(node, env.__getitem__)
    return True
