"""Input signatures: what the optimized module was compiled for, and clear errors for the rest.

A signature is the flat list of example inputs' (shape, dtype).  Rank, dtype and the
number of inputs must match the example inputs; a new shape of the same rank is a new
signature and gets its own compiled program.  Before that, every call's tensors must be
ones a program can read (:func:`runnable_inputs`): dense CPU tensors with storage.
"""
from __future__ import annotations

import inspect
import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, keystr, tree_flatten, tree_flatten_with_path, tree_map, tree_unflatten
from torch._subclasses.fake_tensor import FakeTensor

from pyrys.input_structures import bound_inputs, example_inputs_by_name, is_tensor_leaf, with_defaults_as_example
from pyrys.ir.printer import format_tensor_type


class InputError(TypeError):
    """An input that does not fit what the module was optimized for."""


@dataclass(frozen=True)
class Signature:
    in_spec: TreeSpec
    leaves: tuple  # per flat input: (shape, dtype) for tensors, the value itself otherwise

    def describe(self) -> str:
        return ", ".join(_describe_leaf(leaf) for leaf in self.leaves)

    def describe_named(self) -> str:
        """:meth:`describe` with each input's place: ``input 0: Float(2, 3), input 'mask': Float(2, 4)``, and where
        an input holds several, ``input 'mask'['mak']: ...`` (a mapping passed as the tensor)."""
        paths = [path for path, _ in tree_flatten_with_path(tree_unflatten(list(range(len(self.leaves))),
                                                                           self.in_spec))[0]]
        names = [(f"input {path[1].idx}" if path[0].idx == 0 else f"input {path[1].key!r}") + keystr(path[2:])
                 for path in paths]
        return ", ".join(f"{name}: {_describe_leaf(leaf)}" for name, leaf in zip(names, self.leaves))


def _describe_leaf(leaf) -> str:
    return format_tensor_type(*leaf) if is_tensor_leaf(leaf) else repr(leaf)


class ExactFloat(float):
    """A float input in a signature, equal only to the same bits: ``x / -0.0`` is -inf where ``x / 0.0`` is inf,
    though ``-0.0 == 0.0``; and a NaN is its own value again (``nan != nan`` compiled it at every call)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float) and self.hex() == other.hex()

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash("nan") if math.isnan(self) else float.__hash__(self)  # else a plain float's: a loaded one finds it


class ExactBool(int):
    """A bool input in a signature, equal only to a bool: ``False == 0`` (and one hash), so a call with ``False``
    took the program of ``0`` (int outputs where eager's were bool; a reviewer's find)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (bool, ExactBool)) and int(self) == int(other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(("bool", int(self)))

    def __repr__(self) -> str:
        return repr(bool(self))


class TypedValue:
    """A signature's leaf for an input of another type than a plain int, float, bool, str or None (an ``IntEnum``
    or ``str`` Enum member, a NumPy bool, a ``torch.dtype``): equal only to a value of the same type (by its
    qualified name, which a save keeps) and the same value (a float's bits).  ``Mode.A == 1``, with one hash: a
    call with ``Mode.A`` took the program captured for ``1``, where forward told them apart (a helper's find)."""

    __slots__ = ("type_name", "plain", "original")

    def __init__(self, type_name: str, plain: Any, original: Any = None):
        self.type_name, self.plain, self.original = type_name, plain, original  # original: None from a save

    @classmethod
    def of(cls, value: Any) -> "TypedValue":
        kind = type(value)
        plain = next((base(value) for base in (int, float, complex, str) if isinstance(value, base)), value)
        return cls(f"{kind.__module__}.{kind.__qualname__}", plain, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TypedValue) or other.type_name != self.type_name:
            return False
        a, b = self.plain, other.plain
        return a.hex() == b.hex() if type(a) is float and type(b) is float else type(a) is type(b) and a == b

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        plain = self.plain
        return hash((self.type_name, "nan" if isinstance(plain, float) and math.isnan(plain) else plain))

    def __repr__(self) -> str:
        return repr(self.original) if self.original is not None else f"{self.type_name}({self.plain!r})"

    @property
    def value(self) -> Any:
        """What a call passes: the value itself, or (from a save) its plain form."""
        return self.original if self.original is not None else self.plain


PLAIN_TYPES = (int, float, bool, str, type(None))  # input values a signature holds as they are (floats and bools
# as ExactFloat and ExactBool); any other type's as a TypedValue, but NumPy's scalars: as the Python number of
# their value (torch's ops take them so; a call with np.sqrt(4.0) for an example's 2.0 runs its program)


def as_python_number(value: Any) -> Any:
    """A NumPy number (``np.float64``, ``np.int64``, ``np.float32`` ...) as the Python number of its value; any
    other value as it is."""
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, numpy.generic) and not isinstance(value, numpy.bool_):
        plain = value.item()  # (np.bool_ is not one: torch.full((2,), np.bool_(True)) is float32, of True bool)
        if isinstance(plain, (int, float, complex)):
            return plain
    return value


