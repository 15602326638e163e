"""Outputs eager returns contiguous stay contiguous after the passes.

A pass may leave an output strided where eager's was dense: linears that read one input merged
(``passes/merge_linears.py``) make each one's result a column slice of the merged product, strides
``(10, 1)`` for a ``(3, 4)`` part, and a caller's ``y.view(-1)`` then raised where eager's worked (a
helper's find: two heads on one feature, ``return self.cls(h), self.box(h)``).  Such an output gets a
contiguous copy at the end of the graph, which every backend runs:

    return (%cls_part, ...)  ->  %cls_part_contiguous = aten::clone(%cls_part, memory_format=contiguous_format)
                                 return (%cls_part_contiguous, ...)

"Contiguous" is :func:`~pyrys.ir.symbolic.known_contiguous`: for every size of a symbolic dim.  Eager's
layout is the captured graph's, but for the ops in ``SUGGESTED_LAYOUT``: their CPU kernels lay out the result
as ``input.suggest_memory_format()`` (contiguous below 4-D), where torch's meta keeps the input's strides (a
batch norm of ``x.transpose(1, 2)``: eager's ``(40, 5, 1)``, the meta's ``(40, 1, 8)``), and the ops after
them that keep their first input's layout (a relu of it, it plus 1).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from pyrys.ir.meta import settle_meta
from pyrys.ir.symbolic import hint, known_contiguous

SUGGESTED_LAYOUT = frozenset({torch.ops.aten.batch_norm.default})
"""Ops whose CPU result is laid out as ``input.suggest_memory_format()`` whatever the meta says."""


def contiguous_outputs(gm: fx.GraphModule) -> frozenset[int]:
    """The flat output positions of ``gm`` (as captured: eager's) that are contiguous tensors."""
    return frozenset(position for position, value in enumerate(_outputs(gm))
                     if _contiguous(value) or _suggested_contiguous(value))


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


def _suggested_contiguous(value) -> bool:
    """``value``'s layout is that of an op of ``SUGGESTED_LAYOUT`` (:func:`_layout_source`) whose CPU kernel
    gives a contiguous result: what it gives for uninitialized inputs of the same sizes and strides (the
    kernel's own rules: a size-1 dim lets a channels-last read count as channels-last), symbolic sizes at
    the example's."""
    source = _layout_source(value) if _is_tensor(value) else None
    if source is None or source.target not in SUGGESTED_LAYOUT:
        return False
    metas = [arg.meta.get("val") if isinstance(arg, fx.Node) else arg for arg in source.args]
    if any(isinstance(arg, fx.Node) and meta is None for arg, meta in zip(source.args, metas)):
        return False
    probes = [_probe(meta) if isinstance(meta, torch.Tensor) else meta for meta in metas]
    if any(probe is None for probe, meta in zip(probes, metas) if isinstance(meta, torch.Tensor)):
        return False
    try:
        with torch.no_grad():
            return source.target(*probes, **source.kwargs).is_contiguous()
    except RuntimeError:  # (arguments its kernel refuses: the meta's layout stands)
        return False


def _layout_source(value: fx.Node) -> fx.Node:
    """The op ``value`` takes its layout from: itself, or back through ops whose result has the sizes and
    strides of their first tensor input, as eager's elementwise ops follow it (``relu(bn(x.transpose(1, 2)))``,
    ``bn(...) + 1``: a reviewer's find)."""
    while value.op == "call_function" and value.target not in SUGGESTED_LAYOUT:
        first = next((arg for arg in value.args if _is_tensor(arg)), None)
        if first is None or _hinted(first) != _hinted(value):
            break
        value = first
    return value


def _hinted(value: fx.Node) -> tuple:
    """``value``'s sizes and strides at the example's values."""
    val = value.meta["val"]
    return tuple(map(hint, val.shape)), tuple(map(hint, val.stride()))


def _probe(meta: torch.Tensor) -> torch.Tensor | None:
    """An uninitialized tensor of ``meta``'s sizes and strides (the example's for symbolic ones; None where
    one has no example value)."""
    sizes, strides = [hint(d) for d in meta.shape], [hint(d) for d in meta.stride()]
    if not all(isinstance(d, int) for d in (*sizes, *strides)):
        return None
    return torch.empty_strided(sizes, strides, dtype=meta.dtype)
