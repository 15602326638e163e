"""A namedtuple's class from its module, name and fields: the caller's own where its module is imported
and it has those fields, else one made with that name, in that module (nothing is imported here).

Used where a structure comes back without its class: a saved program's outputs (:mod:`pyrys.saving.tree_spec`)
and a scripted module's NamedTuple results (:mod:`pyrys.capture.script_types`).
"""
from __future__ import annotations

import collections
import sys
from typing import Any, Sequence


def imported_class(module: str, name: str) -> type | None:
    """The class ``module.name`` (``name`` may be dotted: a class inside a class) if its module is imported
    already, else None."""
    owner: Any = sys.modules.get(module)
    for part in name.split("."):
        owner = getattr(owner, part, None)
    return owner if isinstance(owner, type) else None


def namedtuple_class(module: str, name: str, fields: Sequence[str]) -> tuple[type, bool]:
    """``(class, made)``: the imported class if it is a tuple with these fields, else ``(a namedtuple made with
    the last part of name and these fields, True)``."""
    owner = imported_class(module, name)
    if owner is not None and issubclass(owner, tuple) and tuple(getattr(owner, "_fields", ())) == tuple(fields):
        return owner, False
    return collections.namedtuple(name.rsplit(".", 1)[-1], list(fields), module=module), True
