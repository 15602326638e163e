"""The errors pyrys raises for a model it cannot take: each message says what was expected and what to do.

A wrong *input* is a :class:`pyrys.InputError` (``pyrys.signature``).
"""
from __future__ import annotations


class CaptureError(ValueError):
    """The model's code cannot become one graph (it branches on tensor data, say)."""


class DataDependentError(CaptureError):
    """``forward`` reads tensor data into Python (a branch, ``.item()``) or makes a shape from it: where the
    data is a size, a capture with symbolic sizes meets it and one of fixed sizes does not."""


class DeviceError(ValueError):
    """The model's parameters or buffers are not real CPU tensors (on ``meta``, or on a GPU)."""


class ModelCopyError(TypeError):
    """The model cannot be deep-copied, and pyrys works on a private copy so that the user's stays untouched."""


class ModelChangedError(RuntimeError):
    """The model's weights were written after ``optimize``, and a new input shape would capture it again."""


class SaveError(RuntimeError):
    """``pyrys.save`` could not write the program (the path, or something the program holds)."""


class LoadError(ValueError):
    """``pyrys.load`` was given a directory that is not a whole pyrys save this version can read."""


class TracedCallError(TypeError):
    """An optimized module was called by a tracer or a transform (``torch.jit.trace``, ``torch.export``,
    ``torch.func.vmap``), which it cannot run under: it runs compiled programs on real CPU tensors."""
