"""Calibration: the inputs ``optimize(..., calibration=data)`` reads, and the activation scales they give.

Each sample is one call's inputs (a tensor, or a tuple or list of them: what a ``DataLoader`` over the
model's inputs yields), with the example inputs' structure, shapes and dtypes, or a batch of such (cut
into the example's rows).  The captured graph runs on
each (in float32, on the reference backend) and a histogram observer sees every activation an int8 op
reads; its scale is the one that minimizes the quantization's squared error over the histogram
(``torch.ao.quantization.HistogramObserver``), u8 for a value never seen negative, s8 otherwise.  The observer
sees each value times a power of two that brings its largest magnitude (in its first sample not all 0) into
[0.5, 1), and the scale it gives is divided by it again (exact): its search squares and cubes bin widths in
float32, which overflowed past ~1e13 (every value clipped: an error of 0.83), and it keeps scales of at least
float32's eps (1.2e-7), which rounded values of ~1e-6 and smaller to a few levels or none (helpers' finds).

A value that holds rows of a constant table (an ``nn.Embedding`` lookup, an ``nn.EmbeddingBag`` mean or max,
through views and ``cat``) may meet any row of it, while the samples look up a few: its range takes in the
table's smallest and largest number too (:func:`table_bounds`), min/max then, so that an id never seen in
calibration is not clipped.

Rare values far beyond the rest (one pixel of 1e6 in each calibration image) set the range the histogram
choice keeps (their squared error outweighs the rounding of the rest), and int8 then rounds the others to
0: :func:`rounded_to_zero` counts those of an activation's nonzero values, and ``passes/quantize.py`` warns
of those where it is 99% or more (:data:`LOST_SHARE`), or all but about one a sample (:func:`set_by_rare_values`),
and an int8 layer reads it.
"""
from __future__ import annotations

import math
import operator
import threading
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver
from torch.utils._pytree import tree_leaves

from pyrys.backends.reference import ReferenceProgram
from pyrys.ir.graph import constant_value, is_constant
from pyrys.ir.vocabulary import PERMUTES, VIEWS
from pyrys.quantization import SMALLEST_SCALE, TensorQuant
from pyrys.quantization.sample_forms import as_call
from pyrys.signature import InputError, check_runnable, is_tensor_leaf, signature_of
from pyrys.size_one import shapes_of

aten = torch.ops.aten
MAX_SAMPLES = 300  # calibration reads at most this many samples (OpenVINO NNCF's default subset size)
DRAWN_SAMPLES = 16  # samples_like's default count
KEPT_SAMPLE_BYTES = 8 << 20  # the samples kept for later captures' own calibration (token ids: all 300)
LOST_SHARE = 0.99  # an activation whose int8 range rounds this share of its nonzero values to 0 is warned of


@dataclass
class QuantizationPlan:
    """What the first compile decided, reused by the compiles of other input shapes: the quantization of each
    value by its role (``"input of <layer>"``, a layer named by its weight: ``passes/quantize.py``) with what
    computed it there (a value computed otherwise in another capture is not quantized by this plan), each
    int8 layer's bias correction, and the layers kept in floating point by the accuracy guard, with why."""

    activations: dict[str, tuple[str, TensorQuant]]
    roles: dict[str, int] = field(default_factory=dict)  # every role of the graph calibrated, with what computed it
    kept: dict[str, str] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # each layer's bias correction, by layer key
    error: float | None = None  # the outputs' error against float32 the guard measured (None: no guard)
    floating: str = "float32"  # what the ops not in int8 run in where they can (the layers the guard keeps,
    # attention): "bf16" where the CPU has it (and the budget holds so, where a guard measures), else "float32"
    sizes: dict[tuple[int, int], frozenset[int]] = field(default_factory=dict)  # of the samples it was made on
    measured_on: str = "the calibration data"  # what the guard measured on, as notes say it (quantization/guard.py)


CALIBRATED_SIZES_KEY = "pyrys_calibrated_sizes"  # a quantized graph's meta: its plan's ``sizes``


