"""Outputs eager returns contiguous stay contiguous after the passes.

A pass may leave an output strided where eager's was dense: linears that read one input merged
(``passes/merge_linears.py``) make each one's result a column slice of the merged product, strides
``(10, 1)`` for a ``(3, 4)`` part, and a caller's ``y.view(-1)`` then raised where eager's worked (a
helper's find: two heads on one feature, ``return self.cls(h), self.box(h)``).  Such an output gets a
contiguous copy at the end of the graph, which every backend runs:

    return (%cls_part, ...)  ->  %cls_part_contiguous = aten::clone(%cls_part, memory_format=contiguous_format)
                                 return (%cls_part_contiguous, ...)

"Contiguous" is :func:`~pyrys.ir.symbolic.known_contiguous`: for every size of a symbolic dim.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from pyrys.ir.meta import settle_meta
from pyrys.ir.symbolic import known_contiguous


def contiguous_outputs(gm: fx.GraphModule) -> frozenset[int]:
    """The flat output positions of ``gm`` (as captured: eager's) that are contiguous tensors."""
    return frozenset(position for position, value in enumerate(_outputs(gm)) if _contiguous(value))


def keep_contiguous(gm: fx.GraphModule, positions: frozenset[int]) -> int:
    """Give each output at ``positions`` that is not contiguous now a contiguous copy; how many got one."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    strided = list(dict.fromkeys(value for position, value in enumerate(_outputs(gm))  # (in output order)
                                 if position in positions and _is_tensor(value) and not _contiguous(value)))
    for value in strided:
        with gm.graph.inserting_before(output):
            copy = gm.graph.create_node("call_function", torch.ops.aten.clone.default, (value,),
                                        {"memory_format": torch.contiguous_format}, name=f"{value.name}_contiguous")
        settle_meta([copy])
        output.replace_input_with(value, copy)
    if strided:
        gm.recompile()
    return len(strided)


def _outputs(gm: fx.GraphModule) -> list:
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    return tree_flatten(output.args[0])[0]


def _is_tensor(value) -> bool:
    return isinstance(value, fx.Node) and isinstance(value.meta.get("val"), torch.Tensor)


def _contiguous(value) -> bool:
    return _is_tensor(value) and known_contiguous(value.meta["val"])
