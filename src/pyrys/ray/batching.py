"""Dynamic batching: several callers' inputs run as one call, and each caller gets its own rows back.

Requests whose inputs agree in everything but the leading (batch) dim form a group; request i
brings n_i rows (the dim 0 every one of its inputs shares).  A group's inputs are concatenated
along dim 0, run once, and every output tensor is split back: request i gets rows
[n_0 + ... + n_{i-1}, n_0 + ... + n_i).  A group runs request by request instead

- when the module's graph does not show dim 0 as the rows: every input and every output must have
  the same symbolic size there (:attr:`pyrys.OptimizedModule.batches_rows`; False for a program
  saved for fixed shapes, or one whose output is, say, transposed);
- when an output is not a tensor with the batch's rows in dim 0 (then never batched again);
- when the batched call fails, so that only the request at fault gets its error.

That rows do not mix (no op reduces or attends across dim 0) cannot be read from the shapes: a
sequence-first model (``(S, B, E)``, attention across dim 0) has the same symbolic size in dim 0 of
its input and output.  So a batch is also run request by request, and its first request once more joined
with rows unlike it (requests that attend alike, a warm-up of copies, cannot show rows mixing), until a check saw
rows that differ (the batch's, or the probe's: a warm-up of padding ids, one value everywhere, decides nothing).
Where any output element moved by more than ``ROWS_AGREE`` of its feature's magnitude (the largest over the rows
at that place) beyond float rounding (:func:`rows_agree`), or changed shape, the module never batches again, and
its callers get the request-by-request outputs.  ``--max-batch 1`` turns batching off.  Batching changes which
kernels run (they depend on the batch size), so a row's output agrees with the same row run alone
within the module's float tolerance, not bitwise; rows that mix move by far more.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from pyrys.numerics import error_or_reason
from pyrys.precision_notes import effective_precision

ROWS_AGREE = 1e-2  # bf16 and int8 rows move ~1e-3 with the batch's kernels; mixed rows move O(1)
ROWS_ROUNDING = 1e-5  # float32 rows move ~1e-7-1e-6 of the output's magnitude with the batch's kernels


class Batcher:
    """Runs lists of requests (each a tuple of positional input tensors) on ``module``; safe to call from
    many threads at once when ``module`` is."""

    def __init__(self, module: Callable[..., Any]):
        self._module = module
        self.batches = getattr(module, "batches_rows", True)
        self._rows_checked = False  # whether a batch's rows were seen to be each request's own

    def run(self, requests: Sequence[tuple[torch.Tensor, ...]]) -> list[tuple[Any, int]]:
        """Per request: its outputs, or the exception its inputs raised (returned, not raised), and the rows
        of the call that ran it (its own, or the batch's)."""
        results: list[Any] = [None] * len(requests)
        for group in _groups(requests):
            answers = self._batched([requests[i] for i in group]) if self.batches and len(group) > 1 else None
            for i, answer in zip(group, answers or [self._one(requests[i]) for i in group]):
                results[i] = answer
        return results

    def _one(self, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, int]:
        try:
            with torch.inference_mode():
                return self._module(*inputs), rows_of(inputs)
        except Exception as error:  # noqa: BLE001 - the caller answers each request with its own error
            return error, rows_of(inputs)

    def _batched(self, requests: list[tuple[torch.Tensor, ...]]) -> list[tuple[Any, int]] | None:
        rows = [rows_of(inputs) for inputs in requests]
        joined = tuple(torch.cat(column) for column in zip(*requests))
        try:
            with torch.inference_mode():
                outputs = self._module(*joined)
        except Exception:  # noqa: BLE001 - run one by one: only the request at fault gets the error
            return None
        leaves, spec = tree_flatten(outputs)
        if not all(per_row(leaf, sum(rows)) for leaf in leaves):
            self.batches = False  # this model's outputs are not per row: it never batches
            return None
        parts = [leaf.split(rows) for leaf in leaves]
        batched = [(tree_unflatten([part[i] for part in parts], spec), sum(rows)) for i in range(len(requests))]
        return batched if self._rows_checked else self._check_rows(requests, batched)

    def _check_rows(self, requests: list[tuple[torch.Tensor, ...]],
                    batched: list[tuple[Any, int]]) -> list[tuple[Any, int]]:
        """The batch's answers against each request run alone, then a probe (:meth:`_probe_mixes_rows`): the alone
        answers, and no batching from now on, where rows mixed.  The check counts for good only where the rows it
        saw differ (the batch's own, or the probe's): identical rows mix to the same values."""
        alone = [self._one(inputs) for inputs in requests]
        if any(isinstance(outputs, Exception) for outputs, _ in alone):
            return alone  # undecided: a request failed alone that ran in the batch
        floor = _rounding_floor(self._module)
        agree = all(rows_agree(joined, own, floor) for (own, _), (joined, _) in zip(alone, batched))
        probed = self._probe_mixes_rows(requests, alone[0][0], floor) if agree else True
        if probed is True:
            self._rows_checked, self.batches = True, False
            return alone
        self._rows_checked = probed is False or _rows_differ(requests)  # else undecided: the next batch checks again
        return batched

    def _probe_mixes_rows(self, requests: list[tuple[torch.Tensor, ...]], alone: Any, floor: float) -> bool | None:
        """Whether the first request joined with rows unlike its own (:func:`_unlike`, made from values seen in
        ``requests``) answers differently for its own rows: requests that attend alike (copies, a warm-up, one row
        and the same twice) cannot show rows mixing.  None where the probe fails or cannot make other rows (every
        input holds one value, as a warm-up of padding ids does)."""
        inputs = requests[0]
        unlike = tuple(_unlike(t, [r[k] for r in requests]) for k, t in enumerate(inputs))
        if all(torch.equal(made, t) for made, t in zip(unlike, inputs)):
            return None
        try:
            with torch.inference_mode():
                joined = self._module(*(torch.cat([t, made]) for t, made in zip(inputs, unlike)))
            own = tree_unflatten([leaf[:rows_of(inputs)] for leaf in tree_flatten(joined)[0]], tree_flatten(alone)[1])
        except Exception:  # noqa: BLE001 - the probe's rows are made up: a model may refuse them
            return None
        return not rows_agree(own, alone, floor)


def rows_agree(batched: Any, alone: Any, floor: float = ROWS_ROUNDING) -> bool:
    """Whether a request's outputs from a batch are its outputs run alone, element by element:
    ``|batched - alone| <= ROWS_AGREE * feature + floor * leaf``, where ``feature`` is the largest magnitude at that
    place over the rows (dims 1..: a feature, a column) and ``leaf`` the largest of the whole output.  A feature of
    values ~1 that moves by 0.3 next to one of ~1000 is rows mixing (a relative error over the whole output,
    3e-4, hid it); the kernels of another batch size move float32 values by ~1e-6 of the output's magnitude."""
    got, got_spec = tree_flatten(batched)
    want, want_spec = tree_flatten(alone)
    return got_spec == want_spec and all(_leaf_agrees(a, b, floor) for a, b in zip(got, want))


def _leaf_agrees(got: Any, want: Any, floor: float) -> bool:
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor):
        return error_or_reason(got, want)[0] == 0
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if not (want.is_floating_point() or want.is_complex()):
        return torch.equal(got, want)
    if want.numel() == 0:
        return True
    wide = torch.complex128 if want.is_complex() else torch.float64
    got, want = got.detach().to(wide), want.detach().to(wide)
    same = (got == want) | (got.isnan() & want.isnan())  # the same infinity, or NaN in both
    size = torch.maximum(got.abs(), want.abs()).nan_to_num(nan=0.0, posinf=0.0)
    feature = size.amax(0, keepdim=True) if size.dim() else size
    allowed = ROWS_AGREE * feature + floor * size.max()
    return bool(((got - want).abs().nan_to_num(nan=float("inf")) <= allowed).logical_or(same).all())


