"""A new program checked against the same graph on torch ops (the reference backend), on the example inputs.

oneDNN 3.2 has faults no lowering rule can see: its AMX int8 brgconv computed patch convolutions of 96,
144, 160, 224 or 288 input channels wrongly (ConvNeXt-T int8 off by 1.3), its primitive cache took two
descriptors differing only in a size-1 dim's stride for one (every logit of a Qwen2 step NaN), its gemm
matmul ignored a descriptor's start at batch 1 (SegFormer, 1.8e-3).  Each was fixed where a fuzz found
it; this check is for the next one, so that it does not reach a user as wrong numbers.  The first program
built for a graph runs copies of the example inputs, so does the reference backend, and where

    disagreement = max |y_program - y_reference| / max(max |y_reference|, 1e-4)   (``pyrys.relative_error``)

is over :data:`ALLOWED` for the graph's precision, and again on the inputs with noise added (an example that
is ill-conditioned for the graph, a constant image into an instance norm, disagrees by rounding alone), every
call of that program runs on the reference backend instead (slower, right), with a warning and a note.  The bounds sit 10x above what the two
legitimately differ by: float32 sums in another order (1e-6 on every model tried), bfloat16 rounds
another op's result (1e-2), int8 rounds a result 1 LSB the other way, which later layers carry (up to
3e-2 on torchvision CNNs, ``benchmarks/int8_agreement.py``).

Which of the two is off, where they differ: the graph runs once more on torch ops in float64
(:mod:`pyrys.backends.float64`: near the exact result; a bf16 or int8 graph without rounding its activations,
its rounded weights as they are), and each output that differs past the bound must be no further from it
than :data:`ROUNDED_ALIKE` times the graph on torch ops is, both finite (:func:`_against_float64`).  Then the
two differ by rounding, which the graph amplifies (an unstable network, whose float32 eager is far from
float64), no kernel is blamed, and the program keeps running on oneDNN, with a note (:data:`TRUSTED`; no
warning): torch's ops round about as far from it (the bench's random EfficientNet-B0 at 2 threads: its
program 2.4e-3 from its graph on torch ops and 1.7e-3 from float64, where torch's float32 ops are 8.1e-4; in
bf16 and int8 with ``accuracy_budget=None`` it, RegNetY and MobileNetV3 0.7-1.1x as far as torch's), and
calls ran 2.6-14x slower there (its float32, RegNetY's bf16 and int8 on an AVX-512 EPYC Zen 4).  A program
further off than that runs on torch ops, its note naming the output and both distances.  An output is judged
whole: a fault in a part of it that does not amplify rounding, beside a part that does (``torch.cat`` of the
two), passes where it is within 3x of that part's distance from float64; so does any fault no larger than 3x
the graph's own rounding (an int8 input whose scale a feature of 1e6 sets rounds the others to 0: the int8
graph is 0.76 off its float path, and a program 50% off passes): the accuracy guard's measure against
float32 is the other one there (none with ``accuracy_budget=None``).  Integer outputs are not compared.

A graph that does not run in float64 (a module call, a half-precision output) is judged by a probe instead
(:func:`_rounding_explains`): an output that disagrees must itself move past the bound with its inputs rounded
by :data:`ROUNDING`, both finite, and in float32 be within :data:`ROUNDED_ALIKE` times that move; a bf16 or
int8 one need not (a 1e-6 change flips few of the roundings other kernels flip), and is also measured with
its inputs moved by one bf16 step of their own size (:func:`_stepped`: at one row a 1e-6 change flipped none,
and a model trusted at batch 32 was blamed on a kernel at batch 5).  The probe's noise is of each input's
largest magnitude (zeros stay 0): a feature far larger than the others makes it large for them, and the model
then looks as if it amplified rounding (a helper's find: a float32 linear 50% off was trusted so, a bf16 one
too, before float64 judged them).  So there a bf16 or int8 kernel's fault of any size in an output that
amplifies rounding passes.

Not compared: what the reference gives as NaN or infinity (README, "NaN and infinities").  Not checked: a
graph with a random op (two runs differ anyway), example inputs that are not finite (such
calls take the reference backend where a step would drop NaN).  A program of another input shape is checked
too, on that call's inputs, unless a program of the same :func:`structure` (the same steps, kernels, formats
and blocks, the same dims of size 1 and sizes with a kernel tail) was checked already (one that disagreed: its
calls run on torch ops at once): the graph's constants are released by then (packed only), so the reference
runs on plain copies restored from the packed ones, freed after.  A new shape's lowering has faults of its
own (a linear's post-op operand broadcast over leading dims was handed to oneDNN unbroadcast at new shapes
only), and the check costs a run on torch ops (ResNet-50 at batch 7: 0.6 s, 0.2x of the first compile), so a
shape that only changes sizes within their classes is not checked again.  The call whose new shape was
checked returns the outputs the check's run gave on its inputs (a warm run of the program fewer),
where they are what it would give: no input written, none viewed by an output.
"""
from __future__ import annotations

