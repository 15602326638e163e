"""pyrys post-ops (``pyrys.ir.post_ops``) as oneDNN post-op chains.

Unary post-ops map to eltwise algorithms (table below).  ``add`` becomes a *sum*
post-op when the residual operand can be overwritten in place (the primitive then
writes into the residual's buffer), else a *binary add*; ``mul`` is a *binary mul*
(per-channel scales broadcast).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils._pytree import tree_leaves

from pyrys.backends.dnnl.builder import Builder, Unsupported
from pyrys.backends.dnnl.constants import AlgKind, FormatTag
from pyrys.backends.dnnl.layout import plain_md
from pyrys.backends.dnnl.primitives import DNNL_TO_TORCH, MemoryDesc, PostOps
from pyrys.backends.dnnl.values import PLANNED, Value
from pyrys.ir.post_ops import parse_post_op

# post-op name -> (algorithm, alpha and beta from the post-op's parameters)
ELTWISE: dict[str, tuple[AlgKind, object]] = {
    "relu": (AlgKind.eltwise_relu, lambda: (0.0, 0.0)),
    "leaky_relu": (AlgKind.eltwise_relu, lambda slope: (slope, 0.0)),
    "clamp": (AlgKind.eltwise_clip, lambda lo, hi: (lo, hi)),
    "elu": (AlgKind.eltwise_elu, lambda alpha: (alpha, 0.0)),
    "gelu_erf": (AlgKind.eltwise_gelu_erf, lambda: (0.0, 0.0)),
    "gelu_tanh": (AlgKind.eltwise_gelu_tanh, lambda: (0.0, 0.0)),
    "silu": (AlgKind.eltwise_swish, lambda: (1.0, 0.0)),
    "hardswish": (AlgKind.eltwise_hardswish, lambda: (1 / 6, 0.5)),
    "hardsigmoid": (AlgKind.eltwise_hardsigmoid, lambda: (1 / 6, 0.5)),
    "sigmoid": (AlgKind.eltwise_logistic, lambda: (0.0, 0.0)),
    "tanh": (AlgKind.eltwise_tanh, lambda: (0.0, 0.0)),
    "mish": (AlgKind.eltwise_mish, lambda: (0.0, 0.0)),
}
BINARY = {"add": AlgKind.binary_add, "mul": AlgKind.binary_mul}


def eltwise_for(spec: str) -> tuple[AlgKind, float, float]:
    kind, params = parse_post_op(spec)
    if kind.name not in ELTWISE:
        raise Unsupported(f"post-op {kind.name} has no oneDNN eltwise")
    alg, read = ELTWISE[kind.name]
    return (alg, *read(*params))


@dataclass
class Chain:
    """A built chain: the oneDNN post-ops, the binary operands by post-op index, the in-place base."""

    post_ops: PostOps
    binary_operands: dict[int, Value] = field(default_factory=dict)
    sum_base: Value | None = None
    names: list[str] = field(default_factory=list)


@dataclass
class Operand:
    """A binary post-op operand: its value, and whether the fused node is its only reader."""

    value: Value
    exclusive: bool


def operand_of(builder: Builder, node) -> Operand:
    """The operand is exclusive when its one user reads it once (``conv(x) + x`` reads ``x`` twice)
    and it is no view of another value (whose other readers would see the overwrite)."""
    (user, *others) = node.users
    reads = sum(1 for arg in tree_leaves((user.args, user.kwargs)) if arg is node)
    value = builder.value_of(node)
    return Operand(value, not others and reads == 1 and value.alias_of is None)


def can_sum_into(operand: Operand, dst_md: MemoryDesc) -> bool:
    """A residual can take the result in place if nothing else reads it and it has the dst layout."""
    return operand.exclusive and operand.value.root.kind == PLANNED and operand.value.md == dst_md


def build_chain(builder: Builder, specs: list[str], operands: list[Operand], dst_md: MemoryDesc,
                allow_sum: bool = True) -> Chain:
    chain = Chain(PostOps())
    pending = iter(operands)
    for spec in specs:
        kind, _ = parse_post_op(spec)
        chain.names.append(kind.name)
        if kind.binary:
            _append_binary(builder, chain, kind.name, next(pending), dst_md, allow_sum)
        else:
            chain.post_ops.append_eltwise(*eltwise_for(spec))
    return chain


def _append_binary(builder: Builder, chain: Chain, name: str, operand: Operand, dst_md: MemoryDesc,
                   allow_sum: bool) -> None:
    if name == "add" and allow_sum and chain.sum_base is None and can_sum_into(operand, dst_md):
        chain.post_ops.append_sum(1.0)
        chain.sum_base = operand.value
        return
    if name not in BINARY:
        raise Unsupported(f"binary post-op {name} has no oneDNN equivalent")
    value = operand.value
    dims = [1] * (dst_md.ndims - value.md.ndims) + list(value.md.dims)
    md = dst_md if tuple(dims) == tuple(dst_md.dims) else _like(dst_md, dims)
    index = chain.post_ops.append_binary(BINARY[name], md)
    chain.binary_operands[index] = builder.convert(value, md)


def _like(dst_md: MemoryDesc, dims: list[int]) -> MemoryDesc:
    """A broadcast operand's descriptor in the destination's layout (plain if the destination is)."""
    tag = dst_md.layout_tag()
    if tag in FormatTag.__members__ and len(dims) == dst_md.ndims:
        return MemoryDesc.from_tag(dims, dst_md.dtype, FormatTag[tag])
    return plain_md(dims, DNNL_TO_TORCH[dst_md.dtype])
