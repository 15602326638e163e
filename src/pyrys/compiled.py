"""One input signature compiled: capture -> pass pipeline -> backend program (:func:`compile_signature`),
and a program for another shape from its graph (:func:`build_for_shape`)."""
from __future__ import annotations


import dataclasses
import hashlib
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyrys.backends import Program, get_backend, release_constants
from pyrys.backends.options import BackendOptions
from pyrys.calling_context import autocast_off, callers_level, other_default_dtype, rng_kept
from pyrys.capture.captured import Captured
from pyrys.errors import CaptureError, DataDependentError, ModelChangedError
from pyrys.capture.dynamic_shapes import padded_window_inputs
from pyrys.ir.output_aliases import output_roots, outputs_to_copy, same_outputs
from pyrys.ir.output_layouts import contiguous_outputs, keep_contiguous
from pyrys.ir.output_views import output_views, state_views
from pyrys.ir.verify import VerificationError, make_verifier, output_types
from pyrys.ir.graph import share_constants
from pyrys.ir.generated_source import forgetting_dead_sources
from pyrys.ir.quiet_fake import fake_tensor_errors_unlogged
from pyrys.ir.symbolic import hold_squeezed_sizes, is_symbolic
from pyrys.numerics.budget import GUARD_MEASURE_KEY, program_error, program_over_budget
from pyrys.numerics.report import NumericsReport
from pyrys.numerics.trace import NumericsTrace
from pyrys.passes.specialize import ShapeMismatch, specialize
from pyrys.passes.pipeline import Instruments, PassOptions, PipelineRun, legalize_for_backends, run_pipeline
from pyrys.signature import InputError, Signature, signature_of
from pyrys.capture.frontend import Frontend
from pyrys.config import OptimizeConfig
from pyrys.precision_notes import (BF16_ROUNDING, bf16_guard, disabled_precision_note, effective_precision,
                                   guard_accuracy_note, int8_coverage_note, int8_layers, rounded_outputs_note)


@dataclass
class Compiled:
    """One input signature's compiled result.

    ``captured.gm`` is the graph its program runs (concrete shapes); ``generic`` the optimized graph with
    symbolic dims it was specialized from (shared by every signature specialized from it; None when the
    capture holds fixed shapes)."""

    signature: Signature
    captured: Captured
    run: PipelineRun
    program: Program
    backend: str
    notes: list[str] = field(default_factory=list)
    generic: Captured | None = None
    numerics: NumericsReport | None = None  # measured on the example inputs (``numerics=True``)
    template: "Compiled | None" = None  # where ``generic`` excludes this signature's shapes, so that its program
    # was compiled apart: that graph's compile (its history and notes), which later shapes are specialized from


_SOURCE_PLACE = re.compile(r"^\S+\.(?:cpp|h|cc):\d+: ")  # where in torch's C++ an error was raised (its build path)


