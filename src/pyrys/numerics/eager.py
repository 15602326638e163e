"""The model's own outputs on the example inputs: what every pass is measured against.

Nothing of the user's is written, and nothing pyrys compiles either: the model runs as a deep
copy (an ``nn.Module``: pyrys's private copy, copied again with its state, so a forward that
writes its state or its Python attributes, BatchNorm in training mode or a call counter, writes
the copy; an ``ExportedProgram``: its module; a TorchScript module: itself when ``copy.deepcopy``
cannot copy it), on clones of the example inputs (a forward may write its inputs in place).
It runs after the capture (:class:`pyrys.numerics.trace.NumericsTrace` calls it), so a model
that cannot run on these inputs fails there first, with the capture's explanation.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.utils._pytree import tree_leaves, tree_map

from pyrys.calling_context import without_autocast
from pyrys.mode_warnings import in_training


def eager_outputs(model: Any, args: tuple, kwargs: dict) -> list:
    """The flat outputs (tensor leaves and scalars, in pytree order) of ``model(*args, **kwargs)`` (the reference
    a compile is measured against: in float32, whatever the caller's ``torch.autocast``)."""
    if isinstance(model, ExportedProgram):
        model = model.module()
    args, kwargs = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, (args, kwargs))
    with torch.no_grad(), without_autocast():
        outputs = _own_copy(model)(*args, **kwargs)
    return [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in tree_leaves(outputs)]


def _own_copy(model: Any) -> Any:
    """A deep copy of a module to run; a scripted function (no state) or an uncopyable script as it is."""
    if not isinstance(model, torch.nn.Module):
        return model
    try:
        return copy.deepcopy(model)
    except Exception:  # noqa: BLE001 -- a ScriptModule holding something deepcopy refuses
        if isinstance(model, torch.jit.ScriptModule) and not in_training(model):
            return model
        raise
