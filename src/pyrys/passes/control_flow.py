"""Control flow: an If whose condition is a constant is replaced by the branch it takes.

    %If = pyrys::If(False, [%x])
      block0(%x : Float(2)):  %y = aten::mul(%x, 2)  -> (%y)
      block1(%x : Float(2)):  %y = aten::add(%x, 1)  -> (%y)
    %y = prim::TupleIndex(%If, 0)
    ->  %y = aten::add(%x, 1)

The condition becomes a constant when ``freeze_flags`` replaces the flag it reads
(``self.training``) by its value and ``constant_propagation`` evaluates what was
computed from it.  An If left in place is a miss with its reason; a taken branch
that raises (the scripted code's ``raise``) stops the compile with its message.
The graph module stops holding the inlined If's branches.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from pyrys.ir.control_flow import IF, BranchRaised, RaisingBranch, add_branch, branch_taken
from pyrys.ir.graph import add_constant, call_nodes, is_constant
from pyrys.ir.meta import settle_meta
from pyrys.ir.provenance import take_over
from pyrys.passes.rewrite import Miss, PassResult

RULE = "inline_if"


def inline_constant_ifs(gm: fx.GraphModule) -> PassResult:
    """Inline every ``pyrys::If`` with a constant condition; ``fired["inline_if"]`` counts them."""
    result = PassResult()
    for node in call_nodes(gm.graph, {IF}):
        cond = node.args[0]
        if is_constant(cond):
            _inline(gm, node, bool(cond))
            result.fired[RULE] += 1
        else:
            result.misses.append(Miss(RULE, node.name, f"the If's condition %{cond.name} is not a constant: "
                                      "freeze_flags did not freeze the flag it reads, so both branches stay"))
    gm.recompile()
    return result


def _inline(gm: fx.GraphModule, node: fx.Node, cond: bool) -> None:
    branch = branch_taken(gm, node, cond)
    if isinstance(branch, RaisingBranch):
        raise BranchRaised(f"the branch taken when %{node.name}'s condition is {cond} raises: {branch.message}")
    env: dict[fx.Node, fx.Node] = dict(zip(_placeholders(branch), node.args[3]))
    outputs: list = []
    with gm.graph.inserting_before(node):
        for inner in branch.graph.nodes:
            if inner.op == "get_attr":
                env[inner] = _copy_attribute(gm, getattr(branch, inner.target), inner.target)
            elif inner.op == "call_function":
                env[inner] = gm.graph.node_copy(inner, lambda n: env[n])
            elif inner.op == "output":
                outputs = [env[o] for o in inner.args[0]]
    settle_meta(env[n] for n in branch.graph.nodes if n.op == "call_function")
    for user in list(node.users):
        if user.target is operator.getitem:
            output = outputs[user.args[1]]
            if isinstance(output, fx.Node):
                take_over(output, user)  # the branch's op computes the If's output now (numerics pairs them)
            user.replace_all_uses_with(output)
            gm.graph.erase_node(user)
    branches = node.args[1:3]
    gm.graph.erase_node(node)
    for attribute in branches:
        if not attribute.users:
            gm.graph.erase_node(attribute)
            delattr(gm, attribute.target)


def _copy_attribute(gm: fx.GraphModule, value, hint: str) -> fx.Node:
    """A constant of the branch, or the branch of an If inside it, now held by ``gm``."""
    if isinstance(value, torch.Tensor):
        return add_constant(gm, value, hint)
    return add_branch(gm, value, hint)


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]
