"""What a scripted module or function offers before its graph is read: the tensors it holds, ``forward``'s
parameters and their defaults (from its schema), its class name."""
from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch


def is_torchscript(obj: Any) -> bool:
    return isinstance(obj, (torch.jit.ScriptModule, torch.jit.ScriptFunction))


def _forward_arguments(obj: Any) -> list | None:
    """``forward``'s schema arguments (a scripted function's own), without ``self``; None where unknown."""
    try:
        return list(obj.forward.schema.arguments[1:] if isinstance(obj, torch.jit.ScriptModule) else obj.schema.arguments)
    except (AttributeError, RuntimeError):
        return None


def script_tensors(obj: Any) -> dict[str, torch.Tensor]:
    """Every tensor a scripted module holds, by name: its parameters and buffers, and tensor attributes that
    are neither (``self.t = torch.randn(8)``), which its forward reads alike (none for a scripted function)."""
    tensors = {}
    for prefix, module in obj.named_modules() if hasattr(obj, "named_modules") else ():
        try:
            names = list(module._concrete_type.get_attributes())
        except AttributeError:  # (loaded by torch.jit.load: no concrete type) its parameters and buffers
            names = [name for name, _ in itertools.chain(module.named_parameters(recurse=False),
                                                         module.named_buffers(recurse=False))]
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{name}" if prefix else name] = value
    return tensors


def script_parameters(obj: Any) -> inspect.Signature | None:
    """``forward``'s parameters (a scripted function's own), by name, from the schema: what lets a call pass
    by keyword what the example passed by position."""
    arguments = _forward_arguments(obj)
    if arguments is None:
        return None
    try:
        return inspect.Signature([inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                    default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
                                  for a in arguments])
    except ValueError:  # names Python cannot take
        return None


NO_DEFAULT = object()


def forward_defaults(obj: Any) -> list:
    """Each input's default value in ``forward``'s schema (``NO_DEFAULT`` where it has none); [] unknown."""
    arguments = _forward_arguments(obj) or []
    return [a.default_value if a.has_default_value() else NO_DEFAULT for a in arguments]


def script_class_name(obj: Any) -> str:
    if isinstance(obj, torch.jit.ScriptModule):
        return getattr(obj, "original_name", type(obj).__name__)
    return getattr(obj, "name", "function")