class Calibration:
    """The calibration samples of one ``optimize`` call and the plan made from them, once; ``accuracy_budget``:
    see :mod:`pyrys.numerics.budget` (None: no guard).  With ``precision="bf16"`` there is no plan: every
    compile's accuracy guard measures on the samples where its graph takes them (None where none were given:
    each compile measures on its own inputs).

    With ``precision="int8"`` the samples are let go once the plan is made, but for the first ones
    (:data:`KEPT_SAMPLE_BYTES` of them, ``kept``): a later capture (another shape) whose graph computes a
    value otherwise than the one calibrated (a batch of one, a step of one token: constants folded at size 1)
    is calibrated on its own, on those (:meth:`for_capture`)."""

    def __init__(self, samples: list[list] | None, accuracy_budget: float | None, note: str = "",
                 parent: "Calibration | None" = None, example_shapes: list | None = None):
        self.samples: list[list] | None = samples
        self.note = note  # what reading the samples did to them (cut into the example's rows), for opt.notes
        self.read_note = note  # that alone (a compile adds which samples its graph did not hold for)
        self.accuracy_budget = accuracy_budget
        self.plan: QuantizationPlan | None = None
        self.kept: list[list] = []  # int8, once planned: the samples a later capture may calibrate on
        self.parent = parent  # a later capture's: the first compile's calibration, whose plan it tries first
        self.lock = threading.Lock()
        # the example's flat input shapes (None: not a tensor): a sample is not cut to a size above 1 a capture
        # holds fixed where the example has it too (:func:`~pyrys.size_one.fitted_samples`)
        self.example_shapes = parent.example_shapes if parent is not None else example_shapes

    def __repr__(self) -> str:
        held = "planned" if self.plan is not None else f"{len(self.samples or [])} samples"
        return f"Calibration({held}, accuracy_budget={self.accuracy_budget})"

    def for_capture(self) -> "Calibration":
        """What a later capture's compile reads: with int8 (a plan made) a calibration of its own, which takes
        the first plan where that fits its graph and else calibrates it on the samples kept; else this one."""
        root = self.parent or self
        if root.plan is None:
            return self
        return Calibration(None, root.accuracy_budget, root.read_note, parent=root)

    def planned(self, plan: "QuantizationPlan", samples: list[list]) -> None:
        """Keep ``plan``; let the samples go, but for the first ones kept for later captures (a first compile's)."""
        if self.parent is None:  # from every sample read (those of sizes its graph excludes too: a later capture's)
            self.kept = kept_samples(self.samples or samples)
        self.plan, self.samples = plan, None


def spread_first(samples: list[list], count: int) -> list[list]:
    """``samples`` with, first, ``count`` of shapes spread over theirs where they vary (the smallest and the
    largest, then evenly between, by elements): what the accuracy guard measures on (it took the first four,
    and samples bucketed by length, longest first, measured none of the short ones: 1.1e-2 noted, 0.16 at
    one token; a helper's find)."""
    by_shape: dict[tuple, list] = {}
    for sample in samples:
        by_shape.setdefault(shapes_of(sample), []).append(sample)
    if len(by_shape) <= 1 or count < 2:
        return samples
    order = sorted(by_shape, key=lambda shape: sum(math.prod(s) for s in shape if s is not None))
    picked = dict.fromkeys(order[round(k * (len(order) - 1) / (count - 1))] for k in range(count))
    first = [by_shape[shape][0] for shape in picked]
    chosen = {id(sample) for sample in first}
    return first + [sample for sample in samples if id(sample) not in chosen]


def sample_sizes(samples: list[list]) -> dict[tuple[int, int], frozenset[int]]:
    """``(flat input, dim) -> sizes``: the sizes the samples' tensors have at each place."""
    sizes: dict[tuple[int, int], set[int]] = {}
    for sample in samples:
        for position, value in enumerate(sample):
            if isinstance(value, torch.Tensor):
                for d, size in enumerate(value.shape):
                    sizes.setdefault((position, d), set()).add(size)
    return {place: frozenset(held) for place, held in sizes.items()}


def kept_samples(samples: list[list]) -> list[list]:
    """Copies of the first samples whose tensors hold :data:`KEPT_SAMPLE_BYTES` together (at least one): a
    sample cut from a batch is a view, which would keep its whole batch alive; the caller's tensors stay theirs."""
    kept, held = [], 0
    for sample in samples:
        held += sum(t.numel() * t.element_size() for t in sample if isinstance(t, torch.Tensor))
        if kept and held > KEPT_SAMPLE_BYTES:
            break
        kept.append(copied_sample(sample))
    return kept


