"""Post-ops: element-wise work that runs inside a fused op's epilogue.

A fused op carries its post-ops as data: a list of strings, each
``name`` or ``name:p1,p2`` (scalar parameters), applied in order to the op's
result ``y``.  Binary post-ops take their second operand from the fused op's
``post_inputs`` list, in order.  Adding a post-op is adding one row to
``POST_OPS``; the passes and the backends read this table.

    y = conv(x) ; y = relu(y) ; y = y + r ; y = clamp(y, 0, 6)
    ->  post_ops=["relu", "add", "clamp:0.0,6.0"], post_inputs=[r]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PostOpKind:
    """One row of the post-op table: how many tensor operands, and the reference math."""

    name: str
    binary: bool
    reference: Callable[..., torch.Tensor]


def _unary(name: str, fn: Callable[..., torch.Tensor]) -> PostOpKind:
    return PostOpKind(name, False, fn)


def _binary(name: str, fn: Callable[..., torch.Tensor]) -> PostOpKind:
    return PostOpKind(name, True, fn)


POST_OPS: dict[str, PostOpKind] = {
    kind.name: kind
    for kind in (
        _unary("relu", lambda y: torch.relu(y)),
        _unary("clamp", lambda y, lo, hi: torch.clamp(y, lo, hi)),
        _unary("leaky_relu", lambda y, slope: F.leaky_relu(y, slope)),
        _unary("elu", lambda y, alpha: F.elu(y, alpha)),
        _unary("gelu_erf", lambda y: F.gelu(y)),
        _unary("gelu_tanh", lambda y: F.gelu(y, approximate="tanh")),
        _unary("silu", lambda y: F.silu(y)),
        _unary("hardswish", lambda y: F.hardswish(y)),
        _unary("hardsigmoid", lambda y: F.hardsigmoid(y)),
        _unary("sigmoid", lambda y: torch.sigmoid(y)),
        _unary("tanh", lambda y: torch.tanh(y)),
        _unary("mish", lambda y: F.mish(y)),
        _binary("add", lambda y, other: y + other),
        _binary("mul", lambda y, other: y * other),
    )
}


def format_post_op(name: str, *params: float) -> str:
    """``format_post_op("clamp", 0, 6) == "clamp:0.0,6.0"``."""
    if name not in POST_OPS:
        raise KeyError(f"unknown post-op {name!r}; known: {sorted(POST_OPS)}")
    if not params:
        return name
    return name + ":" + ",".join(repr(float(p)) for p in params)


def parse_post_op(spec: str) -> tuple[PostOpKind, tuple[float, ...]]:
    """Inverse of :func:`format_post_op`."""
    name, _, raw = spec.partition(":")
    params = tuple(float(p) for p in raw.split(",")) if raw else ()
    return POST_OPS[name], params


def apply_post_ops(y: torch.Tensor, post_ops: list[str], post_inputs: list[torch.Tensor]) -> torch.Tensor:
    """Reference semantics of a post-op chain."""
    operands = iter(post_inputs)
    for spec in post_ops:
        kind, params = parse_post_op(spec)
        y = kind.reference(y, next(operands)) if kind.binary else kind.reference(y, *params)
    return y