import math
import re

import torch
import torch.fx as fx

from pyrys.backends.float64 import float64_outputs
from pyrys.ir.vocabulary import draws_random_numbers, precision_of
from pyrys.numerics import ZERO_SCALE, relative_error

ALLOWED = {"fp32": 1e-3, "bf16": 1e-1, "int8": 2.5e-1}
ROUNDED_ALIKE = 3.0  # a float32 program this far from float64, times torch's float32 ops' (or the probe's move)
AMPLIFIES = "the model amplifies rounding"  # (a failed check's, where the graph itself does)
ON_TORCH_OPS = "every call of these input shapes runs on torch ops (the reference backend)"  # (a failed check's)
SMALLEST_SCALE = 1e-4  # an output nearer 0 everywhere (a zero input's) is measured against this, not itself


_SIZE = re.compile(r"(?<![\w.])\d+(?![\w.])")  # a whole number on its own: not in a name, a kernel or a float
_COMMENT = re.compile(r"\s*#.*$", re.MULTILINE)  # a step's comment (a kernel choice's timings differ per shape)
BLOCK = 16  # a size that is a multiple of this runs no kernel tail (oneDNN blocks by 16 and its multiples)


def structure(program) -> str:
    """``program``'s text without comments and with every whole number but 1 written by its class, ``N`` (a
    multiple of :data:`BLOCK`) or ``T`` (a tail): what its lowering decided (steps, kernels, formats, attention
    blocks, which dims are 1, where kernels run a tail: oneDNN's faults so far were at size 1), not the sizes."""
    def size_class(number: re.Match) -> str:
        value = int(number[0])
        return "1" if value == 1 else ("N" if value % BLOCK == 0 else "T")

    return _SIZE.sub(size_class, _COMMENT.sub("", program.text))


def checkable(gm: fx.GraphModule, inputs: list) -> bool:
    """Whether two runs of ``gm`` on ``inputs`` should agree: no random op, every floating input finite."""
    if any(draws_random_numbers(node) for node in gm.graph.nodes):
        return False
    return all(bool(t.isfinite().all()) for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())


