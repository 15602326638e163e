"""Simplify: remove ops that do nothing at inference, and collapse view and permute chains.

No-ops (each a row of :data:`NO_OPS`, replaced by their input):

    dropout(x, p, train=False) -> x            clone(x) -> x   (x already in the asked layout)
    alias(x) / detach(x) -> x                  _to_copy(x, dtype=x.dtype) -> x
    type_as(x, y) -> x   (y of x's dtype)
    expand(x, x.shape) -> x                    _assert_tensor_metadata(x, ...) -> (checked now)
    softmax(x, dim, dtype=x.dtype) -> softmax(x, dim)

The graph is functional (nothing is written in place), so a copy that changes neither
values nor layout is never needed.  A no-op whose input is a graph input or a constant
and whose result is a graph output stays: removing it would hand back the input itself.

Reshapes: a chain of views (:data:`pyrys.ir.vocabulary.VIEWS`: ``view``, ``reshape``, ``flatten``,
``squeeze``, ``unsqueeze``, ``alias``) on a contiguous tensor is one ``view`` to the final shape,
and a view to the shape the tensor already has is removed:

    view(flatten(x, 1), [1, 512]) -> view(x, [1, 512])       view(x, x.shape) -> x

Permutes: ``permute(permute(x, p), q) == permute(x, [p[i] for i in q])``, and a permutation
that is the identity is removed (``transpose(transpose(x, 1, 2), 1, 2) -> x``).

Linears: a matrix product with a constant weight is a linear, in one spelling (HF's ``Conv1D``
in GPT-2 is ``addmm(b, x, W)``; ``x @ W`` is ``matmul`` or ``mm``):

    matmul(x, W) -> linear(x, W^T)      addmm(b, x, W) -> linear(x, W^T, b)     (W^T: a new constant)

and a linear between a view that flattens the leading dims and one that restores them is a
linear of the unflattened input (a linear takes any leading dims):

    view(linear(view(x, [-1, K]), W, b), [*x.shape[:-1], N]) -> linear(x, W, b)

so that it is lowered, folded into and fused like ``nn.Linear``.

Convolutions with string padding are spelled out (``conv2d(x, W, b, s, "same", d, g) -> conv2d(x, W, b, s,
[d * (k - 1) // 2, ...], d, g)``, an even kernel's extra end as a zero pad before it), and a norm training for good reads no running
statistics (it only updates them, in place: an update inference drops).

Activations written out as arithmetic (GPT-2's tanh GELU, the erf GELU, SiLU) are the one op they
compute (:mod:`pyrys.passes.activation_formulas`), so they are fused into the op before them:

    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) -> gelu(x, approximate="tanh")
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from pyrys.ir.edit import insert_op, replace_node, set_args
from pyrys.ir.fused import same_padding
from pyrys.ir.graph import add_constant, constant_value, op_args, tensor_meta
from pyrys.ir.printer import format_arg
from pyrys.ir.symbolic import dims_key, known_contiguous, view_shape
from pyrys.ir.written import RUNNING_STATS, argument
from pyrys.ir.vocabulary import PERMUTES, VIEWS, permutation, single_user
from pyrys.passes.activation_formulas import ActivationFromFormula
from pyrys.passes.attention_formula import AttentionFromFormula
from pyrys.passes.merge_linears import MergeSiblingLinears
from pyrys.passes.product_sums import ProductPlusTerm
from pyrys.passes.rewrite import Match, Miss, PassResult, Rule, apply_rules, fail

aten = torch.ops.aten


# c10::MemoryFormat by number: TorchScript passes ``aten::contiguous``'s memory format as an int
MEMORY_FORMATS = (torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d)


def _layout_kept(x: torch.Tensor, memory_format) -> bool:
    """True if copying ``x`` into ``memory_format`` gives the same strides it has."""
    if isinstance(memory_format, int):
        memory_format = MEMORY_FORMATS[memory_format]
    if memory_format in (None, torch.preserve_format):  # strides kept where dense; where not (a slice, x[:, 0]) the
        return known_contiguous(x)  # copy is contiguous, and a view after it may need that (taken as not kept
        # where unknown: a copy too many)
    if memory_format == torch.contiguous_format:
        return known_contiguous(x)  # no guard: attention's (B, L, H, D) output, transposed, is contiguous for any B
    return x.is_contiguous(memory_format=memory_format)


def _clone_is_no_op(x: torch.Tensor, args: dict) -> bool:
    return _layout_kept(x, args.get("memory_format"))


def _to_is_no_op(x: torch.Tensor, args: dict) -> bool:
    return (args.get("dtype") in (None, x.dtype)
            and args.get("device") in (None, x.device)
            and args.get("layout") in (None, torch.strided)
            and _layout_kept(x, args.get("memory_format")))


def _type_as_is_no_op(x: torch.Tensor, args: dict) -> bool:
    other = tensor_meta(args["other"]) if isinstance(args["other"], fx.Node) else None
    return other is not None and other.dtype == x.dtype and other.device == x.device


def _dropout_is_no_op(x: torch.Tensor, args: dict) -> bool:
    return args["train"] is False


def _expand_is_no_op(x: torch.Tensor, args: dict) -> bool:
    return list(args["size"]) in (list(x.shape), [-1] * x.dim())


def _always(x: torch.Tensor, args: dict) -> bool:
    return True


# op -> (rule name, whether this call changes nothing, given its input's meta and its arguments)
NO_OPS: dict[object, tuple[str, Callable[[torch.Tensor, dict], bool]]] = {
    aten.dropout.default: ("dropout", _dropout_is_no_op),
    aten.feature_dropout.default: ("dropout", _dropout_is_no_op),
    aten.alpha_dropout.default: ("dropout", _dropout_is_no_op),
    aten.alias.default: ("alias", _always),
    aten.detach.default: ("detach", _always),
    aten.clone.default: ("clone", _clone_is_no_op),
    aten.contiguous.default: ("contiguous", _clone_is_no_op),
    aten._to_copy.default: ("to", _to_is_no_op),
    aten.to.dtype: ("to", _to_is_no_op),
    aten.type_as.default: ("type_as", _type_as_is_no_op),
    aten.expand.default: ("expand", _expand_is_no_op),
}


def _returns_own_input(node: fx.Node, source: fx.Node) -> bool:
    """Would removing ``node`` make a graph output be a graph input or a constant itself?"""
    feeds_output = any(user.op == "output" for user in node.users)
    return feeds_output and source.op in ("placeholder", "get_attr")


def _first_input(node: fx.Node) -> fx.Node | None:
    source = node.args[0] if node.args else None
    return source if isinstance(source, fx.Node) and tensor_meta(source) is not None else None


class RemoveNoOp(Rule):
    """``op(x) -> x`` when the op changes neither values nor layout (one rule per row of NO_OPS)."""

    def __init__(self, name: str, target, is_no_op: Callable[[torch.Tensor, dict], bool]):
        self.name = name
        self.anchors = frozenset({target})
        self.is_no_op = is_no_op

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        source = _first_input(node)
        if source is None or not self.is_no_op(tensor_meta(source), op_args(node)):
            return None
        if _returns_own_input(node, source):
            return fail(f"%{node.name} is a graph output: without it the output would be "
                        f"the {'input' if source.op == 'placeholder' else 'constant'} %{source.name} itself")
        return Match({"source": source})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        replace_node(node, match["source"])


def _is_empty(node) -> bool:
    """A tensor with a size of 0 known at compile time (a key-value cache before its first step)."""
    meta = tensor_meta(node) if isinstance(node, fx.Node) else None
    return meta is not None and any(isinstance(size, int) and size == 0 for size in meta.shape)


class ConcatWithoutEmpty(Rule):
    """``cat([empty, x, ...])`` -> ``cat([x, ...])``, and ``cat([x])`` -> ``x``: an empty operand adds no
    element (HF's ``DynamicCache`` joins the first step's keys to an empty cache).  Only where the rest
    have the result's dtype (``cat`` promotes, an empty float64 tensor too)."""

    name = "concat_without_empty"
    anchors = frozenset({aten.cat.default})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        tensors, out = node.args[0], tensor_meta(node)
        kept = [t for t in tensors if not _is_empty(t)]
        if out is None or len(kept) == len(tensors) or not kept or _is_empty(node):
            return None
        if any(tensor_meta(t) is None or tensor_meta(t).dtype != out.dtype for t in kept):
            return None
        if len(kept) == 1 and _returns_own_input(node, kept[0]):
            return None
        return Match({"kept": kept})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        kept = match["kept"]
        if len(kept) == 1:
            return replace_node(node, kept[0])
        with gm.graph.inserting_before(node):
            joined = insert_op(gm.graph, aten.cat.default, (kept, op_args(node)["dim"]), node.name)
        replace_node(node, joined)


