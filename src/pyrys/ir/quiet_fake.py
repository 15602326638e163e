"""Fake-tensor failures a caller expects and handles, kept out of the log.

torch's fake tensors log a failing op with its traceback (165 lines for one model) before raising it; where
pyrys tries something that may fail and records why (a TorchScript branch not taken on these shapes, a saved
symbolic graph rebuilt to see whether load can), that log is quiet on the trying thread meanwhile.  So is
torch.export's "Failed to reduce inequalities" (sympy could not simplify the ranges it suggests for a
``Dim``, a warning with a traceback for symbolic image sizes: SqueezeNet, MobileViT) while pyrys exports:
the export goes on, and pyrys reads no suggestion; and the partial graph torch.export prints to stderr before
an error on tensor data, which pyrys raises again naming the line.
"""
from __future__ import annotations

import builtins
import contextlib
import logging
import threading

from torch.export import _trace as _export_trace


class _UnloggedHere(logging.Filter):
    """Drops records on the threads inside :func:`fake_tensor_errors_unlogged`."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "depth", 0)


_UNLOGGED = _UnloggedHere()
logging.getLogger("torch._subclasses.fake_tensor").addFilter(_UNLOGGED)
UNREDUCED = "Failed to reduce inequalities"  # torch.fx.experimental.symbolic_shapes's, with its traceback


class _UnreducedHere(_UnloggedHere):
    """Drops torch.export's :data:`UNREDUCED` on the threads inside :func:`export_diagnostics_unlogged`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return super().filter(record) or record.msg != UNREDUCED


_UNREDUCED = _UnreducedHere()
logging.getLogger("torch.fx.experimental.symbolic_shapes").addFilter(_UNREDUCED)


@contextlib.contextmanager
def _quiet_here(drops: _UnloggedHere):
    """``drops`` drops its records on this thread meanwhile."""
    drops.local.depth = getattr(drops.local, "depth", 0) + 1
    try:
        yield
    finally:
        drops.local.depth -= 1


def fake_tensor_errors_unlogged():
    """torch's fake-tensor log is quiet on this thread meanwhile."""
    return _quiet_here(_UNLOGGED)


@contextlib.contextmanager
def export_diagnostics_unlogged():
    """torch.export's :data:`UNREDUCED` warning is quiet on this thread meanwhile, and so is the partial graph
    it prints to stderr when tracing meets tensor data (``partial_fx_graph``: 1,700 lines for a detection
    model, before the error pyrys raises for it, which names the line; the graph stays on torch's error, the
    ``__cause__`` of pyrys's)."""
    with _quiet_here(_UNREDUCED), _partial_graphs_unprinted():
        yield


_UNPRINTED = threading.local()


def _print_unless_partial_graph(*values, **options) -> None:
    """``print`` as torch.export's module calls it, but for the partial graph of a failed trace on the threads
    inside :func:`_partial_graphs_unprinted` (a module-level name there: no stream of anyone else's is wrapped)."""
    if getattr(_UNPRINTED, "depth", 0) and values and _is_partial_graph(values[0]):
        return
    builtins.print(*values, **options)


_export_trace.print = _print_unless_partial_graph  # torch.export/_trace.py: print(e.partial_fx_graph, file=sys.stderr)


def _is_partial_graph(text) -> bool:
    """An FX graph's code as torch.export prints it (``graph.python_code(...).src``)."""
    return isinstance(text, str) and text.lstrip().startswith("def forward(")


@contextlib.contextmanager
def _partial_graphs_unprinted():
    """torch.export prints no partial graph on this thread meanwhile."""
    _UNPRINTED.depth = getattr(_UNPRINTED, "depth", 0) + 1
    try:
        yield
    finally:
        _UNPRINTED.depth -= 1
