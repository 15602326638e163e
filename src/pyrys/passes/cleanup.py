"""Clean-up passes: dead code elimination and common subexpression elimination.

DCE removes nodes whose value nobody uses (impure ops stay, and every ``pyrys::If``:
its taken branch may raise), module-state reads nobody uses, and constants nobody
uses (their tensors are released).

CSE merges nodes that compute the same pure op on the same arguments:

    %a = aten::relu(%x) ; %b = aten::relu(%x) ; aten::add(%a, %b)
    ->  %a = aten::relu(%x) ; aten::add(%a, %a)
"""
from __future__ import annotations

from collections import Counter

import torch.fx as fx

from pyrys.ir.control_flow import has_effects
from pyrys.ir.edit import replace_node
from pyrys.ir.graph import drop_unused_constants, state_inputs
from pyrys.ir.vocabulary import is_pure
from pyrys.passes.rewrite import PassResult


def dead_code_elimination(gm: fx.GraphModule) -> PassResult:
    """Remove unused values, state reads and constants; ``fired`` counts each kind."""
    before = Counter(n.op for n in gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=has_effects)
    for node in state_inputs(gm.graph):
        if not node.users:
            gm.graph.erase_node(node)
    drop_unused_constants(gm)
    after = Counter(n.op for n in gm.graph.nodes)
    removed = Counter({name: before[op] - after[op] for op, name in _KINDS.items()})
    gm.recompile()
    return PassResult(fired=+removed)


_KINDS = {"call_function": "nodes", "placeholder": "state_reads", "get_attr": "constants"}


def _key(node: fx.Node) -> tuple:
    return (node.op, node.target, _hashable(node.args), _hashable(node.kwargs))


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return (type(value).__name__,) + tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, (bool, float)):
        return (type(value).__name__, value)  # True, 1 and 1.0 are different arguments
    return value


def common_subexpression_elimination(gm: fx.GraphModule) -> PassResult:
    """Merge duplicate pure nodes (in topological order, so chains merge in one sweep)."""
    result = PassResult()
    seen: dict[tuple, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if not is_pure(node):
            continue
        key = _key(node)
        if key in seen:
            replace_node(node, seen[key])
            result.fired["merged"] += 1
        else:
            seen[key] = node
    gm.recompile()
    return result
