"""Shapes with a size of 1 that a graph captured with symbolic sizes excludes, and the inputs to capture them.

A graph captured from larger sizes may hold only where a size is not 1: the trace assumed ``Ne(batch, 1)``
(``nn.TransformerEncoderLayer`` given a padding mask), or torch.export gave a length the range ``[2, oo)``
(HuggingFace BERT).  In memory such a shape used to be captured again for itself alone; a loaded module,
which has no model to capture, refused it.  So for each symbol whose value 1 the graph excludes, the module
captures a second graph from the inputs at hand with that symbol's dims narrowed to 1, those dims fixed and
every other one symbolic (``capture/dynamic_shapes.py``'s ``SIZE_ONE_FIXED``): at the first call that needs
it, and before ``pyrys.save`` for each one still missing (and then for those a size-1 capture excludes in turn:
batch 1 of length 1), so that a saved module takes batch 1 and length 1.

Such a graph may compute some values otherwise than the one calibrated (constants folded at size 1): what
its int8 layers read is measured on the calibration samples it takes, cut to its size-1 dims
(:func:`fitted_samples`); and where their rows are not its rows (one-row samples, a graph for batches from 2;
batch-4 samples, a capture at batch 2), on their rows regrouped into samples of its rows.
"""
from __future__ import annotations

from typing import NamedTuple

import sympy
import torch
import torch.fx as fx
from torch.utils._pytree import tree_unflatten

from pyrys.ir.graph import user_inputs
from pyrys.ir.symbolic import FAKE_MODE_KEY, bind_symbols, hint, is_symbolic, ranges_of
from pyrys.signature import signature_of


class SizeOneInputs(NamedTuple):
    """Inputs to capture a size of 1 from, and whether they narrow one symbol's dims ``alone`` where other
    inputs share their size (a text batch of one beside two images): a mix the model may refuse (ids and a
    mask of two batches), in which case the inputs with both narrowed, which come next, are captured instead."""
    args: tuple
    kwargs: dict
    alone: bool


def excluded_size_one_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[SizeOneInputs]:
    """For each symbol of ``gm``'s inputs whose value 1 its ranges or guards exclude (the other dims as in
    ``args``, ``kwargs``), those inputs with that symbol's dims narrowed to 1 (where other inputs' batches
    vary apart: a text batch of 3 with one image), and with them every other input dim at the same place of
    the same size (ids and a mask may have a symbol each for one batch: a model given one narrowed and not
    the other fails), each where ``gm`` refuses it, copied contiguous (a narrowed view's strides would
    become symbols of their own in the capture; a view would keep the caller's whole tensor)."""
    signature, flat = signature_of(args, kwargs)
    dims = _symbol_dims(gm, flat)
    examples, seen = [], set()
    for symbol, where in dims.items():
        size = flat[where[0][0]].shape[where[0][1]]
        if size < 1:
            continue  # empty: no row to narrow to
        group = sorted({(i, d) for places in dims.values() for i, d in places
                        if d == where[0][1] and flat[i].shape[d] == size} | set(where))
        for places in dict.fromkeys((tuple(sorted(where)), tuple(group))):
            narrowed = list(flat)  # (of size 1 already: these inputs, where a graph captured from others excludes them)
            for i, d in places:
                narrowed[i] = narrowed[i].narrow(d, 0, 1)
            shapes = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in narrowed)
            if shapes in seen:
                continue
            seen.add(shapes)
            shapes = [torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t
                      for t in narrowed]
            if bind_symbols(gm, shapes)[1] is not None:
                narrowed = [t.clone(memory_format=torch.contiguous_format) if isinstance(t, torch.Tensor) else t
                            for t in narrowed]  # copies: kept until a save, they must not hold the caller's tensors
                examples.append(SizeOneInputs(*tree_unflatten(narrowed, signature.in_spec),
                                              alone=len(places) < len(group)))
    return examples