@forgetting_dead_sources
@autocast_off
@rng_kept
def compile_signature(frontend: Frontend, args: tuple, kwargs: dict, config: OptimizeConfig,
                      dynamic: bool | str = False, like: Compiled | None = None, trace: NumericsTrace | None = None,
                      apart_on_data: bool = True) -> Compiled:
    """Capture the model on these inputs (``dynamic``: for every shape, where it can; ``SIZE_ONE_FIXED``: every
    shape with these inputs' size-1 dims), run the pipeline,
    and build the backend's program for these inputs' shapes.  ``like``: a signature compiled before,
    whose equal constants this one shares (:func:`share_constants`) and whose backend decisions and
    packed weights it reuses.  Where the symbolic compile fails (a pass or a lowering meeting a symbolic
    size it cannot take), these shapes are compiled as they are, with a note giving the error.  ``trace``:
    measure every pass and the program against eager on these inputs (:mod:`pyrys.numerics.trace`).
    ``apart_on_data``: a symbolic capture meeting tensor data (:class:`DataDependentError`) tries these shapes
    alone (else it raises: inputs nobody called, widened for the capture, are not worth a compile of their own)."""
    if torch.get_default_dtype() != config.default_dtype:  # (a call refuses first: a capture at pyrys.save)
        raise other_default_dtype(config.default_dtype)
    if not dynamic:
        with fake_tensor_errors_unlogged():  # a failure raises CaptureError, with torch's error as its cause
            return _compile_signature(frontend, args, kwargs, config, False, like, trace)
    try:
        with fake_tensor_errors_unlogged():  # a failure is the note below, not torch's traceback on stderr
            return _compile_signature(frontend, args, kwargs, config, dynamic, like, trace)
    except DataDependentError as error:  # a size read into Python (HF DeBERTa's relative positions) is data to a
        if not apart_on_data:  # capture with symbolic sizes, a constant to one of these shapes: tried so
            raise
        failed: Exception = error
    except (CaptureError, InputError, VerificationError, ModelChangedError):
        raise  # the model, the inputs or a pass is wrong, or the weights were written: fixed shapes would not help
    except Exception as error:  # noqa: BLE001 -- anything else symbolic sizes broke: compile these shapes
        failed = error
    try:
        with fake_tensor_errors_unlogged():  # (as above: a failure raises, without torch's traceback on stderr)
            compiled = _compile_signature(frontend, args, kwargs, _calibrated_apart(config), False, like, trace)
    except DataDependentError:
        if isinstance(failed, DataDependentError):
            raise failed from failed.__cause__  # data the model reads at these shapes too: the capture's own error
        raise
    line = _SOURCE_PLACE.sub("", (str(failed).strip().splitlines() or [""])[0])[:300]
    compiled.notes.append(f"captured for these input shapes only: the compile with symbolic sizes failed "
                          f"({type(failed).__name__}: {line})")
    return compiled


def _dump_dir(config: OptimizeConfig, signature: Signature, dynamic: bool | str, like: Compiled | None) -> Path | None:
    """Where this compile's graphs are written: ``dump_dir`` for the first, a folder in it named by the inputs
    (and ``symbolic`` for a capture with symbolic sizes) for each later one, which would overwrite them."""
    if not config.dump_dir:
        return None
    if like is None:
        return Path(config.dump_dir)
    described = signature.describe()
    digest = hashlib.sha1(f"{described} {dynamic}".encode()).hexdigest()[:8]  # names cut short stay apart
    name = f"{re.sub(r'[^A-Za-z0-9]+', '_', described).strip('_')[:60]}_{digest}"
    return Path(config.dump_dir) / (f"symbolic_{name}" if dynamic else name)


def _checks_writes(frontend: Frontend, like: Compiled | None) -> bool:
    """Whether a compile checks the user's weights against those at optimize (a later one: the first compile's
    are the weights at optimize), before and after it and in each copy it freezes."""
    return frontend.writes is not None and like is not None


def _compile_signature(frontend: Frontend, args: tuple, kwargs: dict, config: OptimizeConfig, dynamic: bool | str,
                       like: Compiled | None, trace: NumericsTrace | None = None) -> Compiled:
    checked = _checks_writes(frontend, like)
    if checked:
        frontend.writes.check(digests=False)  # cheap: a write in place, before the capture
    compiled = _compile_unchecked(frontend, args, kwargs, config, dynamic, like, trace)
    if checked:
        frontend.writes.check()  # every write since optimize, this compile's time too: it would be in the program
    return compiled


