"""The ways a model comes into pyrys IR: an ``nn.Module``, TorchScript, an ``ExportedProgram``."""
from __future__ import annotations


import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.export import ExportedProgram

from pyrys.capture.captured import Captured
from pyrys.capture.export import capture_module, rename_for_export
from pyrys.capture.model_copy import WriteCheck
from pyrys.capture.exported_program import capture_exported
from pyrys.capture.script_module import script_parameters
from pyrys.capture.torchscript import capture_torchscript


@dataclass
class Frontend:
    """How a model gets into pyrys IR: ``capture(args, kwargs, dynamic)`` for each input signature.

    ``kind`` names the way in (``"nn.Module"``, ``"TorchScript"``, ``"ExportedProgram"``, ``"saved"``);
    ``dynamic`` asks for symbolic sizes, which a way in with ``symbolic`` gives where it can;
    ``fixed_shapes`` says what to do when the source cannot be captured again for a new shape.
    """

    capture: Callable[[tuple, dict, bool], Captured]
    kind: str
    fixed_shapes: str = ""  # empty: a new shape is captured again
    symbolic: bool = False  # torch.export can capture it with symbolic sizes
    parameters: inspect.Signature | None = None  # forward's, to take a call that passes inputs another way
    writes: WriteCheck | None = None  # that the user's weights a capture reads are as at optimize: checked before
    # and after each compile (a write while one ran would have given that shape's program the new weights)


def forward_parameters(forward: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):  # a builtin or C++ forward
        return None


def module_frontend(model: torch.nn.Module, writes: WriteCheck | None = None) -> Frontend:
    """An ``nn.Module``, captured with ``torch.export`` (``model`` is pyrys's private copy, ``writes`` the
    check that the weights it shares with the user's model are as they were: :mod:`pyrys.capture.model_copy`)."""
    renamed = rename_for_export(model)

    def capture(args: tuple, kwargs: dict, dynamic: bool) -> Captured:
        captured = capture_module(model, args, kwargs, dynamic=dynamic)
        captured.notes[:0] = renamed
        return captured

    return Frontend(capture, "nn.Module", symbolic=True, parameters=forward_parameters(model.forward), writes=writes)


def torchscript_frontend(script: Any, flag_values: dict[str, bool] | None = None,
                         writes: WriteCheck | None = None) -> Frontend:
    """A ``ScriptModule`` or scripted function, imported without tracing (state is copied); ``writes``: the
    check that its state is as at optimize (each new shape imports it again)."""
    return Frontend(lambda args, kwargs, dynamic: capture_torchscript(script, args, kwargs, flag_values),
                    "TorchScript", parameters=script_parameters(script), writes=writes)


def exported_program_frontend(ep: ExportedProgram) -> Frontend:
    """A ``torch.export.ExportedProgram``, used as it is (not exported again); its dynamic dims stay symbolic."""
    return Frontend(lambda args, kwargs, dynamic: capture_exported(ep), "ExportedProgram",
                    fixed_shapes="Export it again for these inputs (for another shape, with dynamic_shapes whose Dims hold it)")
