"""The record every way in returns: a graph in pyrys IR and how to call it like the original.

``torch.export`` (``export.py``), a user's ``ExportedProgram`` (``exported_program.py``) and
TorchScript (``torchscript.py``) each produce a :class:`Captured`; the passes and backends
see only ``gm`` (flat inputs, flat outputs), and the optimized module puts the outputs back
into the model's own structure with ``out_spec``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch.fx as fx
from torch.utils._pytree import TreeSpec

if TYPE_CHECKING:
    from pyrys.ir.output_views import OutputView


@dataclass
class Captured:
    """A captured graph plus what is needed to call it like the original module."""

    gm: fx.GraphModule
    in_spec: TreeSpec
    out_spec: TreeSpec
    class_name: str
    notes: list[str] = field(default_factory=list)  # what capture changed or dropped, for ``opt.report()``
    input_writes: tuple[str, ...] = ()  # the inputs forward writes in place (dropped from ``gm``)
    state_writes: tuple[str, ...] = ()  # the module state it writes (BatchNorm's statistics ...; dropped)
    output_copies: tuple[int, ...] = ()  # flat outputs the passes made share memory eager kept apart
    # (copied at each call: ``ir/output_aliases.py``)
    same_outputs: tuple[tuple[int, int], ...] = ()  # (position, earlier): one tensor at both in eager's result
    output_views: tuple["OutputView", ...] = ()  # outputs made again at each call as views of an input or output (``ir/output_views.py``)
    state_views: tuple[int, ...] = ()  # outputs that are module state or views of it (``output_views.state_views``)
    # the user inputs whose image sizes stay fixed in every capture (``dynamic_shapes.padded_window_inputs``)
    padded_window_inputs: frozenset[int] = frozenset()


def input_writes_note(inputs) -> str:
    """What ``notes`` (and ``pyrys.optimize``'s warning) say of inputs the model's forward writes in place."""
    return (f"input writes dropped: forward writes {', '.join(inputs)} in place; the optimized module returns the "
            "same outputs but leaves the caller's tensors as they were")
