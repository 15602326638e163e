"""``prim::If`` in pyrys IR: a node that runs one of two branches held by the graph module.

    %if_then = get_attr[target=if_then]                       # an fx.GraphModule
    %if_else = get_attr[target=if_else]
    %If = pyrys::If(%training, %if_then, %if_else, [%x, %w])   # outputs: a list of tensors
    %y  = prim::TupleIndex(%If, 0)

The branches are submodules of the graph module that holds the If, as ``torch.cond``
holds its branches, so a graph copies (``copy.deepcopy``), pickles and prints whole,
and graphs never share branches.  A branch is an ``fx.GraphModule`` whose placeholders
receive the operand tensors, or a :class:`RaisingBranch` (the scripted code's ``raise``):
taking it raises :class:`BranchRaised`.  An If stays in the graph while its condition is
module state (a flag such as ``training``); once ``freeze_flags`` turned the condition
into a literal, ``inline_constant_ifs`` replaces the node by the taken branch.

The If is a plain function rather than a ``torch.library`` op (an op cannot take a
module); it runs directly in every backend and under fake tensors, and torch.fx traces
it as one call (a pickled graph module is traced again when loaded).  torch.fx cannot
know that an If may raise, so pyrys removes dead code with its own predicate,
:func:`has_effects`, which keeps every If; torch.fx's global tables are left alone.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.overrides import handle_torch_function, has_torch_function

from pyrys.ir.graph import _Attributes, identifier


class BranchRaised(RuntimeError):
    """The scripted code raises on this path (e.g. a shape check that fails)."""


class RaisingBranch(torch.nn.Module):
    """A branch that raises: what the scripted code says when it takes this path."""

    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def forward(self, *operands: torch.Tensor) -> list[torch.Tensor]:
        raise BranchRaised(self.message)


def if_op(cond: bool, then: torch.nn.Module, otherwise: torch.nn.Module,
          operands: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the branch ``cond`` selects on ``operands``; its outputs are new tensors."""
    if has_torch_function((cond, *operands)):  # torch.fx tracing: one call node
        return handle_torch_function(if_op, (cond, *operands), cond, then, otherwise, operands)
    outputs = (then if cond else otherwise)(*operands)
    # as from an op: outputs alias neither the operands nor each other
    taken = {_storage(x) for x in operands}
    fresh = []
    for o in outputs:
        if o._base is not None or _storage(o) in taken:
            o = o.clone()
        taken.add(_storage(o))
        fresh.append(o)
    return fresh


IF = if_op


def _storage(t: torch.Tensor) -> int:
    if isinstance(t, FakeTensor):  # no data: identity stands in for the storage
        return id(t)
    return t.untyped_storage().data_ptr() or id(t)


def add_branch(gm: fx.GraphModule, branch: torch.nn.Module, hint: str) -> fx.Node:
    """Hold ``branch`` as a submodule of ``gm``; a ``get_attr`` node for it at the graph's insert point."""
    name = identifier(hint, _Attributes(gm))
    gm.add_submodule(name, branch)
    return gm.graph.get_attr(name)


def add_if(gm: fx.GraphModule, cond: fx.Node, then: torch.nn.Module, otherwise: torch.nn.Module,
           operands: list[fx.Node]) -> fx.Node:
    """An If node on ``cond`` over ``operands`` with its two branches held by ``gm``."""
    branches = add_branch(gm, then, "if_then"), add_branch(gm, otherwise, "if_else")
    return gm.graph.create_node("call_function", IF, (cond, *branches, list(operands)), {}, name="If")


def branch_taken(gm: fx.GraphModule, node: fx.Node, cond: bool) -> torch.nn.Module:
    """The branch of the If ``node`` that runs when its condition is ``cond``."""
    return getattr(gm, node.args[1 if cond else 2].target)


def is_branch(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ``get_attr`` of a branch (a module), not of a constant tensor."""
    return node.op == "get_attr" and isinstance(getattr(gm, node.target, None), torch.nn.Module)


def has_effects(node: fx.Node) -> bool:
    """pyrys's impurity for DCE and CSE: torch.fx's, and every If (its taken branch may raise)."""
    return (node.op == "call_function" and node.target is IF) or node.is_impure()