def _rounding_floor(module: Any) -> float:
    """What batching may move an output by, over its largest magnitude, beside :data:`ROWS_AGREE` of each feature's:
    :data:`ROWS_ROUNDING` for float32, :data:`ROWS_AGREE` where the program runs bf16 or int8 layers (the precision
    it runs in: ``precision="bf16"`` runs float32 on a CPU without native bf16)."""
    asked = getattr(getattr(module, "_config", None), "precision", None)
    return ROWS_AGREE if asked and effective_precision(asked)[0] in ("bf16", "int8") else ROWS_ROUNDING


def _rows_differ(requests: list[tuple[torch.Tensor, ...]]) -> bool:
    """Whether the batch's rows (dim 0 of its inputs, joined) are not all one row: copies cannot show mixing."""
    joined = [torch.cat(column) for column in zip(*requests)]
    return any(len(t) > 1 and not bool((t == t[:1]).all()) for t in joined)


def _unlike(tensor: torch.Tensor, seen: list[torch.Tensor]) -> torch.Tensor:
    """Rows of ``tensor``'s shape and dtype, each element unlike its own: floats drawn around its values; anything
    else (token ids, masks) each element moved to another value ``seen`` in the requests' same input, by a step
    of its row (a row of ids stays ids the embedding takes); ``tensor`` itself where only one value was seen."""
    generator = torch.Generator().manual_seed(len(tensor))
    if tensor.is_floating_point() or tensor.is_complex():
        spread = float(tensor.float().std()) if tensor.numel() > 1 else 1.0
        noise = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
        return tensor.mean() + noise * (spread if spread > 0 else 1.0)
    values = torch.unique(torch.cat([t.reshape(-1) for t in seen]).long())
    if len(values) < 2:
        return tensor
    place = torch.searchsorted(values, tensor.long())
    step = 1 + torch.arange(len(tensor)).remainder(len(values) - 1).view(-1, *[1] * (tensor.dim() - 1))
    return values[(place + step) % len(values)].to(tensor.dtype)


def per_row(leaf: Any, rows: int) -> bool:
    """Whether an output ``leaf`` has one row (dim 0 entry) per input row."""
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and len(leaf) == rows


def rows_of(inputs: tuple) -> int:
    """The rows a request brings: its first input's dim 0 (1 for a scalar or no input)."""
    first = inputs[0] if inputs else None
    return len(first) if isinstance(first, torch.Tensor) and first.dim() > 0 else 1


def _groups(requests: Sequence[tuple[torch.Tensor, ...]]) -> list[list[int]]:
    """Indices of the requests that can run as one batch, in arrival order."""
    groups: dict[Any, list[int]] = {}
    for i, inputs in enumerate(requests):
        groups.setdefault(_batch_key(inputs, i), []).append(i)
    return list(groups.values())


def _batch_key(inputs: tuple[torch.Tensor, ...], index: int) -> Any:
    """What must agree for two requests to be batched: each input's dtype and all but its dim 0, and
    that every input has as many rows (at least one); a request that cannot batch gets a key of its own."""
    if not inputs or not all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in inputs):
        return ("alone", index)
    if len({len(t) for t in inputs}) != 1 or len(inputs[0]) == 0:
        return ("alone", index)
    return tuple((t.dtype, tuple(t.shape[1:])) for t in inputs)
