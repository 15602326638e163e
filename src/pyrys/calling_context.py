"""What around a call an optimized module cannot follow: tracers, transforms, ``torch.autocast``, another default dtype.

A compiled program runs real CPU tensors through oneDNN primitives built for them.  Under
``torch.jit.trace`` (which crashed the interpreter once the call returned), ``torch.export`` or another
tracer running fake tensors, or a ``torch.func`` transform (``vmap``, ``grad``), there are none: such a call
raises :class:`TracedCallError` saying to trace the model itself.  (``torch.compile`` of a module holding an
optimized one works: dynamo runs it as a call it does not trace.)

A call while torch's default dtype is not the one at ``optimize`` raises :class:`OtherDefaultDtype` (an
:class:`~pyrys.signature.InputError`): the program's torch steps would make the model's own tensors in it
(a float64 ``n / 7`` read as float32 by a oneDNN step: 0.56 off), and so would a capture, for every later
shape; the default is the process's, not to be set back for one call while other threads read it.

``torch.autocast`` is not followed: the program runs the precision it was optimized for, whatever the
caller's autocast says, and compiles with autocast off (a capture made under it would record autocast's
bfloat16 casts into the graph every later shape is built from); a call under autocast warns once.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings

import torch

from pyrys.errors import TracedCallError
from pyrys.signature import InputError
from pyrys.ir.vocabulary import draws_random_numbers

_FAKE, _PROXY = torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.PROXY
# the checks every call makes, bound once (about 0.2 us together); each reads the calling thread's state
# (not torch.compiler.is_exporting(): one flag for the process, set while any thread exports)
_tracing, _mode, _transform_level, _any_autocast = (torch._C._is_tracing, torch._C._get_dispatch_mode,
                                                    torch._C._functorch.maybe_current_level,
                                                    torch._C._is_any_autocast_enabled)


def called_plainly() -> bool:
    """Whether this call is neither traced nor transformed nor under any ``torch.autocast``: what every call
    checks first, in one function (the rest of this module runs only where it is not)."""
    return not (_tracing() or _mode(_FAKE) is not None or _mode(_PROXY) is not None
                or _transform_level() is not None or _any_autocast())


def tracer() -> str | None:
    """The tracer or transform running the call now on this thread, in words; None for a plain call."""
    if _tracing():
        return "torch.jit.trace"
    if _mode(_FAKE) is not None or _mode(_PROXY) is not None:
        return "torch.export (or another tracer running fake tensors)"
    if _transform_level() is not None:
        return "a torch.func transform (vmap, grad, jacrev ...)"
    return None


def refuse_tracers() -> None:
    """:class:`TracedCallError` where the call is traced or transformed (see the module docstring)."""
    by = tracer()
    if by is not None:
        raise TracedCallError(
            f"pyrys: an optimized module cannot be called under {by}: it runs compiled oneDNN programs on real "
            "CPU tensors, which a tracer does not pass. Trace, export or transform the original model (and "
            "optimize the result: pyrys.optimize takes TorchScript and ExportedProgram), or torch.compile the "
            "module that holds this one")


def autocast_on() -> bool:
    """Whether the caller's ``torch.autocast`` is on for the CPU."""
    return _any_autocast() and torch.is_autocast_enabled("cpu")


class OtherDefaultDtype(InputError):
    """A call refused because torch's default dtype is not the one the module was optimized under."""


def other_default_dtype(optimized_under: torch.dtype) -> OtherDefaultDtype:
    """Why a call (or a compile) refuses to run while torch's default dtype is not ``optimized_under``: what the
    model makes from the default (``torch.ones(8)``, ``n / 7`` of an integer) is made in it by the program's
    torch steps at each call and by a capture for every later shape, and the default is the process's, not
    to be set back for one call while other threads read it."""
    now = torch.get_default_dtype()
    return OtherDefaultDtype(
        f"pyrys: torch's default dtype is {now}, and the module was optimized under {optimized_under}: what the "
        f"model makes from the default (torch.ones(8), an integer tensor / 7) would be {now} here and "
        f"{optimized_under} where the program was compiled. Call it with torch.set_default_dtype({optimized_under}), "
        f"or optimize the model under {now}")


def warn_of_autocast(precision: str) -> None:
    warnings.warn(f"pyrys: torch.autocast is not followed: the optimized module runs the precision it was "
                  f"optimized for (precision={precision!r}) and returns its dtypes; optimize with precision='bf16' "
                  "(and output_dtype=torch.bfloat16 for bfloat16 outputs) to compute in bf16", UserWarning,
                  stacklevel=callers_level())


_PYRYS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def callers_level() -> int:
    """The ``stacklevel`` that names, in a warning of the function calling this, the user's line: the first
    frame outside pyrys and torch (``Module.__call__`` and its hooks' path, ``opt.eval()`` reaching ``train``,
    dynamo's wrapper of an untraced call); a hard-coded count missed it where a forward hook added a frame."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith((_PYRYS_DIR, _TORCH_DIR)):
        frame, level = frame.f_back, level + 1
    return level


def without_autocast() -> contextlib.AbstractContextManager:
    """A context in which ``torch.autocast`` is off for the CPU (compiles, and calls made under it)."""
    return torch.autocast("cpu", enabled=False)


def rng_kept(function):
    """``function`` (a compile, returning a ``Compiled``) with torch's CPU random generator put back as it was
    where the graph it compiled draws random numbers: the compile runs the program and the model to measure
    them, and a model's own noise (``randn_like``) drew from the generator, so that a seeded first call drew
    other numbers than eager's.  Only there: the generator is the process's, and what other threads drew
    meanwhile is drawn again after it is put back."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        state = torch.random.get_rng_state()
        compiled = function(*args, **kwargs)
        if any(draws_random_numbers(node) for node in compiled.captured.gm.graph.nodes):
            torch.random.set_rng_state(state)
        return compiled
    return run


def autocast_off(function):
    """``function`` run with ``torch.autocast`` off for the CPU (a compile: see the module docstring)."""
    @functools.wraps(function)
    def run(*args, **kwargs):
        with without_autocast():
            return function(*args, **kwargs)
    return run