def _compile_unchecked(frontend: Frontend, args: tuple, kwargs: dict, config: OptimizeConfig, dynamic: bool | str,
                       like: Compiled | None, trace: NumericsTrace | None = None) -> Compiled:
    signature, flat = signature_of(args, kwargs)
    if like is not None and config.calibration is not None:
        config = dataclasses.replace(config, calibration=config.calibration.for_capture())
    captured = frontend.capture(args, kwargs, dynamic)
    captured.padded_window_inputs = padded_window_inputs(captured.gm)  # (before the passes fold pads)
    if is_symbolic(captured.gm):
        hold_squeezed_sizes(captured.gm)
    measure = None if trace is None else (lambda step, gm: trace.measure(step, gm, flat))
    instruments = Instruments(config.print_after_each, _dump_dir(config, signature, dynamic, like),
                              None, captured.class_name, measure)
    if config.verify:
        from pyrys.ir.meta import refresh_meta

        refresh_meta(captured.gm)
        instruments.verify = make_verifier(output_types(captured.gm), config.output_dtype)
    precision, precision_note = effective_precision(config.precision)
    guard = bf16_guard(config.calibration, flat, captured.gm) if precision == "bf16" else None
    checked = _checks_writes(frontend, like)
    options = PassOptions(config.freeze_params, config.freeze_flags, precision, config.calibration, config.output_dtype,
                          guard, frontend.writes.check_copy if checked else None)
    roots = output_roots(captured.gm, as_backends_run=False)
    captured.same_outputs = same_outputs(captured.gm)
    captured.output_views = output_views(captured.gm) if config.output_dtype is None else ()
    captured.state_views = state_views(captured.gm)
    contiguous = contiguous_outputs(captured.gm)
    run = run_pipeline(captured.gm, options, config.disable, instruments)
    legalize_for_backends(captured.gm, instruments)
    keep_contiguous(captured.gm, contiguous)
    guard_measure = captured.gm.meta.pop(GUARD_MEASURE_KEY, None)  # (the samples and answers it measured on)
    captured.output_copies = outputs_to_copy(roots, output_roots(captured.gm, as_backends_run=True))
    if like is not None:
        share_constants(captured.gm, like.captured.gm)
    generic = captured if is_symbolic(captured.gm) else None
    _, backend, notice = get_backend(config.backend)
    if precision == "int8" and (backend != "dnnl" or not int8_layers(run)):
        precision_note = ""  # which oneDNN int8 kernels this CPU gets: said where they run
    measured = guard_accuracy_note(precision, config.calibration, guard)
    rounded = rounded_outputs_note(precision, config, measured)
    disabled = disabled_precision_note(precision, config)
    coverage = "" if disabled.startswith("the pass quantize") else int8_coverage_note(precision, run, captured.gm)
    notes = captured.notes + [note for note in (notice, precision_note, coverage, measured, rounded, disabled,
                                                config.calibration.note if config.calibration else "") if note]
    template = Compiled(signature, captured, run, None, "", notes, generic)
    try:
        compiled = build_for_shape(template, signature, flat, config, like=like.program if like else None)
    except ShapeMismatch as why:  # the example itself: only if a pass assumed what its own shapes break
        if not dynamic:
            raise CaptureError(f"pyrys: the graph captured from this {frontend.kind} does not hold for its own "
                               f"example inputs' shapes ({why}); export it without dynamic_shapes, or report "
                               "this as a pyrys bug") from why
        compiled = compile_signature(frontend, args, kwargs, _calibrated_apart(config), like=like, trace=trace)
        compiled.notes.append(f"captured for these input shapes only: {why}")
        if compiled.generic is None and generic is not None:  # other shapes are specialized from it still,
            share_constants(generic.gm, compiled.captured.gm)  # on the weights this program packed: one copy
            compiled.generic, compiled.template = generic, template
        return compiled
    if guard_measure is not None and compiled.backend != "reference":  # (on torch's ops: what the guard measured)
        error, every_sample = program_error(guard_measure, compiled.program, flat)
        over = program_over_budget(guard_measure, error, BF16_ROUNDING if config.output_dtype == torch.bfloat16 else 0.0)
        if over:  # in place of the guard's notes, which say what torch's ops gave
            compiled.notes = [note for note in compiled.notes if note not in (measured, rounded)] + [over]
            warnings.warn(f"pyrys: {over}", stacklevel=callers_level())
        elif measured and every_sample and guard_measure.error <= guard_measure.budget:  # the program's own error
            again = guard_accuracy_note(precision, config.calibration, guard, error)  # on the data the note names
            compiled.notes = [again if note == measured else note for note in compiled.notes]
    if trace is not None:
        compiled.numerics = _measure_program(trace, compiled, flat, config)
    return compiled


