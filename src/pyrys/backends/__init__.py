"""Backends turn an optimized graph into something that runs.

Each backend is a function ``compile(gm, example_inputs, options, like=None) -> Program``
(``like``: the program of another input shape of the same optimized graph, whose decisions and
packed weights the new one reuses); a program
is called with the flat list of user inputs and returns the flat list of outputs, and says
what it is (``describe``), where its time goes (``profile``) and what it holds (``memory``):
see :class:`pyrys.backends.program.Program`.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from pyrys.backends import reference
from pyrys.backends.options import BackendOptions
from pyrys.backends.program import Program

BackendCompile = Callable[..., Program]  # (gm, example_inputs, options, like=None): see the module docstring


def _dnnl_backend() -> tuple[BackendCompile | None, str]:
    """The dnnl backend if its runtime is present and the library loads, else why not."""
    try:
        from pyrys.backends.dnnl import binding, runtime
    except ImportError as error:
        return None, f"the dnnl runtime is not available ({error})"
    available, reason = binding.is_available()
    return (runtime.compile_program, "") if available else (None, reason)


BACKEND_NAMES = ("auto", "dnnl", "reference")  # what backend= takes


def get_backend(name: str) -> tuple[BackendCompile, str, str]:
    """``(compile, resolved_name, notice)``; ``"auto"`` picks dnnl where it loads, else reference."""
    if name == "reference":
        return reference.compile_program, "reference", ""
    if name in ("dnnl", "auto"):
        compile_fn, reason = _dnnl_backend()
        if compile_fn is not None:
            return compile_fn, "dnnl", ""
        if name == "dnnl":
            raise RuntimeError(f"pyrys: backend 'dnnl' is unavailable: {reason}")
        return reference.compile_program, "reference", f"pyrys: using the reference backend because {reason}"
    raise ValueError(f"pyrys: unknown backend {name!r}; expected one of {', '.join(map(repr, BACKEND_NAMES))}")


def release_constants(program: Program, gms: list[fx.GraphModule]) -> int:
    """Let ``program`` free the plain copies of the constants it holds in its own layouts, wherever
    ``gms`` (its graph and the graphs sharing its constants) hold them: see :mod:`pyrys.ir.released`.
    How many it released (0 for a backend that reads the graph's tensors as they are)."""
    release = getattr(program, "release_constants", None)
    return release(gms) if release is not None else 0


def keep_held(programs: list[Program], graphs: list[fx.GraphModule]) -> int:
    """After input signatures were dropped: what backends share between programs (the dnnl backend's packed
    weights) keeps only what ``programs`` (every one still held) and ``graphs`` read.  How many constants were
    forgotten (0 where a backend shares nothing)."""
    try:
        from pyrys.backends.dnnl import runtime
    except ImportError:
        return 0
    return runtime.keep_held(programs, graphs)


def available_backends() -> list[str]:
    names = ["reference"]
    if _dnnl_backend()[0] is not None:
        names.insert(0, "dnnl")
    return names
