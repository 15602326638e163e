"""The structure of a module's inputs and outputs (a pytree ``TreeSpec``) as JSON, and back.

    (x, {"mask": m})            ->  {"tuple": [null, {"dict": {"keys": ["mask"], "children": [null]}}]}
    Out(logits=y, loss=z)       ->  {"namedtuple": {"module": "model", "name": "Out",
                                                    "fields": ["logits", "loss"], "children": [null, null]}}

    BaseModelOutput(last_hidden_state=h)  ->  {"registered": {"module": "transformers.modeling_outputs",
                                                  "name": "BaseModelOutput", "context": ["last_hidden_state"],
                                                  "children": [null]}}

``null`` is a leaf.  Tuples, lists, dicts, ordered dicts and namedtuples are kept, and any class
registered with torch's pytree (a HuggingFace ``ModelOutput``) whose context is JSON.  A namedtuple
comes back as its own class when its module is already imported and the class has the same
fields; otherwise as a class of that name and those fields made at load.  A registered class comes
back as itself when its module is already imported, else as a dict of its keys (those a ModelOutput's
or a dataclass's context names; a tuple where it names none).  :func:`decode_spec` reports each class it could not find.  Nothing
is imported and nothing is unpickled.

``forward``'s parameters (which let a call pass by keyword what the example passed by position, or the
reverse, or pass an input the example left out at its default) are kept as names and kinds, each default
as its value where it is ``None``, a bool, an int within 64 bits, a float or a string, else as a mark that
there is one:

    def forward(self, x, mask=None, size=(2, 2))  ->  [["x", "POSITIONAL_OR_KEYWORD", false],
                                                       ["mask", "POSITIONAL_OR_KEYWORD", {"default": null}],
                                                       ["size", "POSITIONAL_OR_KEYWORD", true]]
"""
from __future__ import annotations

import collections
import inspect
from typing import Any

from torch.utils._pytree import SUPPORTED_NODES, TreeSpec, treespec_leaf

from pyrys.errors import SaveError
from pyrys.named_tuples import imported_class, namedtuple_class
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
    context = _encoded_context(spec.context) if spec.type in SUPPORTED_NODES else _UNENCODABLE
    if context is not _UNENCODABLE:
        return {"registered": {"module": spec.type.__module__, "name": spec.type.__qualname__, "context": context,
                               "children": children}}
    raise SaveError(f"pyrys.save: the model's inputs or outputs hold a {getattr(spec.type, '__name__', spec.type)}; "
                    "a saved program keeps tuples, lists, dicts, namedtuples and classes registered with torch's "
                    "pytree whose context is JSON (a HuggingFace ModelOutput)")


_UNENCODABLE = object()


def _encoded_context(context: Any) -> Any:
    """A registered pytree class's context as JSON, or :data:`_UNENCODABLE`."""
    try:
        return encode_arg(context, "a pytree context")
    except (SaveError, TypeError, ValueError):
        return _UNENCODABLE


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
        return TreeSpec(container, _dict_keys(payload["keys"], len(children)), children)
    if kind == "namedtuple":
        children = [decode_spec(c, made) for c in payload["children"]]
        return TreeSpec(collections.namedtuple, _namedtuple_class(payload, made, len(children)), children)
    if kind == "registered":
        children = [decode_spec(c, made) for c in payload["children"]]
        context = decode_arg(payload["context"], {})
        cls = imported_class(payload["module"], payload["name"])
        if cls is not None and cls in SUPPORTED_NODES:
            return TreeSpec(cls, context, children)
        made.append(f"{payload['module']}.{payload['name']}")
        keys = _keys(context, len(children))
        return TreeSpec(dict, keys, children) if keys is not None else TreeSpec(tuple, None, children)
    raise ValueError(f"unknown container {kind!r}")