def leaf_value(leaf: Any) -> Any:
    """A number leaf as the plain Python value a call passes (``ExactBool`` as a bool: an int subclass,
    ``torch.full((2,), flag)`` of it is int64)."""
    if type(leaf) is TypedValue:
        return leaf.value
    return bool(leaf) if type(leaf) is ExactBool else float(leaf) if type(leaf) is ExactFloat else leaf


def _leaf(value: Any):
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    value = as_python_number(value)
    if type(value) is float:
        return ExactFloat(value)
    if type(value) is bool:
        return ExactBool(value)
    try:
        hash(value)
    except TypeError:  # a numpy array, say: the signature still hashes, and the checks name what it is
        return Unhashable(type(value).__name__, id(value))
    return value if type(value) in PLAIN_TYPES else TypedValue.of(value)


@dataclass(frozen=True)
class Unhashable:
    """A signature's stand-in for an input that has no hash: equal only to itself (the same object)."""

    type_name: str
    identity: int

    def __repr__(self) -> str:
        return f"<{self.type_name} object>"


def signature_of(args: tuple, kwargs: dict) -> tuple[Signature, list]:
    flat, spec = tree_flatten((tuple(args), dict(kwargs)))
    return Signature(spec, tuple(_leaf(v) for v in flat)), flat


