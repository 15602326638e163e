"""Ops oneDNN does not run go through torch, on plain-layout tensors.

Inputs in a blocked layout are reordered to plain first; the result is a new torch tensor
each call (a *dynamic* value) whose memory is re-pointed for any oneDNN consumer.  The
arguments are a template: constants and literals as they are, computed tensors as
values, read from the calling frame by slot.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from pyrys.backends.dnnl.builder import Builder, node_text
from pyrys.backends.dnnl.frame import Frame
from pyrys.backends.dnnl.layout import contiguous_strides, plain_md
from pyrys.backends.dnnl.int8_dst import COMMUTING, INT8_DTYPES
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH, dnnl_dtype
from pyrys.backends.dnnl.values import DYNAMIC, Value
from pyrys.ir.graph import state_ref
from pyrys.ir.ops import PYTHON_IMPLS
from pyrys.ir.printer import format_arg, op_name


def _torch_input(builder: Builder, arg):
    """A Value (made plain) for a computed tensor, the tensor for a constant, the literal otherwise."""
    if isinstance(arg, fx.Node):
        constant = builder.constant_values(arg)
        if constant is not None:
            return constant
        if state_ref(arg) is not None:
            return state_ref(arg).value  # an unfrozen flag: the captured value
        value = builder.value_of(arg, in_memory=False)
        return builder.to_plain(value) if value.md is not None else value
    if isinstance(arg, (list, tuple)):
        return type(arg)(_torch_input(builder, a) for a in arg)
    return arg


def _operand_text(arg, template) -> str:
    """How the program text names an argument: a computed tensor by the value read (its float32 or plain
    copy, a producer's own where it wrote the converted type), anything else as the graph has it."""
    if isinstance(template, Value):
        return f"%{template.name}"
    if isinstance(arg, (list, tuple)) and isinstance(template, (list, tuple)):
        return "[" + ", ".join(_operand_text(a, t) for a, t in zip(arg, template)) + "]"
    return format_arg(arg)


def _resolver(template, tensors: list) -> Callable[[], Any]:
    """A function producing one argument from ``template``, reading values from ``tensors`` by slot."""
    if isinstance(template, Value):
        slot = template.slot
        return lambda: tensors[slot]
    if isinstance(template, (list, tuple)) and _reads(template):
        parts = [_resolver(t, tensors) for t in template]
        kind = type(template)
        return lambda: kind(p() for p in parts)
    return lambda: template


def _reads(template) -> list[Value]:
    if isinstance(template, Value):
        return [template]
    if isinstance(template, (list, tuple)):
        return [v for t in template for v in _reads(t)]
    return []


def _has_constant(template) -> bool:
    if isinstance(template, torch.Tensor):
        return True
    return isinstance(template, (list, tuple)) and any(_has_constant(t) for t in template)


def _output_md(meta):
    """A plain descriptor for a result oneDNN can read next; None keeps it torch's (rank 0, other dtypes)."""
    if not isinstance(meta, torch.Tensor) or meta.dim() == 0:
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
    reads = _reads([args, list(kwargs.values())])
    meta, md = node.meta.get("val"), _output_md(node.meta.get("val"))
    if node.target in COMMUTING and md is not None and reads and reads[0].md is not None \
            and reads[0].md.dtype in INT8_DTYPES:  # a max pooling of int8 values (int8_dst.py) makes int8
        md = plain_md(meta.shape, DNNL_TO_TORCH[reads[0].md.dtype], contiguous_strides(meta.shape))
    out = builder.define(node, md, DYNAMIC)
    out.borrows = reads  # torch may return a view of an input
    out.reads_constants = _has_constant([args, list(kwargs.values())])
    target, has_md = PYTHON_IMPLS.get(node.target, node.target), out.md is not None  # no dispatch: ir/ops.py

    def bind(frame: Frame) -> Callable[[], None]:
        arg_fns = [_resolver(a, frame.tensors) for a in args]
        kwarg_fns = {k: _resolver(v, frame.tensors) for k, v in kwargs.items()}
        slot, tensors, bind_value = out.slot, frame.tensors, frame.bind

        def call() -> None:
            result = target(*[f() for f in arg_fns], **{k: f() for k, f in kwarg_fns.items()})
            if has_md and isinstance(result, torch.Tensor):
                bind_value(slot, result.contiguous())
            else:
                tensors[slot] = result

        return call

    operands = [_operand_text(a, template) for a, template in zip(node.args, args)]
    text = node_text(node, f"torch::{op_name(node).split('::')[-1]}", "", operands)
    builder.add_torch(f"{text}  # fallback: {reason}", bind, reads, [out])
