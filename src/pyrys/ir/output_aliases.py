"""Outputs that eager returns as separate tensors stay separate.

Passes may make two outputs one value: common subexpressions merged (two equal linears), a clone
dropped (``relu(a)`` and ``relu(a).clone()``), a backend lowering a clone as a view. The caller owns
every output and may write into one; it must not change another that eager kept apart.

The *root* of an output is the value whose memory it reads: followed back through every op whose
torch schema returns an alias of an input (views, ``detach``, a split's parts). In the graph captured
(eager's), not through those that alias only sometimes (``reshape`` of a tensor a view cannot give,
``to`` of another dtype: copies); after the passes, through those and through clones too (the dnnl
backend lowers a clone as a view of a value already in its layout). Two outputs with one root after
the passes but two roots in the graph captured are copied apart at call time (:func:`outputs_to_copy`:
the later positions of each group), as is an output whose root after the passes is a graph input where it
was not one in the graph captured.

The other way round, one tensor returned at two places (``return y, y``, ``{"a": y, "b": y}``) is one object
in eager's result: :func:`same_outputs` finds those places in the graph captured (the passes may merge
two outputs eager keeps apart, or give one a copy of its own: ``outputs_to_copy``), and the call gives the
first's object at the others, after the copies (a backend's two copies of one would let a write through one
miss the other).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten
_COPIES_AS_VIEWS = frozenset({aten.clone.default, aten.contiguous.default})  # dnnl: views (lower_ops.lower_clone)
SOMETIMES_VIEWS = frozenset({aten.reshape, aten.flatten, aten.unflatten, aten.reshape_as, aten.contiguous,
                              aten.to})  # eager copies where the input cannot be viewed so, or converts


def output_roots(gm: fx.GraphModule, as_backends_run: bool) -> list[object | None]:
    """Per flat output position, what its memory is (a node, or a constant's target); None for no tensor.
    ``as_backends_run``: as a backend may run them (after the passes), not as eager does."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    return [memory_root(value, as_backends_run) if isinstance(value, fx.Node) else None
            for value in tree_flatten(output.args[0])[0]]


def outputs_to_copy(captured_roots: list, final_roots: list) -> tuple[int, ...]:
    """The positions to copy at each call: those sharing a root after the passes with an earlier position
    whose root in the captured graph was another, and those whose root after the passes is a graph input where
    eager's was not (``x.view(-1).clone()``: the caller's tensor, where eager returns a copy)."""
    copies, first_at = [], {}
    for position, (captured, final) in enumerate(zip(captured_roots, final_roots)):
        if final is None:
            continue
        earlier = first_at.setdefault(final, position)
        if earlier != position and captured_roots[earlier] != captured or _is_input(final) and not _is_input(captured):
            copies.append(position)
    return tuple(copies)


def _is_input(root: object) -> bool:
    return isinstance(root, fx.Node) and root.op == "placeholder"


def same_outputs(gm: fx.GraphModule, copies: tuple[int, ...] = ()) -> tuple[tuple[int, int], ...]:
    """``(position, earlier)`` pairs: the flat outputs that are the same node of ``gm`` as an earlier one (in the
    graph captured: eager returns one object at both), but for ``copies``."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    pairs, first_at = [], {}
    for position, value in enumerate(tree_flatten(output.args[0])[0]):
        if isinstance(value, fx.Node) and position not in copies:
            earlier = first_at.setdefault(value, position)
            if earlier != position:
                pairs.append((position, earlier))
    return tuple(pairs)


def as_one_object(outputs: list, pairs: tuple[tuple[int, int], ...]) -> list:
    """``outputs`` with each ``(position, earlier)`` pair's position given the earlier's object (a program's
    fresh list: changed in place)."""
    for position, earlier in pairs:
        outputs[position] = outputs[earlier]
    return outputs


def copied_apart(outputs: list, positions: tuple[int, ...]) -> list:
    """``outputs`` with those at ``positions`` copied (a program's fresh list: changed in place)."""
    for position in positions:
        outputs[position] = outputs[position].clone()
    return outputs


def memory_root(node: fx.Node, as_backends_run: bool) -> object:
    """The node whose memory ``node``'s result is (itself, or what it views), or ``("constant", target)``."""
    while True:
        if node.op == "get_attr":
            return ("constant", node.target)
        source = aliased_input(node, as_backends_run)
        if source is None:
            return node
        node = source


def aliased_input(node: fx.Node, as_backends_run: bool) -> fx.Node | None:
    """The input whose memory ``node``'s result may share, else None (a part of a split: the split's input)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.target is operator.getitem:
        return aliased_input(node.args[0], as_backends_run)
    if as_backends_run and node.target in _COPIES_AS_VIEWS:
        return node.args[0]
    if not as_backends_run and getattr(node.target, "overloadpacket", None) in SOMETIMES_VIEWS:
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is not None and any(r.alias_info is not None for r in schema.returns):
        return node.args[0]
    return None
