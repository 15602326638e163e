"""Freezing: module state becomes constants.

``freeze_params``: a read of a parameter or buffer (``prim::GetAttr[name="conv.weight"]``)
becomes ``prim::Constant[value=<Tensor>]``, a copy of its values now: what pyrys compiles never
reads the model's own bytes, which stay the user's to change.  Selectable by attribute name as in the
seed (``weight``, ``bias``, ``running_mean``, ``running_var``); default: all.

``freeze_flags``: a read of a boolean module flag (``training``) becomes the literal
value the module had when captured, so branches on it vanish under constant
propagation.  Selectable by attribute name; default: all (from ``torch.export`` that is
each module's ``training``, the one flag it leaves in the graph; from TorchScript every
bool attribute the code reads).  A model captured in train mode freezes ``training=True``:
BatchNorm then stays in training form and is not folded (``fold_conv_bn`` says so).

``ALL`` (None) is the one spelling of "everything" for both, in every layer above too.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
import torch.fx as fx

from pyrys.ir.edit import replace_node
from pyrys.ir.graph import FLAGS_READ_KEY, add_constant, replace_with_literal, state_inputs, state_ref
from pyrys.passes.rewrite import PassResult

ALL = None  # freeze every parameter and buffer / every flag


def freeze_params(gm: fx.GraphModule, attributes: Iterable[str] | None = ALL,
                  check: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None) -> PassResult:
    """Replace reads of parameters/buffers whose attribute name is in ``attributes`` (all if None);
    ``check(target, tensor, copy)`` is given each copy made (it raises where the copy holds other weights than those
    the module compiled before: :meth:`pyrys.capture.model_copy.WriteCheck.check_copy`)."""
    wanted = None if attributes is None else set(attributes)
    result = PassResult()
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    copies: dict[int, torch.Tensor] = {}  # a tensor read twice (tied weights) is copied once
    for node in state_inputs(gm.graph):
        ref = state_ref(node)
        if ref.kind == "flag" or (wanted is not None and ref.attribute not in wanted):
            continue
        if id(ref.value) not in copies:
            copies[id(ref.value)] = ref.value.detach().clone()
            if check is not None:
                check(ref.target, ref.value, copies[id(ref.value)])
        _replace_with_constant(gm, node, copies[id(ref.value)], ref.target, first_op)
        result.fired[ref.attribute] += 1
    read = {state_ref(node).attribute for node in state_inputs(gm.graph) if state_ref(node).kind != "flag"}
    read |= set(result.fired)
    _warn_if_none_is_read("freeze_params", wanted, read, "parameter or buffer")
    gm.recompile()
    return result


def freeze_flags(gm: fx.GraphModule, flags: Iterable[str] | None = ALL) -> PassResult:
    """Replace reads of the boolean flags whose attribute name is in ``flags`` (all if None) by their captured value."""
    wanted = None if flags is None else set(flags)
    result = PassResult()
    for node in state_inputs(gm.graph):
        ref = state_ref(node)
        if ref.kind == "flag" and (wanted is None or ref.attribute in wanted):
            replace_with_literal(node, ref.value)
            result.fired[f"{ref.attribute}={ref.value}"] += 1
    read = {state_ref(node).attribute for node in state_inputs(gm.graph) if state_ref(node).kind == "flag"}
    read |= {name.split("=", 1)[0] for name in result.fired} | gm.meta.get(FLAGS_READ_KEY, frozenset())
    _warn_if_none_is_read("freeze_flags", wanted, read, "flag")
    gm.recompile()
    return result


def _warn_if_none_is_read(option: str, wanted: set[str] | None, read: set[str], what: str) -> None:
    """A typo froze nothing: say so; a general list (``running_var`` of an MLP) that froze some is fine."""
    if wanted and read and not wanted & read:
        warnings.warn(f"pyrys: {option} names {sorted(wanted - read)}, which no {what} the model reads has; "
                      f"those it reads are named {sorted(read)}", UserWarning, stacklevel=4)


def _replace_with_constant(gm: fx.GraphModule, node: fx.Node, value: torch.Tensor, target: str,
                           before: fx.Node) -> None:
    with gm.graph.inserting_before(before):
        constant = add_constant(gm, value, target)
    replace_node(node, constant)
