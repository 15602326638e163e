"""Ops oneDNN does not run go through torch, on plain-layout tensors.

Inputs in a blocked layout are reordered to plain first; the result is a new torch tensor
each call (a *dynamic* value) whose memory is re-pointed for any oneDNN consumer.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from pyrys.backends.dnnl.builder import Builder, node_text
from pyrys.backends.dnnl.layout import contiguous_strides, plain_md
from pyrys.backends.dnnl.primitives import dnnl_dtype
from pyrys.backends.dnnl.values import DYNAMIC, Value
from pyrys.ir.printer import format_arg, op_name


def _torch_input(builder: Builder, arg):
    """A Value (made plain) for a computed tensor, the tensor for a constant, the literal otherwise."""
    if isinstance(arg, fx.Node):
        constant = builder.constant(arg)
        if constant is not None:
            return constant
        value = builder.value_of(arg)
        return builder.to_plain(value) if value.md is not None else value
    if isinstance(arg, (list, tuple)):
        return type(arg)(_torch_input(builder, a) for a in arg)
    return arg


def _resolver(template):
    """A function producing the call's arguments from ``template`` (Values read their ``current``)."""
    if isinstance(template, Value):
        return lambda: template.current
    if isinstance(template, (list, tuple)) and any(_has_value(t) for t in template):
        parts = [_resolver(t) for t in template]
        kind = type(template)
        return lambda: kind(p() for p in parts)
    return lambda: template


def _has_value(template) -> bool:
    if isinstance(template, Value):
        return True
    return isinstance(template, (list, tuple)) and any(_has_value(t) for t in template)


def _reads(template) -> list[Value]:
    if isinstance(template, Value):
        return [template]
    if isinstance(template, (list, tuple)):
        return [v for t in template for v in _reads(t)]
    return []


def _output_md(meta):
    if not isinstance(meta, torch.Tensor):
        return None
    try:
        dnnl_dtype(meta.dtype)
    except TypeError:
        return None
    return plain_md(meta.shape, meta.dtype, contiguous_strides(meta.shape))


def lower_fallback(builder: Builder, node: fx.Node, reason: str) -> None:
    """Run ``node`` through torch every call."""
    args = [_torch_input(builder, a) for a in node.args]
    kwargs = {k: _torch_input(builder, v) for k, v in node.kwargs.items()}
    arg_fns, kwarg_fns = [_resolver(a) for a in args], {k: _resolver(v) for k, v in kwargs.items()}
    out = builder.define(node, _output_md(node.meta.get("val")), DYNAMIC)
    out.borrows = _reads([args, list(kwargs.values())])  # torch may return a view of an input
    target, has_md = node.target, out.md is not None

    def call() -> None:
        result = target(*[f() for f in arg_fns], **{k: f() for k, f in kwarg_fns.items()})
        if has_md:
            out.bind(result.contiguous())
        else:
            out.current = result

    operands = [format_arg(a) if not isinstance(a, Value) else f"%{a.name}" for a in node.args]
    text = node_text(node, f"torch::{op_name(node).split('::')[-1]}", "", [str(o) for o in operands])
    builder.add_torch(f"{text}  # fallback: {reason}", call, _reads([args, list(kwargs.values())]), [out])
