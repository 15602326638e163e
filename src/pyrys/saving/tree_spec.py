"""The structure of a module's inputs and outputs (a pytree ``TreeSpec``) as JSON, and back.

    (x, {"mask": m})            ->  {"tuple": [null, {"dict": {"keys": ["mask"], "children": [null]}}]}
    Out(logits=y, loss=z)       ->  {"namedtuple": {"module": "model", "name": "Out",
                                                    "fields": ["logits", "loss"], "children": [null, null]}}

``null`` is a leaf.  Tuples, lists, dicts, ordered dicts and namedtuples are kept.  A namedtuple
comes back as its own class when its module is already imported and the class has the same
fields; otherwise as a class of that name and those fields made at load, which
:func:`decode_spec` reports.  Nothing is imported and nothing is unpickled.
"""
from __future__ import annotations

import collections
import sys
from typing import Any

from torch.utils._pytree import TreeSpec, treespec_leaf

from pyrys.errors import SaveError
from pyrys.saving.graph_json import decode_arg, encode_arg

_CONTAINERS = {tuple: "tuple", list: "list"}
_KEYED = {dict: "dict", collections.OrderedDict: "ordered_dict"}


def encode_spec(spec: TreeSpec) -> Any:
    """``spec`` as JSON (see the module docstring); :class:`pyrys.SaveError` for another container."""
    if spec.is_leaf():
        return None
    children = [encode_spec(spec.child(i)) for i in range(spec.num_children)]
    if spec.type in _CONTAINERS:
        return {_CONTAINERS[spec.type]: children}
    if spec.type in _KEYED:
        return {_KEYED[spec.type]: {"keys": encode_arg(list(spec.context), "a dict key"), "children": children}}
    cls = spec.context
    if isinstance(cls, type) and issubclass(cls, tuple) and hasattr(cls, "_fields"):
        return {"namedtuple": {"module": cls.__module__, "name": cls.__qualname__, "fields": list(cls._fields),
                               "children": children}}
    raise SaveError(f"pyrys.save: the model's inputs or outputs hold a {getattr(spec.type, '__name__', spec.type)}; "
                    "a saved program keeps tuples, lists, dicts and namedtuples")


def decode_spec(record: Any, made: list[str]) -> TreeSpec:
    """The inverse of :func:`encode_spec`; the name of each namedtuple class made here is added to ``made``."""
    if record is None:
        return treespec_leaf()
    (kind, payload), = record.items()
    if kind in ("tuple", "list"):
        return TreeSpec(tuple if kind == "tuple" else list, None, [decode_spec(c, made) for c in payload])
    if kind in ("dict", "ordered_dict"):
        container = dict if kind == "dict" else collections.OrderedDict
        children = [decode_spec(c, made) for c in payload["children"]]
        return TreeSpec(container, list(decode_arg(payload["keys"], {})), children)
    if kind == "namedtuple":
        cls = _namedtuple_class(payload, made)
        return TreeSpec(collections.namedtuple, cls, [decode_spec(c, made) for c in payload["children"]])
    raise ValueError(f"unknown container {kind!r}")


def _namedtuple_class(payload: dict, made: list[str]) -> type:
    """The namedtuple class if its module is imported and its fields match, else one made with that name."""
    owner: Any = sys.modules.get(payload["module"])
    for part in payload["name"].split("."):
        owner = getattr(owner, part, None)
    if isinstance(owner, type) and issubclass(owner, tuple) and list(getattr(owner, "_fields", ())) == payload["fields"]:
        return owner
    made.append(f"{payload['module']}.{payload['name']}")
    return collections.namedtuple(payload["name"].rsplit(".", 1)[-1], payload["fields"])
