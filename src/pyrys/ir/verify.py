"""The verifier run after every pass in tests: a broken graph fails here, not later.

Checks, in order: FX well-formedness and topological order (``graph.lint``); every call is an
ATen/pyrys op overload or an If (whose branch graphs pass ``graph.lint`` too); every fused op
reads as one (:func:`pyrys.ir.fused.read_fused`: known post-ops with their parameters, one
operand per binary post-op); every value has a recorded
shape/dtype (``meta["val"]``) and every constant holds a tensor of that shape; the recorded meta
is what a fresh fake-tensor propagation computes (shape, dtype, and the strides of dims longer
than 1), so a pass that records a wrong type fails at that pass; and the graph's outputs keep
the types they had at capture.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from pyrys.ir.control_flow import IF, is_branch
from pyrys.ir.fused import read_fused
from pyrys.ir.meta import fresh_meta, meta_mismatch
from pyrys.ir.printer import op_name
from pyrys.ir.symbolic import dims_key, hint, is_symbolic_scalar_op


class VerificationError(AssertionError):
    pass


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise VerificationError(message)


def output_types(gm: fx.GraphModule) -> list[tuple]:
    """Each output's (dims, dtype), or its Python type."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return [_type_of(a) for a in output.args[0]]


def _in_dtype(types: list[tuple], dtype: torch.dtype) -> list[tuple]:
    """``types`` with every floating-point tensor's dtype ``dtype``."""
    return [(t[0], dtype) if len(t) == 2 and t[1].is_floating_point else t for t in types]


def _type_of(arg) -> tuple:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
    return (dims_key(val.shape), val.dtype) if isinstance(val, torch.Tensor) else (type(hint(val)).__name__,)


def _returns_nothing(node: fx.Node) -> bool:
    """A check such as ``_assert_tensor_metadata``: no value, so nothing to verify."""
    schema = getattr(node.target, "_schema", None)
    return schema is not None and not schema.returns


def _lint(gm: fx.GraphModule) -> None:
    try:
        gm.graph.lint()
    except RuntimeError as error:
        raise VerificationError(f"malformed graph: {error}") from None


def _verify_call(node: fx.Node) -> None:
    _check(isinstance(node.target, torch._ops.OpOverload) or node.target in (operator.getitem, IF)
           or is_symbolic_scalar_op(node.target),
           f"%{node.name} calls {node.target!r}, which is not an op overload")
    try:
        read_fused(node)
    except ValueError as error:
        raise VerificationError(f"%{node.name}: {error}") from None


def _verify_node(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.op == "call_function":
        _verify_call(node)
    if node.op == "output" or _returns_nothing(node):
        return
    if is_branch(gm, node):
        return _verify_branch(getattr(gm, node.target))
    _check("val" in node.meta, f"%{node.name} has no shape/dtype (meta['val'])")
    if node.op == "get_attr":
        value = getattr(gm, node.target, None)
        _check(isinstance(value, torch.Tensor), f"constant %{node.name} holds no tensor")
        _check(tuple(value.shape) == dims_key(node.meta["val"].shape), f"constant %{node.name} changed shape")


def _verify_meta(gm: fx.GraphModule) -> None:
    """Every recorded ``meta["val"]`` against a fresh propagation from the inputs."""
    try:
        fresh = fresh_meta(gm)
    except Exception as error:  # noqa: BLE001 -- any failure of an op on fake tensors is a broken graph
        raise VerificationError(f"shape propagation fails: {error}") from error
    for node, val in fresh.items():
        mismatch = meta_mismatch(node.meta.get("val"), val)
        _check(mismatch is None, f"%{node.name} ({op_name(node)}) records {mismatch}")


def _verify_branch(branch: torch.nn.Module) -> None:
    if isinstance(branch, fx.GraphModule):
        branch.graph.lint()


def make_verifier(expected_outputs: list[tuple], output_dtype: torch.dtype | None = None):
    """A verifier that also checks the outputs keep the types recorded at capture (or, with ``output_dtype``,
    have those types with every floating-point output in ``output_dtype``: once the pass that converts
    them has run)."""
    allowed = [expected_outputs] + ([_in_dtype(expected_outputs, output_dtype)] if output_dtype else [])

    def verify(gm: fx.GraphModule) -> None:
        _lint(gm)
        for node in gm.graph.nodes:
            _verify_node(gm, node)
        _verify_meta(gm)
        _check(output_types(gm) in allowed, f"outputs changed type: {output_types(gm)} != {expected_outputs}")

    return verify
