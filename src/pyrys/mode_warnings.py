"""Warnings of what an optimized module computes otherwise than eager's later calls would: writes it drops
(inputs and module state written in place), and a model captured in training mode (:func:`warn_if_training`)."""
from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
import torch.fx as fx

from pyrys.capture.captured import input_writes_note
from pyrys.ir.vocabulary import draws_random_numbers
from pyrys.ir.written import RUNNING_STATS, argument

NORM_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # written in training mode


def in_training(module: Any) -> bool:
    """A module's ``training`` flag; False for a ``torch.jit.freeze``'d script, which has none (freezing
    takes an eval-mode module and inlines its flags)."""
    return bool(getattr(module, "training", False))


def _norm_statistics_in_training(name: str, model: torch.nn.Module | None) -> bool:
    """Whether the state ``name`` is a norm's running statistics its module writes in training mode (batch
    statistics are what it reads then: the writes change no output); without the model (an ExportedProgram, a
    TorchScript import, a capture of other inputs), whether its name says so."""
    owner, _, leaf = name.rpartition(".")
    if leaf not in NORM_STATISTICS:
        return False
    try:
        return model is None or in_training(model.get_submodule(owner))
    except AttributeError:
        return True


def warn_of_writes(optimized, caller_keeps_writes: bool, stacklevel: int = 3, model: torch.nn.Module | None = None,
                   source: str = "pyrys.optimize") -> None:
    """An input written in place changes the caller's tensor in eager and not here, and module state written in
    place (other than a norm's statistics in training mode) changes what eager's later calls read: say so,
    unless the caller (the ``torch.compile`` backend) runs such a model in torch (``source``: who says it)."""
    captured = optimized._first.captured
    if captured.input_writes and not caller_keeps_writes:
        warnings.warn(f"{source}: {input_writes_note(captured.input_writes)}", stacklevel=stacklevel)
    state = [name for name in captured.state_writes if not _norm_statistics_in_training(name, model)]
    if state and not caller_keeps_writes:  # a counter, a cache: eager's later calls read what forward wrote
        warnings.warn(f"{source}: forward writes {', '.join(state)} in place (module state); the optimized "
                      "module never writes it, so every call reads it as it was at optimize, where eager's next "
                      "calls read what forward wrote. torch.compile(model, backend='pyrys') runs such a graph in "
                      "torch", stacklevel=stacklevel)


def warn_if_training(optimized, model: Any, stacklevel: int = 3, frozen_training: bool | None = None) -> None:
    """Where a model captured with modules in training mode computes otherwise than in eval mode, say so: its
    graph's :func:`training_effects`, or a module in training mode whose forward reads ``self.training``
    (:func:`training_readers`).  The model itself in training mode; or, where it is in eval mode, modules of
    it left in training mode whose mode changes what they compute (a batch norm, a dropout, an RReLU, a
    reader; ``model.eval()`` then ``model.bn.train()``), each effect said only where such a module has it (a
    sampling model's ``randn`` is no dropout left in training mode).  ``frozen_training``: the value
    ``pyrys.jit.freeze_flags`` gave every module's flag.  A fresh ``nn.ReLU()``, or a wrapper left in
    training mode around submodules in eval mode, computes alike in both and is not warned of."""
    if frozen_training is False:
        return
    whole = frozen_training or optimized.compiled_training
    modules = [] if whole else _mode_dependent_in_training(model)
    if not whole and not modules:
        return
    effects = training_effects(optimized._first.captured.gm)
    if not whole:
        effects = [effect for effect in effects if effect in {kind for _, kind in modules}]
    readers = training_readers(model)
    if readers:
        effects.append(f"{readers[0]} reads self.training in forward, which the graph captured in that mode")
    if not effects:
        return
    if whole:
        which, fix = "the model is in training mode", "Call model.eval()"
    else:
        names = [name for name, _ in modules]
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        which, fix = f"modules of the model are in training mode ({shown}) though it is in eval mode", \
            "Call model.eval() (it sets every module's mode)"
    warnings.warn(f"pyrys.optimize: {which}; {' and '.join(effects)}. {fix} first for inference.",
                  stacklevel=stacklevel)


