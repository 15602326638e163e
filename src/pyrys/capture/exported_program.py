"""Take a user's ``torch.export.ExportedProgram`` as it is (it is not exported again).

The program is functionalized (``run_decompositions({})`` returns a new program; the
user's is untouched) and turned into pyrys IR by :func:`pyrys.capture.export.from_exported`.
Buffers are copied: a BatchNorm left in training form updates its running statistics
in place, and those must not be the tensors the user's program holds.
"""
from __future__ import annotations

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from pyrys.capture.captured import Captured
from pyrys.capture.export import from_exported, tracing
from pyrys.errors import CaptureError
from pyrys.ir.graph import state_inputs, state_ref
from pyrys.signature import InputError


def capture_exported(ep: ExportedProgram) -> Captured:
    try:
        with tracing(), torch.no_grad():
            functional = ep.run_decompositions({})
    except (AssertionError, RuntimeError) as error:  # torch cannot functionalize it (an input written in place
        raise CaptureError(  # through another it aliases, say)
            "pyrys: torch cannot functionalize this ExportedProgram (ep.run_decompositions({}) fails: "
            f"{str(error).splitlines()[0] if str(error) else type(error).__name__}); export it again from "
            "example inputs in separate memory, or pass the nn.Module") from error
    captured = from_exported(functional, None)
    for node in state_inputs(captured.gm.graph):
        ref = state_ref(node)
        if isinstance(ref.value, torch.Tensor):
            ref.value = ref.value.detach().clone()
    return captured


def exported_example_inputs(ep: ExportedProgram) -> tuple[tuple, dict]:
    """The example inputs recorded in ``ep`` (present when it was made by ``torch.export.export``)."""
    recorded = getattr(ep, "example_inputs", None)
    if recorded is None:
        raise ValueError("pyrys.optimize needs example_inputs for this ExportedProgram: it records none "
                         "(pass example_inputs=(x,) with the shapes it was exported for)")
    args, kwargs = recorded
    return tuple(args), dict(kwargs)


def check_example_inputs(ep: ExportedProgram, args: tuple, kwargs: dict) -> None:
    """``InputError`` where ``args``/``kwargs`` are not inputs ``ep`` was exported for (another size of a dim it
    holds fixed, a size outside a ``Dim``'s range, another structure: torch's own check, as ``ep.module()``
    runs it; another dtype), so that the graph is never run on inputs it was not traced for."""
    from torch.export._unlift import _check_inputs_match

    try:
        flat = _check_inputs_match(args, kwargs, ep.call_spec.in_spec)
        ep._check_input_constraints(flat)
        placeholders = [node for node, spec in zip(ep.graph.find_nodes(op="placeholder"), ep.graph_signature.input_specs)
                        if spec.kind is InputKind.USER_INPUT]
        for position, ((_, value), node) in enumerate(zip(flat, placeholders)):  # torch's check reads shapes only
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and isinstance(value, torch.Tensor) and val.dtype != value.dtype:
                raise TypeError(f"input {position} is {value.dtype}, exported as {val.dtype}")
    except (RuntimeError, ValueError, TypeError) as error:
        why = " ".join(str(error).split()) or type(error).__name__
        raise InputError(f"pyrys.optimize: the example inputs do not fit this ExportedProgram ({why}). Pass inputs "
                         "like those it was exported with (shapes, dtypes), or export it with dynamic_shapes= (torch.export.Dim) "
                         "for the sizes that vary") from None
