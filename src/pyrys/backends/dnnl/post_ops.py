"""pyrys post-ops (``pyrys.ir.post_ops``) as oneDNN post-op chains.

Unary post-ops map to eltwise steps (table below; relu is two, so that NaN survives it).
``add`` becomes a *sum* post-op when the residual operand can be overwritten in place (the
primitive then writes into the residual's buffer), else a *binary add*; ``mul`` is a
*binary mul* (per-channel scales broadcast).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch.utils._pytree import tree_leaves

from pyrys.backends.dnnl.builder import Builder, Unsupported
from pyrys.backends.dnnl.constants import AlgKind, DataType, FormatTag
from pyrys.backends.dnnl.layout import plain_md
from pyrys.backends.dnnl.primitives import MemoryDesc, PostOps
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH, dnnl_dtype
from pyrys.backends.dnnl.values import PLANNED, Value, broadcast_of
from pyrys.ir.post_ops import PostOp

Eltwise = tuple[AlgKind, float, float]  # one oneDNN eltwise step: algorithm, alpha, beta
FLT_MAX = 3.4028234663852886e38

# oneDNN's relu, clip and hardsigmoid kernels use x86 max/min, which return the bound when y is
# NaN; eager keeps the NaN.  relu is cheap to build so that it keeps NaN: hardswish with
# alpha = FLT_MAX and beta = 0 is y * clamp(FLT_MAX y, 0, 1): y itself for y >= 2^-126 (smaller
# positive y lose digits), 0 * y = -0 for y <= 0, NaN * 0 = NaN, and also -inf * 0 = NaN (eager: 0);
# abs turns -0 into +0.  It costs nothing measurable (ResNet-50 0.99x oneDNN's relu; an elu(0)-based
# form, which also maps -inf to 0, cost 1.09x).  The same trick for clip (clip(y, -inf, hi) sends NaN
# to -inf, the mask turns it back) cost MobileNetV2 1.065x, so clip and hardsigmoid stay oneDNN's;
# a program holding one of these, or the mask (its -inf), checks its inputs instead (UNLIKE_EAGER_ON_NONFINITE,
# runtime.py).
MASK_NEGATIVE: Eltwise = (AlgKind.eltwise_hardswish, FLT_MAX, 0.0)
RELU: list[Eltwise] = [MASK_NEGATIVE, (AlgKind.eltwise_abs, 0.0, 0.0)]
# where the graph may make -inf before it (``log(x).relu()`` at x = 0: NaN, a helper's find): the elu(0) form,
# 0 * (exp(y) - 1) = -0 for y <= 0 (-inf too), NaN kept, made +0 by abs; ~1.09x the mask's time
# (leaky_relu with slope 0 is eager's 0 * y: NaN at -inf, as the mask gives)
RELU_PAST_INFINITY: list[Eltwise] = [(AlgKind.eltwise_elu, 0.0, 0.0), (AlgKind.eltwise_abs, 0.0, 0.0)]


def _leaky_relu(slope: float) -> list[Eltwise]:
    """y if y > 0 else slope * y.  oneDNN's relu with alpha 0 takes its NaN-dropping path; for slope 0
    the mask above is eager's 0 * y exactly (-0, and NaN for -inf)."""
    return [MASK_NEGATIVE] if slope == 0 else [(AlgKind.eltwise_relu, slope, 0.0)]


def _single(alg: AlgKind, alpha: float = 0.0, beta: float = 0.0) -> Callable[..., list[Eltwise]]:
    return lambda: [(alg, alpha, beta)]


