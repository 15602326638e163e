"""Post-ops: element-wise work that runs inside a fused op's epilogue.

A fused op carries its post-ops as data, applied in order to the op's result ``y``:
each is a :class:`PostOp` (a name from ``POST_OPS`` and its scalar parameters); a
binary post-op takes its second operand from the fused op's ``post_inputs``, in order.
Adding a post-op is adding one row to ``POST_OPS`` (and, if an activation op should
fuse into it, one row to ``ACTIVATIONS``); the passes and the backends read these tables.

    y = conv(x) ; y = relu(y) ; y = y + r ; y = clamp(y, 0, 6)
    ->  post_ops=[PostOp("relu"), PostOp("add"), PostOp("clamp", (0.0, 6.0))], post_inputs=[r]

In the op's schema (``str[] post_ops``) a post-op is written ``name`` or ``name:p1,p2``
(``"clamp:0.0,6.0"``); :meth:`PostOp.parse` and ``str(post_op)`` are the only code that
reads or writes that form.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PostOpKind:
    """One row of the post-op table: how many tensor operands, and the reference math."""

    name: str
    binary: bool
    reference: Callable[..., torch.Tensor]

    @property
    def arity(self) -> int:
        """How many scalar parameters it takes (the reference's arguments after ``y``)."""
        return 0 if self.binary else len(inspect.signature(self.reference).parameters) - 1


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
        _unary("scale", lambda y, factor: y * factor),  # a product's scalar factor (attention's 1/sqrt(d))
        _unary("shift", lambda y, term: y + term),
        _binary("add", lambda y, other: y + other),
        _binary("mul", lambda y, other: y * other),
    )
}


@dataclass(frozen=True)
class PostOp:
    """One step of a post-op chain: ``PostOp("clamp", (0.0, 6.0))``, written ``"clamp:0.0,6.0"``."""

    name: str
    params: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in POST_OPS:
            raise ValueError(f"unknown post-op {self.name!r}; known: {sorted(POST_OPS)}")
        if len(self.params) != POST_OPS[self.name].arity:
            raise ValueError(f"{self.name} takes {POST_OPS[self.name].arity} parameters, not {len(self.params)}")
        object.__setattr__(self, "params", tuple(float(p) for p in self.params))

    @property
    def binary(self) -> bool:
        """True if it takes a second tensor operand (``add``, ``mul``)."""
        return POST_OPS[self.name].binary

    def apply(self, y: torch.Tensor, operand: torch.Tensor | None = None) -> torch.Tensor:
        """The reference math: ``kind(y, *params)``, or ``kind(y, operand)`` for a binary post-op."""
        return POST_OPS[self.name].reference(y, *((operand,) if self.binary else self.params))

    def __str__(self) -> str:
        return self.name + (":" + ",".join(repr(p) for p in self.params) if self.params else "")

    @staticmethod
    def parse(spec: str) -> "PostOp":
        """Inverse of ``str``: ``PostOp.parse("clamp:0.0,6.0") == PostOp("clamp", (0.0, 6.0))``."""
        if not isinstance(spec, str):
            raise ValueError(f"a post-op is written as a string, not {spec!r}")
        name, _, raw = spec.partition(":")
        try:
            return PostOp(name, tuple(float(p) for p in raw.split(",")) if raw else ())
        except ValueError as error:
            raise ValueError(f"malformed post-op {spec!r}: {error}") from None




