"""Fused ops: a convolution, transposed convolution, linear or matrix product and its post-op chain, as one node.

    o = add(relu(conv2d(x, W, b, stride, padding, dilation, groups)), r)
    ==  pyrys::conv(x, W, b, stride, padding, dilation, groups, post_ops=["relu", "add"], post_inputs=[r])

printed ``pyrys::conv2d_relu_add``.  ``FUSED_KINDS`` holds one row per family: the op's name,
the ATen ops it stands for, its own arguments (named and ordered as in ATen) and the base
computation; the ops are registered from it.  :func:`read_fused` is the one reader of a fused
node's arguments, :func:`to_fused` and :func:`add_post_op` are its only writers: nothing else
knows their positions or how a post-op is spelled in the schema.  Before the backends, every
conv, linear and matrix product takes this form (``passes/legalize.py``), so they lower these four ops only.

A fused convolution's ``padding`` is ATen's (one value per spatial dim, or one for all), or, where a zero pad
before it was folded in (``passes/legalize.py``), the begin and end of each dim: ``[b_0, .., b_n-1, e_0, ..,
e_n-1]``, oneDNN's ``padding_l`` and ``padding_r`` (:func:`conv_padding` reads both forms).

A matrix product (``bmm``, ``mm``, ``matmul``) has no weight: both its operands may be computed
(attention's ``q @ k^T`` outside ``scaled_dot_product_attention``); :attr:`FusedKind.weighted` says so.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._decomp import decomposition_table

from pyrys.ir.edit import insert_op, replace_node, set_args
from pyrys.ir.graph import op_args
from pyrys.ir.ops import pyrys_op
from pyrys.ir.post_ops import PostOp, apply_post_ops
from pyrys.ir.vocabulary import CONV_TRANSPOSES, CONVOLUTIONS, LINEARS, MATRIX_PRODUCTS

_CONV_BY_RANK = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_BY_RANK = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_POST_OP_SIGNATURE = "str[] post_ops, Tensor[] post_inputs"


@dataclass(frozen=True)
class FusedKind:
    """One family of fused ops: ``pyrys::<name>(<signature>, post_ops, post_inputs)`` standing for ``bases``."""

    name: str
    bases: frozenset
    signature: str  # its own arguments, as schema text
    compute: Callable[..., torch.Tensor]  # the base op, on those arguments
    ranked: bool = True  # printed with the spatial rank: conv2d, conv_transpose3d
    weighted: bool = True  # its "weight" argument is a constant (conv, linear); False: two activations
    renamed: tuple[tuple[str, str], ...] = ()  # (ATen's argument name, its name here): matmul's "other" is "mat2"

    @property
    def op(self) -> torch._ops.OpOverload:
        return getattr(torch.ops.pyrys, self.name).default

    @property
    def arguments(self) -> tuple[str, ...]:
        """Its own argument names, in order: ``("input", "weight", "bias")`` for linear."""
        return tuple(argument.split()[-1] for argument in self.signature.split(", "))

    def own_args(self, aten_args: dict[str, Any]) -> dict[str, Any]:
        """A base op's arguments (by ATen's schema names) under this kind's names."""
        renamed = dict(self.renamed)
        return {renamed.get(name, name): value for name, value in aten_args.items()}


def conv_padding(padding, spatial: int) -> tuple[list[int], list[int]]:
    """A fused convolution's padding as (begin, end) per spatial dim: ``[1]`` -> ``([1, 1], [1, 1])`` in 2-D,
    ``[1, 2]`` -> ``([1, 2], [1, 2])``, ``[0, 0, 1, 1]`` -> ``([0, 0], [1, 1])``."""
    padding = list(padding)
    if len(padding) == 2 * spatial:
        return padding[:spatial], padding[spatial:]
    padding = padding * spatial if len(padding) == 1 else padding
    return padding, list(padding)