def other_sizes_held(gm: fx.GraphModule, flat: list) -> bool:
    """Whether one of ``gm``'s symbolic input dims has a size other than 1 in ``flat``: a capture of those
    inputs with their size-1 dims fixed (a batch of one at every length) takes more shapes than a program of
    ``flat``'s shapes alone (one length)."""
    return any(flat[i].shape[d] != 1 for places in _symbol_dims(gm, flat).values() for i, d in places)


def size_one_dims(gm: fx.GraphModule, flat: list) -> bool:
    """Whether one of ``gm``'s symbolic input dims has size 1 in ``flat`` (a shape a graph captured with those
    dims fixed at 1 may hold for)."""
    return any(flat[i].shape[d] == 1 for places in _symbol_dims(gm, flat).values() for i, d in places)


JOINED_ROWS = (2, 4, 8)  # the rows of the samples tried where a graph takes no sample of fewer rows as it is


def fitted_samples(gm: fx.GraphModule, samples: list[list], limit: int,
                   example_shapes: list | None = None) -> tuple[list[list], str]:
    """The samples (flat inputs) ``gm`` takes, at most ``limit``, each cut where ``gm`` holds an input dim at
    a size the sample has larger (:func:`_fixed_places`: a capture for a batch of one, for a step of one token,
    for a length the model pins): into its rows where dims 0 of one size are cut to 1 (each row a sample),
    any other dim of those tensors to its first positions and, as another sample, its last (a step of one
    token from left-padded texts takes each row's last token too: row 0's first token alone measured only
    padding; a helper's find and a reviewer's); where another tensor is cut past dim 0 (a GRU's state at its
    batch, dim 1), every cut from the first positions, a sample of each's first rows.

    Where it takes none as they are and their tensors are rows (dim 0, one count per sample): the rows of
    consecutive samples (cut as above where so cut: a step of one token at a batch of 2 from one-row samples)
    regrouped into samples of the graph's rows where fixed, else of :data:`JOINED_ROWS` rows (batch-1
    samples, a graph for batches from 2).

    ``example_shapes``: the example's flat input shapes; where ``gm`` holds a size above 1 fixed that the
    example has there too, it is the model's (a feature or channel count, which eager refuses another of,
    or a size the example's capture pins), so a sample larger there is not cut to fit but left out (with
    ``dynamic=True`` RGBA images were read as their RGB channels, 17 features as the first 16: a helper's
    find); a size a later capture holds for itself (a smaller image: the top-left crop) is cut to.

    Returns them and how they were made from the samples ("" where as they are).  The cut is by shapes
    alone: an input holding positions in a dim cut (which token to read) may now point past it, so a run on
    cut samples may fail where the caller must fall back."""
    fitted: list[list] = []
    cut_any = False
    made: list[list] = []  # every sample as cut, whether taken or not: what is joined
    cut_made = False
    wider = False  # a cut to a fixed size above 1 (a length the graph pins at 2)
    for sample in samples:
        cut = _fixed_places(gm, sample)
        if any(size > 1 and _example_size(example_shapes, i, d) == size for i, d, size in cut):
            continue
        wider |= any(size > 1 for *_, size in cut)
        if not cut:
            candidates = [sample]
        elif rows := _cut_rows(sample, cut):
            candidates = [_narrowed(sample, cut, row, end) for row in range(rows) for end in _ends(cut)]
        else:
            candidates = [_narrowed(sample, cut, 0)]
        taken = [candidate for candidate in candidates if takes(gm, candidate)]
        made += candidates if len(made) < limit * max(JOINED_ROWS) else []
        cut_made |= bool(cut)
        cut_any |= bool(cut and taken)
        fitted += taken
        if len(fitted) >= limit:
            break
    dims = "fixed sizes" if wider else "size-1 dims"
    if fitted:
        return fitted[:limit], f"cut from the calibration samples to its {dims}" if cut_any else ""
    cut = f"cut to its {dims} and " if cut_made else ""
    for rows in dict.fromkeys((*_fixed_rows(gm), *JOINED_ROWS)):
        joined = held_by(gm, _joined(made, rows))  # (texts of several lengths: those of the lengths it holds)
        if joined:
            return joined[:limit], f"of {rows} rows, {cut}joined from the calibration samples"
    return [], ""


