"""Specialize: one input shape's concrete graph from a graph optimized once for every shape.

The passes run once, on the graph with symbolic dims (``ir/symbolic.py``).  A backend lowers
concrete shapes, so each input shape gets a copy in which

* the symbols are bound to the inputs' dims, after checking every range and guard the trace
  and the passes assumed (a shape that breaks one raises :class:`ShapeMismatch`: the caller
  captures that shape again and says why);
* every value's shape is made concrete: its symbolic one with the symbols bound (``ir/bound_meta.py``),
  or where that cannot say, propagated again.  At a size of 1 torch's ops may lay a value out otherwise
  than the symbolic graph does (a reshape of an expanded tensor views where it copies), and whether they
  do may turn on how the other sizes compare (a slice of one length to another is whole where it is no
  shorter, and no guard says so: a helper's find).  So shapes with a size of 1 are grouped into kinds
  (:func:`_kind_of`: which symbols are 1; each pair of the others' difference as -1, 0, 1 or beyond; which
  lie within 1 of a fixed size of the graph); the first two shapes of a kind are propagated and their
  values compared with the bound ones node for node, and later shapes of a kind where both agreed (no view
  had to become a reshape) are bound too (a 4-layer BERT at batch 1 and a new length: 0.04-0.1 s less);
  otherwise every shape of that kind is propagated.  Two shapes, because a stride is a product of sizes,
  and two products can meet at one size (a view's ``16 * 16`` against a copy's ``16 * length`` at length
  16) but seldom at two.  A size-1 dim's stride may differ but in what the graph returns (an ``expand`` to
  1 keeps its input's stride there where the symbolic graph has 0, in HF BERT's masks: no index steps over
  it, and oneDNN's descriptors make such strides canonical, ``backends/dnnl/primitives.py``).  A choice
  that turns on sizes further apart or on their products (a slice to ``length + 5`` of a length 5 longer,
  to ``2 * length``) is not told apart, so every ``view`` of a graph bound at a size of 1 becomes a
  ``reshape``, as propagation would make a view the strides refuse (the same where they allow one:
  oneDNN's lowering takes both alike).  Three helpers' rounds (~290 models and graphs) found no wrong result;
* size arithmetic becomes literals: ``sym_size(x, 0)`` -> ``2``, ``mul(s1, 32)`` -> ``4096``,
  so ``view(x, [%sym_size, %mul])`` reads ``view(x, [2, 4096])``; size checks are evaluated
  and dropped;
* :data:`SHAPE_PASSES` run again: a view or slice that is a no-op at this shape goes.

The copy shares every constant tensor with the generic graph (no weight is copied), so a
backend packing them once (keyed by the tensor) packs them once for every shape.
A graph with concrete shapes is returned as it is.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.ir.graph import copy_graph, nodes_in, replace_with_literal, user_inputs
from pyrys.ir.bound_meta import bound_meta, described
from pyrys.ir.meta import fake_input, refresh_meta
from pyrys.ir.symbolic import bind_symbols, graph_fake_mode, is_symbolic, is_symbolic_scalar_op
from pyrys.passes.pipeline import apply_passes, select_passes

aten = torch.ops.aten
SIZE_QUERIES = frozenset({aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int,
                          aten.sym_storage_offset.default})
SIZE_CHECKS = frozenset({aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
                         aten.sym_constrain_range.default})
SHAPE_PASSES = select_passes("simplify", "dead_code_elimination")  # run again once sizes are literals
# a symbolic graph's {its fx graph: {kind of shape with a symbol at 1 (_kind_of): True where bound values were
# propagation's at two shapes, False where not at one, else the bindings of the one shape where they were}}, by
# graph: a trial copy (``ir/graph.py``) shares its module's meta, not its values
BOUND_AT_ONE_KEY = "pyrys_bound_at_one"
FIXED_SIZES_KEY = "pyrys_fixed_sizes"  # _fixed_sizes's, found once per graph, by graph likewise


class ShapeMismatch(Exception):
    """The input shape is not one the symbolic graph holds for; the message says which dim and why."""


def specialize(gm: fx.GraphModule, inputs: list) -> fx.GraphModule:
    """``gm`` for the shapes of ``inputs`` (its flat user inputs); see the module docstring."""
    if not is_symbolic(gm):
        return gm
    bindings, why = bind_symbols(gm, inputs, explain=True)
    if why is not None:
        raise ShapeMismatch(why)
    concrete = fx.GraphModule(gm, copy_graph(gm.graph), gm.__class__.__name__)
    for node, value in zip(user_inputs(concrete.graph), inputs):
        node.meta["val"] = value
    ones = frozenset(symbol for symbol, size in bindings.items() if int(size) == 1)
    kind = _kind_of(gm, bindings, ones) if ones else None
    found = bound_at_one(gm).get(kind) if ones else True  # (None: not compared yet)
    if found is True and _bind_meta(gm, concrete, bindings, ones):
        if ones:
            _views_as_reshapes(concrete)
    else:
        targets = [node.target for node in concrete.graph.nodes]
        try:
            refresh_meta(concrete)
        except Exception as error:  # noqa: BLE001 -- an op that fails at this shape: capture it again
            raise ShapeMismatch(f"shape propagation fails at this shape: {type(error).__name__}: {error}") from error
        if found is None or isinstance(found, dict) and found != bindings:
            alike = targets == [node.target for node in concrete.graph.nodes] and _bound_alike(gm, concrete, bindings,
                                                                                                ones)
            compared = (bindings if found is None else True) if alike else False
            bound_at_one(gm)[kind] = compared  # (a dict's item set: atomic)
    _fold_sizes(concrete)
    apply_passes(concrete, SHAPE_PASSES)
    concrete.recompile()
    return concrete


def _views_as_reshapes(gm: fx.GraphModule) -> None:
    """Every ``view`` of ``gm`` a ``reshape``: its values were bound at a size of 1, where torch may give a view
    what the symbolic graph copies, and a ``view`` of it then fail (propagation repairs those it sees)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.view.default:
            node.target = aten.reshape.default


