"""Export for every shape: which input dims are ``Dim.AUTO`` (symbolic where the model allows).

The batch (dim 0) of every input tensor, and every dim of an input of rank <= 3 (token ids and
masks ``(batch, length)``, sequences of features ``(batch, length, width)``, audio ``(batch,
channels, samples)``).  Image and video sizes (dims 2+ of a rank-4/5 input) stay as captured:
serving rarely varies them, and symbolic spatial sizes through a CNN's convs and pools make the
capture 2x slower (MobileNetV3: 21 s against 11 s); a new image size is captured again, with a
note.  But a dim of a rank-4/5 input whose size is that of a non-batch dim of a rank <= 3 input is
symbolic too: it is a sequence length, as in an attention mask ``(batch, 1, length, length)`` beside
``(batch, length, width)`` features, and fixed there it would pin the length everywhere.  And a dim
of a rank-4/5 input that came at a third size (:class:`VaryingDims`: a KV cache ``(batch, heads,
length, width)`` growing a token a call, an image size that keeps changing) is symbolic in the capture
made then: one slower capture instead of one per size.

``torch.export`` keeps a ``Dim.AUTO`` dim symbolic unless the model pins it (a conv's channels, a
reshape to a constant, a branch on the size), in which case it specializes that dim silently.
Sizes 0 and 1 are specialized by default ("0/1 specialization": a batch-1 example would pin the
batch); ``backed_size_oblivious`` keeps them symbolic, and what the trace assumed about them
(``Ne(s1, 1)``) is recorded as a guard, checked for every later shape
(:func:`pyrys.ir.symbolic.bind_symbols`); the passes propagate shapes in the same mode
(:func:`pyrys.ir.symbolic.sizes_kept_symbolic`).  A guard the model's own code makes on a batch of 1
(``if batch == 1``) would still pin it: the capture runs from :func:`symbolic_example`.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.fx as fx
from torch.export import Dim
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from pyrys.ir.graph import user_inputs
from pyrys.ir.vocabulary import (ATTENTION, CONV_TRANSPOSES, CONVOLUTIONS, LINEARS, MATRIX_PRODUCTS, PERMUTES, POOLS,
                                 VIEWS, ZERO_PADS)

MAX_SEQUENCE_RANK = 3  # inputs up to this rank have every dim symbolic; higher ranks only the batch
# ``dynamic=`` of a capture whose example's dims of size 1 stay 1 (the rest as above): the graph for the shapes
# a graph captured from larger sizes excludes (``Ne(batch, 1)``, a length in ``[2, oo)``), symbolic elsewhere
SIZE_ONE_FIXED = "size-1 dims fixed"


class VaryingDims(frozenset):
    """``dynamic=`` of a capture that also keeps these dims symbolic: ``(position, dim)`` pairs, ``position``
    an input's place among the flattened ``(args, kwargs)`` leaves; ``size_one_fixed`` as ``SIZE_ONE_FIXED``."""

    def __new__(cls, dims=(), size_one_fixed: bool = False):
        varying = super().__new__(cls, dims)
        varying.size_one_fixed = size_one_fixed
        return varying


def padded_window_inputs(gm: fx.GraphModule) -> frozenset[int]:
    """The positions among ``gm``'s user inputs of those that reach, as images, a pad a convolution or pooling
    reads (through a few elementwise ops).  Such a model often computes the pad from the size (TF "same"
    padding, timm's ``Conv2dSame``): with symbolic image sizes each layer's size is then a nested ``Max``/``ceil``
    of the last one's, over which torch.export and sympy spent minutes (tf_mobilenetv3_small_100: more than 9
    minutes at a third width, against seconds for a capture of that size alone), so their image sizes are
    captured one by one (``VaryingDims`` leaves them out).  "As images": back from the pad through anything but
    ops that take an input's dims apart (matrix products, attention, views, permutes, concatenation: a KV cache
    reaches a padded causal convolution so, and keeps its length symbolic).  From the graph as captured, before
    the passes fold pads into convolutions."""
    windows = CONVOLUTIONS | CONV_TRANSPOSES | frozenset(POOLS)
    pads = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in ZERO_PADS and _feeds(n, windows)]
    reaching: set[fx.Node] = set()
    work = list(pads)
    while work:
        node = work.pop()
        if node not in reaching:
            reaching.add(node)
            if node.op == "call_function" and node.target not in _REARRANGING:
                work.extend(node.all_input_nodes)
    return frozenset(i for i, node in enumerate(user_inputs(gm.graph)) if node in reaching)


_REARRANGING = (MATRIX_PRODUCTS | LINEARS | VIEWS | PERMUTES
                | {ATTENTION, torch.ops.aten.cat.default, torch.ops.aten.stack.default})  # see padded_window_inputs