class SoftmaxInItsOwnDtype(Rule):
    """``softmax(x, dim, dtype=x.dtype)`` -> ``softmax(x, dim)`` (likewise ``log_softmax``): HF's eager attention
    asks for float32 to keep half-precision models' sums exact; on a float32 ``x`` it changes nothing."""

    name = "softmax_own_dtype"
    anchors = frozenset({aten.softmax.int, aten.log_softmax.int})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        x, args = tensor_meta(node.args[0]), op_args(node)
        if x is None or args.get("dtype") is None or args["dtype"] != x.dtype:
            return None
        return Match({"dim": args["dim"]})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        set_args(node, (node.args[0], match["dim"]))


class RemoveMetadataAssert(Rule):
    """``_assert_tensor_metadata(x, dtype=...)``: checked against the recorded type now, then dropped."""

    name = "assert_metadata"
    anchors = frozenset({aten._assert_tensor_metadata.default})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        x, args = tensor_meta(node.args[0]), op_args(node)
        if x is None:
            return None
        if args.get("dtype") not in (None, x.dtype) or args.get("size") not in (None, list(x.shape)):
            return fail(f"%{node.name} asserts a type that %{node.args[0].name} does not have")
        return Match({})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        gm.graph.erase_node(node)


class CollapseViews(Rule):
    """``view(view(x))`` -> ``view(x)`` (x contiguous); ``view(x, x.shape)`` -> ``x``."""

    name = "view_chain"
    anchors = VIEWS

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        source, out = _first_input(node), tensor_meta(node)
        if source is None or out is None:
            return None
        while source.target in VIEWS and _first_input(source) is not None:
            source = _first_input(source)
        x = tensor_meta(source)
        if not known_contiguous(x):
            return None  # a reshape of it may copy, and later views may rely on that copy
        if dims_key(x.shape) == dims_key(out.shape):
            return None if _returns_own_input(node, source) else Match({"source": source, "shape": None})
        if source is node.args[0]:
            return None
        shape = view_shape(out.shape)
        return None if shape is None else Match({"source": source, "shape": shape})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        replacement = match["source"]
        if match["shape"] is not None:
            with gm.graph.inserting_before(node):
                replacement = insert_op(gm.graph, aten.view.default, (match["source"], match["shape"]), "view")
        replace_node(node, replacement)