def bound_at_one(gm: fx.GraphModule) -> dict:
    """What was found of ``gm``'s values bound with a symbol at 1, by kind of shape (:data:`BOUND_AT_ONE_KEY`)."""
    return gm.meta.setdefault(BOUND_AT_ONE_KEY, {}).setdefault(gm.graph, {})


def _kind_of(gm: fx.GraphModule, bindings: dict, ones: frozenset) -> tuple:
    """What of ``bindings`` may decide how torch's ops lay out a value, beyond the symbols' ranges: ``ones``
    (the symbols at 1), how the others compare (each pair's difference, ``-2`` and ``2`` for any further
    apart), and which are within 1 of a fixed size of ``gm`` (and how)."""
    values = {symbol: int(size) for symbol, size in bindings.items() if symbol not in ones}
    fixed = _fixed_sizes(gm)
    return (ones,
            frozenset((a, b, max(-2, min(2, values[a] - values[b]))) for a in values for b in values if a != b),
            frozenset((symbol, size + step, -step) for symbol, size in values.items() for step in (-1, 0, 1)
                      if size + step in fixed))


def _fixed_sizes(gm: fx.GraphModule) -> frozenset:
    """Every whole number of 2 or more among ``gm``'s values' sizes and its ops' arguments (a view's sizes)."""
    found = gm.meta.setdefault(FIXED_SIZES_KEY, {}).get(gm.graph)
    if found is None:
        numbers: set = set()

        def note(value) -> None:
            if isinstance(value, torch.Tensor):
                numbers.update(d for d in value.shape if isinstance(d, int))
            elif isinstance(value, int) and not isinstance(value, bool):
                numbers.add(value)
            elif isinstance(value, (list, tuple)):
                for item in value:
                    note(item)

        for node in gm.graph.nodes:
            note(node.meta.get("val"))
            note(list(node.args))
            note(list(node.kwargs.values()))
        found = gm.meta[FIXED_SIZES_KEY][gm.graph] = frozenset(n for n in numbers if n >= 2)
    return found


def _bound_alike(gm: fx.GraphModule, concrete: fx.GraphModule, bindings: dict, ones: frozenset) -> bool:
    """Whether ``gm``'s values bound at ``bindings`` (``ones``: its symbols at 1) are, node for node, what
    propagation gave ``concrete`` (its copy at those sizes)."""
    values = bound_meta(gm, bindings, graph_fake_mode(concrete), ones)
    returned = set(nodes_in([node.args for node in concrete.graph.nodes if node.op == "output"]))
    return values is not None and all(
        node.name in values
        and described(values[node.name], node in returned) == described(node.meta.get("val"), node in returned)
        for node in concrete.graph.nodes if node.op not in ("placeholder", "output"))


def _bind_meta(gm: fx.GraphModule, concrete: fx.GraphModule, bindings: dict, ones: frozenset) -> bool:
    """Set ``concrete``'s values from ``gm``'s symbolic ones at ``bindings`` (:mod:`pyrys.ir.bound_meta`: the
    same as propagating them, without running each op's shape rule; ``ones``, its symbols at 1, found so
    before); whether it could."""
    mode = graph_fake_mode(concrete)  # a fresh one, as propagation would make
    values = bound_meta(gm, bindings, mode, ones)
    if values is None:
        return False
    nodes = list(concrete.graph.nodes)
    if any(n.op not in ("placeholder", "output") and n.name not in values for n in nodes):
        return False
    for node in nodes:
        if node.op == "placeholder":  # as propagation gives them: fake tensors of the same mode
            node.meta["val"] = fake_input(mode, node)
        elif node.op == "output":  # what it returns, as propagation records it
            node.meta["val"] = fx.node.map_arg(node.args[0], lambda n: n.meta.get("val"))
        else:
            node.meta["val"] = values[node.name]
    return True


def _fold_sizes(gm: fx.GraphModule) -> None:
    """Sizes and size arithmetic -> literals; size checks evaluated (a false one: :class:`ShapeMismatch`)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in SIZE_CHECKS:
            condition = node.args[0]
            if node.target is aten._assert_scalar.default and condition is False:
                raise ShapeMismatch(f"the graph asserts {node.args[1] if len(node.args) > 1 else 'a size check'}")
            gm.graph.erase_node(node)
        elif node.target in SIZE_QUERIES or is_symbolic_scalar_op(node.target):
            value = node.meta.get("val")
            if isinstance(value, (bool, int, float)):
                replace_with_literal(node, value)
