"""Take ``torch.export``'s graph as it comes (its training IR) where it is already what pyrys reads.

``ExportedProgram.run_decompositions({})`` traces the whole model a second time to reach the inference
IR: about as long as the export itself (ResNet-18 1.1 s, MobileNetV3 2.6 s here).  On most inference
graphs the two IRs differ only in what pyrys reads either way:

* in-place ops on values the graph computed (``relu_``, ``add_``, ``hardswish_``), which the second
  trace makes functional; here ``y = relu_(x)`` becomes ``y = relu(x)`` and every later read of ``x``
  reads ``y``;
* ops the second trace decomposes that are already pyrys vocabulary: ``batch_norm`` (pyrys's own form;
  the inference IR has ``_native_batch_norm_legit_no_training``), ``reshape``, ``flatten`` and
  ``dropout``.

:func:`as_inference_graph` checks that a graph is of that kind and rewrites its in-place ops; anything
else (an in-place write to an input, a parameter or a buffer, or to a value that is a view or has views,
a ``batch_norm`` in training, any other op the second trace would change) leaves the graph alone and
returns False, and the caller runs the second trace.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.symbolic_shapes import statically_known_true

from pyrys.capture.in_place import functional_twin

aten = torch.ops.aten

# ops run_decompositions({}) decomposes that pyrys reads as they are (passes/simplify.py, ir/vocabulary.py);
# batch_norm only when not training (capture/export.py gives it its flag)
READ_AS_THEY_ARE = frozenset({aten.reshape.default, aten.flatten.using_ints, aten.dropout.default,
                              aten.batch_norm.default})


def as_inference_graph(gm: fx.GraphModule) -> bool:
    """Rewrite ``gm``'s in-place ops functionally if every op of ``gm`` is one the inference IR would hold
    as it is, or one of the above; True when done, False (``gm`` untouched) otherwise."""
    in_place, rewritten = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            if node.target.__module__ != "_operator":  # getitem and arithmetic on sizes only
                return False
            continue
        if node.target in REWRITES:
            if not _rewritable(node):
                return False
            rewritten.append(node)
        elif node.target._schema.is_mutable:
            twin = functional_twin(node.target._schema)
            if twin is None or not _writes_a_fresh_value(node, in_place) or not _same_result(node, twin):
                return False
            in_place.append(node)
        elif node.target in READ_AS_THEY_ARE:
            if node.target is aten.batch_norm.default and _training(node) is not False:
                return False
        elif _decomposed_by_second_trace(node.target):
            return False
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in in_place:
        _make_functional(node, order)
    for node in rewritten:
        REWRITES[node.target](gm, node)
    return True


def _same_result(node: fx.Node, twin: torch._ops.OpOverload) -> bool:
    """The functional op gives what the in-place one wrote: its dtype (``y.gt_(0)`` keeps ``y``'s float dtype
    where ``gt`` gives bool; ``half.add_(float32)`` stays half), run on the fake values."""
    expected = node.meta.get("val")
    values = [a.meta.get("val") for a in node.all_input_nodes]
    mode = detect_fake_mode(values)
    if not isinstance(expected, torch.Tensor) or mode is None:
        return False
    fake = lambda a: a.meta["val"] if isinstance(a, fx.Node) else a  # noqa: E731
    try:
        with mode:
            result = twin(*fx.node.map_arg(node.args, fake), **fx.node.map_arg(node.kwargs, fake))
    except Exception:  # noqa: BLE001 -- whatever the functional op refuses, the second trace decides
        return False
    return isinstance(result, torch.Tensor) and result.dtype == expected.dtype and result.dim() == expected.dim()


def _writes_a_fresh_value(node: fx.Node, in_place: list[fx.Node]) -> bool:
    """The written value was computed by the graph (not an input, parameter or buffer), by an op that
    returns new memory (or by an in-place op made functional before this one: ``relu_(add_(x, y))``), and
    nothing views it: writing it changes nothing else."""
    written = node.args[0]
    if not isinstance(written, fx.Node) or written.op != "call_function":
        return False
    if not isinstance(written.target, torch._ops.OpOverload) or (_aliases(written.target) and written not in in_place):
        return False
    return not any(isinstance(u.target, torch._ops.OpOverload) and _aliases(u.target) and u is not node
                   for u in written.users)


def _aliases(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` returns (a view of) one of its arguments, in place or not."""
    return any(r.alias_info is not None for r in op._schema.returns)


def _training(node: fx.Node):
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else None)
    return training if isinstance(training, bool) else None


def _decomposed_by_second_trace(op: torch._ops.OpOverload) -> bool:
    """A CompositeImplicitAutograd op that export does not preserve (it aliases or writes, or torch says it is
    unsafe to keep): the inference IR holds its decomposition instead."""
    from torch._export.utils import _is_cia_op, _is_preservable_cia_op

    return _is_cia_op(op) and not _is_preservable_cia_op(op)


