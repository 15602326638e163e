"""The seed's text form of a graph, stable enough for golden tests.

    graph(%x : Float(1, 3, 8, 8)):
      %conv_weight : Float(32, 3, 3, 3) = prim::Constant[value=<Tensor>]()
      %conv2d : Float(1, 32, 6, 6) = aten::conv2d(%x, %conv_weight, None, [1, 1], [0, 0], [1, 1], 1)
      return (%conv2d)

Unfrozen module state reads print as ``prim::GetAttr[name="bn.running_var"](%self)``;
one-element constants print by value (``prim::Constant[value={10.}]()``); fused ops
print their post-op chain in their name (``pyrys::conv2d_relu``,
``pyrys::conv_transpose2d_relu``, ``pyrys::linear_add_relu``); an If prints its two
branches below it, as TorchScript prints ``prim::If`` (see :func:`format_if`).
"""
from __future__ import annotations

import textwrap
from typing import Any

import torch
import torch.fx as fx

from pyrys.ir.control_flow import IF, RaisingBranch, is_branch
from pyrys.ir.fused import Fused, read_fused
from pyrys.ir.graph import state_ref
from pyrys.ir.symbolic import hint

_DTYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool",
}


def format_tensor_type(shape, dtype: torch.dtype) -> str:
    """``Float(1, 3, 8, 8)``; a symbolic dim prints as the example's value (:func:`pyrys.ir.symbolic.hint`)."""
    return f"{_DTYPE_NAMES.get(dtype, str(dtype))}({', '.join(str(int(hint(s))) for s in shape)})"


def format_type(val: Any) -> str:
    """``Float(1, 3, 8, 8)`` for a tensor, ``bool``/``int``/``float`` for a scalar, ``Tensor`` if unknown."""
    if isinstance(val, torch.Tensor):
        return format_tensor_type(val.shape, val.dtype)
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(format_type(v) for v in val) + ")"
    if isinstance(hint(val), (bool, int, float)):
        return type(hint(val)).__name__
    return "Tensor"


def format_arg(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        return "[" + ", ".join(format_arg(a) for a in arg) + "]"
    if isinstance(arg, str):
        return repr(arg)
    return str(arg)


def op_name(node: fx.Node) -> str:
    """``aten::conv2d``, ``pyrys::fold_weight``, ``pyrys::conv2d_relu``, ``prim::GetItem``."""
    fused = read_fused(node)
    if fused is not None:
        return f"pyrys::{fused.label}"
    if node.target is IF:
        return "pyrys::If"
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.name
    if getattr(node.target, "__name__", "") == "getitem":
        return "prim::TupleIndex"
    return f"python::{getattr(node.target, '__name__', node.target)}"


def _fused_args(fused: Fused) -> str:
    """``(%x, %w, %b, [1, 1], ..., %r)``, after ``[post_ops=['clamp:0.0,6.0']]`` when a post-op has parameters."""
    text = ", ".join(format_arg(a) for a in [*fused.args.values(), *fused.post_inputs])
    with_params = any(p.params for p in fused.post_ops)
    return (f"[post_ops={format_arg([str(p) for p in fused.post_ops])}]" if with_params else "") + f"({text})"


def format_constant(gm: fx.GraphModule, node: fx.Node) -> str:
    value = getattr(gm, node.target)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return f"prim::Constant[value={{{value.item():g}}}]()"
    return "prim::Constant[value=<Tensor>]()"


def format_node(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.target is IF:
        return format_if(gm, node)
    lhs = f"%{node.name} : {format_type(node.meta.get('val'))}"
    if node.op == "get_attr":
        return f"{lhs} = {format_constant(gm, node)}"
    ref = state_ref(node)
    if ref is not None:
        return f'{lhs} = prim::GetAttr[name="{ref.target}"](%self)'
    fused = read_fused(node)
    if fused is not None:
        return f"{lhs} = pyrys::{fused.label}{_fused_args(fused)}"
    args = [format_arg(a) for a in node.args] + [f"{k}={format_arg(v)}" for k, v in node.kwargs.items()]
    return f"{lhs} = {op_name(node)}({', '.join(args)})"


def format_if(gm: fx.GraphModule, node: fx.Node) -> str:
    """An If with its branches indented below it, as TorchScript prints ``prim::If`` blocks::

          %If : (Float(2)) = pyrys::If(%training, [%x])
            block0(%x : Float(2)):
              %mul : Float(2) = aten::mul(%x, 2.0)
              -> (%mul)
            block1():
              prim::RaiseException('expected 4D input')
              -> ()

    Lines after the first carry the indentation of a node in a graph (two spaces).
    """
    cond, then, otherwise, operands = node.args
    head = f"%{node.name} : {format_type(node.meta.get('val'))} = pyrys::If({format_arg(cond)}, {format_arg(operands)})"
    blocks = [_format_block(getattr(gm, branch.target), f"block{i}") for i, branch in enumerate((then, otherwise))]
    return "\n".join([head] + [textwrap.indent(block, "    ") for block in blocks])


def _format_block(branch: torch.nn.Module, name: str) -> str:
    if isinstance(branch, RaisingBranch):
        return f"{name}():\n  prim::RaiseException({branch.message!r})\n  -> ()"
    nodes = list(branch.graph.nodes)
    params = ", ".join(f"%{n.name} : {format_type(n.meta.get('val'))}" for n in nodes if n.op == "placeholder")
    results = ", ".join(format_arg(a) for a in next(n for n in nodes if n.op == "output").args[0])
    body = [f"  {format_node(branch, n)}" for n in nodes if _printed(branch, n)]
    return "\n".join([f"{name}({params}):", *body, f"  -> ({results})"])


def _printed(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A node with a line of its own: a state read, a constant or a call (an If's branches print under it)."""
    return state_ref(node) is not None or node.op in ("get_attr", "call_function") and not is_branch(gm, node)


def format_graph(gm: fx.GraphModule, class_name: str = "Module") -> str:
    """The whole graph in the seed's text form."""
    nodes = list(gm.graph.nodes)
    header = [f"%{n.name} : {format_type(n.meta.get('val'))}" for n in nodes if n.op == "placeholder" and not state_ref(n)]
    if any(state_ref(n) for n in nodes):
        header.insert(0, f"%self : ClassType<{class_name}>")
    body = [f"  {format_node(gm, n)}" for n in nodes if _printed(gm, n)]
    output = next(n for n in nodes if n.op == "output")
    returns = ", ".join(format_arg(a) for a in _flat(output.args[0]))
    return "graph(" + ",\n      ".join(header) + "):\n" + "\n".join(body + [f"  return ({returns})"])


def _flat(value: Any) -> list[Any]:
    return [x for v in value for x in _flat(v)] if isinstance(value, (list, tuple)) else [value]