def _calibrated_apart(config: OptimizeConfig) -> OptimizeConfig:
    """``config`` for the compile of these shapes alone after the symbolic one: where that made the int8 plan,
    a later capture's calibration (the plan where this graph computes alike, else calibrated on its own); it
    took the plan as it was, and a batch-1 example's static graph ran 1 of 5 layers in int8, unnoted."""
    if config.calibration is None:
        return config
    return dataclasses.replace(config, calibration=config.calibration.for_capture())


def _measure_program(trace: NumericsTrace, compiled: Compiled, flat: list, config: OptimizeConfig) -> NumericsReport:
    """The trace's report for ``compiled``: its program's error, and each layer's through a probe program
    compiled like it (its decisions and packed weights shared)."""
    compile_program = get_backend(config.backend)[0]
    options = BackendOptions(config.threads, config.layout)

    def compile_probe(gm: torch.fx.GraphModule) -> Program:
        return compile_program(gm, flat, options, like=compiled.program)

    return trace.report(compiled.run.history, compiled.captured.gm, compiled.program, compiled.backend, flat,
                        compile_probe)


@forgetting_dead_sources
@autocast_off
@rng_kept
def build_for_shape(template: Compiled, signature: Signature, flat: list, config: OptimizeConfig,
                    like: Program | None = None, for_call: bool = False) -> Compiled:
    """The program for ``signature`` from ``template``'s optimized graph (specialized to these shapes when
    it is symbolic: :mod:`pyrys.passes.specialize`, which raises ``ShapeMismatch`` for a shape it does not
    hold for); ``like``: a program of the same graph whose decisions and packed weights to reuse;
    ``for_call``: ``flat`` are the inputs of a call that runs the program next (its check's outputs are kept
    for it: ``BackendOptions.keep_outputs``)."""
    template = template.template or template  # (its history and notes are the graph's specialized here)
    source = template.generic or template.captured
    gm = specialize(source.gm, flat)
    if config.verify and gm is not source.gm:
        make_verifier(output_types(gm))(gm)
    compile_program, backend, _ = get_backend(config.backend)
    program = compile_program(gm, flat, BackendOptions(config.threads, config.layout, check=True,
                                                      keep_outputs=for_call), like=like)
    release_constants(program, [gm, source.gm])
    captured = dataclasses.replace(source, gm=gm, notes=list(source.notes))
    notes = list(template.notes) + [note for note in getattr(program, "notes", []) if note not in template.notes]
    fault = getattr(program, "fault", None)  # its calls run on the reference backend (dnnl's self_check.py)
    if fault is not None:
        notes.append(fault)
        backend = "reference"  # so it is saved: a load builds the reference program
    return Compiled(signature, captured, template.run, program, backend, notes, template.generic)


# torch.export and the passes are not made for two threads at once: compiles (and loads) take turns
# (calls of programs already compiled never wait for this); so does the meta memo (ir/meta.py).
COMPILING = threading.RLock()


def static_reason(compiled: Compiled, size_one_fixed: bool = False) -> str:
    """Why a capture asked for symbolic sizes has none: its note, or torch.export pinned every dim (or, in a
    capture keeping the dims of size 1 fixed, every dim that may vary is of size 1)."""
    said = [note for note in compiled.notes if note.startswith("captured for these input shapes only")]
    if said:
        return said[0]
    if size_one_fixed:
        return "every dim that may vary is of size 1 here, and this capture keeps those fixed"
    return "torch.export kept no input dim symbolic (the model pins every one)"
