"""The model's own outputs on the example inputs: what every pass is measured against.

Nothing of the user's is written while they are computed: an ``nn.Module`` runs with
``torch.func.functional_call`` on pyrys's private copy (:mod:`pyrys.capture.model_copy`)
with every parameter and buffer cloned, so a forward that writes its state (BatchNorm in
training mode, a step counter) writes the clones; an ``ExportedProgram``'s module likewise;
a TorchScript module runs as a deep copy.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.utils._pytree import tree_leaves


def eager_outputs(model: Any, args: tuple, kwargs: dict) -> list:
    """The flat outputs (tensor leaves and scalars, in pytree order) of ``model(*args, **kwargs)``."""
    if isinstance(model, ExportedProgram):
        model = model.module()  # its state is the program's own tensors: cloned below like a module's
    with torch.no_grad():
        if isinstance(model, torch.jit.ScriptModule):
            outputs = copy.deepcopy(model)(*args, **kwargs)
        elif isinstance(model, torch.nn.Module):
            state = {name: tensor.clone() for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
            outputs = torch.func.functional_call(model, state, args, kwargs, tie_weights=True)
        else:  # a scripted function: no state
            outputs = model(*args, **kwargs)
    return [leaf.detach() if isinstance(leaf, torch.Tensor) else leaf for leaf in tree_leaves(outputs)]