class CollapsePermutes(Rule):
    """``permute(permute(x, p), q)`` -> ``permute(x, p∘q)``, or ``x`` when that is the identity."""

    name = "permute_chain"
    anchors = PERMUTES

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        inner = _first_input(node)
        if inner is None or inner.target not in PERMUTES or tensor_meta(node) is None:
            return None
        p, q = permutation(inner), permutation(node)
        order = [p[i] for i in q]
        source = inner.args[0]
        if order == sorted(order) and _returns_own_input(node, source):
            return None
        return Match({"source": source, "order": order})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        replacement, order = match["source"], match["order"]
        if order != sorted(order):
            with gm.graph.inserting_before(node):
                replacement = insert_op(gm.graph, aten.permute.default, (match["source"], order), "permute")
        replace_node(node, replacement)


# op -> the schema names of its (input, weight, bias): each computes input @ weight (+ bias)
PRODUCT_ARGUMENTS = {aten.mm.default: ("input", "mat2", None), aten.matmul.default: ("input", "other", None),
                   aten.addmm.default: ("mat1", "mat2", "input")}


class LinearFromMatmul(Rule):
    """``x @ W`` (``mm``, ``matmul``) -> ``linear(x, W^T)``, ``addmm(b, x, W)`` -> ``linear(x, W^T, b)``
    (W a constant matrix, b a constant vector over W's columns, ``beta = alpha = 1``)."""

    name = "linear_from_matmul"
    anchors = frozenset(PRODUCT_ARGUMENTS)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        args = op_args(node)
        x_name, weight_name, bias_name = PRODUCT_ARGUMENTS[node.target]
        weight = args[weight_name]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or tensor_meta(weight) is None:
            return None  # a product of two computed tensors (attention's q @ k^T): not a linear, not a miss
        if tensor_meta(weight).dim() != 2:
            return fail(f"the weight %{weight.name} is not a matrix")
        columns, bias = tensor_meta(weight).shape[1], args[bias_name] if bias_name else None
        if bias_name is not None:
            if args.get("beta", 1) != 1 or args.get("alpha", 1) != 1:
                return fail("addmm scales by beta or alpha")
            meta = tensor_meta(bias) if isinstance(bias, fx.Node) and bias.op == "get_attr" else None
            if meta is None or tuple(meta.shape) != (columns,):
                return fail(f"the bias {format_arg(bias)} is not a constant vector of {columns}")
        return Match({"x": args[x_name], "weight": weight, "bias": bias})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        weight = match["weight"]
        with gm.graph.inserting_before(node):
            transposed = add_constant(gm, constant_value(gm, weight).t().contiguous(), f"{weight.target}_t")
            bias = () if match["bias"] is None else (match["bias"],)
            linear = insert_op(gm.graph, aten.linear.default, (match["x"], transposed, *bias), "linear")
        replace_node(node, linear)


