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
version counter, address and CRC-32 at ``optimize`` (the CRCs computed on a thread while the
capture runs: zlib releases the GIL; about 0.07 s per 100 MB): if the user wrote to one since (an
in-place update, ``load_state_dict``, ``.data =``, a write through ``.data``, which no version counter
sees), that capture raises :class:`pyrys.ModelChangedError` rather than compile a new shape from
other weights than the shapes compiled before.
"""
from __future__ import annotations

import copy
import itertools
import threading
from typing import Any, Iterable

import torch

from pyrys.errors import CaptureError, ModelChangedError, ModelCopyError
from pyrys.ir.graph import values_crc


MODULE_ADVICE = ("Optimize the model again for its new weights, or call each input shape it is to serve before "
                 "writing them. With dynamic=True, a batch size or sequence length the graph for every shape holds "
                 "is compiled from the weights at optimize, without a capture; this shape needs one (dynamic=None "
                 "captures that graph at the first new shape; another image size or a branch on a size is captured "
                 "apart)")
SCRIPT_ADVICE = "Optimize the module again for its new weights (each shape of a TorchScript module is imported apart)"


class WriteCheck:
    """The version counter, address and CRC-32 of each tensor the copy shares with the user's model."""

    def __init__(self, owner: str, shared: dict[str, torch.Tensor], advice: str = MODULE_ADVICE):
        self.owner, self.shared, self.advice = owner, shared, advice
        self.stamps = {name: _stamp(tensor) for name, tensor in shared.items()}
        self._names = {id(tensor): name for name, tensor in shared.items()}
        self._places = {_place(tensor): name for name, tensor in shared.items()}
        self.digests: dict[str, int | None] = {}
        self._digesting = threading.Thread(target=self._digest_all, name="pyrys-weight-digests", daemon=True)
        self._digesting.start()

    def _digest_all(self) -> None:
        self.digests = {name: values_crc(tensor) for name, tensor in self.shared.items()}

    def wait(self) -> None:
        """Return once the CRCs are recorded (``optimize`` waits: they are the weights at optimize)."""
        self._digesting.join()

    def check(self, digests: bool = True) -> None:
        """Raise :class:`ModelChangedError` if a shared tensor was written since it was recorded: its version
        counter or address moved, or (``digests``) its CRC-32 (a write through ``.data``, which no counter sees)."""
        if digests:
            self.wait()
        for name, tensor in self.shared.items():
            if _stamp(tensor) != self.stamps[name] or (digests and values_crc(tensor) != self.digests[name]):
                raise self._changed(name)

    def check_copy(self, target: str, source: torch.Tensor, copy: torch.Tensor) -> None:
        """Raise :class:`ModelChangedError` if ``copy``, what a compile froze of the shared tensor ``source`` (the
        graph's state ``target``), has other values than it had at ``optimize``: a write undone before the check
        after the compile (``p.data.mul_(2)``, then ``div_(2)``, on another thread) would be in the program,
        though no check sees it.  ``source`` is found by identity, else by the bytes it views, else by name (a
        TorchScript import's state is a copy made as it reads the module)."""
        name = self._names.get(id(source))
        if name is None or self.shared[name] is not source:
            name = self._places.get(_place(source), target if target in self.shared else None)
        if name is not None:
            self.wait()
            if values_crc(copy) != self.digests[name]:
                raise self._changed(name)

    def _changed(self, name: str) -> ModelChangedError:
        return ModelChangedError(
            f"pyrys: {name} of {self.owner} was written after pyrys.optimize (in place, load_state_dict, "
            ".data, ...). The compiled programs hold the weights from optimize, and this new input shape "
            f"would be compiled from the new ones. {self.advice}")


def _place(tensor: torch.Tensor) -> tuple:
    """Where a tensor's values lie and how they are laid out (a view of the same bytes is another place)."""
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def _stamp(tensor: torch.Tensor) -> tuple:
    return tensor._version, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def private_copy(model: torch.nn.Module, frozen: Iterable[str] | None) -> tuple[torch.nn.Module, WriteCheck]:
    """The copy pyrys captures (see the module docstring) and the check of the tensors it shares.

    ``frozen``: the attribute names ``freeze_params`` freezes (None: all; empty when the pass is disabled)."""
    lazy = [name for name, tensor in state_of(model) if torch.nn.parameter.is_lazy(tensor)]
    if lazy:
        raise CaptureError(f"pyrys: {type(model).__name__} has parameters not made yet ({', '.join(lazy[:3])}"
                           f"{', ...' if len(lazy) > 3 else ''}: a lazy module's, such as nn.LazyLinear). Call the "
                           "model once on an example input (model(x)) before optimizing: that makes them (a lazy "
                           "module forward never calls stays unmade: remove it)")
    wanted = None if frozen is None else set(frozen)
    shared = {name: tensor for name, tensor in state_of(model)
              if (wanted is None or name.rpartition(".")[2] in wanted) and not tensor.is_inference()}
    memo = {id(tensor): tensor for tensor in shared.values()}
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as error:
        culprit = _uncopyable_attribute(model)
        where = f" (its attribute {culprit[0]}, a {culprit[1]})" if culprit else ""
        computed = "graph leaves" in str(error)  # a tensor a hook computed with grad (torch.nn.utils.prune's weight)
        remedy = ("That tensor was computed with autograd on (torch.nn.utils.prune computes its weight in a forward "
                  "pre-hook): call the model once under torch.no_grad(), or make the pruning permanent "
                  "(prune.remove(module, 'weight')), before optimizing" if computed else
                  "Make that attribute deep-copyable (give its class a __deepcopy__) or remove it before optimizing")
        raise ModelCopyError(
            f"pyrys: copy.deepcopy cannot copy {type(model).__name__}{where}: {error}. pyrys optimizes a private "
            f"copy so that your model is never modified. {remedy}, or pass an ExportedProgram, which pyrys uses "
            "without copying: pyrys.optimize(torch.export.export(model, (x,)))") from error
    return copied, WriteCheck(type(model).__name__, shared)


def state_of(model: Any) -> Iterable[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of a module, by name (none for a scripted function)."""
    if not hasattr(model, "named_parameters"):
        return ()
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
