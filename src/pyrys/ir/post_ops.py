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


class NoPostOp(ValueError):
    """An activation with no post-op equivalent (the message says why)."""


def _reads(name: str, *param_names: str) -> Callable[[dict], str]:
    """A reader: the post-op ``name`` with parameters taken from the op's arguments by name."""

    def read(args: dict) -> str:
        params = [args[p] for p in param_names]
        if None in params:
            raise NoPostOp(f"{name} with an open bound has no post-op equivalent")
        return format_post_op(name, *params)

    return read


def _elu(args: dict) -> str:
    if args["scale"] != 1 or args["input_scale"] != 1:
        raise NoPostOp("elu with scale or input_scale has no oneDNN post-op equivalent")
    return format_post_op("elu", args["alpha"])


_aten = torch.ops.aten

# activation op -> its post-op spec, read from the op's arguments (by schema name).  The passes fuse
# these into conv/linear; the dnnl backend runs a standalone one as an eltwise primitive.
ACTIVATIONS: dict[object, Callable[[dict], str]] = {
    _aten.relu.default: _reads("relu"),
    _aten.hardtanh.default: _reads("clamp", "min_val", "max_val"),
    _aten.relu6.default: lambda args: format_post_op("clamp", 0.0, 6.0),
    _aten.clamp.default: _reads("clamp", "min", "max"),
    _aten.leaky_relu.default: _reads("leaky_relu", "negative_slope"),
    _aten.elu.default: _elu,
    _aten.gelu.default: lambda args: "gelu_tanh" if args["approximate"] == "tanh" else "gelu_erf",
    _aten.silu.default: _reads("silu"),
    _aten.hardswish.default: _reads("hardswish"),
    _aten.hardsigmoid.default: _reads("hardsigmoid"),
    _aten.sigmoid.default: _reads("sigmoid"),
    _aten.tanh.default: _reads("tanh"),
    _aten.mish.default: _reads("mish"),
}


def activation_post_op(target, args: dict) -> str:
    """The post-op spec of an activation call; :class:`NoPostOp` with the reason if it has none."""
    return ACTIVATIONS[target](args)
