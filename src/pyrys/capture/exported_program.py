"""Take a user's ``torch.export.ExportedProgram`` as it is (it is not exported again).

The program is functionalized (``run_decompositions({})`` returns a new program; the
user's is untouched) and turned into pyrys IR by :func:`pyrys.capture.export.from_exported`.
Buffers are copied: a BatchNorm left in training form updates its running statistics
in place, and those must not be the tensors the user's program holds.
"""
from __future__ import annotations

import torch
from torch.export import ExportedProgram

from pyrys.capture.captured import Captured
from pyrys.capture.export import from_exported, tracing
from pyrys.errors import CaptureError
from pyrys.ir.graph import state_inputs, state_ref


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