# post-op name -> its oneDNN eltwise steps, from the post-op's parameters
ELTWISE: dict[str, Callable[..., list[Eltwise]]] = {
    "relu": lambda: RELU,
    "leaky_relu": _leaky_relu,
    "clamp": lambda lo, hi: [(AlgKind.eltwise_clip, lo, hi)],
    "elu": lambda alpha: [(AlgKind.eltwise_elu, alpha, 0.0)],
    "gelu_erf": _single(AlgKind.eltwise_gelu_erf),
    "gelu_tanh": _single(AlgKind.eltwise_gelu_tanh),
    "silu": _single(AlgKind.eltwise_swish, 1.0),
    "hardswish": _single(AlgKind.eltwise_hardswish, 1 / 6, 0.5),
    "hardsigmoid": _single(AlgKind.eltwise_hardsigmoid, 1 / 6, 0.5),
    "sigmoid": _single(AlgKind.eltwise_logistic),
    "tanh": _single(AlgKind.eltwise_tanh),
    "mish": _single(AlgKind.eltwise_mish),
    "scale": lambda factor: [(AlgKind.eltwise_pow, factor, 1.0)],
    "shift": lambda term: [(AlgKind.eltwise_linear, 1.0, term)],
}
# the post-ops whose oneDNN steps give another result than eager's for a value that is not finite: clip and
# hardsigmoid turn NaN into a number, relu's mask (leaky_relu's with slope 0) turns -inf into NaN
# (tests/backends/dnnl/test_nan.py pins it)
UNLIKE_EAGER_ON_NONFINITE = frozenset({"clamp", "hardsigmoid", "relu", "leaky_relu"})
# of those, the ones that turn NaN into a number: where a NaN may be made inside the graph (``ir/finite.py``),
# the op runs in torch (``lower.py``)
DROPS_NAN = frozenset({"clamp", "hardsigmoid"})
BINARY = {"add": AlgKind.binary_add, "mul": AlgKind.binary_mul}


def eltwise_steps(post_op: PostOp, sees_nonfinite: bool = False) -> list[Eltwise]:
    """The oneDNN eltwise steps of a unary post-op (``PostOp("clamp", (0.0, 6.0))``); ``sees_nonfinite``: its
    input may hold an infinity the graph made (a relu is then :data:`RELU_PAST_INFINITY`)."""
    if post_op.name not in ELTWISE:
        raise Unsupported(f"post-op {post_op.name} has no oneDNN eltwise")
    return RELU_PAST_INFINITY if sees_nonfinite and post_op.name == "relu" else ELTWISE[post_op.name](*post_op.params)


def eltwise_post_ops(steps: list[Eltwise]) -> PostOps:
    post_ops = PostOps()
    for alg, alpha, beta in steps:
        post_ops.append_eltwise(alg, alpha, beta)
    return post_ops


@dataclass
class Chain:
    """A built chain: the oneDNN post-ops, the binary operands by post-op index, the in-place base."""

    post_ops: PostOps
    binary_operands: dict[int, Value] = field(default_factory=dict)
    sum_base: Value | None = None
    names: list[str] = field(default_factory=list)

    @property
    def unlike_eager_on_nonfinite(self) -> bool:
        return not UNLIKE_EAGER_ON_NONFINITE.isdisjoint(self.names)


@dataclass
class Operand:
    """A binary post-op operand: its value, and whether the fused node is its only reader (or its last:
    nothing reads it after); ``scale``: an int8 residual's (``lower_int8.py``), added as ``scale * q``."""

    value: Value | None
    exclusive: bool
    scale: float | None = None
    constant: torch.Tensor | None = None  # a constant operand (no value: packed where the chain says how)
    name: str = ""


def operand_of(builder: Builder, node) -> Operand:
    """The operand is exclusive when its one user reads it once (``conv(x) + x`` reads ``x`` twice)
    and it is no view of another value (whose other readers would see the overwrite)."""
    constant = builder.constant(node)
    if isinstance(constant, torch.Tensor):  # a norm's weight after a residual add (MobileBERT's NoNorm)
        return Operand(None, False, constant=constant, name=node.name)
    (user, *others) = node.users
    reads = sum(1 for arg in tree_leaves((user.args, user.kwargs)) if arg is node)
    value = builder.value_of(node)
    return Operand(value, not others and reads == 1 and value.alias_of is None)