def arranged_like(example: Signature, parameters: inspect.Signature | None, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call's inputs passed as the example passed them (``example``: its signature), by ``forward``'s parameters:
    ``opt(x, mask=m)`` for an example ``(x, m)``, or the reverse; an input at its default the example left out
    (``mask=None``), left out (:func:`pyrys.input_structures.with_defaults_as_example`). Any other call is
    returned as it is: one that passes or leaves out an input the example did not (a program of its own:
    :func:`pyrys.input_structures.passed_otherwise`), or that a ``forward`` taking ``*args`` (a ``**kwargs``
    one, as HuggingFace's are, by its named parameters) or unknown parameters leaves unbound."""
    spec = example.in_spec
    positional, names = spec.child(0).num_children, list(spec.child(1).context)
    if len(args) == positional and sorted(kwargs) == sorted(names):
        return args, (kwargs if list(kwargs) == names else {name: kwargs[name] for name in names})
    given = bound_inputs(parameters, args, kwargs)
    if given is None:
        return args, kwargs
    given = with_defaults_as_example(given, example_inputs_by_name(example, parameters), parameters)
    order = [p.name for p in parameters.parameters.values() if p.kind is not p.VAR_KEYWORD]
    if set(given) != set(order[:positional]) | set(names):
        return args, kwargs
    return tuple(given[name] for name in order[:positional]), {name: given[name] for name in names}


def runnable_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call's inputs as a program reads them: each tensor on the CPU and dense (else
    :class:`InputError`), with lazy negation or conjugation (``torch._neg_view``) applied."""
    flat, spec = tree_flatten((args, kwargs))
    for i, value in enumerate(flat):
        if isinstance(value, torch.Tensor) and (value.device.type != "cpu" or value.layout != torch.strided
                                                or value.is_nested or type(value) not in _PLAIN_TENSORS):
            check_runnable(leaf_names(spec)[i], value)
    if not any(isinstance(v, torch.Tensor) and (v.is_neg() or v.is_conj()) for v in flat):
        return args, kwargs
    resolve = lambda v: v.resolve_neg().resolve_conj() if isinstance(v, torch.Tensor) else v  # noqa: E731
    return tree_map(resolve, args), tree_map(resolve, kwargs)


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)  # others are looked at closer (a FakeTensor has no values)


def _has_memory(value: torch.Tensor) -> bool:
    """Whether a tensor's values lie in memory of its own (a subclass that wraps others has none: its storage
    has no address)."""
    try:
        return value.numel() == 0 or value.untyped_storage().data_ptr() != 0
    except RuntimeError:
        return False


def check_runnable(name: str, value: torch.Tensor) -> None:
    """:class:`InputError` naming ``name`` unless ``value`` is a dense CPU tensor with values of its own."""
    if isinstance(value, FakeTensor):
        raise InputError(f"pyrys: {name} must be a tensor with values, got a FakeTensor (torch's tensor of shapes "
                         "alone, made under FakeTensorMode); pass a real tensor")
    if value.is_nested:
        raise InputError(f"pyrys: {name} must be a dense (strided) tensor, got a nested tensor; pass "
                         "x.to_padded_tensor(0.0) (and a mask)")
    if type(value) not in _PLAIN_TENSORS and not _has_memory(value):  # a wrapper (MaskedTensor, DTensor)
        raise InputError(f"pyrys: {name} must be a plain tensor, got a {type(value).__name__} (a tensor subclass "
                         "that wraps others); pass the plain tensor it stands for")
    if value.device.type != "cpu":
        raise InputError(f"pyrys: {name} must be a tensor on the CPU (device 'cpu'), got a tensor on "
                         f"{value.device}; pyrys runs on the CPU: pass x.to('cpu')")
    if value.layout != torch.strided:
        raise InputError(f"pyrys: {name} must be a dense (strided) tensor, got layout {value.layout}; "
                         "pass x.to_dense()")


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return format_tensor_type(value.shape, value.dtype)
    return type(value).__name__


def differing_numbers(expected: Signature, got: Signature) -> list[int]:
    """The flat positions where both signatures hold a number (a bool, an int, a float, an ``IntEnum`` member
    ...) and they differ, in value or in type: inputs a capture freezes into its graph
    (torch.export specializes them)."""
    return [i for i, (want, have) in enumerate(zip(expected.leaves, got.leaves))
            if _is_number(want) and _is_number(have) and want != have]


def _is_number(leaf: Any) -> bool:
    value = leaf.plain if type(leaf) is TypedValue else leaf
    return isinstance(value, numbers.Number) and not is_tensor_leaf(leaf)


def check_compatible(expected: Signature, got: Signature, flat: list, args: tuple) -> None:
    """Raise :class:`InputError` naming what was expected unless only shapes (same rank) or numbers differ
    (:func:`differing_numbers`: whether another number may be captured is the caller's to say)."""
    if got.in_spec != expected.in_spec:
        described = ", ".join(_describe_value(a) for a in args)
        inner = _passed(got.in_spec) == _passed(expected.in_spec) and _inner_difference(expected.in_spec, got.in_spec)
        raise InputError(f"pyrys: expected inputs like the example inputs ({expected.describe()}): "
                         f"{_passed(expected.in_spec)}; got ({described}): {_passed(got.in_spec)}"
                         + (f"; {inner}" if inner else ""))
    free = set(differing_numbers(expected, got))
    for i, (name, want, have, value) in enumerate(zip(leaf_names(got.in_spec), expected.leaves, got.leaves, flat)):
        if i not in free:
            _check_leaf(name, want, have, value)


def leaf_names(spec: TreeSpec) -> list[str]:
    """What to call each input leaf in a message, in flat order: ``input 0``, ``input 1[0]`` (a leaf inside
    the second positional input), ``input 'attention_mask'`` (passed by keyword)."""
    names = []
    for group, keys in ((spec.child(0), range(spec.child(0).num_children)), (spec.child(1), spec.child(1).context)):
        for index, key in enumerate(keys):
            label = f"input {key!r}" if isinstance(key, str) else f"input {key}"
            count = group.child(index).num_leaves
            names += [label] if count == 1 else [f"{label}[{leaf}]" for leaf in range(count)]
    return names


def _inner_difference(want: TreeSpec, have: TreeSpec) -> str | None:
    """What first differs inside inputs passed alike: ``input 0 must be a dict with the keys ['a', 'b'] in
    that order ...``."""
    for group, keys in ((0, range(want.child(0).num_children)), (1, want.child(1).context)):
        for index, key in enumerate(keys):
            label = f"input {key!r}" if isinstance(key, str) else f"input {key}"
            found = _difference(want.child(group).child(index), have.child(group).child(index), label)
            if found:
                return found
    return None


def _difference(want: TreeSpec, have: TreeSpec, name: str) -> str | None:
    if want.type is not have.type:
        return f"{name} must be {_container(want)} like the example's, got {_container(have)}"
    if want.context != have.context:
        if isinstance(want.context, list) and isinstance(have.context, list) and \
                sorted(map(repr, want.context)) == sorted(map(repr, have.context)):
            return (f"{name} must hold the keys {want.context} in that order, the example's, got {have.context} "
                    "(the program was compiled for the example's order, which a model may read: reorder the keys)")
        return f"{name} must hold the keys {want.context} like the example's, got {have.context}"
    if want.num_children != have.num_children:
        return f"{name} must hold {want.num_children} items like the example's, got {have.num_children}"
    for index in range(want.num_children):
        key = want.context[index] if isinstance(want.context, list) else index
        found = _difference(want.child(index), have.child(index), f"{name}[{key!r}]")
        if found:
            return found
    return None


def _container(spec: TreeSpec) -> str:
    if spec.type is None:
        return "a tensor or value"
    name = spec.type.__name__
    return with_article(name)


def with_article(noun: str) -> str:
    """``noun`` with its indefinite article: ``an int``, ``a float``."""
    return f"{'an' if noun[:1].lower() in ('a', 'e', 'i', 'o', 'u') else 'a'} {noun}"


def type_name(value: Any) -> str:
    """``value``'s type as a message names it: ``int``, ``numpy.bool`` (NumPy's own is ``bool``, as Python's)."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__.split('.')[0]}.{kind.__name__}"


def _passed(spec: TreeSpec) -> str:
    """How a call passed its inputs: ``2 by position, mask by keyword``."""
    keywords = list(spec.child(1).context)
    return f"{spec.child(0).num_children} by position" + (f", {', '.join(keywords)} by keyword" if keywords else "")


def _check_leaf(name: str, want, have, value) -> None:
    if is_tensor_leaf(want):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"pyrys: {name} must be a tensor like {_describe_leaf(want)}, got {type(value).__name__}")
        if value.dtype != want[1]:
            raise InputError(f"pyrys: {name} must have dtype {want[1]} like the example input "
                             f"{_describe_leaf(want)}, got {value.dtype}")
        if value.dim() != len(want[0]):
            raise InputError(f"pyrys: {name} must have rank {len(want[0])} like the example input "
                             f"{_describe_leaf(want)}, got shape {tuple(value.shape)}")
    elif have != want:
        kind = type(leaf_value(want)).__name__
        if is_tensor_leaf(have) and _is_number(want):
            raise InputError(f"pyrys: {name} must be {with_article(kind)} like the example's {want!r}, got a tensor "
                             f"{_describe_leaf(have)} (a number input is frozen into the graph captured; a tensor "
                             "is a tensor input: pass it as the example did)")
        if is_tensor_leaf(have):
            raise InputError(f"pyrys: {name} must equal the example's {want!r} (it was specialized), got a tensor "
                             f"{_describe_leaf(have)}")
        numpy = sys.modules.get("numpy")
        advice = (" (a NumPy bool is not a bool to torch: pass bool(value))"
                  if numpy is not None and isinstance(value, numpy.bool_) else "")
        raise InputError(f"pyrys: {name} must equal the example's {want!r} (it was specialized), got {have!r}"
                         + (f", {with_article(type_name(value))}" if type(value) is not type(leaf_value(want)) else "")
                         + advice)
