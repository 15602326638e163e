"""How one calibration sample reads as a call's ``(args, kwargs)``, against the example's.

    example passed                   a sample may be
    positional inputs only           a tensor (one input), a tuple or list of them
    keyword inputs only              a mapping of those names (a tokenizer's output), or of some of them
    both                             an (args, kwargs) pair, ``((x,), {"mask": m})`` or ``(x, {"mask": m})``;
                                     a tuple of every input, the keyword ones last in the example's order
                                     (those holding no tensor, flags such as ``use_cache=False``, may be
                                     left out); a tuple of the positional ones alone

Keyword inputs a sample leaves out are the example's, as they are; those holding tensors are named
(``kept``), so that the calibration note says the samples did not vary them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from pyrys.signature import InputError


def as_call(index: int, sample: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict, list[str]]:
    """``sample`` (the ``index``-th) as ``(args, kwargs)``, and the example's keyword inputs holding tensors it
    took as they are; :class:`InputError` for a mapping where the example passed positional inputs, or a
    tuple where it passed keywords only."""
    _refuse(index, sample, args, kwargs)
    if isinstance(sample, Mapping) and kwargs and not args:
        if not set(sample) <= set(kwargs):
            return (), dict(sample), []  # names the example did not pass: the signature check says which
        return (), {name: sample[name] if name in sample else kwargs[name] for name in kwargs}, \
            _holding_tensors(kwargs, without=sample)
    if args and kwargs:
        read = _pair(sample, args, kwargs) or _every_input(sample, args, kwargs)
        if read is not None:  # (its keywords are the example's names: in the example's order, the rest its own)
            positional, given = read
            return positional, {**kwargs, **given}, _holding_tensors(kwargs, without=given)
    positional = tuple(sample) if isinstance(sample, (tuple, list)) else (sample,)
    return positional, kwargs, _holding_tensors(kwargs) if args else []


def _refuse(index: int, sample: Any, args: tuple, kwargs: dict) -> None:
    """:class:`InputError` for the forms no example's call reads (see the module docstring)."""
    if isinstance(sample, Mapping) and args:
        raise InputError(f"pyrys: calibration sample {index} is a mapping (keys {sorted(map(str, sample))}), but the "
                         "example inputs were passed by position: give each sample as a tuple in the example's order"
                         + (f" (its keyword inputs {', '.join(kwargs)} last), or as an (args, kwargs) pair"
                            if kwargs else "") + " (a mapping is read where the example passed keywords only)")
    if kwargs and not args and isinstance(sample, (tuple, list)) and len(sample) > 1:
        raise InputError(f"pyrys: calibration sample {index} is a {type(sample).__name__} of {len(sample)} inputs, but "
                         f"the example inputs were passed by keyword ({', '.join(kwargs)}): give each sample as a "
                         "mapping of those names (a tokenizer's output, a dict)")


def _pair(sample: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """``sample`` as an (args, kwargs) pair, its args a tuple or, for an example of one positional input, that
    input; None where it is not one (or two positional inputs of those types: the example's are)."""
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], Mapping)
            and set(sample[1]) <= set(kwargs)):
        return None
    if len(args) == 2 and isinstance(args[1], Mapping):
        return None  # (a positional mapping, as the example has)
    positional, given = sample
    if len(args) == 1 and not _args_tuple(positional, args[0]):
        return (positional,), dict(given)
    return (tuple(positional), dict(given)) if isinstance(positional, (tuple, list)) else None


def _args_tuple(value: Any, only: Any) -> bool:
    """Whether ``value`` is the tuple of an example's one positional input ``only`` (not that input itself)."""
    if not isinstance(value, (tuple, list)):
        return False
    return not isinstance(only, (tuple, list)) or (len(value) == 1 and isinstance(value[0], (tuple, list)))


def _every_input(sample: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """``sample`` as a tuple of every input, the keyword ones last (all of them, or those holding tensors)."""
    if not isinstance(sample, (tuple, list)):
        return None
    for names in (list(kwargs), _holding_tensors(kwargs)):
        if names and len(sample) == len(args) + len(names):
            return tuple(sample[:len(args)]), dict(zip(names, sample[len(args):]))
    return None


def _holding_tensors(kwargs: dict, without: Mapping = {}) -> list[str]:  # noqa: B006 -- read only
    """The names of ``kwargs`` holding a tensor, but for those in ``without``."""
    return [name for name, value in kwargs.items()
            if name not in without and any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(value))]
