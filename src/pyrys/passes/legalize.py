"""Legalize: one spelling of each op before the backends.

Every convolution, transposed convolution and linear nothing was fused into becomes its fused op
with an empty post-op chain (:func:`pyrys.ir.fused.to_fused`), so a backend lowers three ops,
``pyrys::conv``, ``pyrys::conv_transpose`` and ``pyrys::linear``, and reads them by name:

    %conv2d = aten::conv2d(%x, %w, %b, [1, 1], [0, 0], [1, 1], 1)
    ->  %conv2d = pyrys::conv2d(%x, %w, %b, [1, 1], [0, 0], [1, 1], 1)      (the node keeps its name)

A zero pad that only adds to a convolution's input is folded into its padding, begin and end per dim
(TF-style "same" padding, an even kernel's ``padding="same"``; read through an int8 input's quantize pair,
whose zero point is 0, so the pad's zeros are the quantized zeros):

    %p = aten::pad(%x, [0, 1, 0, 1])                  (W: 0 before, 1 after; H: 0 before, 1 after)
    %y = pyrys::conv2d(%p, %w, %b, [2, 2], [0, 0], ..)  ->  %y = pyrys::conv2d(%x, %w, %b, [2, 2], [0, 0, 1, 1], ..)

A convolution with string padding (where its kernel's size is not known) has no fused form and stays as it
is (the dnnl backend runs it through torch).  An unbatched convolution or pooling (``[C, H, W]`` in)
becomes a batch of one between views, the form oneDNN takes; a binary post-op's operand of the output's rank is
batched too (a lower-rank one broadcasts from the right: it reads the same against ``[1, C, H, W]``):

    %y = pyrys::conv2d(%x, ...)  ->  %x_batched = aten::unsqueeze(%x, 0)
                                     %y = pyrys::conv2d(%x_batched, ...)
                                     %y_unbatched = aten::squeeze(%y, [0])   (read where %y was)

This runs after the recorded pipeline
(:func:`pyrys.passes.pipeline.legalize_for_backends`), so ``opt.graph`` keeps ATen's names.
"""
from __future__ import annotations

from dataclasses import replace
from itertools import zip_longest

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from pyrys.ir.edit import insert_op, set_args
from pyrys.ir.fused import (FUSED_BY_BASE, FUSED_CONV, FUSED_CONV_TRANSPOSE, conv_padding, fused_form_miss, read_fused,
                            to_fused)
from pyrys.ir.graph import op_args, tensor_meta
from pyrys.ir.meta import settle_meta
from pyrys.ir.vocabulary import POOLS, ZERO_PADS
from pyrys.passes.rewrite import Match, Miss, PassResult, Rule, apply_rules, fail
from pyrys.passes.precision import CONVERT
from pyrys.quantization import DEQUANTIZE, QUANTIZE

aten = torch.ops.aten


class ToFusedForm(Rule):
    """``aten::conv2d(...)`` -> ``pyrys::conv(..., post_ops=[], post_inputs=[])`` (likewise deconv, linear)."""

    name = "fused_form"
    anchors = frozenset(FUSED_BY_BASE)

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        reason = fused_form_miss(node)
        return fail(reason) if reason else Match({})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        to_fused(gm, node, in_place=True)


def zero_pad(node: object, spatial: int) -> list[int] | None:
    """``node``'s pad (torch's order: last dim first, begin then end) if it pads at most the last ``spatial``
    dims by constant zeros, by amounts known and not negative; else None."""
    if not isinstance(node, fx.Node) or node.target not in ZERO_PADS:
        return None
    args = op_args(node)
    if node.target is aten.pad.default and (args.get("mode", "constant") != "constant" or args.get("value") not in (None, 0)):
        return None
    if node.target is aten.constant_pad_nd.default and args.get("value", 0) != 0:
        return None
    pad = args["pad"]
    if (not isinstance(pad, (list, tuple)) or len(pad) % 2 or len(pad) > 2 * spatial
            or not all(type(p) is int and p >= 0 for p in pad)):
        return None
    return list(pad)