def _example_size(example_shapes: list | None, position: int, dim: int) -> int | None:
    """The example's size of its flat input ``position`` at ``dim`` (None where unknown)."""
    shape = example_shapes[position] if example_shapes is not None and position < len(example_shapes) else None
    return shape[dim] if shape is not None and dim < len(shape) else None


def _fixed_rows(gm: fx.GraphModule) -> tuple[int, ...]:
    """The rows (dim 0) of ``gm``'s first tensor input where that size is fixed (a static capture), else ()."""
    for node in user_inputs(gm.graph):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim():
            return (val.shape[0],) if isinstance(val.shape[0], int) else ()
    return ()


def _joined(samples: list[list], rows: int) -> list[list]:
    """Samples of ``rows`` rows each, the rows of consecutive ``samples`` of one shape regrouped along dim 0
    (batch-4 samples into 2 rows, one-row samples into 2; texts of several lengths each with their own),
    where every sample's tensors have one count of rows and its other inputs are the first sample's; else []."""
    counts = {t.shape[0] for sample in samples for t in sample if isinstance(t, torch.Tensor) and t.dim()}
    if len(counts) != 1 or rows == next(iter(counts)):
        return []
    count = next(iter(counts))
    if count > 1:  # each row a sample first
        samples = [[t[row:row + 1] if isinstance(t, torch.Tensor) and t.dim() else t for t in sample]
                   for sample in samples for row in range(count)]
    alike: dict[tuple, list[list]] = {}  # by the sizes past dim 0, in the order they come
    for sample in samples:
        alike.setdefault(tuple(t.shape[1:] if isinstance(t, torch.Tensor) else () for t in sample), []).append(sample)
    return [joined for group in alike.values() for joined in _joined_alike(group, rows)]


def _joined_alike(samples: list[list], rows: int) -> list[list]:
    """``samples`` (one row each, of one shape) joined ``rows`` at a time; [] where their other inputs differ."""
    first = samples[0]
    joined = []
    for start in range(0, len(samples) - rows + 1, rows):
        group = samples[start:start + rows]
        if any(len(s) != len(first) or any(isinstance(t, torch.Tensor) != isinstance(f, torch.Tensor) or
                                           (not isinstance(t, torch.Tensor) and t != f) or
                                           (isinstance(t, torch.Tensor) and not t.dim())
                                           for t, f in zip(s, first)) for s in group):
            return []
        joined.append([torch.cat([s[i] for s in group]) if isinstance(value, torch.Tensor) else value
                       for i, value in enumerate(first)])
    return joined


def shapes_of(sample: list) -> tuple:
    """A sample's flat inputs' shapes (None for a value that is not a tensor): what groups samples alike."""
    return tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else None for t in sample)


def held_shapes(gm: fx.GraphModule, samples: list[list]) -> dict[tuple, bool]:
    """Whether ``gm`` holds for each of the samples' shapes, read once a shape (a graph with symbolic sizes
    reads its guards)."""
    held: dict[tuple, bool] = {}
    for sample in samples:
        shape = shapes_of(sample)
        if shape not in held:
            held[shape] = takes(gm, sample)
    return held


def held_by(gm: fx.GraphModule, samples: list[list]) -> list[list]:
    """The samples ``gm`` holds for as they are."""
    held = held_shapes(gm, samples)
    return [sample for sample in samples if held[shapes_of(sample)]]


