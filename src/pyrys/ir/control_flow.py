"""``prim::If`` in pyrys IR: a node that holds two sub-graphs and runs one of them.

    %out = pyrys::If(%training, <branches id>, [%x, %w])      # outputs: a list of tensors
    %y   = prim::TupleIndex(%out, 0)

The two branches are ``fx.GraphModule`` s whose placeholders receive the operand
tensors; a branch may instead *raise* (the scripted code's ``raise``), in which case
taking it raises :class:`BranchRaised`.  An If stays in the graph while its condition
is module state (a flag such as ``training``); once ``freeze_flags`` turned the
condition into a literal, ``inline_constant_ifs`` replaces the node by the taken branch.
The op is registered with ``torch.library`` (real and fake implementations run the
taken branch), so graphs containing it stay runnable and shape propagation works.
"""
from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from pyrys.ir.ops import pyrys_op


class BranchRaised(RuntimeError):
    """The scripted code raises on this path (e.g. a shape check that fails)."""


@dataclass(eq=False)
class Branch:
    """One arm of an If: a graph over the operands, or the message it raises."""

    gm: fx.GraphModule | None
    raises: str | None = None


@dataclass(eq=False)
class Branches:
    then: Branch
    otherwise: Branch

    def pick(self, cond: bool) -> Branch:
        return self.then if cond else self.otherwise


_REGISTRY: "weakref.WeakValueDictionary[int, Branches]" = weakref.WeakValueDictionary()
_IDS = itertools.count()
BRANCHES_KEY = "pyrys_branches"  # node.meta key holding the Branches (keeps them alive)


def register_branches(branches: Branches) -> int:
    """An id for the If node's argument; the node's meta must keep ``branches`` alive."""
    key = next(_IDS)
    _REGISTRY[key] = branches
    return key


def branches_of(node: fx.Node) -> Branches:
    return _REGISTRY[node.args[1]]


def run_branch(cond: bool, key: int, operands: list[torch.Tensor]) -> list[torch.Tensor]:
    branch = _REGISTRY[key].pick(bool(cond))
    if branch.raises is not None:
        raise BranchRaised(branch.raises)
    outputs = branch.gm(*operands)
    # a custom op's outputs must not alias its inputs or each other
    taken = {_storage(x) for x in operands}
    fresh = []
    for o in outputs:
        if o._base is not None or _storage(o) in taken:
            o = o.clone()
        taken.add(_storage(o))
        fresh.append(o)
    return fresh


def _storage(t: torch.Tensor) -> int:
    if isinstance(t, FakeTensor):  # no data: identity stands in for the storage
        return id(t)
    return t.untyped_storage().data_ptr() or id(t)


@pyrys_op("If", schema="(bool cond, int branches, Tensor[] operands) -> Tensor[]")
def if_op(cond: bool, branches: int, operands: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the branch ``cond`` selects on ``operands``."""
    return run_branch(cond, branches, operands)


if_op.register_fake(run_branch)

IF = torch.ops.pyrys.If.default
# An If whose taken branch raises must not be removed as dead code.
torch.fx.node.has_side_effect(IF)