def disagreement(program, reference, gm: fx.GraphModule, inputs: list) -> tuple[str | None, list | None, str | None]:
    """Why ``program`` cannot be trusted on ``gm``'s shapes (its outputs against ``reference``'s on copies of
    ``inputs``, then, where those disagree, on the inputs perturbed: :func:`_perturbed`), or None where they
    agree within :data:`ALLOWED` on either; the program's outputs on ``inputs`` where they are what a
    call on ``inputs`` itself gives (:func:`_own_outputs`), else None; and a note where it is trusted though
    they disagree (its graph amplifies rounding: :func:`_rounded_alike`)."""
    precision = precision_of(gm)
    allowed = ALLOWED[precision]
    copies = _copies(inputs)
    versions = [version_of(t) for t in copies]
    got = program(copies)
    expected = reference(_copies(inputs))
    errors = _errors(got, expected)
    worst, where = _worst(errors)
    outputs = _own_outputs(got, copies, versions)
    if worst <= allowed:
        return None, outputs, None
    perturbed = _perturbed(inputs)
    again, _ = _worst(_errors(program(_copies(perturbed)), reference(_copies(perturbed))))
    if again <= allowed:  # the example itself is ill-conditioned (a constant image into an instance norm)
        return None, outputs, None
    exact = float64_outputs(reference, _copies(inputs), lower=precision != "fp32")
    if exact is not None:
        exact = _where_finite(exact, expected)
        fault, note = _against_float64(errors, _errors(_wide(got), exact), _errors(_wide(expected), exact),
                                       allowed, again, precision)
        return fault, (outputs if fault is None else None), note
    moved = _errors(reference(_copies(_perturbed(inputs, ROUNDING, keep_zeros=True))), expected)
    unexplained = [i for i, (error, move) in enumerate(zip(errors, moved))
                   if error > allowed and not _rounding_explains(error, move, allowed, precision)]
    if unexplained and precision != "fp32":  # a 1e-6 change flips few bf16 or int8 roundings (one row: none)
        stepped = _errors(reference(_copies(_stepped(inputs))), expected)
        moved = [max(a, b) for a, b in zip(moved, stepped)]
        unexplained = [i for i in unexplained if not _rounding_explains(errors[i], moved[i], allowed, precision)]
    if not unexplained:
        return None, outputs, _rounded_alike(precision, errors, moved)
    if max(moved) > allowed:  # the graph amplifies rounding, but an output is further off than that explains
        i = max(unexplained, key=lambda j: errors[j])
        allowed_there = f"; {ROUNDED_ALIKE:g}x that is allowed in float32" if precision == "fp32" else ""
        return (f"the oneDNN program disagrees with the same graph on torch ops on the example inputs (output "
                f"{i}: relative error {errors[i]:.1e}), more than rounding explains: the graph on torch ops moves "
                f"that output by {moved[i]:.1e} with its inputs rounded ({AMPLIFIES} "
                f"elsewhere{allowed_there}): a kernel's fault, or rounding this check cannot tell from one; "
                f"{ON_TORCH_OPS}"), None, None
    return (f"the oneDNN program disagrees with the same graph on torch ops on the example inputs (output {where}: "
            f"relative error {worst:.1e}, {again:.1e} on them perturbed, over the {allowed:.0e} allowed in "
            f"{precision}): a fault in a oneDNN kernel pyrys does not know yet; {ON_TORCH_OPS} instead. "
            "Please report it, with pyrys.save(opt, path) of the module"), None, None


def _against_float64(errors: list[float], off: list[float], torch_off: list[float], allowed: float,
                     again: float, precision: str) -> tuple[str | None, str | None]:
    """A program's verdict where its graph runs in float64 (:mod:`pyrys.backends.float64`; a bf16 or int8 one
    without rounding its activations): each output that differs from torch's ops past ``allowed``
    (``errors``) must be no further from the float64 result (``off``) than :data:`ROUNDED_ALIKE` times the
    graph on torch ops is (``torch_off``), both finite: then the two differ by rounding, which the graph
    amplifies, and the program is trusted with a note; else the fault (a kernel's, or rounding further off
    than torch's own) and no note."""
    unexplained = [i for i, error in enumerate(errors) if error > allowed and not (
        math.isfinite(off[i]) and math.isfinite(torch_off[i]) and off[i] <= ROUNDED_ALIKE * torch_off[i])]
    float32 = precision == "fp32"
    ops = "torch's float32 ops are" if float32 else f"the {precision} graph on torch ops is"
    exact = "that graph run in float64" if float32 else f"that graph run in float64 without rounding to {precision}"
    if not unexplained:
        _, i = _worst(errors)
        measured = "" if float32 else ("; its error against float32 is what the accuracy guard measures "
                                       "(accuracy_budget=; none with None)")
        return None, (f"the oneDNN program differs from the same graph on torch ops by {errors[i]:.1e} on the "
                      f"example inputs (output {i}), and is {off[i]:.1e} from {exact}, where {ops} "
                      f"{torch_off[i]:.1e}: {AMPLIFIES}; {TRUSTED}{measured}")
    i = max(unexplained, key=lambda j: errors[j])
    found = (f"the oneDNN program disagrees with the same graph on torch ops on the example inputs (output {i}: "
             f"relative error {errors[i]:.1e}, {again:.1e} on them perturbed, over the {allowed:.0e} allowed in "
             f"{precision}), and is {off[i]:.1e} from {exact}, where {ops} {torch_off[i]:.1e}")
    if max(torch_off) > allowed:  # (torch's ops are that far off somewhere: the graph amplifies rounding)
        return (f"{found}, more than rounding explains ({AMPLIFIES}, and {ROUNDED_ALIKE:g}x torch's distance is "
                f"allowed): a kernel's fault; {ON_TORCH_OPS}"), None
    return (f"{found}: a fault in a oneDNN kernel pyrys does not know yet; {ON_TORCH_OPS} instead. Please report "
            "it, with pyrys.save(opt, path) of the module"), None