def takes(gm: fx.GraphModule, flat: list) -> bool:
    """Whether ``gm`` holds for these flat inputs: its ranges and guards with symbolic sizes, else its shapes."""
    if is_symbolic(gm):
        return bind_symbols(gm, flat)[1] is None
    for node, value in zip(user_inputs(gm.graph), flat):
        val = node.meta.get("val")
        if isinstance(value, torch.Tensor) and not (isinstance(val, torch.Tensor) and val.shape == value.shape):
            return False
    return True


def _fixed_places(gm: fx.GraphModule, flat: list) -> list[tuple[int, int, int]]:
    """The ``(flat input, dim, size)`` places where ``gm``'s input has a fixed ``size`` (or a symbolic one
    ranging below ``flat``'s: the size it was captured at) and ``flat``'s is larger: of 1 anywhere, above 1 past dim 0 (a length the model pins;
    more rows than a fixed batch are regrouped, not cut: :func:`_joined`)."""
    places = []
    ranges = ranges_of(gm) if is_symbolic(gm) else {}
    for position, (node, value) in enumerate(zip(user_inputs(gm.graph), flat)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(value, torch.Tensor) or val.dim() != value.dim():
            continue
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                upper = ranges.get(expr, (None, None))[1] if not expr.is_number else None
                if not expr.is_number and (upper is None or value.shape[d] <= upper):
                    continue
                size = int(expr) if expr.is_number else hint(size)  # (the size it was captured at: held)
            if (size == 1 or d > 0) and value.shape[d] > size:
                places.append((position, d, size))
    return places


def _cut_rows(sample: list, cut: list[tuple[int, int, int]]) -> int:
    """How many rows of ``sample`` are samples where cut as ``cut`` says: those of the tensors cut at dim 0
    where they have one count (1 where none is), and every tensor cut past dim 0 is one of them or none is
    cut at dim 0; else 0 (a GRU's state cut at its batch, dim 1, beside inputs cut at dim 0)."""
    at_rows = {i for i, d, _ in cut if d == 0}
    counts = {sample[i].shape[0] for i in at_rows}
    if len(counts) > 1 or (at_rows and any(i not in at_rows for i, d, _ in cut if d > 0)):
        return 0
    return counts.pop() if counts else 1


def _ends(cut: list[tuple[int, int, int]]) -> tuple[bool, ...]:
    """Whether to cut dims past 0 from their first positions, their last or both: both where one is cut."""
    return (False, True) if any(d > 0 for _, d, _ in cut) else (False,)


def _narrowed(flat: list, places: list[tuple[int, int, int]], row: int, end: bool = False) -> list:
    """``flat`` with each of ``places`` narrowed to its size: dims 0 from ``row``, the others from their first
    position, or to their last ones where ``end`` (contiguous copies)."""
    narrowed = list(flat)
    for position, d, size in places:
        tensor = narrowed[position]
        start = row if d == 0 else tensor.shape[d] - size if end else 0
        narrowed[position] = tensor.narrow(d, start, size)
    return [t.contiguous() if isinstance(t, torch.Tensor) else t for t in narrowed]


def _symbol_dims(gm: fx.GraphModule, flat: list) -> dict[sympy.Symbol, list[tuple[int, int]]]:
    """Each symbol sizing one of ``gm``'s user input dims alone, with the ``(flat input, dim)`` places it sizes
    (inputs of another rank than the graph's left out)."""
    env = gm.meta[FAKE_MODE_KEY].shape_env
    dims: dict[sympy.Symbol, list[tuple[int, int]]] = {}
    for position, (node, value) in enumerate(zip(user_inputs(gm.graph), flat)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(value, torch.Tensor) or val.dim() != value.dim():
            continue
        for d, size in enumerate(val.shape):
            expr = env.replace(size.node.expr) if isinstance(size, torch.SymInt) else None
            if isinstance(expr, sympy.Symbol):
                dims.setdefault(expr, []).append((position, d))
    return dims