def copied_sample(sample: list) -> list:
    """``sample`` with its tensors copied (a view cut from the caller's batch would keep it alive, and see
    what the caller writes there later)."""
    return [t.clone(memory_format=torch.contiguous_format) if isinstance(t, torch.Tensor) else t for t in sample]


def calibration_samples(data: Iterable, args: tuple, kwargs: dict, limit: int | None = None,
                        other_sizes: bool = False) -> tuple[list[list], str]:
    """The flat inputs of each sample of ``data`` (at most ``limit``, default :data:`MAX_SAMPLES`), each checked
    against the example inputs ``(args, kwargs)``: :class:`InputError` naming the sample and what differs.
    Returns them and a note when samples were cut or read at other sizes (below), else "".

    Samples whose tensors differ from the example's only in their rows (dim 0 of every tensor: a
    ``DataLoader`` batch of 32 for an example of one, a smaller last batch) are cut into samples of the
    example's rows, carrying rows over from one sample to the next; rows too few for a last sample are
    left out. The observers' statistics are the same however rows are grouped.  With ``other_sizes``
    (``dynamic=True``: one capture for every size) samples whose tensors differ from the example's in other
    sizes too (texts of other lengths) are read as they are, where the graph holds for them (``passes/quantize.py``);
    without it such a sample is an :class:`InputError` saying so.  The samples of any iterable but a list or a
    tuple are copied as read: a loader may yield one tensor refilled in place for each sample (every sample
    read was then its last, calibrated on as five: int8 0.87 off on its own data, said to be 3e-3)."""
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise TypeError("pyrys.optimize: calibration must be an iterable of input samples (a list of tensors or of "
                        "input tuples, or a DataLoader over the inputs), got " + type(data).__name__)
    expected, _ = signature_of(args, kwargs)
    held_by_caller = isinstance(data, (list, tuple))  # an iterator's samples are copied as read (below)
    wanted = MAX_SAMPLES if limit is None else limit
    samples: list[list] = []
    rows = _Rows(expected)
    resized: dict[str, None] = {}  # the signatures of the samples read at other sizes, in order
    kept: dict[str, None] = {}  # the example's keyword tensors samples took as they are
    kept_by = 0  # how many samples did
    for i, sample in enumerate(data):
        sample_args, sample_kwargs, kept_as_they_are = as_call(i, sample, args, kwargs)
        for position, value in enumerate(tree_leaves((sample_args, sample_kwargs))):
            if isinstance(value, torch.Tensor):  # (on meta: torch's "cannot be called on meta tensors")
                check_runnable(f"calibration sample {i}'s input {position}", value)
        kept_by += bool(kept_as_they_are)
        kept.update(dict.fromkeys(kept_as_they_are))
        signature, flat = signature_of(sample_args, sample_kwargs)
        if not held_by_caller:  # (a loader may refill one tensor in place for the next sample: a helper's find)
            flat = [t.clone() if isinstance(t, torch.Tensor) else t for t in flat]
        _check_finite(i, flat)
        if signature == expected:
            samples.append(flat)
        elif rows.fits(signature):
            samples += rows.take(flat)
        elif other_sizes and sized_otherwise(signature, expected):
            samples.append(flat)
            resized.setdefault(signature.describe(), None)
        else:
            sized = sized_otherwise(signature, expected)
            raise InputError(f"pyrys: calibration sample {i} must be inputs like the example inputs "
                             f"({_described(expected, signature)}), got ({_described(signature, expected)}); every "
                             "sample is one call's "
                             "inputs with the example's shapes and dtypes, or a batch of such along dim 0 (a "
                             "DataLoader over the inputs alone, without labels)"
                             + ("; samples of other sizes (texts of other lengths) are read with dynamic=True, whose "
                                "one capture for every size is calibrated on them" if sized else "")
                             + _keywords_said(sample_kwargs, kwargs, kept_as_they_are))
        if len(samples) >= wanted:
            break
    if not samples:
        if rows.held:  # (a helper's note: "gave no samples" read wrong where it gave rows)
            raise ValueError(f"pyrys.optimize: calibration gave {rows.held} rows, fewer than one sample of the "
                             f"example's {rows.per_sample}: pass samples of the example's shapes, or batches of "
                             "them along dim 0")
        raise ValueError("pyrys.optimize: calibration gave no samples: pass a non-empty iterable of input samples")
    _warn_of_constant_inputs(samples[:wanted])
    notes = [f"calibration: samples of {', '.join(map(str, sorted(rows.cut)))} rows were cut into the example's "
             f"{rows.per_sample} along dim 0 (taken as the batch)"] if rows.cut else []
    if kept:
        read = "every sample" if kept_by == i + 1 else f"{kept_by} of the {i + 1} samples read"
        they, them = ("they are", "them") if len(kept) > 1 else ("it is", "it")
        notes.append(f"calibration: {read} took the example's {', '.join(kept)} as {they} (a sample without "
                     f"{them}): to vary {them}, "
                     + ("give each sample's mapping every input" if not args else "give each sample as an (args, "
                        "kwargs) pair or a tuple of every input, the keyword ones last"))
    if resized:
        shown = [f"({described})" for described in list(resized)[:4]] + ["..."] * (len(resized) > 4)
        notes.append(f"calibration: samples of {len(resized)} other input shapes than the example's read as they are "
                     f"where the captured graph holds for them (else left out, below): {', '.join(shown)}")
    return samples[:wanted], "; ".join(notes)