def _where_finite(exact: list, expected: list) -> list:
    """The float64 outputs, NaN where the graph on torch ops gives NaN or infinity (a float32 overflow that
    float64 holds: not compared, as there the program is not against torch's ops; a review's find)."""
    return [torch.where(want.isfinite(), y, float("nan"))
            if isinstance(y, torch.Tensor) and isinstance(want, torch.Tensor) and y.shape == want.shape
            and y.is_floating_point() and want.is_floating_point() else y for y, want in zip(exact, expected)]


def _wide(outputs: list) -> list:
    """The floating-point tensors of ``outputs`` in float64 (compared with the graph's float64 outputs)."""
    return [y.double() if isinstance(y, torch.Tensor) and y.is_floating_point() else y for y in outputs]


def _rounding_explains(error: float, move: float, allowed: float, precision: str) -> bool:
    """Whether an output ``error`` off its graph on torch ops, which moves ``move`` with its inputs rounded by
    :data:`ROUNDING`, may be rounding: that output itself amplifies rounding (``move`` over ``allowed``), both
    finite, and in float32 ``error`` within :data:`ROUNDED_ALIKE` times ``move`` (in bf16 or int8 a 1e-6 change
    flips few of the roundings a program's other kernels flip, so ``move`` is no bound there)."""
    if not (math.isfinite(error) and math.isfinite(move)) or move <= allowed:
        return False
    return precision != "fp32" or error <= ROUNDED_ALIKE * move


TRUSTED = "its calls run on oneDNN: torch's own ops round about as far from the exact result"  # (a trusted
# program's note)


def _rounded_alike(precision: str, errors: list[float], moved: list[float]) -> str:
    """The note of a program trusted though it differs from its graph on torch ops (:func:`_rounding_explains`)."""
    _, i = _worst(errors)
    lower = "" if precision == "fp32" else f", and the {precision} graph there rounds to {precision} too"
    measured = "" if precision == "fp32" else ("; its error against float32 is what the accuracy guard measures "
                                               "(accuracy_budget=; none with None)")
    rounded = f"{ROUNDING:.0e}" if precision == "fp32" else f"{ROUNDING:.0e} or one bf16 step"
    return (f"the oneDNN program differs from the same graph on torch ops by {errors[i]:.1e} on the example inputs "
            f"(output {i}), as the graph on torch ops does with its inputs rounded by {rounded} "
            f"({moved[i]:.1e}): {AMPLIFIES}; {TRUSTED} (float32 eager differs from float64 alike{lower}), and "
            f"this check cannot tell a kernel's fault from rounding here{measured}")