def same_padding(kernel, dilation) -> tuple[list[int], list[int]]:
    """``padding="same"`` (stride 1) as (begin, end) per spatial dim, as torch pads it: ``t = d * (k - 1)`` in
    all, ``t // 2`` at the begin and the rest at the end (one more there for an even kernel)."""
    dilation = list(dilation) * len(kernel) if len(dilation) == 1 else list(dilation)
    totals = [d * (k - 1) for d, k in zip(dilation, kernel)]
    return [t // 2 for t in totals], [t - t // 2 for t in totals]


def string_padded_conv(input, weight, bias=None, stride=(1,), padding="valid", dilation=(1,), groups=1):
    """``aten::conv2d.padding`` and its 1-D/3-D twins spelled with numbers (torch's meta of them fixes symbolic
    sizes at the example's: ``ir/meta.py`` infers them so)."""
    spatial = weight.dim() - 2
    begin, end = same_padding(weight.shape[2:], dilation) if padding == "same" else ([0] * spatial,) * 2
    return _conv(input, weight, bias, stride, begin + end, dilation, groups)


def _conv(input, weight, bias, stride, padding, dilation, groups):
    """Convolution, 1d/2d/3d by the weight's rank; a zero pad first where its two sides differ."""
    spatial = weight.dim() - 2
    begin, end = conv_padding(padding, spatial)
    if begin != end:
        pad = [p for b, e in zip(reversed(begin), reversed(end)) for p in (b, e)]
        input = decomposition_table[torch.ops.aten.constant_pad_nd.default](input, pad, 0)  # symbolic sizes kept
        begin = [0] * spatial
    return _CONV_BY_RANK[spatial](input, weight, bias, stride, begin, dilation, groups)


def _conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation):
    """Transposed convolution, 1d/2d/3d by the weight's rank (ATen's argument order)."""
    fn = _CONV_TRANSPOSE_BY_RANK[weight.dim() - 2]
    return fn(input, weight, bias, stride, padding, output_padding, groups, dilation)


FUSED_KINDS: tuple[FusedKind, ...] = (
    # (sizes as ATen's: a padding or output padding computed from a symbolic length stays that expression, where
    # ``int[]`` took the example's number, unguarded: ``output_size=x.shape[-1:]``, a helper's find)
    FusedKind("conv", CONVOLUTIONS, "Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, SymInt[] padding, "
              "SymInt[] dilation, SymInt groups", _conv),
    FusedKind("conv_transpose", CONV_TRANSPOSES, "Tensor input, Tensor weight, Tensor? bias, SymInt[] stride, "
              "SymInt[] padding, SymInt[] output_padding, SymInt groups, SymInt[] dilation", _conv_transpose),
    FusedKind("linear", LINEARS, "Tensor input, Tensor weight, Tensor? bias", F.linear, ranked=False),
    FusedKind("matmul", MATRIX_PRODUCTS, "Tensor input, Tensor mat2", torch.matmul, ranked=False, weighted=False,
              renamed=(("other", "mat2"),)),
)


_LEAST = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}  # each size's least value


def check_sizes(kind: FusedKind, args: dict[str, Any]) -> None:
    """RuntimeError naming a fused op's size argument that torch's kernels refuse at every call, where its
    fake functions do not all check (dilation 0, an output padding past the stride: a program edited so
    loaded, then failed at each call).  Symbolic values are left to the kernel."""
    for name, least in _LEAST.items():
        if name in args and any(type(v) is int and v < least for v in _values(args[name])):
            raise RuntimeError(f"pyrys::{kind.name}'s {name} must be at least {least}, got {args[name]}")
    if "output_padding" in args and not _output_padding_fits(args):
        raise RuntimeError(f"pyrys::{kind.name}'s output_padding {args['output_padding']} must be smaller than "
                           f"the stride {args['stride']} or the dilation {args['dilation']} in each dim")


