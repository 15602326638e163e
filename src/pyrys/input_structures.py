"""Which of ``forward``'s inputs a call passes, against the example's: an optional input left out, added, or
``None`` where the example passed a value (HuggingFace's ``attention_mask``, ``token_type_ids``, ``return_dict``).

Eager runs each such call; torch.export captures the inputs it is given, so a call that passes another set
of inputs (:func:`passed_otherwise`) gets a capture and a program of its own (``OptimizedModule``), while a
call that passes the same inputs another way (by keyword what the example passed by position, or a
default value the example left out: :func:`with_defaults_as_example`) is the example's signature.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch.utils._pytree import TreeSpec


@dataclass(frozen=True)
class PassedOtherwise:
    """A call's top-level inputs where they differ from the example's: ``key`` names the inputs it passes
    other than at their defaults (each with whether it is ``None``), in ``forward``'s order: calls of one key
    give ``forward`` alike; ``differences`` says what differs from the example, in words."""

    key: tuple[tuple[str, bool], ...]
    differences: tuple[str, ...]

    def describe(self) -> str:
        return "; ".join(self.differences)


def bound_inputs(parameters: inspect.Signature | None, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The inputs a call gives ``forward`` by name (those a ``**kwargs`` takes among them), or None where it
    cannot tell: no known parameters, a ``*args`` forward, or a call ``forward`` refuses (eager's TypeError)."""
    if parameters is None or any(p.kind is p.VAR_POSITIONAL for p in parameters.parameters.values()):
        return None
    try:
        given = dict(parameters.bind(*args, **kwargs).arguments)
    except TypeError:
        return None
    rest = next((p.name for p in parameters.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    given.update(given.pop(rest, {}))
    return given


def binding_error(parameters: inspect.Signature | None, args: tuple, kwargs: dict) -> str | None:
    """Why ``forward`` refuses this call, as eager's TypeError says it (None where it takes it or cannot tell)."""
    if parameters is None:
        return None
    try:
        parameters.bind(*args, **kwargs)
    except TypeError as error:
        return str(error)
    return None


def example_inputs_by_name(spec: TreeSpec, parameters: inspect.Signature) -> dict[str, bool]:
    """The inputs the example passed (``spec``: its signature's), by name, each with whether it was ``None``
    (its first ones by position are ``forward``'s first parameters)."""
    order = [p.name for p in parameters.parameters.values() if p.kind is not p.VAR_KEYWORD]
    positional, keywords = spec.child(0), spec.child(1)
    passed = {order[i]: _is_none(positional.child(i)) for i in range(min(positional.num_children, len(order)))}
    passed.update({name: _is_none(keywords.child(i)) for i, name in enumerate(keywords.context)})
    return passed


def _is_none(spec: TreeSpec) -> bool:
    return spec.type is type(None)


def with_defaults_as_example(given: dict[str, Any], example: dict[str, bool],
                             parameters: inspect.Signature) -> dict[str, Any]:
    """``given`` with the inputs that give ``forward`` what the example gave it passed as the example passed
    them: one the example left out, passed at its default (``is`` it: ``None``, ``True``, ``False``), left
    out; one the example passed as ``None``, left out where ``None`` is its default, passed as ``None``."""
    given = dict(given)
    for name in [name for name in given if name not in example]:
        default = _default(parameters, name)
        if default is not inspect.Parameter.empty and given[name] is default:
            del given[name]
    for name, was_none in example.items():
        if name not in given and was_none and _default(parameters, name) is None:
            given[name] = None
    return given


def _default(parameters: inspect.Signature, name: str) -> Any:
    parameter = parameters.parameters.get(name)
    return inspect.Parameter.empty if parameter is None else parameter.default


def passed_otherwise(spec: TreeSpec, parameters: inspect.Signature | None, args: tuple,
                     kwargs: dict) -> PassedOtherwise | None:
    """How a call that ``forward`` takes passes other inputs than the example (``spec``: its signature's): an
    input it leaves out or adds, or ``None`` on one side only; None where it passes the same ones (or
    ``forward`` refuses it, or its parameters are unknown: the signature check says what differs)."""
    given = bound_inputs(parameters, args, kwargs)
    if given is None:
        return None
    example = example_inputs_by_name(spec, parameters)
    given = with_defaults_as_example(given, example, parameters)
    differences = []
    for name in _in_forward_order(parameters, [*example, *given]):
        if name not in example:
            differences.append(f"{name} passed{' as None' if given[name] is None else ''}, the example left it out")
        elif name not in given:
            differences.append(f"{name} left out, the example passed it")
        elif example[name] != (given[name] is None):
            differences.append(f"{name} is None, the example's is not" if given[name] is None
                               else f"{name} is not None, the example's is")
    if not differences:
        return None
    at_default = [name for name in given if given[name] is _default(parameters, name)]  # (x, None) is (x,)
    key = tuple((name, given[name] is None) for name in _in_forward_order(parameters, given) if name not in at_default)
    return PassedOtherwise(key, tuple(differences))


def _in_forward_order(parameters: inspect.Signature, names: list[str]) -> list[str]:
    """``names`` once each, ``forward``'s parameters first in their order, then those a ``**kwargs`` takes."""
    unique = list(dict.fromkeys(names))
    order = [name for name in parameters.parameters if name in unique]
    return order + [name for name in unique if name not in order]