def version_of(value) -> int | None:
    """A tensor's version counter (each write in place adds one); None for anything else and for an inference
    tensor (``torch.inference_mode``'s, which counts no writes)."""
    if not isinstance(value, torch.Tensor) or value.is_inference():
        return None
    return value._version


def _own_outputs(outputs: list, copies: list, versions: list) -> list | None:
    """``outputs`` (of a run on ``copies``) where a run on the originals gives the same: no copy was written
    (its version as in ``versions``) and no output shares memory with one (an output that is an input, or a
    view of one, must be the caller's own input); else None."""
    inputs = [t for t in copies if isinstance(t, torch.Tensor)]
    if any(version_of(t) != version or t.is_inference() for t, version in zip(inputs, versions)):
        return None
    held = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    if any(isinstance(o, torch.Tensor) and o.numel() and o.untyped_storage().data_ptr() in held for o in outputs):
        return None
    return outputs


def _worst(errors: list[float]) -> tuple[float, int]:
    """The largest of :func:`_errors`' and which output it is."""
    where = max(range(len(errors)), key=lambda i: errors[i], default=0)
    return (errors[where] if errors else 0.0), where


def _errors(got: list, want: list) -> list[float]:
    """Each output's :func:`_error` (0 for one that is not a floating-point tensor of the reference's shape and
    dtype; inf where NaN is on one side only)."""
    errors = []
    for a, b in zip(got, want):
        error = 0.0
        if isinstance(b, torch.Tensor) and b.is_floating_point() and isinstance(a, torch.Tensor) \
                and a.shape == b.shape and a.dtype == b.dtype:
            error = _error(a, b)
            error = error if error == error else math.inf
        errors.append(error)
    return errors


ROUNDING = 1e-6  # relative noise of a float32 rounding's size: what a graph that amplifies rounding is found by


def _perturbed(inputs: list, size: float = 0.1, keep_zeros: bool = False) -> list:
    """The floating-point inputs with seeded noise of ``size`` (a tenth) of their magnitude added: where the example is
    ill-conditioned for the graph (a constant image makes an instance norm's ``x - mean`` pure rounding, which
    its ``1 / std`` amplifies), the two agree on these; a wrong kernel is wrong on both.  ``keep_zeros``: an
    exact 0 stays 0 (a rounding never moves one; a mask ``x != 0`` must not flip)."""
    generator = torch.Generator().manual_seed(0)
    perturbed = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            scale = float(t.detach().abs().max().float()) or 1.0
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32) * (size * scale)
            if keep_zeros:
                noise = noise * (t != 0)
            t = (t.float() + noise).to(t.dtype)
        perturbed.append(t)
    return perturbed


LOWER_PRECISION_STEP = 2.0 ** -8  # one bfloat16 rounding step, relative (an int8 one of a value near its range)


def _stepped(inputs: list) -> list:
    """The floating-point inputs each moved by seeded noise of :data:`LOWER_PRECISION_STEP` of its own size: the
    change one bf16 or int8 rounding makes, which a bf16 or int8 graph's roundings of them see (zeros stay)."""
    generator = torch.Generator().manual_seed(1)
    stepped = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32) * LOWER_PRECISION_STEP
            t = (t.float() * (1 + noise)).to(t.dtype)
        stepped.append(t)
    return stepped


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``relative_error`` over the values the reference gives finite (a NaN or infinity made inside the network,
    ``log`` of a negative number, oneDNN's max-pooling and clip turn into a number: a documented difference,
    README "NaN and infinities"), against :data:`SMALLEST_SCALE` where those are all smaller (float32 sums in
    another order differ by ~1e-7 of their terms, which an output of zeros would make infinite)."""
    finite = expected.isfinite()
    if not bool(finite.any()):
        return 0.0
    scale = float(expected[finite].abs().max())
    error = relative_error(actual[finite], expected[finite])
    return error * min(1.0, (scale or ZERO_SCALE) / SMALLEST_SCALE)


def _copies(inputs: list) -> list:
    """The inputs, tensors copied (a program may write to its inputs, as the model did)."""
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
