"""Constants a graph writes as it runs: the running statistics of a norm that may be training.

aten's ``batch_norm`` and ``instance_norm`` update their running statistics in place when ``training``
(``use_input_stats``) is true, though their schemas mark no argument as written:

    running_mean <- (1 - momentum) * running_mean + momentum * mean(x)     (running_var likewise)

A captured graph reads those as constants.  One made the same tensor as another constant of equal values
(a fresh BatchNorm's ``running_var`` and ``weight`` are both ones) would move that constant at every
call, so they are never shared between captures (``share_constants``) nor saved as one (``pyrys.save``);
a norm whose ``training`` is the constant True (its result reads the input's own statistics) is given none
where no other op reads them (``simplify``'s ``training_norm_stats``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

# norm -> the (position, name) of its running mean, its running variance and its training flag
RUNNING_STATS = {
    aten.batch_norm.default: ((3, "running_mean"), (4, "running_var"), (5, "training")),
    aten.instance_norm.default: ((3, "running_mean"), (4, "running_var"), (5, "use_input_stats")),
}


def argument(node: fx.Node, position: int, name: str):
    """The argument at ``position`` (or passed by ``name``) of ``node``; None where not given."""
    return node.args[position] if len(node.args) > position else node.kwargs.get(name)


def written_constants(gm: fx.GraphModule) -> frozenset[str]:
    """The names of ``gm``'s constants a call may write (its own graph's; a branch is a graph of its own)."""
    names = set()
    for node in gm.graph.nodes:
        where = RUNNING_STATS.get(node.target) if node.op == "call_function" else None
        if where is None or argument(node, *where[2]) is False:
            continue
        for stat in where[:2]:
            value = argument(node, *stat)
            if isinstance(value, fx.Node) and value.op == "get_attr":
                names.add(value.target)
    return frozenset(names)


def written_tensors(gm: fx.GraphModule) -> set[int]:
    """The ``id`` of every constant tensor a call of ``gm`` or of one of its branches may write."""
    return {id(getattr(graph, name)) for graph in gm.modules() if isinstance(graph, fx.GraphModule)
            for name in written_constants(graph)}
