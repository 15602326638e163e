"""The front door: capture -> pass pipeline -> backend.  The one place that knows every stage."""
from __future__ import annotations

import copy
import dataclasses
import inspect
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch.export import ExportedProgram
from torch.utils._pytree import tree_flatten, tree_unflatten

from pyrys.backends import Program, get_backend, release_constants
from pyrys.backends.reference import with_values
from pyrys.backends.options import LAYOUTS, BackendOptions
from pyrys.capture.captured import Captured, input_writes_note
from pyrys.capture.export import capture_module, rename_for_export
from pyrys.capture.model_copy import WriteCheck, private_copy, state_of
from pyrys.capture.exported_program import capture_exported, exported_example_inputs
from pyrys.capture.torchscript import capture_torchscript, is_torchscript, script_class_name, script_parameters
from pyrys.errors import CaptureError, DeviceError
from pyrys.forwarding import forwarded
from pyrys.ir.verify import VerificationError, make_verifier, output_types
from pyrys.ir.graph import share_constants
from pyrys.ir.symbolic import describe_dims, is_symbolic, rows_dim
from pyrys.numerics import TOLERANCES
from pyrys.numerics.budget import AUTO, GUARD_SAMPLES, accuracy_note, budget_for, check_budget
from pyrys.numerics.eager import eager_outputs
from pyrys.numerics.report import NumericsReport
from pyrys.numerics.trace import NumericsTrace
from pyrys.machine import give_back_freed_memory, native_bf16
from pyrys.passes.freeze import ALL
from pyrys.passes.precision import PRECISIONS
from pyrys.passes.precision_guard import Bf16Guard
from pyrys.quantization import int8_note
from pyrys.quantization.calibration import Calibration, calibration_samples
from pyrys.quantization.guard import CALIBRATION_DATA
from pyrys.passes.specialize import ShapeMismatch, specialize
from pyrys.passes.pipeline import (Instruments, PassOptions, PipelineRun, check_pass_names, legalize_for_backends,
                                   run_pipeline)