_NORM_EFFECT = "BatchNorm uses its batch's statistics and is not folded"
_RANDOM_EFFECT = "dropout (an op drawing random numbers) stays random"
_KIND_BY_CLASS = (("BatchNorm", _NORM_EFFECT), ("SyncBatchNorm", _NORM_EFFECT), ("Dropout", _RANDOM_EFFECT),
                  ("AlphaDropout", _RANDOM_EFFECT), ("FeatureAlphaDropout", _RANDOM_EFFECT), ("RReLU", _RANDOM_EFFECT))


def _mode_dependent_in_training(model: Any) -> list[tuple[str, str]]:
    """``(name, effect)`` of ``model``'s modules in training mode whose mode changes what they compute:
    torch.nn's batch norms, dropouts and RReLU by class (the effect :func:`training_effects` says), and
    the modules :func:`training_readers` names."""
    if not isinstance(model, torch.nn.Module):
        return []
    found = []
    for name, module in model.named_modules():
        if not in_training(module):
            continue
        kind = next((effect for prefix, effect in _KIND_BY_CLASS if _class_name(module).startswith(prefix)),
                    None) if _from_torch_nn(module) else None
        if kind is None and _reads_training(module):
            kind = "reads self.training"
        if kind is not None:
            found.append((name or "the model", kind))
    return found


def warn_if_exported_training(optimized, stacklevel: int = 3) -> None:
    """An ExportedProgram has no mode to read: where its graph holds a batch norm in training mode (exported from a
    model in training mode), the module says ``training`` and warns as :func:`warn_if_training` would (an op
    drawing random numbers may be a sampling model's own: not told apart here)."""
    if _NORM_EFFECT not in training_effects(optimized._first.captured.gm):
        return
    optimized.training = optimized.compiled_training = True
    warnings.warn(f"pyrys.optimize: the ExportedProgram was exported in training mode; {_NORM_EFFECT}. Export the "
                  "model after model.eval() for inference.", UserWarning, stacklevel=stacklevel)


def training_effects(gm: fx.GraphModule) -> list[str]:
    """What a graph captured in training mode computes otherwise than eval mode would, by its ops: a batch
    norm whose training flag is not False, an op drawing random numbers (dropout, drop path, RReLU)."""
    nodes = [node for node in gm.graph.nodes if node.op == "call_function"]
    effects = []
    if any(node.target is torch.ops.aten.batch_norm.default and argument(node, *RUNNING_STATS[node.target][2])
           is not False for node in nodes):
        effects.append(_NORM_EFFECT)
    if any(draws_random_numbers(node) for node in nodes):
        effects.append(_RANDOM_EFFECT)
    return effects


def training_readers(model: Any) -> list[str]:
    """The modules of ``model`` in training mode whose forward reads the mode where its graph may show nothing
    of it (``if self.training:``; an instance norm keeping running statistics): user classes and other
    libraries' by their source (a traced one's is lost: each), torch.nn's instance norms by their running
    statistics (torch.nn's batch norms, dropouts and RNNs: their ops in the graph say it)."""
    readers = []
    for name, module in model.named_modules() if isinstance(model, torch.nn.Module) else ():
        if in_training(module) and _reads_training(module):
            readers.append(f"{name or 'the model'} ({_class_name(module)})")
    return readers


def _class_name(module: torch.nn.Module) -> str:
    return getattr(module, "original_name", None) or type(module).__name__  # (a TorchScript module's own class)


def _from_torch_nn(module: torch.nn.Module) -> bool:
    """A torch.nn class's module (scripted too: by its class name)."""
    if isinstance(module, torch.jit.ScriptModule):
        return hasattr(torch.nn, _class_name(module))
    return type(module).__module__.startswith("torch.nn.")


def _reads_training(module: torch.nn.Module) -> bool:
    name = _class_name(module)
    if name.startswith("InstanceNorm"):  # (a traced one keeps its buffers, not its flags)
        return dict(module.named_buffers(recurse=False)).get("running_mean") is not None
    if _from_torch_nn(module):
        return False
    if isinstance(module, torch.jit.TracedModule):  # its code is the path traced: whether forward read it is lost
        return True
    try:
        source = module.code if isinstance(module, torch.jit.ScriptModule) else inspect.getsource(type(module).forward)
    except (OSError, TypeError, RuntimeError, AttributeError):  # no source (a builtin, a class made by exec)
        return False
    return "training" in source
