"""torch's fused attention as a step of a dnnl program, where it is measured faster than oneDNN's steps.

The step calls ``torch.nn.functional.scaled_dot_product_attention`` on views of the query, key and value
where they lie (torch's CPU kernel reads strided heads, so a projection's output is not copied) and copies
its result into the node's buffer in the layout its readers want, so that the heads' merge is a view, as
after oneDNN's steps.  A value torch cannot view in a frame's buffers (a call's own tensor, a blocked
layout) is read plain.  Which kernel runs: ``attention_kernels.py``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from pyrys.backends.dnnl import attention_kernels
from pyrys.backends.dnnl.builder import Builder, node_text
from pyrys.backends.dnnl.primitives import MemoryDesc
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH
from pyrys.backends.dnnl.values import PLANNED, Value
from pyrys.ir.printer import format_arg


def instead_if_faster(builder: Builder, node: fx.Node, start: tuple, read: tuple[Value, Value, Value],
                      out_md: MemoryDesc, args: dict, masked: bool) -> None:
    """Where torch's kernel is measurably faster than the oneDNN steps built since ``start`` (a builder
    snapshot), those steps undone and torch's step built instead.  ``read``: the query, key and value;
    ``args``: the node's arguments; ``masked``: whether its mask masks anything."""
    mask = args.get("attn_mask") if masked else None
    constant = None if mask is None else builder.constant_values(mask)
    meta = mask.meta["val"] if isinstance(mask, fx.Node) else None
    kwargs = {"attn_mask": constant, "is_causal": bool(args.get("is_causal")), "scale": args.get("scale")}
    signature = {"query": _layout(read[0].md), "key": _layout(read[1].md), "value": _layout(read[2].md),
                 "output": _layout(out_md), "causal": kwargs["is_causal"],
                 "mask": None if mask is None else [str(meta.dtype), list(meta.shape), constant is not None]}
    timed = dict(kwargs)
    if mask is not None and constant is None:  # computed each call: a mask of its kind for the timing
        timed["attn_mask"] = torch.ones(meta.shape, dtype=meta.dtype) if meta.dtype == torch.bool \
            else torch.zeros(meta.shape, dtype=meta.dtype)
    steps = [step for step in builder.steps[start[0]:] if step.primitive is not None]
    memo, choice = attention_kernels.choose(builder.engine, signature, steps, _timed_call(read, out_md, timed))
    if choice is not None:  # (None: a load of a save that has no choice for it)
        builder.kernel_choices[memo] = choice
    if choice is None or choice.get("kernel") != "torch":  # an unreadable record too: oneDNN's steps
        return
    builder.restore(start, node)
    mask_value = None
    if mask is not None and constant is None:  # a torch tensor each call (boolean: no oneDNN type), else plain
        mask_value = builder.value_of(mask, in_memory=False)
        mask_value = builder.to_plain(mask_value) if mask_value.md is not None else mask_value
    _lower(builder, node, read, out_md, mask_value, kwargs, f"torch's fused attention is faster here "
                                                            f"({choice.get('measured', 'measured before')})")


def _lower(builder: Builder, node: fx.Node, read: tuple[Value, ...], out_md: MemoryDesc, mask: Value | None,
           kwargs: dict, reason: str) -> None:
    q, k, v = (_readable(builder, value) for value in read)
    out = builder.define(node, out_md)
    inputs = [q, k, v] + ([mask] if mask is not None else [])

    causal, scale, constant_mask = kwargs["is_causal"], kwargs["scale"], kwargs["attn_mask"]

    def bind(frame):
        tensors, result = [_tensor(frame, value) for value in inputs], _tensor(frame, out)

        def call() -> None:
            q_t, k_t, v_t, *mask_t = (tensor() for tensor in tensors)
            attention = F.scaled_dot_product_attention(q_t, k_t, v_t, mask_t[0] if mask_t else constant_mask,
                                                       is_causal=causal, scale=scale)
            result().copy_(attention)

        return call

    operands = [f"%{value.name}" for value in (q, k, v)]
    shown = {**kwargs, "attn_mask": mask if mask is not None else kwargs["attn_mask"]}
    operands += [f"{key}={f'%{item.name}' if isinstance(item, Value) else _shown(item)}" for key, item in shown.items()]
    text = node_text(node, "torch::scaled_dot_product_attention", "", operands)
    builder.add_torch(f"{text}  # chosen: {reason}", bind, inputs, [out])


def _readable(builder: Builder, value: Value) -> Value:
    """``value`` where a frame can view it for torch (plain, in the frame's buffers) or where it is a call's
    own plain tensor; else a plain copy."""
    return value if value.root.kind == PLANNED and not value.md.inner_blocks else builder.to_plain(value)


def _tensor(frame, value: Value) -> Callable[[], torch.Tensor]:
    """The current tensor of ``value`` in ``frame``: a view of its buffer, made once; else the call's own
    (an input, an output written into a new tensor each call)."""
    if value.md is not None and value.root.kind == PLANNED:
        view = frame.strided(value)
        return lambda: view
    tensors, slot = frame.tensors, value.slot
    return lambda: tensors[slot]


def _shown(item) -> str:
    return f"Tensor{list(item.shape)}" if isinstance(item, torch.Tensor) else format_arg(item)


def _layout(md: MemoryDesc) -> list:
    return [list(md.dims), list(md.strides), md.dtype.name]


def _timed_call(read: tuple[Value, ...], out_md: MemoryDesc, kwargs: dict) -> Callable[[], None]:
    """One call of the step as the program would make it, on tensors laid out as ``read`` and ``out_md``."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.empty_strided(value.md.dims, value.md.strides, dtype=DNNL_TO_TORCH[value.md.dtype]).copy_(
        torch.randn(value.md.dims, generator=generator)) for value in read)
    out = torch.empty_strided(out_md.dims, out_md.strides, dtype=DNNL_TO_TORCH[out_md.dtype])

    def call() -> None:
        out.copy_(F.scaled_dot_product_attention(q, k, v, **kwargs))

    return call