def apply_post_ops(y: torch.Tensor, post_ops: Sequence[PostOp], post_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Reference semantics of a post-op chain."""
    operands = iter(post_inputs)
    for post_op in post_ops:
        y = post_op.apply(y, next(operands)) if post_op.binary else post_op.apply(y)
    return y


class NoPostOp(ValueError):
    """An activation with no post-op equivalent (the message says why)."""


def _reads(name: str, *param_names: str) -> Callable[[dict], PostOp]:
    """A reader: the post-op ``name`` with parameters taken from the op's arguments by name."""

    def read(args: dict) -> PostOp:
        params = [args[p] for p in param_names]
        if None in params:
            raise NoPostOp(f"{name} with an open bound has no post-op equivalent")
        return PostOp(name, tuple(params))

    return read


def _clamp(low: str, high: str) -> Callable[[dict], PostOp]:
    """A reader of a clamp's bounds, either of which may be open (None: -inf or inf); ``clamp(min=0)`` is a relu."""
    def read(args: dict) -> PostOp:
        lo, hi = args[low], args[high]
        if lo is None and hi is None:
            raise NoPostOp("clamp with no bound has no post-op equivalent")
        if lo == 0 and hi is None:
            return PostOp("relu")
        return PostOp("clamp", (-math.inf if lo is None else lo, math.inf if hi is None else hi))

    return read


def _elu(args: dict) -> PostOp:
    if args["scale"] != 1 or args["input_scale"] != 1:
        raise NoPostOp("elu with scale or input_scale has no oneDNN post-op equivalent")
    return PostOp("elu", (args["alpha"],))


_aten = torch.ops.aten

# activation op -> its post-op, read from the op's arguments (by schema name).  The passes fuse
# these into conv/linear; the dnnl backend runs a standalone one as an eltwise primitive.
ACTIVATIONS: dict[object, Callable[[dict], PostOp]] = {
    _aten.relu.default: _reads("relu"),
    _aten.hardtanh.default: _clamp("min_val", "max_val"),
    _aten.relu6.default: lambda args: PostOp("clamp", (0.0, 6.0)),
    _aten.clamp.default: _clamp("min", "max"),
    _aten.leaky_relu.default: _reads("leaky_relu", "negative_slope"),
    _aten.elu.default: _elu,
    _aten.gelu.default: lambda args: PostOp("gelu_tanh" if args["approximate"] == "tanh" else "gelu_erf"),
    _aten.silu.default: _reads("silu"),
    _aten.hardswish.default: _reads("hardswish"),
    _aten.hardsigmoid.default: _reads("hardsigmoid"),
    _aten.sigmoid.default: _reads("sigmoid"),
    _aten.tanh.default: _reads("tanh"),
    _aten.mish.default: _reads("mish"),
}


def activation_post_op(target, args: dict) -> PostOp:
    """The post-op of an activation call; :class:`NoPostOp` with the reason if it has none."""
    return ACTIVATIONS[target](args)


FLOAT32_MAX = torch.finfo(torch.float32).max


def is_float32_factor(c: float) -> bool:
    """Whether ``y * c`` can run as a float32 multiply by ``c``: ``c`` and its float32 value finite and not 0
    (0 would give ``+0`` for eager's ``-0`` beside a negative ``y``, and a rounding to 0 or inf changes it)."""
    return math.isfinite(c) and c != 0 and 0 < abs(c) <= FLOAT32_MAX and as_float32(c) != 0


def as_float32(c: float) -> float:
    """``c`` as torch's float32 kernels read a Python number."""
    return float(torch.tensor(float(c), dtype=torch.float32))


def as_read_by(c: float, dtype: torch.dtype) -> float:
    """``c`` as torch's kernels for ``dtype`` read a Python number: as it is for float64, as float32 for
    float32 and the types computed in float32 (bfloat16, float16)."""
    return float(c) if dtype == torch.float64 else as_float32(c)


def _is_factor(c: float, dtype: torch.dtype) -> bool:
    """:func:`is_float32_factor`, or for float64 a finite factor other than 0."""
    return math.isfinite(c) and c != 0 if dtype == torch.float64 else is_float32_factor(c)


# ``y op c`` for a number ``c``: op -> its name (the passes fuse it as a scale or shift post-op; the dnnl
# backend runs a standalone one as that post-op's eltwise step)
SCALAR_OPS = {_aten.mul.Tensor: "mul", _aten.div.Tensor: "div", _aten.add.Tensor: "add", _aten.sub.Tensor: "sub"}


def scalar_post_op(target, c: float, dtype: torch.dtype = torch.float32) -> "PostOp | str":
    """``y op c`` (``target`` in :data:`SCALAR_OPS`, ``y`` of ``dtype``) as one scale or shift post-op, or why
    it has none.

    ``c`` is read as eager reads it (:func:`as_read_by`: ``x / 1e39`` divides a float32 ``x`` by inf; a
    float64 ``x`` is scaled by ``c`` itself).  A divisor becomes the factor ``1 / c``.  A factor of 0 or
    beyond float32 (float64's range for a float64 ``y``) stays an op; so does a term that is 0 as read:
    ``y + 0`` and ``y - 0`` differ only at ``-0``, which oneDNN's primitive cache does not tell from ``+0``
    (a program for ``x - 1e-46`` reused the one built for ``x + 1e-46``)."""
    op, value = SCALAR_OPS[target], as_read_by(c, dtype)
    if op in ("mul", "div"):
        factor = value if op == "mul" else (1.0 / value if value != 0 and math.isfinite(value) else 0.0)
        if not _is_factor(factor, dtype):
            return f"{op} by {c!r}: a factor of 0 or beyond {_range_of(dtype)} (torch computes it)"
        return PostOp("scale", (factor,))
    if value == 0:
        return f"{op} of {c!r}: a term of 0 in {_range_of(dtype)} (torch computes it)"
    return PostOp("shift", (value if op == "add" else -value,))


def _range_of(dtype: torch.dtype) -> str:
    return "float64" if dtype == torch.float64 else "float32"
