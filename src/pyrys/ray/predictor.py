"""Ray Data batch inference with a saved pyrys program.

    ds = ray.data.from_numpy(images)                       # a column "data"; read_images gives "image"
    ds = ds.map_batches(pyrys.ray.Predictor, fn_constructor_args=("resnet50.pyrys",),
                        fn_constructor_kwargs={"column": "data"}, batch_size=64,
                        compute=ray.data.ActorPoolStrategy(size=2))

Each actor loads the program once (``pyrys.load``: no capture, no pass).  ``path`` is the saved
directory (every node must read it), or its files (``pyrys.saving.read_files(path)``, which Ray
ships to each actor with the constructor's arguments), or an object reference to them.  A batch's ``column``
(or columns, one per positional input, bound by position: columns named as ``forward``'s parameters in
another order are refused) become the inputs, dim 0 being the rows; the outputs are
added to the batch as ``output_column`` (one tensor output), or, for several outputs, as
``output_column`` + ``"_"`` + the output's name (:func:`pyrys.ray.codec.named_leaves`: ``output_0``,
``output_logits``), or under the names ``output_column`` lists.  Every output must have one row
per input row, and a column the batch already has is not replaced (``ValueError``).  A batch size the program cannot take (a program saved for fixed shapes) runs
row by row when the program takes one row, else raises :class:`pyrys.InputError` naming the shapes.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pyrys.ray.batching import per_row
from pyrys.ray.codec import as_tensor, distinct, named_leaves, to_numpy
from pyrys.ray.source import load_program
from pyrys.signature import InputError, is_tensor_leaf


class Predictor:
    """A callable class for ``Dataset.map_batches``: ``batch -> batch`` with the model's outputs added."""

    def __init__(self, path: str | os.PathLike | Mapping[str, bytes], column: str | Sequence[str] = "image",
                 output_column: str | Sequence[str] = "output", *, threads: int | None = None):
        self.columns = _names(column, "column")
        output_names = _names(output_column, "output_column")
        clashing = sorted(set(self.columns) & set(output_names))
        if clashing:
            raise ValueError(f"pyrys.ray.Predictor: output_column {clashing[0]!r} is an input column too: the outputs "
                             "would replace the inputs; name the outputs otherwise")
        self.output_column = output_column if isinstance(output_column, str) else output_names
        self.module = load_program(path, threads)
        _check_column_order(self.columns, getattr(self.module, "input_names", []))

    def __call__(self, batch: Mapping[str, Any]) -> Any:
        if not hasattr(batch, "keys"):
            raise InputError(f"pyrys.ray.Predictor takes batches of columns by name (batch_format='numpy', the "
                             f"default, or 'pandas'), got {type(batch).__name__}")
        missing = [name for name in self.columns if name not in batch]
        if missing:
            raise InputError(f"pyrys.ray.Predictor: the batch has no column {missing[0]!r} (it has "
                             f"{sorted(batch.keys())}); pass column= the input's column name")
        leaves = self.module.input_types
        inputs = tuple(_column_tensor(batch[name], name, leaves[i] if i < len(leaves) else None)
                       for i, name in enumerate(self.columns))
        outputs = self._run(inputs)
        rows = len(inputs[0])
        named = named_leaves(outputs)
        names = self._output_names(named)
        taken = [name for name in names if name in batch]
        if taken:
            raise ValueError(f"pyrys.ray.Predictor: the batch has a column {taken[0]!r} already, which the output would "
                             "replace; pass output_column= another name for the outputs")
        for (_, leaf), name in zip(named, names):
            if not per_row(leaf, rows):
                raise ValueError(f"pyrys.ray.Predictor: output {name!r} must have one row per input row ({rows}), "
                                 f"got {_describe(leaf)}; Ray Data needs per-row outputs")
            batch[name] = _column_value(leaf, batch)
        return batch

    def _run(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        with torch.inference_mode():
            try:
                return self.module(*inputs)
            except InputError as error:
                if self.module.specializes_shapes or len(inputs[0]) <= 1:
                    raise
                try:
                    rows = [self.module(*(t[i:i + 1] for t in inputs)) for i in range(len(inputs[0]))]
                except InputError:
                    raise error from None
        return torch.utils._pytree.tree_map(_joined_rows, *rows) if len(rows) > 1 else rows[0]

    def _output_names(self, named: list[tuple[str, Any]]) -> list[str]:
        if not isinstance(self.output_column, str):
            if len(self.output_column) != len(named):
                raise ValueError(f"pyrys.ray.Predictor: output_column names {len(self.output_column)} columns; "
                                 f"the model has {len(named)} outputs ({[n for n, _ in named]})")
            return list(self.output_column)
        if len(named) == 1:
            return [self.output_column]
        return distinct([f"{self.output_column}_{name.replace('.', '_')}" for name, _ in named])


def _names(value: Any, argument: str) -> list[str]:
    """A column name or a sequence of them as a list of names, else ``TypeError`` naming ``argument``."""
    names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if not names or not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"pyrys.ray.Predictor: {argument} must be a column name or a list of them, got {value!r:.80}")
    return names