class LinearOfFlattened(Rule):
    """``view(linear(view(x, [-1, K]), W, b), [*x.shape[:-m], N])`` -> ``linear(flatten(x, -m), W, b)``, where
    x's last m dims hold K values (m = 1: no flatten): a linear reads the leading dims as rows itself (HF's
    ``Conv1D`` flattens them around its ``addmm``; GPT-2's attention output projection reads the heads merged
    back, ``(B, T, H, D)``), and its post-ops (the residual add after it) can then be fused."""

    name = "linear_of_flattened"
    anchors = VIEWS

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        linear = _first_input(node)
        if linear is None or linear.target is not aten.linear.default or not single_user(linear):
            return None
        flat = linear.args[0]
        if not isinstance(flat, fx.Node) or flat.target not in VIEWS or _first_input(flat) is None:
            return None
        x, rows, out = tensor_meta(_first_input(flat)), tensor_meta(flat), tensor_meta(node)
        if out is None or rows is None or rows.dim() != 2 or x.dim() < 2:
            return None
        merged = _trailing_dims_holding(x.shape, rows.shape[1])
        if merged is None or dims_key(out.shape) != dims_key([*x.shape[:-merged], tensor_meta(linear).shape[-1]]):
            return None
        return Match({"x": _first_input(flat), "linear": linear, "merged": merged})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        linear, x, merged = match["linear"], match["x"], match["merged"]
        with gm.graph.inserting_before(node):
            if merged > 1:
                rank = tensor_meta(x).dim()
                x = insert_op(gm.graph, aten.flatten.using_ints, (x, rank - merged, rank - 1), "flatten")
            unflattened = insert_op(gm.graph, aten.linear.default, (x, *linear.args[1:]), "linear")
        replace_node(node, unflattened)


def _trailing_dims_holding(shape, count) -> int | None:
    """How many of ``shape``'s last dims (static, leaving one in front) hold ``count`` values; None if none do."""
    if isinstance(count, torch.SymInt):
        return None
    held = 1
    for merged, size in enumerate(reversed(shape[1:]), start=1):
        if isinstance(size, torch.SymInt):
            return None
        held *= size
        if held == count:
            return merged
        if held > count:
            return None
    return None


STRING_PADDED = {aten.conv1d.padding: aten.conv1d.default, aten.conv2d.padding: aten.conv2d.default,
                 aten.conv3d.padding: aten.conv3d.default}


