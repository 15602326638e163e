"""In-place ops and their functional twins, for every way in that makes a graph functional.

``relu_(x)`` writes ``x`` and returns it; its twin ``relu(x)`` returns a new tensor with the same
values. An op has a twin here when it writes its first argument only, and the op of the same name
without the trailing ``_`` (same namespace, same overload) takes arguments of the same types (and
names, where passed by name) and writes nothing (``pow_.Scalar(Tensor, Scalar)`` has none: ``pow.Scalar`` takes a number first).
"""
from __future__ import annotations

import torch


def functional_twin(schema) -> torch._ops.OpOverload | None:
    """The functional op of the in-place op ``schema`` (a ``torch._C.FunctionSchema``), else None."""
    written = [i for i, a in enumerate(schema.arguments) if a.alias_info is not None and a.alias_info.is_write]
    namespace, name = schema.name.split("::")
    if written != [0] or not name.endswith("_") or name.startswith("_"):
        return None
    try:
        twin = getattr(getattr(getattr(torch.ops, namespace), name[:-1]), schema.overload_name or "default")
    except (AttributeError, RuntimeError):
        return None
    if not isinstance(twin, torch._ops.OpOverload) or twin._schema.is_mutable:
        return None
    return twin if _arguments(twin._schema) == _arguments(schema) else None


def _arguments(schema) -> list[tuple[str, str]]:
    """Each argument's type, and its name where it is passed by name (``dropout_`` calls its first ``self``,
    ``dropout`` calls it ``input``: the same positional argument)."""
    return [(str(a.type), a.name if a.kwarg_only else "") for a in schema.arguments]
