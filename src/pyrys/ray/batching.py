"""Dynamic batching: several callers' inputs run as one call, and each caller gets its own rows back.

Requests whose inputs agree in everything but the leading (batch) dim form a group; request i
brings n_i rows (the dim 0 every one of its inputs shares).  A group's inputs are concatenated
along dim 0, run once, and every output tensor is split back: request i gets rows
[n_0 + ... + n_{i-1}, n_0 + ... + n_i).  A group runs request by request instead

- when the module cannot take a new batch size without capturing the model again (a program
  saved for fixed shapes: :attr:`pyrys.OptimizedModule.specializes_shapes` is False);
- when an output is not a tensor with the batch's rows in dim 0 (then never batched again);
- when the batched call fails, so that only the request at fault gets its error.

Batching changes which kernels run (they depend on the batch size), so a row's output agrees
with the same row run alone within the module's float tolerance, not bitwise.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


class Batcher:
    """Runs lists of requests (each a tuple of positional input tensors) on ``module``."""

    def __init__(self, module: Callable[..., Any]):
        self._module = module
        self.batches = getattr(module, "specializes_shapes", True)

    def run(self, requests: Sequence[tuple[torch.Tensor, ...]]) -> list[Any]:
        """Per request, its outputs, or the exception its inputs raised (returned, not raised)."""
        results: list[Any] = [None] * len(requests)
        for group in _groups(requests):
            outputs = self._batched([requests[i] for i in group]) if self.batches and len(group) > 1 else None
            for i, output in zip(group, outputs or [self._one(requests[i]) for i in group]):
                results[i] = output
        return results

    def _one(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        try:
            with torch.inference_mode():
                return self._module(*inputs)
        except Exception as error:  # noqa: BLE001 - the caller answers each request with its own error
            return error

    def _batched(self, requests: list[tuple[torch.Tensor, ...]]) -> list[Any] | None:
        rows = [len(inputs[0]) for inputs in requests]
        joined = tuple(torch.cat(column) for column in zip(*requests))
        try:
            with torch.inference_mode():
                outputs = self._module(*joined)
        except Exception:  # noqa: BLE001 - run one by one: only the request at fault gets the error
            return None
        leaves, spec = tree_flatten(outputs)
        if not all(isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and len(leaf) == sum(rows) for leaf in leaves):
            self.batches = False  # this model's outputs are not per row: it never batches
            return None
        parts = [leaf.split(rows) for leaf in leaves]
        return [tree_unflatten([part[i] for part in parts], spec) for i in range(len(requests))]


def _groups(requests: Sequence[tuple[torch.Tensor, ...]]) -> list[list[int]]:
    """Indices of the requests that can run as one batch, in arrival order."""
    groups: dict[Any, list[int]] = {}
    for i, inputs in enumerate(requests):
        groups.setdefault(_batch_key(inputs, i), []).append(i)
    return list(groups.values())


def _batch_key(inputs: tuple[torch.Tensor, ...], index: int) -> Any:
    """What must agree for two requests to be batched: each input's dtype and all but its dim 0, and
    that every input has as many rows; a request that cannot batch gets a key of its own."""
    if not inputs or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in inputs):
        return ("alone", index)
    if len({len(t) for t in inputs}) != 1 or len(inputs[0]) == 0:
        return ("alone", index)
    return tuple((t.dtype, tuple(t.shape[1:])) for t in inputs)