def _keywords_said(sample_kwargs: dict, kwargs: dict, kept: list[str]) -> str:
    """What a refused sample's keyword inputs have to do with it: those the example does not pass (a
    tokenizer's ``token_type_ids``), and those it took from the example (its shapes shown were the
    example's: a helper's find, "got (Long(8, 8), Long(2, 8))" said nothing of the mask filled in)."""
    said = ""
    extra = [name for name in sample_kwargs if name not in kwargs]
    if extra:
        said += (f"; it passes {', '.join(extra)}, which the example does not: leave "
                 f"{'it' if len(extra) == 1 else 'them'} out of the samples, or pass the example "
                 f"{'it' if len(extra) == 1 else 'them'} too")
    if kept:
        said += (f"; its {', '.join(kept)} {'is' if len(kept) == 1 else 'are'} the example's (the sample leaves "
                 f"{'it' if len(kept) == 1 else 'them'} out)")
    return said


def sized_otherwise(signature, expected) -> bool:
    """Whether ``signature`` differs from ``expected`` in tensor sizes alone: the same structure, values, dtypes
    and ranks."""
    if signature.in_spec != expected.in_spec or len(signature.leaves) != len(expected.leaves):
        return False
    for got, want in zip(signature.leaves, expected.leaves):
        if is_tensor_leaf(want) != is_tensor_leaf(got):
            return False
        if not is_tensor_leaf(want):
            if got != want:
                return False
        elif got[1] != want[1] or len(got[0]) != len(want[0]):
            return False
    return True


class _Rows:
    """Samples cut into the example's rows: ``fits`` a sample that differs from the example only in dim 0 of
    every tensor; ``take`` its rows, giving each whole sample they complete."""

    def __init__(self, expected):
        self.expected = expected
        rows = common_rows([shape for shape, _ in (leaf for leaf in expected.leaves if is_tensor_leaf(leaf))])
        self.per_sample = rows or None  # None: nothing to cut (no common dim 0, or an example of 0 rows)
        self.pending: list | None = None  # the flat inputs of rows not yet in a sample
        self.held = 0
        self.cut: set[int] = set()  # the row counts of the samples cut

    def fits(self, signature) -> bool:
        if self.per_sample is None or not sized_otherwise(signature, self.expected):
            return False
        tensors = [(got[0], want[0]) for got, want in zip(signature.leaves, self.expected.leaves) if is_tensor_leaf(want)]
        return all(got[1:] == want[1:] for got, want in tensors) and len({got[0] for got, _ in tensors}) == 1

    def take(self, flat: list) -> list[list]:
        self.cut.add(next(x.shape[0] for x in flat if isinstance(x, torch.Tensor)))
        if self.pending is not None:
            flat = [torch.cat([a, b]) if isinstance(a, torch.Tensor) else a for a, b in zip(self.pending, flat)]
        held = next(x.shape[0] for x in flat if isinstance(x, torch.Tensor))
        whole = held // self.per_sample
        cut = lambda x, start, stop: x[start:stop] if isinstance(x, torch.Tensor) else x  # noqa: E731
        done = [[cut(x, k * self.per_sample, (k + 1) * self.per_sample) for x in flat] for k in range(whole)]
        rest = whole * self.per_sample
        self.pending = [cut(x, rest, held) for x in flat] if rest < held else None
        self.held = held - rest
        return done


