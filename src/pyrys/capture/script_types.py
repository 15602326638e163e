"""A TorchScript ``NamedTuple`` as a Python class, so a scripted module's named outputs keep their names.

TorchScript knows a NamedTuple by its qualified name (``__torch__.<module>.<class>``) and its fields, which
its Python binding shows only in the graph's text (``%7 : NamedTuple(a : Tensor, b : Tensor) = ...``). The
class is the caller's own where its module is loaded and it has those fields, else a ``collections.namedtuple``
of that name and those fields (what calling the scripted module returns).
"""
from __future__ import annotations

import torch

from pyrys.named_tuples import namedtuple_class

SCRIPT_PREFIX = "__torch__."
NAMED_TUPLE = "NamedTuple("


def named_tuple_class(value: torch._C.Value) -> type | None:
    """The class of the NamedTuple ``value`` is, or None where it is a plain tuple."""
    text = str(value.node())
    head = f"%{value.debugName()} : {NAMED_TUPLE}"
    name = value.type().annotation_str
    if not text.startswith(head) or not all(part.isidentifier() for part in name.split(".")):
        return None  # an ATen op's named result (``x.max(1)``: ``Tuple[Tensor, Tensor]``), a plain tuple in TorchScript
    return _class(name, tuple(_field_names(text[len(head):])))


def _field_names(rest: str) -> list[str]:
    """The names in ``a : Tensor, b : (Tensor, int))...``: each top-level ``name : type`` up to the closing paren."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(rest):
        if char in "([":
            depth += 1
        elif char in ")]" and depth:
            depth -= 1
        elif char in ",)" and depth == 0:
            names += [name] if (name := rest[start:i].split(":", 1)[0].strip()) else []  # NamedTuple(): none
            start = i + 1
            if char == ")":
                return names
    raise ValueError(f"pyrys: cannot read the fields of a TorchScript NamedTuple from {rest!r}")


def _class(qualified_name: str, fields: tuple[str, ...]) -> type:
    """The caller's class where some split of ``module.Class.Nested`` names an imported one with these fields,
    else one made in the module it names."""
    parts = qualified_name.removeprefix(SCRIPT_PREFIX).split(".")
    splits = [(".".join(parts[:i]) or "__main__", ".".join(parts[i:])) for i in range(len(parts) - 1, -1, -1)]
    for module, name in splits:
        cls, made = namedtuple_class(module, name, fields)
        if not made:
            return cls
    return namedtuple_class(*splits[0], fields)[0]