class ExplicitConvPadding(Rule):
    """``conv2d(x, W, b, stride, "valid" | "same", dilation, groups)`` -> ``conv2d(x, W, b, stride, p, dilation,
    groups)``, the form every backend lowers: "valid" is ``p = 0``; "same" (stride 1) pads each spatial dim by
    ``t = dilation * (k - 1)`` in all, ``p = t // 2`` on each side and, where ``t`` is odd (an even kernel), one
    more at the end, as torch does: ``conv2d(pad(x, [0, 1, 0, 1]), W, b, stride, p, ..)`` (legalize folds the
    pad into the conv's padding)."""

    name = "explicit_conv_padding"
    anchors = frozenset(STRING_PADDED)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        args = op_args(node)
        weight = tensor_meta(args["weight"]) if isinstance(args["weight"], fx.Node) else None
        if weight is None or not all(isinstance(k, int) for k in weight.shape[2:]):
            return None
        spatial = weight.dim() - 2
        dilation = list(args.get("dilation", [1] * spatial))
        dilation = dilation * spatial if len(dilation) == 1 else dilation
        if args.get("padding", "valid") == "valid":
            return Match({"padding": [0] * spatial})
        begin, end = same_padding(weight.shape[2:], dilation)
        return Match({"padding": begin, "odd": [e - b for b, e in zip(begin, end)]})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        args = op_args(node)
        spatial = len(match["padding"])
        source = args["input"]
        if any(match.bindings.get("odd", ())):  # one more at the end: [0, odd_w, 0, odd_h, ..], last dim first
            with gm.graph.inserting_before(node):
                source = insert_op(gm.graph, aten.constant_pad_nd.default,
                                   (source, [p for odd in reversed(match["odd"]) for p in (0, odd)]), f"{node.name}_pad")
        set_args(node, (source, args["weight"], args.get("bias"), list(args.get("stride", [1] * spatial)),
                        match["padding"], list(args.get("dilation", [1] * spatial)), args.get("groups", 1)),
                 target=STRING_PADDED[node.target])


class TrainingNormWithoutStats(Rule):
    """``batch_norm(x, w, b, mean, var, training=True, ...)`` -> ``batch_norm(x, w, b, None, None, True, ...)``
    (likewise ``instance_norm``): in training a norm normalizes by its input's own statistics and only
    updates the running ones in place (:mod:`pyrys.ir.written`), an update inference drops; without
    them a call writes nothing.  Not where another op reads them (it reads what the update wrote)."""

    name = "training_norm_stats"
    anchors = frozenset(RUNNING_STATS)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        mean, var, training = RUNNING_STATS[node.target]
        stats = [argument(node, *stat) for stat in (mean, var)]
        if argument(node, *training) is not True or stats == [None, None]:
            return None
        read = [s for s in stats if isinstance(s, fx.Node) and set(s.users) != {node}]
        if read:
            return fail(f"%{read[0].name} is read by another op too: it reads the value the update writes")
        return Match({"stats": (mean, var)})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        args, kwargs = list(node.args), dict(node.kwargs)
        for position, name in match["stats"]:
            if position < len(args):
                args[position] = None
            else:
                kwargs[name] = None
        set_args(node, tuple(args), kwargs=kwargs)


SIMPLIFY_RULES: tuple[Rule, ...] = (
    tuple(RemoveNoOp(name, target, check) for target, (name, check) in NO_OPS.items())
    + (ConcatWithoutEmpty(), SoftmaxInItsOwnDtype(), RemoveMetadataAssert(), CollapseViews(), CollapsePermutes(),
       LinearFromMatmul(), ProductPlusTerm(), LinearOfFlattened(), ActivationFromFormula(), AttentionFromFormula(),
       MergeSiblingLinears(), TrainingNormWithoutStats(), ExplicitConvPadding())
)


def simplify(gm: fx.GraphModule) -> PassResult:
    """Apply :data:`SIMPLIFY_RULES` once over the graph (the pass manager repeats it to a fixed point)."""
    return apply_rules(gm, SIMPLIFY_RULES)