def _dict_keys(record: Any, count: int) -> list:
    """A saved dict's keys: a list of ``count`` distinct hashable values, else ValueError (a string read as
    its letters, a list as a key: a program so edited loaded, then every call failed)."""
    keys = decode_arg(record, {})
    if not (isinstance(keys, list) and len(keys) == count and _distinct(keys)):
        raise ValueError(f"a saved dict's keys are not a list of {count} distinct hashable values: {record!r:.100}")
    return keys


def _distinct(values: list) -> bool:
    """Whether no two of ``values`` are equal, each hashable."""
    try:
        return len(set(values)) == len(values)
    except TypeError:
        return False


def _keys(context: Any, count: int) -> list[str] | None:
    """The names of a registered class's ``count`` children from its context: a list of them (a ModelOutput's),
    or first in a pair of lists (``torch.utils._pytree.register_dataclass``'s: field names, then the fields
    that are no children); None where it holds no such names."""
    def names(value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) == count and all(isinstance(k, str) for k in value)

    if names(context):
        return list(context)
    if isinstance(context, (list, tuple)) and len(context) == 2 and names(context[0]):
        return list(context[0])
    return None


def _namedtuple_class(payload: dict, made: list[str], count: int) -> type:
    """The namedtuple class if its module is imported and its fields match, else one made with that name;
    ValueError where the fields are not ``count`` distinct names (a string read as its letters, a field
    more than its children: a program so edited loaded, then every call failed; a reviewer's find)."""
    fields = payload["fields"]
    if not (isinstance(fields, list) and len(fields) == count and all(isinstance(f, str) for f in fields)):
        raise ValueError(f"a saved namedtuple's fields are not a list of {count} names: {fields!r:.100}")
    try:
        cls, was_made = namedtuple_class(payload["module"], payload["name"], fields)
    except (TypeError, ValueError) as error:  # (a keyword or a repeated name: collections.namedtuple's checks)
        raise ValueError(f"a saved namedtuple's fields {fields!r:.100} make no class: {error}") from None
    if was_made:
        made.append(f"{payload['module']}.{payload['name']}")
    return cls


_HAS_DEFAULT = object()  # a saved parameter's default that was not saved: there is one (a call may leave it out)
_SAVED_DEFAULTS = (type(None), bool, int, float, str)  # defaults JSON gives back as they were (type and value)
_JSON_INTS = range(-2**63, 2**64)  # ints every JSON reader takes (json.dumps refuses those past 4300 digits)


def encode_parameters(parameters: inspect.Signature | None) -> list | None:
    """``forward``'s parameters as ``[name, kind, default]`` lists: the default ``false`` (none), ``{"default":
    value}`` or ``true`` (one of another type, or an int past 64 bits); None stays None."""
    if parameters is None:
        return None
    return [[p.name, p.kind.name, _encode_default(p.default)] for p in parameters.parameters.values()]


def _encode_default(default: Any) -> bool | dict:
    if default is inspect.Parameter.empty:
        return False
    saved = type(default) in _SAVED_DEFAULTS and (type(default) is not int or default in _JSON_INTS)
    return {"default": default} if saved else True


def decode_parameters(record: Any) -> inspect.Signature | None:
    """The signature :func:`encode_parameters` wrote (``ValueError`` where it is not one)."""
    if record is None:
        return None
    if not isinstance(record, list) or not all(isinstance(p, list) and len(p) == 3 for p in record):
        raise ValueError(f"the saved parameters of forward are not [name, kind, default] lists: {record!r:.100}")
    return inspect.Signature([inspect.Parameter(name, _KINDS.get(kind), default=_decode_default(default))
                              for name, kind, default in record])


def _decode_default(default: Any) -> Any:
    if default is True:
        return _HAS_DEFAULT
    if default is False:
        return inspect.Parameter.empty
    if isinstance(default, dict) and set(default) == {"default"} and type(default["default"]) in _SAVED_DEFAULTS:
        return default["default"]
    raise ValueError(f"a saved parameter's default is not false, true or {{\"default\": value}}: {default!r:.100}")


_KINDS = {kind.name: kind for kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                       inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.KEYWORD_ONLY,
                                       inspect.Parameter.VAR_KEYWORD)}
