"""A model named on a command line, and its own example inputs: what ``pyrys explain`` and ``pyrys bench``
both read.

A spec is a zoo model's name (torchvision's, random weights and BatchNorm: :mod:`pyrys.testing`; or a zoo
transformer, ``hf_bert``) or ``module:attr``, where ``attr`` (dotted) is an ``nn.Module`` or something that
builds one when called with no arguments; the module is looked for on ``sys.path`` and in the working folder,
as ``python -m`` has it.  A model may have ``example_inputs(batch)``: one tensor (one input, not its rows)
or a tuple of its positional inputs.  Anything else raises :class:`ModelSpecError`, one line saying what was
expected (a command's caller prefixes its name).
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

import torch

from pyrys import zoo


class ModelSpecError(ValueError):
    """A spec that names no model, or whose model or example inputs cannot be made."""


def resolve(spec: str) -> Any:
    """What ``spec`` names, before anything is built: a zoo name as it is, else the ``module:attr`` object,
    checked to be an ``nn.Module`` or callable with no arguments."""
    if ":" not in spec:
        if why := zoo.unknown_model(spec):
            raise ModelSpecError(why)
        return spec
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # as ``python -m`` has it (a console script has not):
        sys.path.insert(0, os.getcwd())  # a module in the working folder is found
    target = _imported(module_name, spec)
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ModelSpecError(f"{module_name!r} has no attribute {attr!r} (from {spec!r})")
        target = getattr(target, part)
    if not isinstance(target, torch.nn.Module) and not callable(target):
        raise ModelSpecError(f"{spec} is a {type(target).__name__}: neither an nn.Module nor something that builds one")
    if not isinstance(target, torch.nn.Module):
        try:
            inspect.signature(target).bind()
        except TypeError as error:
            raise ModelSpecError(f"{spec} cannot be built with no arguments: {error}") from None
        except ValueError:  # no signature to read (a builtin): called as it is
            pass
    return target


def _imported(module_name: str, spec: str) -> Any:
    """The module ``module_name``; where there is none, or importing it fails (its own code raising, or an
    import of its own not installed), one line saying so."""
    parents = [".".join(module_name.split(".")[:i + 1]) for i in range(module_name.count(".") + 1)]

    def not_found(why: object) -> ModelSpecError:
        return ModelSpecError(f"cannot import {module_name!r} (from {spec!r}): {why}; give module:attribute, a "
                              "module in this folder or on PYTHONPATH")

    if not all(part.isidentifier() for part in module_name.split(".")):  # empty, a path
        raise not_found("not a module name")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name in parents:
            raise not_found(error) from None
        raise ModelSpecError(f"importing {module_name!r} (from {spec!r}) failed: it imports {error.name!r}, "
                             "which is not installed here") from None
    except Exception as error:  # the module's own code raising (a SyntaxError too): in one line
        raise ModelSpecError(f"importing {module_name!r} (from {spec!r}) raised {type(error).__name__}: "
                             f"{_first_line(error)}") from None


def load_model(spec: str) -> torch.nn.Module:
    """The model ``spec`` names (:func:`resolve`), built: a zoo model, the ``nn.Module`` itself, or what the
    factory returns (its own error in one line)."""
    target = resolve(spec)
    if isinstance(target, str):
        return zoo.build_model(target)
    try:
        model = target if isinstance(target, torch.nn.Module) else target()
    except Exception as error:  # the factory's own error, in one line (its traceback hidden)
        raise ModelSpecError(f"{spec}() raised {type(error).__name__}: {_first_line(error)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(f"{spec} is not an nn.Module and did not build one (got {type(model).__name__})")
    return model


def own_example_inputs(spec: str, model: torch.nn.Module, batch: int) -> tuple | None:
    """``model.example_inputs(batch)`` as the tuple of the model's positional inputs (one tensor: one input,
    not its rows; numbers and nested tuples as they are); None where the model has no such method."""
    method = getattr(model, "example_inputs", None)
    if not callable(method):
        return None
    try:
        given = method(batch)
    except Exception as error:  # noqa: BLE001 -- the model's own error, in one line
        raise ModelSpecError(f"{spec}: example_inputs({batch}) raised {type(error).__name__}: "
                             f"{_first_line(error)}") from None
    inputs = (given,) if isinstance(given, torch.Tensor) else given
    if not isinstance(inputs, (tuple, list)) or not inputs:
        got = f"an empty {type(given).__name__}" if isinstance(inputs, (tuple, list)) else type(given).__name__
        raise ModelSpecError(f"{spec}: example_inputs({batch}) should return a tensor or a tuple of the model's "
                             f"positional inputs, got {got}")
    return tuple(inputs)


def describe_inputs(inputs: tuple) -> str:
    """``1x3x8x8, 1x16`` for tensors; a number as itself, a tuple in parentheses."""
    def one(value: Any) -> str:
        if isinstance(value, torch.Tensor):
            return "x".join(map(str, value.shape)) or "a 0-d tensor"
        if isinstance(value, (tuple, list)):
            return f"({', '.join(one(v) for v in value)})"
        return f"{value!r:.40}"
    return ", ".join(one(value) for value in inputs)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]