def common_rows(shapes: list) -> int | None:
    """A sample's rows: dim 0 of its tensors' ``shapes`` where every one has a dim 0 and they share it; else None."""
    firsts = {shape[0] if len(shape) else None for shape in shapes}
    return firsts.pop() if len(firsts) == 1 else None


def samples_like(inputs: tuple, count: int = DRAWN_SAMPLES, seed: int = 7) -> list[tuple]:
    """Calibration samples where there is no data (``pyrys bench``, ``pyrys explain --precision int8``): the
    inputs themselves, then ``count - 1`` drawn like them (a float tensor: normal with its mean and std;
    any other: itself), seeded."""
    generator = torch.Generator().manual_seed(seed)

    def like(x):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return x
        drawn = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        return drawn * x.std() + x.mean() if x.numel() > 1 else drawn

    return [tuple(inputs)] + [tuple(like(x) for x in inputs) for _ in range(count - 1)]


def _warn_of_constant_inputs(samples: list[list]) -> None:
    """Warn where a floating-point input holds one value in every sample (all zeros): ranges measured on it fit
    nothing else, and the accuracy measured on it says nothing of other inputs."""
    for position, value in enumerate(samples[0]):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() < 2:
            continue
        first = value.reshape(-1)[0]
        if all(bool((sample[position] == first).all()) for sample in samples):
            warnings.warn(f"pyrys: calibration input {position} is {float(first):g} everywhere in all {len(samples)} "
                          "samples: the int8 ranges measured on it will clip other inputs, and the accuracy measured "
                          "on it says nothing of them; calibrate on data like what will be served", UserWarning,
                          stacklevel=5)


def _check_finite(index: int, flat: list) -> None:
    """:class:`InputError` where a floating-point input of calibration sample ``index`` holds NaN, which has no
    place in a range.  Infinities are taken (an additive attention mask's ``-inf``): the observers measure the
    finite values (:func:`observe`)."""
    for position, value in enumerate(flat):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and bool(value.isnan().any()):
            raise InputError(f"pyrys: calibration sample {index} holds NaN (its input {position}); calibration "
                             "measures the ranges of numbers: leave that sample out or clean it")


def _described(signature, other) -> str:
    """``signature`` in words, with its inputs' names where its shapes read as ``other``'s (a keyword misspelt,
    a list for the keywords: "(Float(2, 3), Float(2, 4)), got (Float(2, 3), Float(2, 4))" said nothing)."""
    said = _describe(signature)
    if said != _describe(other):
        return said
    try:
        named = signature.describe_named()
        if named != other.describe_named():
            return named
        return f"{named}; as {_structure(signature.in_spec.child(0))}"  # (a DataLoader's lists for tuples)
    except Exception:  # noqa: BLE001 -- a structure leaf_names does not read (a spec of another form): as it is
        return said


def _structure(spec) -> str:
    """A pytree's containers in words: ``tuple(*, list(*, *))``, ``*`` a leaf."""
    if spec.is_leaf():
        return "*"
    return f"{spec.type.__name__}({', '.join(_structure(spec.child(i)) for i in range(spec.num_children))})"


def _describe(signature) -> str:
    try:
        return signature.describe()
    except Exception:  # noqa: BLE001 -- a leaf of an odd kind: say what we can
        return repr(signature.leaves)