def _zero_keeping(node: fx.Node) -> bool:
    """Whether ``node`` maps its input's zeros to zeros elementwise: a dtype conversion (bf16's), or an int8
    quantize or dequantize with zero point 0."""
    if node.target is CONVERT:
        return True
    return node.target in (QUANTIZE, DEQUANTIZE) and node.args[2] == 0


def _pad_through(source: object) -> tuple[fx.Node | None, list[fx.Node]]:
    """The pad a conv's input comes from, through conversions that keep zeros (:func:`_zero_keeping`), each
    read by the next alone, the last read by convs alone; and those conversions, the pad's reader first."""
    chain = []
    while isinstance(source, fx.Node) and _zero_keeping(source) and isinstance(source.args[0], fx.Node):
        readers = source.users
        if chain and len(readers) != 1 or not chain and not all(_reads_as_input(user, source) for user in readers):
            return None, []
        chain.insert(0, source)
        source = source.args[0]
    return (source if isinstance(source, fx.Node) else None), chain


def _reads_as_input(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` is a fused conv reading ``value`` as its input alone (not as a residual operand)."""
    if node.target is not FUSED_CONV:
        return False
    fused = read_fused(node)
    return fused.args["input"] is value and value not in fused.post_inputs


def _padded(fused, pad: list[int]) -> list[int] | None:
    """The conv's padding (begin, then end, per dim) with ``pad`` added, or None where it is a string."""
    spatial = tensor_meta(fused.args["weight"]).dim() - 2
    if isinstance(fused.args["padding"], str):
        return None
    begin, end = conv_padding(fused.args["padding"], spatial)
    for index in range(len(pad) // 2):  # pad[2i], pad[2i + 1]: the begin and end of the i-th dim from the last
        begin[spatial - 1 - index] += pad[2 * index]
        end[spatial - 1 - index] += pad[2 * index + 1]
    return begin + end


class ZeroPadIntoConv(Rule):
    """``conv(pad(x, p, 0), ..)`` -> ``conv(x, .., padding=begin + end)``: oneDNN pads each side by its own
    amount, and the pad (a torch step) is gone where nothing else reads it.  Through conversions that keep
    zeros (bf16's, int8's quantize pair): ``conv(to(pad(x), bf16))`` -> ``conv(to(x, bf16))``, for every conv
    reading the conversion."""

    name = "zero_pad_into_conv"
    anchors = frozenset({FUSED_CONV})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | Miss | None:
        fused = read_fused(node)
        weight = tensor_meta(fused.args["weight"])
        if weight is None:
            return None
        pad_node, chain = _pad_through(fused.args["input"])
        spatial = weight.dim() - 2
        pad = zero_pad(pad_node, spatial)
        if pad is None:
            return None
        pads = [pad_node]  # a zero pad of a zero pad read by it alone: one pad, their sums
        while (inner := zero_pad(pads[-1].args[0], spatial)) is not None and len(pads[-1].args[0].users) == 1:
            pads.append(pads[-1].args[0])
            pad = [a + b for a, b in zip_longest(pad, inner, fillvalue=0)]
        convs = list(chain[-1].users) if chain else [node]
        paddings = [_padded(read_fused(conv), pad) for conv in convs]
        if any(padding is None for padding in paddings):
            return fail(f"%{node.name}'s padding is a string: the pad %{pad_node.name} stays")
        return Match({"convs": convs, "paddings": paddings, "pads": pads, "chain": chain})

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        pads, chain = match["pads"], match["chain"]
        unpadded = pads[-1].args[0]
        if chain:  # to(pad(x)) -> to(x): the pad's zeros convert to zeros
            chain[0].args = (unpadded, *chain[0].args[1:])
        for conv, padding in zip(match["convs"], match["paddings"]):
            fused = read_fused(conv)
            source = chain[-1] if chain else unpadded
            conv.args = replace(fused, args={**fused.args, "input": source, "padding": padding}).node_args()
        # every argument first, then the values: a conv of the unpadded input with its old padding may not exist
        settle_meta([*chain, *match["convs"]])
        for pad in pads:  # the outer first: each inner one is read by the one before alone
            if not pad.users:
                gm.graph.erase_node(pad)


class BatchOfOne(Rule):
    """An unbatched (transposed) convolution or pooling runs on its input as a batch of one."""

    name = "batch_of_one"
    anchors = frozenset({FUSED_CONV, FUSED_CONV_TRANSPOSE, *POOLS})

    def match(self, gm: fx.GraphModule, node: fx.Node) -> Match | None:
        data = tensor_meta(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if node.target in POOLS:
            unbatched_rank = POOLS[node.target] + 1
        else:
            weight = tensor_meta(read_fused(node).args["weight"])
            unbatched_rank = weight.dim() - 1 if weight is not None else None
        return Match({"rank": data.dim()}) if data is not None and data.dim() == unbatched_rank else None

    def rewrite(self, gm: fx.GraphModule, node: fx.Node, match: Match) -> None:
        data = node.args[0]
        batched = _batch_of(data)
        if batched is None:
            with gm.graph.inserting_before(node):
                batched = insert_op(gm.graph, aten.unsqueeze.default, (data, 0), f"{node.name}_batched")
        if node.target in POOLS:
            with gm.graph.inserting_after(node):
                unbatched = insert_op(gm.graph, aten.squeeze.dims, (node, [0]), f"{node.name}_unbatched")
            node.replace_all_uses_with(unbatched, delete_user_cb=lambda user: user is not unbatched)
            set_args(node, (batched, *node.args[1:]), kwargs=node.kwargs)
            _erase_unread(data)
            return
        fused = read_fused(node)
        operands = []
        for operand in fused.post_inputs:  # batched too where they had the unbatched output's rank
            batched_operand = batched if operand is data else _batch_of(operand)
            val = tensor_meta(operand)
            if batched_operand is None and val is not None and val.dim() == match["rank"]:
                with gm.graph.inserting_before(node):
                    batched_operand = insert_op(gm.graph, aten.unsqueeze.default, (operand, 0),
                                                f"{operand.name}_batched")
            operands.append(batched_operand or operand)
        with gm.graph.inserting_after(node):
            unbatched = insert_op(gm.graph, aten.squeeze.dims, (node, [0]), f"{node.name}_unbatched")
        node.replace_all_uses_with(unbatched, delete_user_cb=lambda user: user is not unbatched)
        set_args(node, replace(fused, args={**fused.args, "input": batched}, post_inputs=tuple(operands)).node_args())
        for dropped in (data, *fused.post_inputs):
            _erase_unread(dropped)


def _erase_unread(node: object) -> None:
    """Erase an earlier batch's squeeze no one reads now."""
    if isinstance(node, fx.Node) and not node.users and _batch_of(node) is not None:
        node.graph.erase_node(node)


def _batch_of(node: object) -> fx.Node | None:
    """The batch of one ``node`` squeezes (``aten::squeeze(%y, [0])`` of a ``%y`` whose first dim is 1:
    an earlier unbatched convolution's), else None: ``unsqueeze(node, 0)`` is that ``%y`` exactly."""
    if not isinstance(node, fx.Node) or node.target is not aten.squeeze.dims or list(node.args[1]) != [0]:
        return None
    source = node.args[0]
    val = tensor_meta(source) if isinstance(source, fx.Node) else None
    return source if val is not None and val.dim() >= 1 and statically_known_true(val.shape[0] == 1) else None


LEGALIZE_RULES: tuple[Rule, ...] = (ToFusedForm(),)
PADDING_RULES: tuple[Rule, ...] = (ZeroPadIntoConv(),)
BATCHING_RULES: tuple[Rule, ...] = (BatchOfOne(),)


def legalize(gm: fx.GraphModule) -> PassResult:
    """Apply :data:`LEGALIZE_RULES` once over the graph, then :data:`PADDING_RULES` and :data:`BATCHING_RULES` on
    their fused forms."""
    result = apply_rules(gm, LEGALIZE_RULES)
    for rules in (PADDING_RULES, BATCHING_RULES):
        later = apply_rules(gm, rules)
        result.fired.update(later.fired)
        result.misses += later.misses
    return result