def _make_functional(node: fx.Node, order: dict[fx.Node, int]) -> None:
    """``y = op_(x, ...)`` -> ``y = op(x, ...)``; reads of ``x`` after ``node`` read ``y``."""
    written = node.args[0]
    for user in [u for u in written.users if u is not node and order[u] > order[node]]:
        user.replace_input_with(written, node)
    node.target = functional_twin(node.target._schema)
    node._rename(node.target._schema.name.split("::")[1])  # "relu__3" -> "relu" or the next free "relu_<n>"


def _rewritable(node: fx.Node) -> bool:
    """An in-place dropout when not training (it writes nothing), ``to`` without a ``memory_format`` (it reads
    dtypes only), ``contiguous`` or ``unflatten``."""
    if node.target is aten.dropout_.default:
        return len(node.args) > 2 and node.args[2] is False
    if node.target in _TO:
        return node.kwargs.get("memory_format") in (None, torch.preserve_format)
    if node.target is aten.contiguous.default:
        return isinstance(node.args[0], fx.Node) and isinstance(node.args[0].meta.get("val"), torch.Tensor)
    if node.target is aten.unflatten.int:
        return isinstance(node.args[0], fx.Node) and isinstance(node.args[0].meta.get("val"), torch.Tensor)
    return _static(node)


def _static(node: fx.Node) -> bool:
    """The node's input and output have fixed shapes (the rewrites below read them)."""
    values = [node.meta.get("val"), node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None]
    return all(isinstance(v, torch.Tensor) and all(isinstance(d, int) for d in v.shape) for v in values)


def _replace(gm: fx.GraphModule, node: fx.Node, target, args: tuple, kwargs: dict | None = None) -> None:
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(target, args, kwargs or {})
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _alias(gm: fx.GraphModule, node: fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    gm.graph.erase_node(node)


def _contiguous(gm: fx.GraphModule, node: fx.Node) -> None:
    """``x.contiguous()``: ``x`` where it is contiguous, else a contiguous clone (as the second trace gives)."""
    memory_format = node.kwargs.get("memory_format", torch.contiguous_format)
    if statically_known_true(node.args[0].meta["val"].is_contiguous(memory_format=memory_format)):
        return _alias(gm, node)  # (with symbolic sizes, where that is not known for every size: the clone)
    _replace(gm, node, aten.clone.default, (node.args[0],), {"memory_format": memory_format})


def _to(gm: fx.GraphModule, node: fx.Node) -> None:
    """``x.to(...)``: ``x`` where nothing changes, else a copy in the output's dtype."""
    source, out = node.args[0].meta["val"], node.meta["val"]
    copy = node.kwargs.get("copy", False) or any(a is True for a in node.args[1:])  # to(..., non_blocking, copy)
    if not copy and out.dtype == source.dtype and out.device == source.device:
        return _alias(gm, node)
    _replace(gm, node, aten._to_copy.default, (node.args[0],), {"dtype": out.dtype})


def _unflatten(gm: fx.GraphModule, node: fx.Node) -> None:
    """``unflatten(x, dim, sizes)`` -> ``view(x, x's sizes with the one at dim replaced by sizes)``, a symbolic
    size of ``x`` read by ``sym_size`` (as the second trace writes it): nn.MultiheadAttention's packed
    projection is one, and a symbolic capture of a model holding it took the second trace (5-8 s of a tiny
    nn.Transformer's capture here, seven times over before a save)."""
    x, dim, sizes = node.args[0], node.args[1], list(node.args[2])
    shape = list(x.meta["val"].shape)
    dim %= len(shape)
    with gm.graph.inserting_before(node):
        before = [_size_of(gm, x, i, size) for i, size in enumerate(shape[:dim])]
        after = [_size_of(gm, x, i, size) for i, size in enumerate(shape[dim + 1:], dim + 1)]
    _replace(gm, node, aten.view.default, (x, before + sizes + after))


def _size_of(gm: fx.GraphModule, x: fx.Node, dim: int, size) -> "int | fx.Node":
    """``x``'s size at ``dim``: the number, or a ``sym_size`` node where it is symbolic."""
    if isinstance(size, int):
        return size
    node = gm.graph.call_function(aten.sym_size.int, (x, dim))
    node.meta["val"] = size
    return node


def _dropout_in_place(gm: fx.GraphModule, node: fx.Node) -> None:
    """``dropout_(x, p, train=False)`` writes nothing: ``x``."""
    _alias(gm, node)


_TO = (aten.to.device, aten.to.dtype, aten.to.dtype_layout, aten.to.other)
# aliasing or writing ops the second trace decomposes, rewritten as it would (fixed shapes only)
REWRITES = {
    aten.contiguous.default: _contiguous,
    **{op: _to for op in _TO},
    aten.unflatten.int: _unflatten,
    aten.dropout_.default: _dropout_in_place,
}
