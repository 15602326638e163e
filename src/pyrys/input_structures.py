"""Which of ``forward``'s inputs a call passes, against the example's: an optional input left out, added, or
``None`` where the example passed a value (HuggingFace's ``attention_mask``, ``token_type_ids``, ``return_dict``),
or a tensor in another dtype (ids as int32, a mask as bool, a float64 image: :func:`other_dtypes`).

Eager runs each such call; torch.export captures the inputs it is given, so a call that passes another set
of inputs (:func:`passed_otherwise`) gets a capture and a program of its own (``OptimizedModule``), while a
call that passes the same inputs another way (by keyword what the example passed by position, or a
default value the example left out: :func:`with_defaults_as_example`) is the example's signature.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PassedOtherwise:
    """A call's top-level inputs where they differ from the example's: ``key`` names the inputs it passes
    other than at their defaults (each with whether it is ``None``), in ``forward``'s order, or the index
    tensors of another dtype (:func:`other_dtypes`); ``OptimizedModule`` adds every tensor's dtype and
    rank. Calls of one key share a module, which tells apart what else differs (a shape, a number) as any
    does. ``differences`` says what differs from the example, in words."""

    key: tuple
    differences: tuple[str, ...]
    floating: bool = False  # a floating-point tensor in another dtype (:func:`other_dtypes`)

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


def example_inputs_by_name(example, parameters: inspect.Signature) -> dict[str, bool]:
    """The inputs the example passed (``example``: its signature, with ``in_spec`` and ``leaves``), by name,
    each with whether it was ``None`` (its first ones by position are ``forward``'s first parameters)."""
    order = [p.name for p in parameters.parameters.values() if p.kind is not p.VAR_KEYWORD]
    positional, keywords = example.in_spec.child(0), example.in_spec.child(1)
    nones, start = [], 0
    for group in (positional, keywords):
        for i in range(group.num_children):
            child = group.child(i)
            nones.append(child.is_leaf() and example.leaves[start] is None)  # (None is a leaf to torch's pytree)
            start += child.num_leaves
    names = [order[i] if i < len(order) else None for i in range(positional.num_children)] + list(keywords.context)
    return {name: none for name, none in zip(names, nones) if name is not None}


def with_defaults_as_example(given: dict[str, Any], example: dict[str, bool],
                             parameters: inspect.Signature) -> dict[str, Any]:
    """``given`` with the inputs that give ``forward`` what the example gave it passed as the example passed
    them: one the example left out, passed at its default (:func:`at_default`), left out; one the example
    passed as ``None``, left out where ``None`` is its default, passed as ``None``."""
    given = dict(given)
    for name in [name for name in given if name not in example]:
        if at_default(parameters, name, given[name]):
            del given[name]
    for name, was_none in example.items():
        if name not in given and was_none and _default(parameters, name) is None:
            given[name] = None
    return given


def _default(parameters: inspect.Signature, name: str) -> Any:
    parameter = parameters.parameters.get(name)
    return inspect.Parameter.empty if parameter is None else parameter.default


def at_default(parameters: inspect.Signature, name: str, value: Any) -> bool:
    """Whether ``value`` is parameter ``name``'s default: that object, or a number or string of its type and
    value (``float("1.0")`` for ``1.0``, a NaN for a NaN; not ``-0.0`` for ``0.0``, nor ``1`` for ``True``)."""
    default = _default(parameters, name)
    if value is default:
        return True
    if type(value) is not type(default) or type(value) not in (int, float, complex, str, bytes):
        return False
    return repr(value) == repr(default)  # (equal values of one of these types, NaN too; -0.0 is not 0.0)


def passed_otherwise(example_signature, parameters: inspect.Signature | None, args: tuple,
                     kwargs: dict) -> PassedOtherwise | None:
    """How a call that ``forward`` takes passes other inputs than the example (``example_signature``: its
    signature): an input it leaves out or adds, or ``None`` on one side only; None where it passes the same
    ones (or ``forward`` refuses it, or its parameters are unknown: the signature check says what differs)."""
    given = bound_inputs(parameters, args, kwargs)
    if given is None:
        return None
    example = example_inputs_by_name(example_signature, parameters)
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
    defaults = [name for name in given if at_default(parameters, name, given[name])]  # (x, None) is (x,)
    key = tuple((name, given[name] is None) for name in _in_forward_order(parameters, given) if name not in defaults)
    return PassedOtherwise(key, tuple(differences))


def _in_forward_order(parameters: inspect.Signature, names: list[str]) -> list[str]:
    """``names`` once each, ``forward``'s parameters first in their order, then those a ``**kwargs`` takes."""
    unique = list(dict.fromkeys(names))
    order = [name for name in parameters.parameters if name in unique]
    return order + [name for name in unique if name not in order]


def tensor_kinds(leaves: tuple) -> tuple:
    """Each tensor's dtype and rank among a signature's ``leaves``, in order."""
    return tuple((leaf[1], len(leaf[0])) for leaf in leaves if is_tensor_leaf(leaf))


def leaf_kinds(leaves: tuple) -> tuple:
    """What each of a signature's ``leaves`` is, its sizes and value aside: a tensor's dtype and rank, None, or
    the type of a value. With the ``in_spec``, it tells apart the calls whose :class:`PassedOtherwise` keys
    differ (those keys leave out inputs at their defaults: calls of one memo entry may differ in key, and go
    to either module, whose own checks take them)."""
    return tuple((leaf[1], len(leaf[0])) if is_tensor_leaf(leaf) else None if leaf is None else type(leaf)
                 for leaf in leaves)


def other_dtypes(expected: tuple, got: tuple, names: list[str], floating: bool) -> PassedOtherwise | None:
    """Where tensors of a call (its signature's leaves ``got``, of the example's structure) come in another
    integer dtype or as bool where the example's were integer or bool (token ids as int32, which eager's
    embedding takes as it takes int64; a mask as bool), or with ``floating``, in another floating-point dtype
    where the example's was floating-point (a float64 image, which eager runs where ``forward`` casts it,
    ``x.float()``, or a number's 0-dim tensor, which does not promote): a capture of their own, keyed by every
    tensor's dtype.  Where eager's ops refuse the dtype (float64 into float32 weights) so does that capture
    (``OptimizedModule`` says so).  None where no such tensor differs."""
    differing = [i for i, (want, have) in enumerate(zip(expected, got))
                 if is_tensor_leaf(want) and is_tensor_leaf(have) and want[1] != have[1]
                 and (_is_index_dtype(want[1]) and _is_index_dtype(have[1])
                      or floating and want[1].is_floating_point and have[1].is_floating_point)]
    if not differing:
        return None
    key = (("dtypes", tuple(differing)),)
    return PassedOtherwise(key, tuple(f"{names[i]} is {str(got[i][1]).removeprefix('torch.')}, the example's "
                                      f"{str(expected[i][1]).removeprefix('torch.')}" for i in differing),
                           floating=any(got[i][1].is_floating_point for i in differing))


def _is_index_dtype(dtype) -> bool:
    return not (dtype.is_floating_point or dtype.is_complex)


def is_tensor_leaf(leaf) -> bool:
    """Whether a signature's leaf stands for a tensor: its ``(shape, dtype)``."""
    return isinstance(leaf, tuple) and len(leaf) == 2 and isinstance(leaf[1], torch.dtype)