def _values(value: Any) -> list:
    """A size argument's values: its list, or the one value it is."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _output_padding_fits(args: dict[str, Any]) -> bool:
    """Each dim's output padding below its stride or its dilation (a single value stands for every dim's)."""
    paddings, strides, dilations = (_values(args[name]) for name in ("output_padding", "stride", "dilation"))
    dims = max(len(paddings), len(strides), len(dilations))
    for padding, stride, dilation in zip(_per_dim(paddings, dims), _per_dim(strides, dims), _per_dim(dilations, dims)):
        if all(type(v) is int for v in (padding, stride, dilation)) and padding >= max(stride, dilation):
            return False
    return True


def _per_dim(values: list, dims: int) -> list:
    """``values`` for ``dims`` dims: one value repeated, else as they are."""
    return values * dims if len(values) == 1 else values


def _register(kind: FusedKind) -> None:
    """``pyrys::<kind.name>``: the base op, then its post-op chain; its fake is the same, its sizes checked."""

    def run(*args):
        *own, post_ops, post_inputs = args
        return apply_post_ops(kind.compute(*own), [PostOp.parse(p) for p in post_ops], post_inputs)

    def fake(*args):
        check_sizes(kind, dict(zip(kind.arguments, args)))
        return run(*args)

    run.__name__ = run.__qualname__ = kind.name
    op = pyrys_op(kind.name, f"({kind.signature}, {_POST_OP_SIGNATURE}) -> Tensor")(run)
    op.register_fake(fake)


for _kind in FUSED_KINDS:
    _register(_kind)

FUSED_BY_OP = {kind.op: kind for kind in FUSED_KINDS}
FUSED_BY_BASE = {base: kind for kind in FUSED_KINDS for base in kind.bases}
FUSED_OPS = frozenset(FUSED_BY_OP)  # every op with a post-op chain
FUSED_CONV = torch.ops.pyrys.conv.default
FUSED_CONV_TRANSPOSE = torch.ops.pyrys.conv_transpose.default
FUSED_LINEAR = torch.ops.pyrys.linear.default
FUSED_MATMUL = torch.ops.pyrys.matmul.default


@dataclass(frozen=True)
class Fused:
    """A fused node read by name: its kind, its own arguments, its post-ops and their tensor operands."""

    kind: FusedKind
    args: dict[str, Any]
    post_ops: tuple[PostOp, ...] = ()
    post_inputs: tuple[fx.Node, ...] = ()

    @property
    def label(self) -> str:
        """``conv2d_relu_add``: the family (with the weight's spatial rank) and the post-op names."""
        base = self.kind.name
        if self.kind.ranked:
            base += f"{self.args['weight'].meta['val'].dim() - 2}d"
        return "_".join([base, *(p.name for p in self.post_ops)])

    def node_args(self) -> tuple:
        """The node's positional arguments: its own, then ``post_ops`` as schema strings, then ``post_inputs``."""
        own = (self.args[name] for name in self.kind.arguments)
        return (*own, [str(p) for p in self.post_ops], list(self.post_inputs))


def read_fused(node: fx.Node) -> Fused | None:
    """``node`` read by name if it calls a fused op, else None; ``ValueError`` saying what is malformed."""
    kind = FUSED_BY_OP.get(node.target)
    if kind is None:
        return None
    names = (*kind.arguments, "post_ops", "post_inputs")
    values = {**dict(zip(names, node.args)), **node.kwargs}
    if len(node.args) > len(names) or set(values) != set(names):
        raise ValueError(f"pyrys::{kind.name} takes ({', '.join(names)}), not {len(node.args)} arguments "
                         f"and {sorted(node.kwargs)}")
    if not isinstance(values["post_ops"], (list, tuple)) or not isinstance(values["post_inputs"], (list, tuple)):
        raise ValueError("post_ops and post_inputs must be lists")
    post_ops = tuple(PostOp.parse(p) for p in values["post_ops"])
    binaries = sum(p.binary for p in post_ops)
    if binaries != len(values["post_inputs"]):
        raise ValueError(f"{binaries} binary post-ops but {len(values['post_inputs'])} operands")
    return Fused(kind, {name: values[name] for name in kind.arguments}, post_ops, tuple(values["post_inputs"]))


def as_fused(node: fx.Node) -> Fused:
    """A fused node read by name, or a base op (``aten::conv2d``, ``aten::bmm``) read as its fused form."""
    fused = read_fused(node)
    if fused is not None:
        return fused
    kind = FUSED_BY_BASE[node.target]
    return Fused(kind, kind.own_args(op_args(node)))


def fused_form_miss(node: fx.Node) -> str | None:
    """Why this conv, transposed conv or linear has no fused form (None if it has one)."""
    if node.target in CONVOLUTIONS and isinstance(op_args(node)["padding"], str):
        return f"conv padding='{op_args(node)['padding']}' is not lowered to explicit padding"
    return None


def to_fused(gm: fx.GraphModule, node: fx.Node, in_place: bool = False) -> fx.Node:
    """``node`` as its fused op with no post-ops: a new node replacing it, or with ``in_place`` the node
    itself, keeping its name (a fused node is returned as it is).

        %y = aten::conv2d(%x, %w, %b, [1, 1], [0, 0], [1, 1], 1)  ->  %y_1 = pyrys::conv2d(<the same arguments>)
    """
    if node.target in FUSED_OPS:
        return node
    args = as_fused(node).node_args()
    kind = FUSED_BY_BASE[node.target]
    if in_place:
        set_args(node, args, kind.op)
        return node
    with gm.graph.inserting_before(node):
        fused = insert_op(gm.graph, kind.op, args, node.name)
    replace_node(node, fused)
    return fused


def add_post_op(node: fx.Node, post_op: PostOp, operand: fx.Node | None = None) -> None:
    """Append ``post_op`` (and its tensor operand, if binary) to a fused node's chain."""
    fused = read_fused(node)
    operands = fused.post_inputs + ((operand,) if post_op.binary else ())
    set_args(node, replace(fused, post_ops=fused.post_ops + (post_op,), post_inputs=operands).node_args())