def observe(gm: fx.GraphModule, names: set[str], samples: list[list], keep_outputs: int
            ) -> tuple[dict[str, TensorQuant], list[list], list[list], tuple[int, str], dict[str, float]]:
    """Run ``gm`` on every sample; the quantization of each value named in ``names`` (an activation an int8
    op reads), from its finite values (an infinity or NaN saturates or stays what it is in int8 whatever the
    scale, and would make the histogram's range meaningless), and the outputs of the first ``keep_outputs``
    samples (the float32 answers the guard compares with).  A sample ``gm`` fails on (a text longer than the
    model's position table, an id past its vocabulary: eager fails too) is left out, none of its values
    observed: returned are the samples run and ``(how many failed, what the first said)``; where every one
    fails, an :class:`InputError` saying what the first raised (its cause).  Last, the values whose range
    rounds most of their nonzero values to 0 (:func:`rounded_to_zero`; not one holding a table's rows, whose
    range is the table's), with that share."""
    program = ReferenceProgram(gm)
    observers: dict[str, HistogramObserver] = {}
    factors: dict[str, float] = {}  # what each observer sees its value times, set at its first sample not all 0
    seen: list[tuple[str, torch.Tensor]] = []  # one sample's, observed once it has run through

    def visit(name: str, value: torch.Tensor) -> None:
        if name not in names or not value.is_floating_point():
            return
        value = value.detach().float()
        if not value.numel():
            return
        low, high = torch.aminmax(value)  # NaN in both where any is NaN: finite extremes, every value finite
        if not (math.isfinite(low) and math.isfinite(high)):  # (24x faster than isfinite().all() at 16x32x112x112)
            value = value[value.isfinite()]
        if value.numel():
            seen.append((name, value))

    zeros: dict[str, int] = {}  # how many of the values each observer saw were 0
    observations: dict[str, int] = {}  # how many samples' values it saw
    outputs, run, failed, first_error = [], [], 0, None
    for i, sample in enumerate(samples):
        seen.clear()
        try:
            result = program.observe(sample, visit)
        except Exception as error:  # noqa: BLE001 -- the graph refuses this sample (eager raises too)
            failed, first_error = failed + 1, first_error or (i, error)
            continue
        for name, value in seen:
            if name not in observers:
                observers[name] = HistogramObserver(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
            if name not in factors and bool(value.any()):  # (zeros seen before are zeros at any factor)
                factors[name] = unit_factor(float(value.abs().max()))
            observers[name](value * factors.get(name, 1.0))
            zeros[name] = zeros.get(name, 0) + int(value.numel() - value.count_nonzero())
            observations[name] = observations.get(name, 0) + 1
        run.append(sample)
        if len(outputs) < keep_outputs:
            outputs.append(result)
    seen.clear()
    said = ""
    if failed:
        i, error = first_error
        line = (str(error).strip().splitlines() or [""])[0][:160]
        shapes = ", ".join(str(list(t.shape)) for t in samples[i] if isinstance(t, torch.Tensor))
        said = f"one of shapes {shapes}: {type(error).__name__}: {line}"
    if not run:
        raise InputError(f"pyrys: the model's captured graph fails on every calibration sample ({failed} of "
                         f"them; {said}): calibrate on inputs forward takes") from first_error[1]
    bounds = table_bounds(gm)
    quants = {name: _quant_of(observer, factors.get(name, 1.0), bounds.get(name)) for name, observer in observers.items()}
    lost = {}
    for name, observer in observers.items():
        rounded, nonzero = rounded_to_zero(observer, factors.get(name, 1.0), quants[name], zeros[name])
        if name not in bounds and set_by_rare_values(rounded, nonzero, observations[name]):
            lost[name] = rounded / nonzero
    return quants, outputs, run, (failed, said), lost


def set_by_rare_values(rounded: float, nonzero: float, samples: int) -> bool:
    """Whether rare values set an activation's range, from how many of its ``nonzero`` values over ``samples``
    int8 rounds to 0: :data:`LOST_SHARE` of them, or all but about one a sample where that is half of them or
    more (one outlier among 64 values a sample left 98.4%)."""
    kept = nonzero - rounded
    return nonzero > 0 and (rounded >= LOST_SHARE * nonzero or (kept <= samples and rounded >= nonzero / 2))


def rounded_to_zero(observer: HistogramObserver, factor: float, quant: TensorQuant, zeros: int) -> tuple[float, float]:
    """How many of the nonzero values ``observer`` saw (times ``factor``; ``zeros`` of them were 0) ``quant``
    rounds to 0, and how many nonzero values it saw: those within half a step of 0, ``|x| < scale / 2``,
    counted from the histogram (each bin's count spread evenly over its width).  Nearly all where rare values
    far beyond the rest set the range (one pixel of 1e6 in a calibration image: every other value of that
    input became 0 in int8)."""
    counts = observer.histogram.double()
    total = float(counts.sum()) - zeros
    if total <= 0:
        return 0.0, 0.0
    low, high = float(observer.min_val), float(observer.max_val)
    half = quant.scale * factor / 2
    if not high > low:
        within = float(counts.sum()) * (abs(low) < half)
    else:
        edges = torch.linspace(low, high, counts.numel() + 1, dtype=torch.float64)
        overlap = (edges[1:].clamp(-half, half) - edges[:-1].clamp(-half, half)).clamp(min=0)
        within = float((counts * overlap / (edges[1:] - edges[:-1]).clamp(min=1e-300)).sum())
    return min(max(within - zeros, 0.0), total), total


# ops whose result holds only numbers of their first argument
_SAME_NUMBERS = VIEWS | PERMUTES | frozenset({aten.clone.default, aten.contiguous.default, aten.select.int,
                                               aten.slice.Tensor, aten.expand.default})
_BAGS = frozenset({aten.embedding_bag.default, aten.embedding_bag.padding_idx, aten._embedding_bag.default})
_BAG_MEAN, _BAG_MAX = 1, 2  # embedding_bag's mode argument (0: sum, which is not bounded by the table)


def table_bounds(gm: fx.GraphModule) -> dict[str, tuple[float, float]]:
    """For each value that may hold rows of a constant table, the table's smallest and largest number (of every
    table it may hold rows of): ``embedding(W, ids)``, ``embedding_bag(W, ...)[0]`` in mean or max mode without
    per-sample weights (0 too: an empty bag), and what views or ``cat`` make of them."""
    bounds: dict[fx.Node, tuple[float, float]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.embedding.default and _is_table(node.args[0]):
            bounds[node] = _extremes(constant_value(gm, node.args[0]))
        elif node.target is operator.getitem and node.args[1] == 0 and _is_bag_of_rows(node.args[0]):
            low, high = _extremes(constant_value(gm, node.args[0].args[0]))
            bounds[node] = (min(low, 0.0), max(high, 0.0))
        elif node.target in _SAME_NUMBERS and node.args[0] in bounds:
            bounds[node] = bounds[node.args[0]]
        elif node.target is aten.cat.default and any(arg in bounds for arg in node.args[0]):
            held = [bounds[arg] for arg in node.args[0] if arg in bounds]
            bounds[node] = (min(low for low, _ in held), max(high for _, high in held))
    return {node.name: extremes for node, extremes in bounds.items()}


def _is_table(arg) -> bool:
    return isinstance(arg, fx.Node) and is_constant(arg)


def _is_bag_of_rows(node) -> bool:
    """An ``embedding_bag`` whose every result row is a mean or max of the table's rows."""
    if not (isinstance(node, fx.Node) and node.target in _BAGS and _is_table(node.args[0])):
        return False
    mode = node.args[4] if len(node.args) > 4 else node.kwargs.get("mode", 0)
    weights = node.args[6] if len(node.args) > 6 else node.kwargs.get("per_sample_weights")
    return mode in (_BAG_MEAN, _BAG_MAX) and weights is None


def _extremes(table: torch.Tensor) -> tuple[float, float]:
    finite = table[table.isfinite()].float()
    return (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 0.0)


def unit_factor(magnitude: float) -> float:
    """The power of two that brings ``magnitude`` into [0.5, 1) (1 for 0 and non-finite ones), at most 2^126 (a
    float32 denormal's is past float32: ``value * factor`` would be infinite)."""
    if not math.isfinite(magnitude) or magnitude <= 0:
        return 1.0
    return math.ldexp(1.0, min(-math.frexp(magnitude)[1], 126))


def _quant_of(observer: HistogramObserver, factor: float, table: tuple[float, float] | None = None) -> TensorQuant:
    """u8 (zero point 0) when nothing negative was seen, else s8 symmetric: zero is exact in both, and the
    kernels need no zero-point compensation.  ``observer`` saw the values times ``factor``; ``table``: the
    extremes of the constant tables the value holds rows of, which its range takes in (min/max over them and
    what was seen)."""
    if table is not None:
        seen = [float(observer.min_val) / factor, float(observer.max_val) / factor, *table]
        factor = unit_factor(max(abs(v) for v in seen))
        signed = min(seen) < 0
        observer = MinMaxObserver(dtype=torch.qint8 if signed else torch.quint8,
                                  qscheme=torch.per_tensor_symmetric if signed else torch.per_tensor_affine)
        observer(torch.tensor(seen) * factor)
        dtype = torch.int8 if signed else torch.uint8
    elif float(observer.min_val) < 0:
        symmetric = HistogramObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
        symmetric.load_state_dict(observer.state_dict())
        observer, dtype = symmetric, torch.int8
    else:
        dtype = torch.uint8
    scale, zero_point = observer.calculate_qparams()
    return TensorQuant(max(float(scale.reshape(-1)[0]) / factor, SMALLEST_SCALE), int(zero_point.reshape(-1)[0]),
                       dtype)
