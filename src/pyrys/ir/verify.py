"""The verifier run after every pass in tests: a broken graph fails here, not later.

Checks: FX well-formedness and topological order (``graph.lint``); every value has a
shape/dtype; constants hold tensors matching their recorded type; ops are ATen/pyrys
op overloads or an If (whose branch graphs pass ``graph.lint`` too); fused ops have one
operand per binary post-op; and the graph's outputs keep the types they had at capture.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from pyrys.ir.control_flow import IF, is_branch
from pyrys.ir.ops import FUSED_OPS
from pyrys.ir.post_ops import parse_post_op


class VerificationError(AssertionError):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise VerificationError(message)


def output_types(gm: fx.GraphModule) -> list[tuple]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return [_type_of(a) for a in output.args[0]]


def _type_of(arg) -> tuple:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else (type(val).__name__,)


def _returns_nothing(node: fx.Node) -> bool:
    """A check such as ``_assert_tensor_metadata``: no value, so nothing to verify."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and not schema.returns


def _verify_node(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.op == "output" or _returns_nothing(node):
        return
    if is_branch(gm, node):
        return _verify_branch(getattr(gm, node.target))
    _check("val" in node.meta, f"%{node.name} has no shape/dtype (meta['val'])")
    if node.op == "get_attr":
        value = getattr(gm, node.target, None)
        _check(isinstance(value, torch.Tensor), f"constant %{node.name} holds no tensor")
        _check(tuple(value.shape) == tuple(node.meta["val"].shape), f"constant %{node.name} changed shape")
    if node.op == "call_function":
        _check(isinstance(node.target, torch._ops.OpOverload) or node.target in (operator.getitem, IF),
               f"%{node.name} calls {node.target!r}, which is not an op overload")
    if node.target in FUSED_OPS:
        post_ops, post_inputs = node.args[-2], node.args[-1]
        binaries = sum(parse_post_op(p)[0].binary for p in post_ops)
        _check(binaries == len(post_inputs), f"%{node.name}: {binaries} binary post-ops but {len(post_inputs)} operands")


def _verify_branch(branch: torch.nn.Module) -> None:
    if isinstance(branch, fx.GraphModule):
        branch.graph.lint()


def make_verifier(expected_outputs: list[tuple]):
    """A verifier that also checks the outputs keep the types recorded at capture."""

    def verify(gm: fx.GraphModule) -> None:
        gm.graph.lint()
        for node in gm.graph.nodes:
            _verify_node(gm, node)
        _check(output_types(gm) == expected_outputs,
               f"outputs changed type: {output_types(gm)} != {expected_outputs}")

    return verify