def can_sum_into(operand: Operand, dst_md: MemoryDesc) -> bool:
    """A residual can take the result in place if nothing else reads it and it has the dst layout."""
    return (operand.constant is None and operand.exclusive and operand.value.root.kind == PLANNED
            and operand.value.md == dst_md)


def build_chain(builder: Builder, post_ops: Sequence[PostOp], operands: list[Operand], dst_md: MemoryDesc) -> Chain:
    chain = Chain(PostOps())
    pending = iter(operands)
    for post_op in post_ops:
        chain.names.append(post_op.name)
        if post_op.binary:
            _append_binary(builder, chain, post_op.name, next(pending), dst_md)
        else:
            for alg, alpha, beta in eltwise_steps(post_op, builder.sees_nonfinite):
                chain.post_ops.append_eltwise(alg, alpha, beta)
    return chain


def _append_binary(builder: Builder, chain: Chain, name: str, operand: Operand, dst_md: MemoryDesc) -> None:
    if operand.scale is not None:  # an int8 residual: summed with its scale, in its own buffer or a copy of it
        if name != "add" or chain.sum_base is not None:
            raise Unsupported("an int8 residual is added by one sum post-op")
        dtype = operand.value.md.dtype  # s8 or u8 read as it is, whichever of the two dst is
        base_md = _like(dst_md, list(dst_md.dims), dtype)
        chain.post_ops.append_sum(operand.scale, dtype if dtype != dst_md.dtype else DataType.undef)
        in_place = can_sum_into(operand, base_md)
        chain.sum_base = operand.value if in_place else builder.copy(operand.value, base_md)
        return
    if name == "add" and chain.sum_base is None and can_sum_into(operand, dst_md):
        chain.post_ops.append_sum(1.0)
        chain.sum_base = operand.value
        return
    if name not in BINARY:
        raise Unsupported(f"binary post-op {name} has no oneDNN equivalent")
    if operand.constant is not None:  # packed once, in the destination's layout
        tensor = operand.constant
        dims = [1] * (dst_md.ndims - tensor.dim()) + list(tensor.shape)
        md = _like(dst_md, dims, dnnl_dtype(tensor.dtype))
        index = chain.post_ops.append_binary(BINARY[name], md)
        chain.binary_operands[index] = builder.constant_value(tensor.reshape(dims), md, operand.name)
        return
    value = operand.value
    dims = [1] * (dst_md.ndims - value.md.ndims) + list(value.md.dims)
    same = tuple(dims) == tuple(dst_md.dims) and value.md.dtype == dst_md.dtype
    md = dst_md if same else _like(dst_md, dims, value.md.dtype)  # the operand keeps its data type
    index = chain.post_ops.append_binary(BINARY[name], md)
    chain.binary_operands[index] = builder.convert(_with_rank(builder, value, dims), md)


def _with_rank(builder: Builder, value: Value, dims: list[int]) -> Value:
    """``value`` seen with ``dims`` (its own, with leading 1s): a reorder takes no change of rank."""
    if len(dims) == value.md.ndims:
        return value
    source = builder.to_plain(value) if value.md.inner_blocks else value
    return broadcast_of(source, f"{value.name}.{len(dims)}d", dims)


def _like(dst_md: MemoryDesc, dims: list[int], dtype=None) -> MemoryDesc:
    """A broadcast operand's descriptor in the destination's layout (plain if the destination is), of the
    destination's data type or ``dtype`` (a oneDNN data type)."""
    dtype = dst_md.dtype if dtype is None else dtype
    tag = dst_md.layout_tag()
    if tag in FormatTag.__members__ and len(dims) == dst_md.ndims:
        return MemoryDesc.from_tag(dims, dtype, FormatTag[tag])
    return plain_md(dims, DNNL_TO_TORCH[dtype])
