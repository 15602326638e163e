"""Shapes with a size of 1 that a graph captured with symbolic sizes excludes, and the inputs to capture them.

A graph captured from larger sizes may hold only where a size is not 1: the trace assumed ``Ne(batch, 1)``
(``nn.TransformerEncoderLayer`` given a padding mask), or torch.export gave a length the range ``[2, oo)``
(HuggingFace BERT).  In memory such a shape used to be captured again for itself alone; a loaded module,
which has no model to capture, refused it.  So for each symbol whose value 1 the graph excludes, the module
captures a second graph from the inputs at hand with that symbol's dims narrowed to 1, those dims fixed and
every other one symbolic (``capture/dynamic_shapes.py``'s ``SIZE_ONE_FIXED``): at the first call that needs
it, and before ``pyrys.save`` for each one still missing (and then for those a size-1 capture excludes in turn:
batch 1 of length 1), so that a saved module takes batch 1 and length 1.
"""
from __future__ import annotations

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_unflatten

from pyrys.ir.graph import user_inputs
from pyrys.ir.symbolic import FAKE_MODE_KEY, bind_symbols
from pyrys.signature import signature_of


def excluded_size_one_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
    """For each symbol of ``gm``'s inputs whose value 1 its ranges or guards exclude (the other dims as in
    ``args``, ``kwargs``), those inputs with that symbol's dims narrowed to 1, and with them every other
    input dim at the same place of the same size (ids and a mask may have a symbol each for one batch: a
    model given one narrowed and not the other fails), copied contiguous (a narrowed view's strides would
    become symbols of their own in the capture; a view would keep the caller's whole tensor)."""
    signature, flat = signature_of(args, kwargs)
    dims = _symbol_dims(gm, flat)
    examples, seen = [], set()
    for symbol, where in dims.items():
        size = flat[where[0][0]].shape[where[0][1]]
        if size < 1:
            continue  # empty: no row to narrow to
        group = sorted({(i, d) for places in dims.values() for i, d in places
                        if d == where[0][1] and flat[i].shape[d] == size} | set(where))
        narrowed = list(flat)  # (of size 1 already: these inputs, where a graph captured from others excludes them)
        for i, d in group:
            narrowed[i] = narrowed[i].narrow(d, 0, 1)
        shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in narrowed)
        if shapes in seen:
            continue
        seen.add(shapes)
        shapes = [torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t
                  for t in narrowed]
        if bind_symbols(gm, shapes)[1] is not None:
            narrowed = [t.clone(memory_format=torch.contiguous_format) if isinstance(t, torch.Tensor) else t
                        for t in narrowed]  # copies: kept until a save, they must not hold the caller's tensors
            examples.append(tree_unflatten(narrowed, signature.in_spec))
    return examples


def size_one_dims(gm: fx.GraphModule, flat: list) -> bool:
    """Whether one of ``gm``'s symbolic input dims has size 1 in ``flat`` (a shape a graph captured with those
    dims fixed at 1 may hold for)."""
    return any(flat[i].shape[d] == 1 for places in _symbol_dims(gm, flat).values() for i, d in places)


def _symbol_dims(gm: fx.GraphModule, flat: list) -> dict[sympy.Symbol, list[tuple[int, int]]]:
    """Each symbol sizing one of ``gm``'s user input dims alone, with the ``(flat input, dim)`` places it sizes
    (inputs of another rank than the graph's left out)."""
    env = gm.meta[FAKE_MODE_KEY].shape_env
    dims: dict[sympy.Symbol, list[tuple[int, int]]] = {}
    for position, (node, value) in enumerate(zip(user_inputs(gm.graph), flat)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(value, torch.Tensor) or val.dim() != value.dim():
            continue
        for d, size in enumerate(val.shape):
            expr = env.replace(size.node.expr) if isinstance(size, torch.SymInt) else None
            if isinstance(expr, sympy.Symbol):
                dims.setdefault(expr, []).append((position, d))
    return dims