from pyrys.shape_cache import DEFAULT_MAX_SHAPES, ShapeCache
from pyrys.signature import InputError, Signature, arranged_like, check_compatible, runnable_inputs, signature_of


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything a user can choose; see :func:`optimize`."""

    backend: str = "auto"
    freeze_params: tuple[str, ...] | None = ALL  # None: every parameter and buffer
    freeze_flags: tuple[str, ...] | None = ALL  # None: every flag the captured graph reads
    disable: tuple[str, ...] = ()
    print_after_each: bool = False
    dump_dir: str | None = None
    verify: bool = False
    threads: int | None = None
    layout: str = "auto"
    max_shapes: int = DEFAULT_MAX_SHAPES
    dynamic: bool | None = None  # see optimize()
    numerics: bool = False  # measure every pass and layer against eager on the example inputs
    precision: str = "fp32"  # "bf16", "int8": see optimize()
    # precision="int8": the samples, then the plan; "bf16": the samples (if given) and the accuracy budget
    calibration: Calibration | None = field(default=None, compare=False, repr=False)
    output_dtype: torch.dtype | None = None  # every floating-point output in this dtype; None: eager's


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


@dataclass
class Frontend:
    """How a model gets into pyrys IR: ``capture(args, kwargs, dynamic)`` for each input signature.

    ``kind`` names the way in (``"nn.Module"``, ``"TorchScript"``, ``"ExportedProgram"``, ``"saved"``);
    ``dynamic`` asks for symbolic sizes, which a way in with ``symbolic`` gives where it can;
    ``fixed_shapes`` says what to do when the source cannot be captured again for a new shape.
    """

    capture: Callable[[tuple, dict, bool], Captured]
    kind: str
    fixed_shapes: str = ""  # empty: a new shape is captured again
    symbolic: bool = False  # torch.export can capture it with symbolic sizes
    parameters: inspect.Signature | None = None  # forward's, to take a call that passes inputs another way


def _parameters(forward: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):  # a builtin or C++ forward
        return None


def module_frontend(model: torch.nn.Module, writes: WriteCheck | None = None) -> Frontend:
    """An ``nn.Module``, captured with ``torch.export`` (``model`` is pyrys's private copy, ``writes`` the
    check that the weights it shares with the user's model are as they were: :mod:`pyrys.capture.model_copy`)."""
    renamed = rename_for_export(model)

    def capture(args: tuple, kwargs: dict, dynamic: bool) -> Captured:
        if writes is not None:
            writes.check()
        captured = capture_module(model, args, kwargs, dynamic=dynamic)
        captured.notes[:0] = renamed
        return captured

    return Frontend(capture, "nn.Module", symbolic=True, parameters=_parameters(model.forward))


def torchscript_frontend(script: Any, flag_values: dict[str, bool] | None = None) -> Frontend:
    """A ``ScriptModule`` or scripted function, imported without tracing (state is copied)."""
    return Frontend(lambda args, kwargs, dynamic: capture_torchscript(script, args, kwargs, flag_values),
                    "TorchScript", parameters=script_parameters(script))


def exported_program_frontend(ep: ExportedProgram) -> Frontend:
    """A ``torch.export.ExportedProgram``, used as it is (not exported again); its dynamic dims stay symbolic."""
    return Frontend(lambda args, kwargs, dynamic: capture_exported(ep), "ExportedProgram",
                    fixed_shapes="Export it again for the new shape, or export it with dynamic_shapes")


def compile_signature(frontend: Frontend, args: tuple, kwargs: dict, config: OptimizeConfig,
                      dynamic: bool = False, like: Compiled | None = None, trace: NumericsTrace | None = None) -> Compiled:
    """Capture the model on these inputs (``dynamic``: for every shape, where it can), run the pipeline,
    and build the backend's program for these inputs' shapes.  ``like``: a signature compiled before,
    whose equal constants this one shares (:func:`share_constants`) and whose backend decisions and
    packed weights it reuses.  Where the symbolic compile fails (a pass or a lowering meeting a symbolic
    size it cannot take), these shapes are compiled as they are, with a note giving the error.  ``trace``:
    measure every pass and the program against eager on these inputs (:mod:`pyrys.numerics.trace`)."""
    if not dynamic:
        return _compile_signature(frontend, args, kwargs, config, False, like, trace)
    try:
        return _compile_signature(frontend, args, kwargs, config, True, like, trace)
    except (CaptureError, InputError, VerificationError):
        raise  # the model, the inputs or a pass is wrong: fixed shapes would not help
    except Exception as error:  # noqa: BLE001 -- anything else symbolic sizes broke: compile these shapes
        compiled = _compile_signature(frontend, args, kwargs, config, False, like, trace)
        line = (str(error).strip().splitlines() or [""])[0][:300]
        compiled.notes.append(f"captured for these input shapes only: the compile with symbolic sizes failed "
                              f"({type(error).__name__}: {line})")
        return compiled


def _compile_signature(frontend: Frontend, args: tuple, kwargs: dict, config: OptimizeConfig, dynamic: bool,
                       like: Compiled | None, trace: NumericsTrace | None = None) -> Compiled:
    signature, flat = signature_of(args, kwargs)
    captured = frontend.capture(args, kwargs, dynamic)
    measure = None if trace is None else (lambda step, gm: trace.measure(step, gm, flat))
    instruments = Instruments(config.print_after_each, Path(config.dump_dir) if config.dump_dir else None,
                              None, captured.class_name, measure)
    if config.verify:
        from pyrys.ir.meta import refresh_meta

        refresh_meta(captured.gm)
        instruments.verify = make_verifier(output_types(captured.gm), config.output_dtype)
    precision, precision_note = effective_precision(config.precision)
    guard = _bf16_guard(config.calibration, flat, is_symbolic(captured.gm)) if precision == "bf16" else None
    options = PassOptions(config.freeze_params, config.freeze_flags, precision, config.calibration, config.output_dtype,
                          guard)
    run = run_pipeline(captured.gm, options, config.disable, instruments)
    legalize_for_backends(captured.gm, instruments)
    if like is not None:
        share_constants(captured.gm, like.captured.gm)
    generic = captured if is_symbolic(captured.gm) else None
    notice = get_backend(config.backend)[2]
    notes = captured.notes + [note for note in (notice, precision_note, _int8_note(precision, run),
                                                _accuracy_note(precision, config.calibration, guard),
                                                _disabled_precision_note(precision, config),
                                                config.calibration.note if config.calibration else "") if note]
    template = Compiled(signature, captured, run, None, "", notes, generic)
    try:
        compiled = build_for_shape(template, signature, flat, config, like=like.program if like else None)
    except ShapeMismatch as why:  # the example itself: only if a pass assumed what its own shapes break
        if not dynamic:
            raise
        compiled = compile_signature(frontend, args, kwargs, config, like=like, trace=trace)
        compiled.notes.append(f"captured for these input shapes only: {why}")
        if compiled.generic is None and generic is not None:  # other shapes are specialized from it still,
            share_constants(generic.gm, compiled.captured.gm)  # on the weights this program packed: one copy
            compiled.generic = generic
        return compiled
    if trace is not None:
        compiled.numerics = _measure_program(trace, compiled, flat, config)
    return compiled


def _bf16_guard(calibration: Calibration | None, flat: list, symbolic: bool) -> Bf16Guard | None:
    """What the bf16 accuracy guard of this compile measures on: the samples of ``calibration=`` where given
    and the graph takes them (a graph for every shape, or one for the samples' shapes), else the inputs
    it compiles for; None where ``accuracy_budget=None`` (nothing measured)."""
    if calibration is None or calibration.accuracy_budget is None:
        return None
    samples = calibration.samples  # kept (GUARD_SAMPLES of them): every capture measures on them
    if samples and (symbolic or all(_same_shape(a, b) for a, b in zip(samples[0], flat))):
        return Bf16Guard(samples, calibration.accuracy_budget,
                         f"{len(samples)} calibration sample{'s' * (len(samples) > 1)}")
    return Bf16Guard([flat], calibration.accuracy_budget, "the inputs compiled for")


def _same_shape(a: Any, b: Any) -> bool:
    return a.shape == b.shape if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else True


def _accuracy_note(precision: str, calibration: Calibration | None, guard: Bf16Guard | None) -> str:
    """How far the outputs are from float32's, as the accuracy guard measured (bf16: this compile's; int8:
    the first compile's, whose plan every compile uses)."""
    if guard is not None:
        return guard.note()
    plan = calibration.plan if calibration is not None and precision == "int8" else None
    if plan is None or plan.error is None:
        return ""
    return accuracy_note("int8", plan.error, calibration.accuracy_budget, len(plan.kept), CALIBRATION_DATA,
                         plan.floating)


def _disabled_precision_note(precision: str, config: OptimizeConfig) -> str:
    """What ``disable=("lower_precision",)`` leaves undone (bf16, ``output_dtype``), said rather than silent."""
    if "lower_precision" not in config.disable:
        return ""
    undone = [f"precision={precision!r}"] * (precision == "bf16")
    undone += [f"output_dtype={config.output_dtype}"] * (config.output_dtype is not None)
    return f"the pass lower_precision is disabled: {' and '.join(undone)} not applied" if undone else ""


def _measure_program(trace: NumericsTrace, compiled: Compiled, flat: list, config: OptimizeConfig) -> NumericsReport:
    """The trace's report for ``compiled``: its program's error, and each layer's through a probe program
    compiled like it (its decisions and packed weights shared)."""
    compile_program = get_backend(config.backend)[0]
    options = BackendOptions(config.threads, config.layout)

    def compile_probe(gm: torch.fx.GraphModule) -> Program:
        return compile_program(gm, flat, options, like=compiled.program)

    return trace.report(compiled.run.history, compiled.captured.gm, compiled.program, compiled.backend, flat,
                        compile_probe)


def build_for_shape(template: Compiled, signature: Signature, flat: list, config: OptimizeConfig,
                    like: Program | None = None) -> Compiled:
    """The program for ``signature`` from ``template``'s optimized graph (specialized to these shapes when
    it is symbolic: :mod:`pyrys.passes.specialize`, which raises ``ShapeMismatch`` for a shape it does not
    hold for); ``like``: a program of the same graph whose decisions and packed weights to reuse."""
    source = template.generic or template.captured
    gm = specialize(source.gm, flat)
    if config.verify and gm is not source.gm:
        make_verifier(output_types(gm))(gm)
    compile_program, backend, _ = get_backend(config.backend)
    program = compile_program(gm, flat, BackendOptions(config.threads, config.layout), like=like)
    release_constants(program, [gm, source.gm])
    captured = dataclasses.replace(source, gm=gm, notes=list(source.notes))
    return Compiled(signature, captured, template.run, program, backend, list(template.notes), template.generic)


MAX_SHAPE_NOTES = 16  # opt.notes keeps at most this many, however many shapes are captured again

# torch.export and the passes are not made for two threads at once: compiles (and loads) take turns
# (calls of programs already compiled never wait for this); so does the meta memo (ir/meta.py).
COMPILING = threading.RLock()


class OptimizedModule(torch.nn.Module):
    """A drop-in replacement for the model: same inputs, same outputs, optimized graph.

    ``graph`` is the optimized graph in the seed's text form, ``history`` the graph after
    every pass, ``misses`` every fold/fusion that could not happen and why.

    Safe to call from many threads at once: a compiled program runs each call in its own
    frame, a new input shape compiles once (other threads keep running meanwhile), and
    every output belongs to the caller.  ``copy.deepcopy`` gives an independent module
    sharing the read-only compiled programs; pickling is refused (see ``__reduce_ex__``).
    """

    def __init__(self, frontend: Frontend, args: tuple, kwargs: dict, config: OptimizeConfig,
                 trace: NumericsTrace | None = None):
        super().__init__()
        with COMPILING:
            first = compile_signature(frontend, args, kwargs, config, dynamic=config.dynamic is True, trace=trace)
        self._hold(frontend, config, [first])
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            self._remember_fast_call(_call_key(args), first)

    def _hold(self, frontend: Frontend, config: OptimizeConfig, compiled: list[Compiled],
              generic: Compiled | None = None) -> None:
        """Hold these compiled signatures (the first is the one ``graph``, ``history`` ... describe) and the
        one new shapes are specialized from (``generic``, or the first of them captured with symbolic sizes)."""
        self._frontend, self._config = frontend, config
        self._first = compiled[0]
        self._generic = generic or next((c for c in compiled if c.generic is not None), None)
        self._generic_tried = self._generic is not None or config.dynamic is not None or not frontend.symbolic
        self._shapes = ShapeCache(config.max_shapes, self._first.signature, {c.signature: c for c in compiled})
        self._fast_calls: dict[tuple, tuple[Signature, Any]] = {}

    @classmethod
    def from_compiled(cls, frontend: Frontend, config: OptimizeConfig, compiled: list[Compiled],
                      generic: Compiled | None = None) -> "OptimizedModule":
        """A module holding signatures compiled elsewhere (a copy, or ``pyrys.load``)."""
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module._hold(frontend, config, compiled, generic)
        return module

    def forward(self, *args, **kwargs):
        fast = self._fast_calls.get(_call_key(args)) if not kwargs else None
        if fast is not None:
            self._shapes.touch(fast[0])
            return fast[1](list(args))
        args, kwargs = runnable_inputs(*arranged_like(self._first.signature.in_spec, self._frontend.parameters,
                                                     args, kwargs))
        signature, flat = signature_of(args, kwargs)
        compiled = self._shapes.get(signature) or self._compile(signature, flat, args, kwargs)
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
            self._remember_fast_call(_call_key(args), compiled)
        outputs = compiled.program(flat)
        return tree_unflatten(outputs, compiled.captured.out_spec)

    def _remember_fast_call(self, key: tuple, compiled: Compiled) -> None:
        self._fast_calls[key] = (compiled.signature, _direct_call(compiled))
        if compiled.signature not in self._shapes.entries:  # evicted meanwhile: do not keep it alive here
            self._fast_calls.pop(key, None)

    @property
    def _programs(self) -> dict[Signature, Compiled]:
        """The compiled signatures held now (at most ``max_shapes``; the first is always held)."""
        return self._shapes.entries

    def _compile(self, signature: Signature, flat: list, args: tuple, kwargs: dict) -> Compiled:
        """The program for a new input signature, compiled once however many threads ask at once."""
        check_compatible(self._first.signature, signature, flat, args)
        if self._frontend.fixed_shapes and self._generic is None:
            raise self._fixed_shapes_error(signature, "")
        with COMPILING:
            compiled = self._shapes.get(signature)
            if compiled is None:
                compiled = self._new_shape(signature, flat, args, kwargs)
                evicted = set(self._shapes.put(signature, compiled))
                if evicted:
                    self._fast_calls = {k: v for k, v in self._fast_calls.items() if v[0] not in evicted}
        return compiled

    def _new_shape(self, signature: Signature, flat: list, args: tuple, kwargs: dict) -> Compiled:
        """The program for a new shape: specialized from the graph optimized for every shape.  With
        ``dynamic=None`` that graph is captured at the first new shape (the first signature was captured
        for its own shape only); a shape it does not hold for, or a way in without symbolic sizes, is
        captured and optimized again for that shape alone, with a note saying why."""
        if self._generic is None and not self._generic_tried:
            self._generic_tried = True
            compiled = compile_signature(self._frontend, args, kwargs, self._config, dynamic=True, like=self._first)
            give_back_freed_memory()  # the capture's own copies of the weights, shared away (share_constants)
            if compiled.generic is not None:
                self._generic = compiled
                self._note(f"input shapes vary: captured once more with symbolic sizes "
                           f"({describe_dims(compiled.generic.gm)}); every later shape is specialized from it")
            else:
                self._note(f"inputs ({signature.describe()}) captured and optimized again: {_static_reason(compiled)}")
            self._note_precision(compiled, signature)
            return compiled
        if self._generic is not None:
            try:
                return build_for_shape(self._generic, signature, flat, self._config, like=self._first.program)
            except ShapeMismatch as error:
                why = str(error)
        elif self._frontend.symbolic:
            why = "the captured graph holds fixed shapes (no input dim could stay symbolic)"
        else:
            why = f"a {self._frontend.kind} import is specialized to its inputs' shapes"
        if self._frontend.fixed_shapes:
            raise self._fixed_shapes_error(signature, why)
        compiled = compile_signature(self._frontend, args, kwargs, self._config, like=self._first)
        note = f"inputs ({signature.describe()}) captured and optimized again: {why}"
        compiled.notes.append(note)
        self._note(note)
        self._note_precision(compiled, signature)
        return compiled

    def _note_precision(self, compiled: Compiled, signature: Signature) -> None:
        """What a capture for new shapes did in lower precision, in ``opt.notes``: its bf16 accuracy guard's
        measure (it may keep other ops in float32: its misses say which), and fewer int8 layers than the
        calibrated capture (its values computed otherwise, constants folded at one shape and not at another,
        have no calibrated scale)."""
        for note in compiled.notes:
            if note.startswith("precision='bf16': "):
                self._note(f"the capture for inputs ({signature.describe()}): {note}")
        first, now = _int8_layers(self._first.run), _int8_layers(compiled.run)
        if now < first:
            self._note(f"precision='int8': the capture for inputs ({signature.describe()}) runs {now} of the "
                       f"{first} int8 layers in int8, the rest in float32 (their inputs are computed otherwise "
                       "there than in the graph calibrated; its misses say which); optimize with dynamic=True to "
                       "calibrate the graph every shape is specialized from")

    def _note(self, note: str) -> None:
        """Add to ``opt.notes`` (the first signature's), at most :data:`MAX_SHAPE_NOTES` times."""
        if len(self._first.notes) < MAX_SHAPE_NOTES:
            self._first.notes.append(note)

    def _fixed_shapes_error(self, signature: Signature, why: str) -> InputError:
        source = f"pyrys: the module optimized from this {self._frontend.kind}"
        if why:  # its graph has symbolic sizes, and these inputs break what it holds for
            return InputError(f"{source} cannot take inputs ({signature.describe()}): {why}. "
                              f"{self._frontend.fixed_shapes}")
        held = "; ".join(f"({s.describe()})" for s in self._programs)
        return InputError(f"{source} was compiled for inputs {held}; got ({signature.describe()}). "
                          f"{self._frontend.fixed_shapes}")

    def __deepcopy__(self, memo: dict) -> "OptimizedModule":
        """An independent module: its own frames and caches; the compiled, read-only plans are shared."""
        programs = {signature: dataclasses.replace(compiled, program=copy.deepcopy(compiled.program, memo))
                    for signature, compiled in self._programs.items()}
        first = programs.pop(self._first.signature)
        copied = OptimizedModule.from_compiled(self._frontend, self._config, [first, *programs.values()], self._generic)
        copied.training = self.training
        return copied

    def __copy__(self) -> "OptimizedModule":
        return self.__deepcopy__({})

    def __reduce_ex__(self, protocol):
        raise TypeError(
            "pyrys: an optimized module holds compiled oneDNN programs and cannot be pickled, so neither pickle "
            "nor torch.save can keep it. Use pyrys.save(opt, path) and pyrys.load(path) (no pickle); "
            "copy.deepcopy(opt) gives an independent copy in this process")

    @property
    def graph(self) -> str:
        return self._first.run.history[-1].graph

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        """The optimized graph module (first input signature), runnable: weights the backend holds packed
        are restored into a copy (:mod:`pyrys.ir.released`), which is as large as those weights."""
        return with_values(self._first.captured.gm)

    history = forwarded("_first.run.history", "Every pass's :class:`pyrys.passes.pipeline.Step`: graph text, rule counts, misses.")
    misses = forwarded("_first.run.misses", "The :class:`pyrys.passes.rewrite.Miss` records still standing after the pipeline.")
    backend = forwarded("_first.backend", "The backend the program runs on: ``\"dnnl\"`` or ``\"reference\"``.")
    notes = forwarded("_first.notes", "What capture and the backend choice said (a fallback, a dropped write).")
    numerics = forwarded("_first.numerics", "The :class:`pyrys.numerics.report.NumericsReport` of ``numerics=True`` "
                                            "(error after every pass and of every layer), else None.")

    @property
    def writes(self) -> tuple[str, ...]:
        """The inputs and module state the model's forward writes in place, which the optimized module does
        not (``notes`` says so)."""
        return self._first.captured.input_writes + self._first.captured.state_writes

    @property
    def frontend(self) -> str:
        """How the model came in: ``"nn.Module"``, ``"TorchScript"``, ``"ExportedProgram"``."""
        return self._frontend.kind

    @property
    def input_types(self) -> list:
        """Per flat input (positional, then keyword) of the first compiled signature: ``(shape, dtype)`` for
        a tensor, the value itself for an input it was specialized to."""
        return list(self._first.signature.leaves)

    @property
    def specializes_shapes(self) -> bool:
        """Whether a new input shape is specialized from a graph captured with symbolic sizes (no capture,
        no pass); False where a new shape captures the model again or, loaded, is refused."""
        return self._generic is not None

    @property
    def batches_rows(self) -> bool:
        """Whether calls can be joined along dim 0 (``pyrys serve``'s batching): new shapes are specialized
        without capture, and dim 0 of every input and every output is one symbolic size, the rows.  That no
        op mixes rows (a reduction or attention across dim 0) is not visible in shapes: the caller's to know."""
        return self._generic is not None and rows_dim(self._generic.generic.gm) is not None

    def program_text(self) -> str:
        return self._first.program.describe()

    def memory(self) -> dict[str, int]:
        """Bytes the module holds, over every input signature it keeps (see :mod:`pyrys.backends.program`):
        ``weights`` and ``packed_weights`` once (every shape's program shares the first's), ``activations``
        the largest call's arena, ``frames`` what every shape's idle frames hold."""
        held = [compiled.program.memory() for compiled in list(self._programs.values())]
        first = self._first.program.memory()
        return {"weights": first["weights"], "packed_weights": first["packed_weights"],
                "activations": max(m["activations"] for m in held), "frames": sum(m["frames"] for m in held)}

    def thread_choice(self) -> str:
        """How many threads the first input shape's calls run with now: at most the caller's
        ``torch.get_num_threads()``, fewer while busy CPUs make that faster (``threads=`` pins it)."""
        choice = getattr(self._first.program, "thread_choice", None)
        return choice() if choice is not None else "the caller's thread count, or threads= (not adapted on this backend)"

    def report(self) -> str:
        """Per-pass counts, then every miss with its reason, then notes; then the numerics when measured."""
        lines = [step.summary() for step in self.history[1:]]
        lines += [f"missed: {miss}" for miss in self.misses]
        lines += [f"note: {note}" for note in self.notes]
        lines += [self.numerics.render()] if self.numerics is not None else []
        return "\n".join(lines)


def _call_key(args: tuple) -> tuple | None:
    """A cheap key for calls made of positional tensors only (None otherwise).

    Only keys of calls that passed :func:`runnable_inputs` unchanged are ever stored, so a
    tensor on another device, with another layout or with its negation bit set never
    takes the fast path: it meets the checks instead."""
    try:
        return tuple((a.shape, a.dtype, a.is_cpu, a.layout, a.is_neg()) for a in args)
    except AttributeError:
        return None


def _direct_call(compiled: Compiled):
    """The program with its outputs restructured, for the all-tensor fast path of ``forward``."""
    program, spec = compiled.program, compiled.captured.out_spec
    if spec.is_leaf():
        return lambda flat: program(flat)[0]
    return lambda flat: tree_unflatten(program(flat), spec)


def _as_args(example_inputs: Any) -> tuple:
    if example_inputs is None:
        raise ValueError("pyrys.optimize needs example_inputs: the tuple of inputs the model is called with, "
                         "e.g. example_inputs=(torch.rand(1, 3, 224, 224),)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise TypeError("pyrys.optimize expects example_inputs to be a non-empty tuple of inputs "
                        f"(e.g. (torch.rand(1, 3, 224, 224),)), got {type(example_inputs).__name__}")
    return tuple(example_inputs)


def optimize(
    model: torch.nn.Module | ExportedProgram,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    example_kwargs: dict | None = None,
    *,
    backend: str = "auto",
    freeze_params: Iterable[str] | None = ALL,
    freeze_flags: Iterable[str] | None = ALL,
    disable: Iterable[str] = (),
    print_after_each: bool = False,
    dump_dir: str | Path | None = None,
    verify: bool = False,
    threads: int | None = None,
    layout: str = "auto",
    max_shapes: int = DEFAULT_MAX_SHAPES,
    dynamic: bool | None = None,
    numerics: bool = False,
    precision: str = "fp32",
    calibration: Iterable | None = None,
    accuracy_budget: float | str | None = AUTO,
    output_dtype: torch.dtype | None = None,
) -> OptimizedModule:
    """Optimize ``model`` for inference on inputs like ``example_inputs``.

    ``model`` is an eval-mode ``nn.Module``, a TorchScript ``ScriptModule`` or scripted
    function (imported without tracing), or a ``torch.export.ExportedProgram`` (used as it
    is; ``example_inputs`` default to the program's own).
    ``freeze_params``: attribute names to freeze (``"weight"``, ``"running_var"`` ...); None (default): all.
    ``freeze_flags``: boolean module attributes to freeze to their captured value; None (default): every
    flag the captured graph reads. From an ``nn.Module`` that is each module's ``training`` (``torch.export``
    bakes every other attribute into the graph); from TorchScript every bool attribute its code reads.
    ``disable``: pass names to skip (see ``pyrys.passes.pipeline.PASS_NAMES``).
    ``backend``: ``"auto"`` (dnnl where it loads, else reference), ``"dnnl"`` or ``"reference"``.
    ``threads``: threads per call (default: ``torch.get_num_threads()`` at call time).
    ``layout``: the dnnl backend's activation layout: ``"auto"`` (each candidate measured at compile
    time, the fastest kept), ``"nhwc"``, ``"blocked8"`` or ``"blocked16"``.
    ``max_shapes``: how many input signatures (shapes) keep their compiled program; past that the least
    recently called one is dropped (the first is kept) and compiles again if it comes back.
    ``dynamic``: capture with symbolic sizes (the batch, and every dim of inputs of rank <= 3: sequence
    lengths; where ``torch.export`` can keep them symbolic), run the passes once, and give each new shape a program specialized
    from that graph (ResNet-18: about 0.2 s, 10-15% of a compile; the weights shared). ``None`` (default): the example's shape
    is captured as it is (the fastest first compile) and the symbolic capture happens at the first call
    with another shape; ``True``: at ``optimize`` (a slower first compile, every new shape fast);
    ``False``: never (each new shape is captured and optimized again). A shape the symbolic graph does
    not hold for (a branch on a size, a dim the model pins) is captured again, with a note in ``notes``.
    ``numerics``: run the model eagerly on the example inputs (its state cloned: nothing of it is written),
    then measure the graph after every pass (on the reference backend) and the backend's program, and the
    program's every layer against the captured graph's value it computes: ``opt.numerics``
    (:class:`pyrys.numerics.report.NumericsReport`), also in ``opt.report()``.  It costs compile time (a
    reference run per pass, a second build of the program) and, while it runs, memory: a copy of the
    model, every intermediate activation of the example, and a clone of the weights per measuring run.
    A program saved and loaded keeps each step's error in ``history``, not ``numerics``.
    ``precision``: ``"fp32"`` (default) or ``"bf16"``: convolutions, linears, matmuls and the pooling,
    elementwise and data-movement ops between them run in bfloat16 with float32 accumulation, the rest
    in float32, with a conversion node at each edge (:mod:`pyrys.passes.precision`); outputs stay float32
    (see ``output_dtype``).  Where the CPU has no native bf16 it runs in fp32, with a note in ``notes``.  ``"int8"``: convolutions
    and linears read 8-bit activations (per tensor, scales from ``calibration``) and weights (per output
    channel) and accumulate in int32 (:mod:`pyrys.passes.quantize`); ``notes`` says which kernels this CPU gets.
    ``calibration`` (int8: required; bf16: optional, what the accuracy guard measures on): an iterable of
    samples, each one call's inputs (a tensor or a tuple of them, a ``DataLoader`` over the inputs) with the
    example's shapes and dtypes; the first 300 are read.  ``accuracy_budget`` (bf16, int8): the largest
    relative error against float32 of the outputs on the calibration data (bf16 without it: the inputs
    compiled for); the fewest ops whose own rounding costs the most go back to float32 so that it holds,
    each a miss saying why, and ``notes`` gives the error measured (:mod:`pyrys.numerics.budget`).
    ``"auto"`` (default): 3e-2 for bf16, 5e-2 for int8 (``TOLERANCES``); None: nothing measured.
    ``output_dtype``: ``None`` (default): each output in the dtype eager gives (float32 under every
    ``precision``); ``torch.bfloat16``: every floating-point output in bfloat16 (with ``precision="bf16"``
    a bfloat16 result comes back as it is, no conversion); ``torch.float32``: in float32.
    The user's model is never modified: pyrys works on a private copy (its modules copied, the weights
    it freezes read, not copied: :mod:`pyrys.capture.model_copy`); a new shape after the user wrote to
    those weights raises :class:`pyrys.ModelChangedError`.
    A model pyrys cannot take raises :class:`pyrys.CaptureError` (``forward`` needs tensor data in
    Python), :class:`pyrys.DeviceError` (weights not on the CPU) or :class:`pyrys.ModelCopyError`;
    example inputs off the CPU raise :class:`pyrys.InputError`.
    """
    config = make_config(backend=backend, freeze_params=freeze_params, freeze_flags=freeze_flags, disable=disable,
                         print_after_each=print_after_each, dump_dir=dump_dir, verify=verify, threads=threads,
                         layout=layout, max_shapes=max_shapes, dynamic=dynamic, numerics=numerics,
                         precision=precision, output_dtype=output_dtype)
    check_calibration_options(precision, calibration, accuracy_budget)
    if isinstance(model, ExportedProgram):
        if example_inputs is None:
            example_inputs, example_kwargs = exported_example_inputs(model)
        args, kwargs = _example_inputs(example_inputs, example_kwargs)
        config = with_calibration(config, calibration, accuracy_budget, args, kwargs)
        _check_on_cpu("the ExportedProgram", model.state_dict.items())
        optimized = OptimizedModule(exported_program_frontend(model), args, kwargs, config, _trace(config, model, args, kwargs))
        _warn_of_input_writes(optimized, caller_keeps_writes=False)
        return optimized
    if is_torchscript(model):
        return optimize_torchscript(model, example_inputs, example_kwargs, config, calibration=calibration,
                                    accuracy_budget=accuracy_budget)
    if not isinstance(model, torch.nn.Module):
        raise TypeError("pyrys.optimize expects a torch.nn.Module, a TorchScript module or function, or a "
                        f"torch.export.ExportedProgram, got {type(model).__name__}")
    args, kwargs = _example_inputs(example_inputs, example_kwargs)
    config = with_calibration(config, calibration, accuracy_budget, args, kwargs)
    _check_on_cpu(type(model).__name__, state_of(model))
    _warn_if_training(model)
    caller_keeps_writes = getattr(model, "caller_keeps_writes", False)
    frozen = () if "freeze_params" in config.disable else config.freeze_params
    model, writes = private_copy(model, frozen)
    trace = _trace(config, model, args, kwargs)
    optimized = OptimizedModule(module_frontend(model, writes), args, kwargs, config, trace)
    writes.wait()
    _warn_of_input_writes(optimized, caller_keeps_writes)
    return optimized


def _trace(config: OptimizeConfig, model: Any, args: tuple, kwargs: dict) -> NumericsTrace | None:
    """What measures the compile when ``numerics=True``: the model's own outputs on the example inputs,
    and the tolerance of the precision it runs in."""
    if not config.numerics:
        return None
    tolerance = TOLERANCES[effective_precision(config.precision)[0]]
    if config.output_dtype is torch.bfloat16:  # the outputs' own rounding counts
        tolerance = max(tolerance, TOLERANCES["bf16"])
    return NumericsTrace(lambda: eager_outputs(model, args, kwargs), tolerance, config.output_dtype)


def effective_precision(precision: str) -> tuple[str, str]:
    """The precision the passes use, and a note where it is not the one asked for (no native bf16 here)
    or says what it runs on (int8)."""
    if precision == "bf16" and not native_bf16():
        return "fp32", ("precision='bf16' runs in fp32 here: this CPU has no native bfloat16 (neither avx512_bf16 "
                        "nor amx_bf16), and emulated bf16 is slower than fp32")
    if precision == "int8":
        return precision, int8_note()
    return precision, ""


def _int8_layers(run) -> int:
    """How many convs and linears a pipeline run put in int8."""
    return sum(step.fired.get("int8", 0) for step in run.history)


def _int8_note(precision: str, run) -> str:
    """With ``precision="int8"``, a note when no op could run in int8 (the misses say why), or saying how many
    ops run in bf16 beside the int8 ones (where the CPU has native bf16: ``passes/quantize.py``)."""
    if precision != "int8":
        return ""
    bf16 = sum(step.fired.get("bf16", 0) for step in run.history)
    if not any(step.fired.get("int8") for step in run.history):
        kept_in = "bf16 where the accuracy guard kept it, else float32" if bf16 else "float32"
        return f"precision='int8': no convolution or linear could run in int8 here, so the model runs in {kept_in} (see misses)"
    if bf16:
        return (f"precision='int8': {bf16} ops run in bf16, not float32 (this CPU has native bf16): attention (no "
                "int8 kernel here), the layers the accuracy guard keeps out of int8, and the views between")
    return ""


def check_calibration_options(precision: str, calibration: Any, accuracy_budget: Any) -> None:
    """``calibration`` is given when ``precision == "int8"``, and only with a lower precision; the budget is
    ``"auto"``, None or a positive number."""
    if precision == "int8" and calibration is None:
        raise ValueError("pyrys.optimize: precision='int8' needs calibration=: samples of the model's inputs to "
                         "measure its activations on (an iterable of input tensors or tuples, e.g. a DataLoader "
                         "over the inputs; a few hundred representative samples)")
    if precision not in ("bf16", "int8") and calibration is not None:
        raise ValueError(f"pyrys.optimize: calibration= is read with precision='int8' or 'bf16' only, not {precision!r}")
    check_budget(accuracy_budget)
    if precision not in ("bf16", "int8") and accuracy_budget not in (AUTO, None):
        raise ValueError(f"pyrys.optimize: accuracy_budget= is read with precision='int8' or 'bf16' only, not "
                         f"{precision!r}")


def with_calibration(config: OptimizeConfig, calibration: Iterable | None, accuracy_budget: float | str | None,
                     args: tuple, kwargs: dict) -> OptimizeConfig:
    """``config`` holding the checked calibration samples (if any) and the accuracy budget of its precision
    (int8, bf16; with bf16 and ``accuracy_budget=None``: none, nothing is measured), else as it is."""
    budget = budget_for(config.precision, accuracy_budget)
    if calibration is None and (config.precision != "bf16" or budget is None):
        return config
    limit = GUARD_SAMPLES if config.precision == "bf16" else None  # bf16 reads only what its guard measures on
    samples, note = (None, "") if calibration is None else calibration_samples(calibration, args, kwargs, limit)
    return dataclasses.replace(config, calibration=Calibration(samples, budget, note))


def _example_inputs(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """The example inputs as (args, kwargs), every tensor among them on the CPU."""
    if example_kwargs is not None and not isinstance(example_kwargs, Mapping):
        raise TypeError("pyrys.optimize expects example_kwargs to be a dict of keyword inputs, got "
                        f"{type(example_kwargs).__name__}; a model with several positional inputs takes them as "
                        "one tuple: pyrys.optimize(model, (x, y))")
    kwargs = dict(example_kwargs or {})
    keywords_only = kwargs and (example_inputs is None or (isinstance(example_inputs, (tuple, list)) and not example_inputs))
    args = () if keywords_only else _as_args(example_inputs)  # model(**inputs), as HF models are called
    for i, value in enumerate(tree_flatten((args, kwargs))[0]):
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            raise InputError(f"pyrys: example input {i} must be on the CPU (pyrys compiles for the CPU), got a tensor "
                             f"on {value.device}; pass CPU tensors with real values, e.g. x.to(\"cpu\")")
    return args, kwargs


def _check_on_cpu(owner: str, state: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise :class:`DeviceError` unless every parameter and buffer is a CPU tensor with values."""
    for name, tensor in state:
        if tensor.device.type == "meta":
            raise DeviceError(
                f"pyrys: {name} of {owner} is on the meta device (a shape without values), and pyrys compiles CPU "
                "models with real weights. Materialize the model on the CPU with model.to_empty(device=\"cpu\"), "
                "then load its weights with model.load_state_dict(state_dict)")
        if tensor.device.type != "cpu":
            raise DeviceError(f"pyrys: {name} of {owner} is on {tensor.device}, and pyrys compiles CPU models; "
                              "move the model to the CPU first: model.to(\"cpu\")")


OUTPUT_DTYPES = (None, torch.float32, torch.bfloat16)


def make_config(*, backend: str = "auto", freeze_params: Iterable[str] | None = ALL,
                freeze_flags: Iterable[str] | None = ALL, disable: Iterable[str] = (),
                print_after_each: bool = False, dump_dir: str | Path | None = None,
                verify: bool = False, threads: int | None = None, layout: str = "auto",
                max_shapes: int = DEFAULT_MAX_SHAPES, dynamic: bool | None = None,
                numerics: bool = False, precision: str = "fp32",
                output_dtype: torch.dtype | None = None) -> OptimizeConfig:
    """An :class:`OptimizeConfig` from :func:`optimize`'s keyword options, checked."""
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"pyrys.optimize: threads must be a positive int, got {threads!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"pyrys.optimize: layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(max_shapes, int) or isinstance(max_shapes, bool) or max_shapes < 1:
        raise ValueError(f"pyrys.optimize: max_shapes must be a positive int, got {max_shapes!r}")
    if dynamic not in (None, True, False):
        raise ValueError(f"pyrys.optimize: dynamic must be None, True or False, got {dynamic!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"pyrys.optimize: precision must be one of {PRECISIONS}, got {precision!r}")
    if not isinstance(numerics, bool):
        raise ValueError(f"pyrys.optimize: numerics must be True or False, got {numerics!r}")
    if output_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"pyrys.optimize: output_dtype must be None, torch.float32 or torch.bfloat16, got "
                         f"{output_dtype!r}")
    return OptimizeConfig(
        backend=backend,
        freeze_params=None if freeze_params is None else tuple(freeze_params),
        freeze_flags=None if freeze_flags is None else tuple(freeze_flags),
        disable=check_pass_names(disable),
        print_after_each=print_after_each,
        dump_dir=None if dump_dir is None else str(dump_dir),
        verify=verify,
        threads=threads,
        layout=layout,
        max_shapes=max_shapes,
        dynamic=dynamic,
        numerics=numerics,
        precision=precision,
        output_dtype=output_dtype,
    )


def optimize_torchscript(script: Any, example_inputs: Any, example_kwargs: dict | None, config: OptimizeConfig,
                         flag_values: dict[str, bool] | None = None, calibration: Iterable | None = None,
                         accuracy_budget: float | str | None = AUTO) -> OptimizedModule:
    """The TorchScript way in (``pyrys.jit`` passes the freezes recorded by the seed's calls)."""
    args, kwargs = _example_inputs(example_inputs, example_kwargs)
    config = with_calibration(config, calibration, accuracy_budget, args, kwargs)
    _check_on_cpu(script_class_name(script), state_of(script))
    if (flag_values or {}).get("training", getattr(script, "training", False)):
        _warn_if_training(script, stacklevel=4)
    trace = _trace(config, script, args, kwargs)
    optimized = OptimizedModule(torchscript_frontend(script, flag_values), args, kwargs, config, trace)
    _warn_of_input_writes(optimized, caller_keeps_writes=False, stacklevel=4)
    return optimized


def _warn_of_input_writes(optimized: OptimizedModule, caller_keeps_writes: bool, stacklevel: int = 3) -> None:
    """An input written in place changes the caller's tensor in eager and not here: say so, unless the caller
    (the ``torch.compile`` backend) runs such a model in torch instead."""
    if optimized._first.captured.input_writes and not caller_keeps_writes:
        warnings.warn(f"pyrys.optimize: {input_writes_note(optimized._first.captured.input_writes)}",
                      stacklevel=stacklevel)


def _warn_if_training(model: Any, stacklevel: int = 3) -> None:
    if getattr(model, "training", False):
        warnings.warn("pyrys.optimize: the model is in training mode; BatchNorm will not be folded and "
                      "dropout stays random. Call model.eval() first for inference.", stacklevel=stacklevel)


def _static_reason(compiled: Compiled) -> str:
    """Why a capture asked for symbolic sizes has none: its note, or torch.export pinned every dim."""
    said = [note for note in compiled.notes if note.startswith("captured for these input shapes only")]
    return said[0] if said else "torch.export kept no input dim symbolic (the model pins every one)"
