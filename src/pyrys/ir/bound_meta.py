"""A symbolic graph's values at one input shape, read off its symbolic ones: every symbol replaced by its size.

A graph optimized for every shape (``ir/symbolic.py``) records each value's sizes and strides as expressions
of its inputs' symbols (``[s0, 64, 56, 56]``, strides ``[200704, 3136, 56, 1]``).  Specializing it to one
shape (``passes/specialize.py``) needs them as numbers; propagating fake tensors through the concrete copy
again runs every op's shape rule (a convolution's, with its post-ops: 2-3 ms each, ResNet-18's 60 ms, 0.4x
of what a new shape costs).  Binding the symbols gives the same numbers without running any:

    size_i = expr_i.xreplace({s0: 2, ...}),  stride_i likewise.

They were found equal, node for node (sizes, strides, dtypes), on torchvision's CNNs and ViT/Swin and on HF
BERT, DistilBERT, GPT-2, ViT and Whisper at other batch sizes and lengths, where no symbol is 0 or 1: the
symbolic graph's values were propagated "size-obliviously", as if no symbol were 0 or 1, which is exact
for every other size.  At 1 they may not be: a ``reshape`` of an ``expand``ed tensor is a view there
(strides ``(8, 0, 1)``) where the symbolic graph has a copy (``(24, 8, 1)``), and a later ``view`` that the
copy allows fails on the view (propagation makes it a ``reshape``: a reviewer's find); at 0 an op's rule may
refuse.  So :func:`bound_meta` answers only where every symbol is 2 or more (or 1, for symbols its
caller found bound alike to propagation at two shapes of a kind: ``passes/specialize.py``) and every size
it gives is a whole number of at least 1; it returns None otherwise (and for any value it does not know),
and the caller propagates as before.  Storage offsets are not carried (the symbolic graph's are not either, and
nothing lowered reads them from ``meta``).
"""
from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from pyrys.ir.symbolic import FAKE_MODE_KEY


def _fake(mode: FakeTensorMode, sizes: list[int], strides: list[int], dtype: torch.dtype,
          device: torch.device) -> FakeTensor:
    """A fake tensor of ``mode``, made from a meta tensor directly (0.5 ms less than through the mode's
    dispatch: BERT-base's 400 values, 0.2 s)."""
    meta = torch.empty_strided(sizes, strides, dtype=dtype, device="meta")
    try:
        return FakeTensor(mode, meta, device)
    except TypeError:  # a torch whose FakeTensor takes other arguments: through the mode
        with mode:
            return torch.empty_strided(sizes, strides, dtype=dtype, device=device)


class _Unbound(Exception):
    """A value :func:`bound_meta` cannot give: the caller propagates shapes instead."""


def bound_meta(gm: fx.GraphModule, bindings: dict[sympy.Symbol, sympy.Integer], mode: FakeTensorMode,
               ones: frozenset = frozenset()) -> dict[str, Any] | None:
    """Every node's ``meta["val"]`` of ``gm`` (symbolic) at ``bindings`` but its placeholders' and output's, by
    node name, tensors as fake ones of ``mode`` (of concrete sizes); None where one cannot be given so (see
    the module docstring): a symbol below 2, unless it is 1 and in ``ones``."""
    if not bindings or any(int(size) < 2 and not (int(size) == 1 and symbol in ones)
                           for symbol, size in bindings.items()):
        return None
    env = gm.meta[FAKE_MODE_KEY].shape_env
    numbers: dict[sympy.Basic, Any] = {}

    def number(value: Any, kind: type) -> Any:
        expr = value.node.expr
        known = numbers.get(expr)
        if known is None:
            bound = env.replace(expr).xreplace(bindings)
            if kind is int and isinstance(bound, sympy.Integer):
                known = int(bound)
            elif kind is float and isinstance(bound, sympy.Number):
                known = float(bound)
            elif kind is bool and bound in (sympy.true, sympy.false):
                known = bool(bound)
            else:
                raise _Unbound(str(bound))
            numbers[expr] = known
        return known

    def dims(values) -> list[int]:
        return [number(d, int) if isinstance(d, torch.SymInt) else d for d in values]

    def bound(value: Any) -> Any:
        if isinstance(value, torch.SymInt):
            return number(value, int)
        if isinstance(value, torch.SymFloat):
            return number(value, float)
        if isinstance(value, torch.SymBool):
            return number(value, bool)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return value  # a one-element constant, real as propagation keeps it (its value is read: ``item()``)
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided or value.is_quantized or value.constant is not None:
                raise _Unbound("a tensor of another layout")
            sizes, strides = dims(value.shape), dims(value.stride())
            if any(size < 1 for size in sizes) or any(stride < 0 for stride in strides):
                raise _Unbound("an empty or negative size")
            return _fake(mode, sizes, strides, value.dtype, value.device)
        if isinstance(value, (list, tuple)):
            parts = [bound(v) for v in value]
            try:
                return type(value)(parts)
            except TypeError:  # a named tuple's fields are positional
                raise _Unbound(type(value).__name__) from None
        if value is None or isinstance(value, (int, float, bool, torch.dtype, torch.device)):
            return value
        raise _Unbound(type(value).__name__)

    values: dict[str, Any] = {}
    try:
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if "val" not in node.meta:  # propagation would give it one
                return None
            values[node.name] = bound(node.meta["val"])
    except _Unbound:
        return None
    return values


def described(value: Any, every_stride: bool = True) -> Any:
    """What a node's value says of its shape, comparable with ``==``: a tensor's sizes, strides (without
    ``every_stride``, not those of its dims of size 1, which no index steps over), dtype and device; a list's
    or tuple's items so; anything else itself."""
    if isinstance(value, torch.Tensor):
        strides = tuple(stride if every_stride or size != 1 else None for size, stride in zip(value.shape,
                                                                                               value.stride()))
        return tuple(value.shape), strides, value.dtype, value.device
    if isinstance(value, (list, tuple)):
        return [described(v, every_stride) for v in value]
    return value