def _check_column_order(columns: list[str], inputs: list) -> None:
    """``ValueError`` where ``columns`` are the names of the program's inputs (``forward``'s parameters they fill)
    in another order: columns bind to inputs by position, so the inputs would be swapped."""
    known = [name for name in inputs if name is not None]
    if set(columns) <= set(known) and columns != inputs[:len(columns)]:
        raise ValueError(f"pyrys.ray.Predictor: column= {columns} names forward's parameters in another order than "
                         f"its inputs {inputs[:len(columns)]}; columns fill the inputs by position, so list them "
                         f"in forward's order: column={inputs[:len(columns)]}")


def _column_tensor(values: Any, name: str, expected: Any = None) -> torch.Tensor:
    """A batch column as one tensor, rows in dim 0 (a column of per-row arrays is stacked; one of no rows is
    the program's input with 0 rows, ``expected``: its signature leaf, ``(shape, dtype)``; float32 rows for a
    bfloat16 input, which numpy has no type for, are rounded to it, as ``pyrys serve`` does)."""
    array = values.to_numpy() if hasattr(values, "to_numpy") else np.asarray(values)
    if array.dtype == object and len(array) == 0 and is_tensor_leaf(expected):
        return torch.empty((0, *expected[0][1:]), dtype=expected[1])
    if array.dtype == object:
        try:
            rows = [np.asarray(row) for row in array]
        except ValueError as error:  # a ragged row: numbers nested unevenly
            raise InputError(f"pyrys.ray.Predictor: column {name!r} holds rows of different shapes ({error}); "
                             "resize them to one shape first") from None
        for i, row in enumerate(rows):
            if row.dtype.kind not in "biufc":
                raise InputError(f"pyrys.ray.Predictor: row {i} of column {name!r} is {type(array[i]).__name__} "
                                 f"{array[i]!r:.60}, not an array of numbers")
        try:
            array = np.stack(rows)
        except ValueError as error:
            raise InputError(f"pyrys.ray.Predictor: column {name!r} holds rows of different shapes ({error}); "
                             "resize them to one shape first") from None
    return as_tensor(array, f"column {name!r}", expected[1] if is_tensor_leaf(expected) else None)  # f32 -> bf16


def _column_value(leaf: torch.Tensor, batch: Any) -> Any:
    array = to_numpy(leaf)
    return list(array) if hasattr(batch, "to_numpy") and array.ndim > 1 else array


def _describe(leaf: Any) -> str:
    return f"shape {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else type(leaf).__name__


def _joined_rows(*parts: Any) -> Any:
    """One output's rows, called one by one, joined; an output that is no tensor, or a 0-d one, is the first row's (refused
    below as not per row, by name, as a batch's would be; ``torch.cat`` raised a TypeError)."""
    return torch.cat(parts) if all(isinstance(part, torch.Tensor) and part.dim() for part in parts) else parts[0]
