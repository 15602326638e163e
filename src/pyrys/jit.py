"""The seed's TorchScript workflow, under its own names.

    m = torch.jit.script(ConvBnRelu().eval())
    pyrys._jit_pass_freeze_params(m._c, 'forward', 'weight')       # one call per attribute name
    pyrys._jit_pass_freeze_params(m._c, 'forward', 'bias')
    pyrys._jit_pass_freeze_flags(m._c, 'forward', 'training', False)
    print(pyrys.jit.graph_for(m, x))                               # the optimized graph
    y = pyrys.jit.run(m, x)                                        # runs the optimized program

Pythonic spelling: ``pyrys.jit.freeze_params(m, "weight", "bias")``,
``pyrys.jit.freeze_flags(m, training=False)``.

The calls do not touch the scripted module: they record what to freeze in a side table
keyed by the module (weakly), and pyrys applies it when it compiles the module.  Only
what was asked for is frozen, as in the seed: with no ``_jit_pass_freeze_flags`` call,
``training`` stays a read of module state, the ``prim::If`` on it stays, BatchNorm is
not folded, and the result's ``report()`` says so.
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from pyrys.numerics.budget import AUTO
from pyrys.config import check_calibration_options, make_config
from pyrys.optimize import OptimizedModule, optimize_torchscript


@dataclass
class FreezeRequests:
    """What the seed's calls asked pyrys to freeze for one scripted module."""

    params: list[str] = field(default_factory=list)
    flags: dict[str, bool] = field(default_factory=dict)
    compiled: dict[str, OptimizedModule] = field(default_factory=dict)
    generation: int = 0  # freeze calls so far: a compile begun before one is not kept


_REQUESTS: "weakref.WeakKeyDictionary[Any, FreezeRequests]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()  # a freeze call against a compile that stores its result


def _cpp_module(module: Any) -> torch._C.ScriptModule:
    if isinstance(module, torch.jit.ScriptModule):
        return module._c
    if isinstance(module, torch._C.ScriptModule):
        return module
    raise TypeError(f"pyrys.jit expects a scripted module (torch.jit.script(model)) or its ._c, "
                    f"got {type(module).__name__}")


def requests_for(module: Any) -> FreezeRequests:
    """The freezes recorded for ``module`` (a ``ScriptModule`` or its ``._c``)."""
    return _REQUESTS.setdefault(_cpp_module(module), FreezeRequests())


def _check_method(cpp: torch._C.ScriptModule, method_name: str) -> None:
    if method_name != "forward":
        raise ValueError(f"pyrys compiles a module's forward method; got method {method_name!r}")
    if not cpp._has_method("forward"):
        raise ValueError("the scripted module has no forward method")


def _wrapped(cpp: torch._C.ScriptModule) -> torch.jit.ScriptModule:
    return torch.jit._recursive.wrap_cpp_module(cpp)


def _tensor_attribute_names(cpp: torch._C.ScriptModule) -> set[str]:
    module = _wrapped(cpp)
    named = list(module.named_parameters()) + list(module.named_buffers())
    return {name.rsplit(".", 1)[-1] for name, _ in named}


def _flag_names(cpp: torch._C.ScriptModule) -> set[str]:
    """The bool attributes of the module and its submodules (``training``, ``strict`` ...)."""
    return {name for sub in _wrapped(cpp).modules()
            for name, (jit_type, _) in sub._concrete_type.get_attributes().items()
            if isinstance(jit_type, torch._C.BoolType)}


def _jit_pass_freeze_params(module: Any, method_name: str, attribute: str) -> None:
    """The seed's call: freeze every parameter or buffer named ``attribute`` (e.g. ``'weight'``)."""
    cpp = _cpp_module(module)
    _check_method(cpp, method_name)
    names = _tensor_attribute_names(cpp)
    if attribute not in names:
        raise AttributeError(f"the scripted module has no parameter or buffer named {attribute!r}; "
                             f"its tensor attributes are named {sorted(names)}")
    entry = requests_for(cpp)
    if attribute not in entry.params:
        entry.params.append(attribute)
    _forget_compiles(entry)


def _jit_pass_freeze_flags(module: Any, method_name: str, attribute: str, value: bool) -> None:
    """The seed's call: freeze the bool attribute ``attribute`` (e.g. ``'training'``) to ``value``."""
    cpp = _cpp_module(module)
    _check_method(cpp, method_name)
    if not isinstance(value, bool):
        raise TypeError(f"a flag is frozen to True or False, got {value!r}")
    flags = _flag_names(cpp)
    if attribute not in flags:
        raise AttributeError(f"the scripted module has no bool attribute named {attribute!r}; "
                             f"its bool attributes are named {sorted(flags)}")
    entry = requests_for(cpp)
    entry.flags[attribute] = value
    _forget_compiles(entry)


def _forget_compiles(entry: FreezeRequests) -> None:
    with _LOCK:
        entry.generation += 1
        entry.compiled.clear()


def freeze_params(module: Any, *attributes: str) -> None:
    """``pyrys.jit.freeze_params(m, "weight", "bias", "running_mean", "running_var")``."""
    for attribute in attributes:
        _jit_pass_freeze_params(module, "forward", attribute)


def freeze_flags(module: Any, **flags: bool) -> None:
    """``pyrys.jit.freeze_flags(m, training=False)``."""
    for attribute, value in flags.items():
        _jit_pass_freeze_flags(module, "forward", attribute, value)


def compile(module: Any, *example_inputs: Any, **options: Any) -> OptimizedModule:
    """The optimized module for ``module`` with its recorded freezes, cached until a new freeze call or a write
    to the module's tensors (in place or by ``load_state_dict``: their version counters); a compile given
    ``calibration=`` is not cached (its samples are data a key cannot stand for).

    ``options`` are :func:`pyrys.optimize`'s (``backend``, ``disable``, ...), except the freezes.
    """
    if not isinstance(module, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise TypeError(f"pyrys.jit works on scripted modules and functions (torch.jit.script), "
                        f"got {type(module).__name__}")
    for key in ("freeze_params", "freeze_flags"):
        if key in options:
            raise TypeError(f"pyrys.jit takes freezes from the _jit_pass_* calls, not {key}=")
    entry = requests_for(module) if isinstance(module, torch.jit.ScriptModule) else FreezeRequests()
    cached = "calibration" not in options
    key = repr(sorted(options.items()))
    with _LOCK:
        generation, params, flags = entry.generation, tuple(entry.params), dict(entry.flags)
        compiled = entry.compiled.get(key) if cached else None
    if compiled is not None and compiled._weights_unchanged():
        return compiled
    measured = {name: options.pop(name) for name in ("calibration", "accuracy_budget") if name in options}
    config = make_config(freeze_params=params, freeze_flags=tuple(flags), **options)
    check_calibration_options(config.precision, measured.get("calibration"), measured.get("accuracy_budget", AUTO))
    compiled = optimize_torchscript(module, example_inputs, None, config, flags, **measured)
    with _LOCK:
        if cached and entry.generation == generation:  # no freeze call came while it compiled
            entry.compiled[key] = compiled
    return compiled


def graph_for(module: Any, *inputs: Any, **options: Any) -> str:
    """The optimized graph for these inputs, in the seed's text form (the dnnl program's when it runs on dnnl)."""
    compiled = compile(module, *inputs, **options)
    if compiled.backend == "dnnl":
        return compiled.program_text()
    return compiled.graph


def run(module: Any, *inputs: Any, **options: Any) -> Any:
    """Call ``module``'s optimized program on ``inputs``."""
    with torch.no_grad():
        return compile(module, *inputs, **options)(*inputs)
