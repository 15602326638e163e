"""pyrys's private copy of a user's ``nn.Module``: its modules copied, the weights it freezes shared.

pyrys never modifies the user's model, and it needs the model again after ``optimize`` (the
first call with a new input shape captures it with symbolic sizes).  A deep copy would hold a
second copy of every weight for the optimized module's whole life.  Instead the copy's modules
are new objects (pyrys renames some for torch.export) while the parameters and buffers that
will be frozen are the user's own tensors: freezing takes its own copy of their values
(``passes/freeze.py``), so no program reads the user's bytes.  State left unfrozen
(``freeze_params=`` names) and inference-mode tensors (which keep no version counter) are
deep-copied as before.

A later capture reads the shared tensors again, so :class:`WriteCheck` records each one's
version counter and address at ``optimize``: if the user wrote to one since (an in-place update,
``load_state_dict``, ``.data =``), that capture raises :class:`pyrys.ModelChangedError` rather
than compile a new shape from other weights than the shapes compiled before.
"""
from __future__ import annotations

import copy
import itertools
from typing import Iterable

import torch

from pyrys.errors import ModelChangedError, ModelCopyError


class WriteCheck:
    """The version counter and address of each tensor the copy shares with the user's model."""

    def __init__(self, owner: str, shared: dict[str, torch.Tensor]):
        self.owner, self.shared = owner, shared
        self.recorded = {name: _stamp(tensor) for name, tensor in shared.items()}

    def check(self) -> None:
        """Raise :class:`ModelChangedError` if a shared tensor was written since it was recorded."""
        for name, tensor in self.shared.items():
            if _stamp(tensor) != self.recorded[name]:
                raise ModelChangedError(
                    f"pyrys: {name} of {self.owner} was written after pyrys.optimize (in place: an update, "
                    "load_state_dict, or .data =). The compiled programs hold the weights from optimize, and this "
                    "new input shape would be compiled from the new ones. Optimize the model again for its new "
                    "weights, or pass dynamic=True so that every shape is compiled from the weights at optimize")


def _stamp(tensor: torch.Tensor) -> tuple:
    return tensor._version, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def private_copy(model: torch.nn.Module, frozen: Iterable[str] | None) -> tuple[torch.nn.Module, WriteCheck]:
    """The copy pyrys captures (see the module docstring) and the check of the tensors it shares.

    ``frozen``: the attribute names ``freeze_params`` freezes (None: all)."""
    wanted = None if frozen is None else set(frozen)
    shared = {name: tensor for name, tensor in _state_of(model)
              if (wanted is None or name.rpartition(".")[2] in wanted) and not tensor.is_inference()}
    memo = {id(tensor): tensor for tensor in shared.values()}
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as error:
        culprit = _uncopyable_attribute(model)
        where = f" (its attribute {culprit[0]}, a {culprit[1]})" if culprit else ""
        raise ModelCopyError(
            f"pyrys: copy.deepcopy cannot copy {type(model).__name__}{where}: {error}. pyrys optimizes a private "
            "copy so that your model is never modified. Make that attribute deep-copyable (give its class a "
            "__deepcopy__) or remove it before optimizing, or pass an ExportedProgram, which pyrys uses without "
            "copying: pyrys.optimize(torch.export.export(model, (x,)))") from error
    return copied, WriteCheck(type(model).__name__, shared)


def _state_of(model: torch.nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    return itertools.chain(model.named_parameters(), model.named_buffers())


def _uncopyable_attribute(model: torch.nn.Module) -> tuple[str, str] | None:
    """The path and type name of the first module attribute ``copy.deepcopy`` fails on (None if none alone does)."""
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if name == "_modules":
                continue
            for attribute, item in value.items() if name in ("_parameters", "_buffers") else [(name, value)]:
                try:
                    copy.deepcopy(item)
                except Exception:
                    kind = type(item)
                    return (f"{path}.{attribute}" if path else attribute), f"{kind.__module__}.{kind.__qualname__}"
    return None