def _feeds(pad: fx.Node, windows: frozenset, steps: int = 3) -> bool:
    """Whether a window op reads ``pad``'s result, directly or through up to ``steps`` other ops (a cast, an
    activation)."""
    users = list(pad.users)
    for _ in range(steps + 1):
        if any(user.target in windows for user in users):
            return True
        users = [after for user in users if user.op == "call_function" and user.target not in _REARRANGING
                 for after in user.users]
    return False


def keeps_size_one_fixed(dynamic: object) -> bool:
    """Whether a capture's ``dynamic=`` keeps the example's dims of size 1 fixed."""
    return dynamic == SIZE_ONE_FIXED or getattr(dynamic, "size_one_fixed", False)


def symbolic_dims(model: torch.nn.Module, args: tuple, kwargs: dict, size_one_fixed: bool = False,
                  varying: frozenset = frozenset()) -> Any:
    """The ``dynamic_shapes`` argument of ``torch.export.export``: ``Dim.AUTO`` on the dims above (those of
    size 1 left fixed with ``size_one_fixed``) and on ``varying`` (:class:`VaryingDims`), by position, or by
    parameter name where there are keyword arguments or a ``*args`` parameter (export takes the tensors of
    ``forward(self, *inputs)`` as one argument, a tuple)."""
    lengths = _sequence_sizes((args, kwargs))
    leaves = tree_leaves((tuple(args), dict(kwargs)))
    extra = {(id(leaves[position]), dim) for position, dim in varying if position < len(leaves)}
    auto = lambda value: _auto(value, size_one_fixed, lengths, extra)  # noqa: E731
    if not kwargs and not _takes_varargs(model):
        return tuple(auto(a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {name: auto(value) for name, value in bound.arguments.items()}


def _takes_varargs(model: torch.nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a Python signature
        return False
    return any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)


def _sequence_sizes(inputs: Any) -> set[int]:
    """The sizes (above 1) of the non-batch dims of the input tensors of rank <= MAX_SEQUENCE_RANK."""
    return {size for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.dim() <= MAX_SEQUENCE_RANK
            for size in t.shape[1:] if size > 1}


def _auto(value: Any, size_one_fixed: bool, lengths: set[int], extra: set[tuple[int, int]]) -> Any:
    return tree_map(lambda v: _dims(v, size_one_fixed, lengths, extra) if isinstance(v, torch.Tensor) and v.dim()
                    else None, value)


def _dims(tensor: torch.Tensor, size_one_fixed: bool, lengths: set[int], extra: set[tuple[int, int]]) -> dict[int, Any]:
    if tensor.dim() <= MAX_SEQUENCE_RANK:
        dims = range(tensor.dim())
    else:
        dims = [0] + [i for i in range(1, tensor.dim()) if tensor.shape[i] in lengths or (id(tensor), i) in extra]
    return {i: Dim.AUTO for i in dims if not (size_one_fixed and tensor.shape[i] == 1)}


def symbolic_example(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs to capture with symbolic sizes: as given, or, where every input's batch is 1, with each
    input's first dim repeated to 2.  A batch-1 example takes the model's batch-1 path (HF GPT-2's mask
    code guards ``Eq(batch, 1)``), which pins the batch of the graph every shape is specialized from; from a
    batch of 2 only batch 1 itself may need a capture of its own."""
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim()]
    if not tensors or any(t.shape[0] != 1 for t in tensors):
        return args, kwargs

    def widened(value):
        return torch.cat([value, value]) if isinstance(value, torch.Tensor) and value.dim() else value

    return tree_map(widened, args), tree_map(widened, kwargs)


def widened_like(args: tuple, kwargs: dict, first: list) -> tuple[tuple, dict]:
    """The inputs to capture with symbolic sizes at a new shape (``dynamic=None``): as given, but each tensor
    dim of size 1 where the first inputs' (``first``: their flat shapes, None for a non-tensor) is larger
    repeated to 2.  A length of 1 (a decode step after a prompt) takes paths larger lengths do not (HF's
    ``is_causal=q_len > 1``, a symbolic bool torch.export refuses), and would leave every later shape a
    capture of its own."""
    leaves, spec = tree_flatten((args, kwargs))
    if len(leaves) != len(first):
        return args, kwargs
    widened = []
    for value, shape in zip(leaves, first):
        if isinstance(value, torch.Tensor) and shape is not None and value.dim() == len(shape):
            for dim, (size, before) in enumerate(zip(value.shape, shape)):
                if size == 1 and before > 1:
                    value = torch.cat([value, value], dim)
        widened.append(value)
    return tree_unflatten(widened, spec)
