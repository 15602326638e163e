"""The module :func:`pyrys.optimize` returns: compiled signatures held, new shapes compiled once."""
from __future__ import annotations


import contextlib
import copy
import dataclasses
import warnings
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from pyrys.backends import keep_held
from pyrys.backends.reference import with_values
from pyrys.calling_context import (autocast_on, called_plainly, callers_level, other_default_dtype, refuse_tracers,
                                   warn_of_autocast, without_autocast)
from pyrys.forwarding import forwarded
from pyrys.input_structures import (PassedOtherwise, binding_error, leaf_kinds, other_dtypes, passed_otherwise,
                                     tensor_kinds)
from pyrys.ir.symbolic import (bind_symbols, describe_dims, differing_fixed_dims, fixed_dims_differ, pinned_dims_differ,
                                rows_dim, rows_dim_reason)
from pyrys.numerics.trace import NumericsTrace
from pyrys.machine import give_back_freed_memory, note_module_freed
from pyrys.mode_warnings import warn_of_writes
from pyrys.passes.specialize import ShapeMismatch
from pyrys.shape_cache import ShapeCache
from pyrys.size_one import SizeOneInputs, excluded_size_one_inputs, other_sizes_held, size_one_dims
from pyrys.capture.dynamic_shapes import SIZE_ONE_FIXED, VaryingDims, symbolic_example, widened_like
from pyrys.ir.graph import user_inputs
from pyrys.ir.output_aliases import as_one_object, copied_apart
from pyrys.ir.output_views import with_views
from pyrys.output_tree import unflattener
from pyrys.signature import (InputError, Signature, arranged_like, as_python_number, check_compatible, differing_numbers,
                             is_tensor_leaf, leaf_names, leaf_value, runnable_inputs, signature_of, with_article)
from pyrys.capture.frontend import Frontend
from pyrys.config import OptimizeConfig
from pyrys.errors import CaptureError, ModelChangedError
from pyrys.ir.meta import bound_torch_fake_cache
from pyrys.ir.quiet_fake import fake_tensor_errors_unlogged
from pyrys.compiled import COMPILING, Compiled, build_for_shape, compile_signature, static_reason
from pyrys.numerics.budget import ACCURACY_NOTE, KEPT_BY_GUARD
from pyrys.passes.quantize import CALIBRATED_ON_ITS_OWN, OWN_NOTES
from pyrys.quantization.calibration import CALIBRATED_SIZES_KEY, Calibration
from pyrys.precision_notes import int8_layers


MAX_SHAPE_NOTES = 16  # opt.notes keeps at most this many, however many shapes are captured again
# graphs for every shape kept beside the first (size-1 dims fixed, other image sizes); past this many, a
# shape none holds for is captured for itself alone (its program then counts against max_shapes)
MAX_OTHER_TEMPLATES = 8
MAX_REFUSED = 64  # input signatures whose compile the model refused, answered again without a capture
RETRY_REFUSED = 16  # ... until this many calls, then at each power of two
MAX_STRUCTURES = 8  # ways of passing other inputs than the example's, each a module of its own (_passed_otherwise)
NUMBER_VALUES_ADVISED = 4  # a number input at this many values (the example's included) is told to be a tensor


_default_dtype = torch.get_default_dtype  # (bound once: every call reads it)


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
                 trace: NumericsTrace | None = None, like: Compiled | None = None):
        super().__init__()
        args, kwargs = tree_map(_capturable, (args, kwargs))  # every capture's inputs are contiguous (_compile)
        with COMPILING:
            first = compile_signature(frontend, args, kwargs, config, dynamic=config.dynamic is True, trace=trace,
                                      like=like)
        self._hold(frontend, config, [first])
        self._note_dynamic_ignored(first)
        self._find_size_one_gaps(args, kwargs)
        if not kwargs and all(isinstance(a, torch.Tensor) for a in args):  # keyed as forward keys it: as run
            self._remember_fast_call(_call_key(runnable_inputs(args, kwargs)[0], grad=False), first)

    def _note_dynamic_ignored(self, first: Compiled) -> None:
        """A note where ``dynamic=True`` cannot give symbolic sizes: a TorchScript import, an ExportedProgram
        exported without dynamic dims (before, the option was taken without a word)."""
        if self._config.dynamic is not True or first.generic is not None:
            return
        if self._frontend.fixed_shapes:
            self._note(f"dynamic=True: this {self._frontend.kind} has no dynamic dims, so it takes the shapes it "
                       "was exported for alone (export it with dynamic_shapes for others)")
        elif not self._frontend.symbolic:
            self._note(f"dynamic=True: a {self._frontend.kind} import is specialized to its inputs' shapes, so "
                       "each new shape is imported and optimized again (optimize the nn.Module itself for one "
                       "capture for every shape)")

    def _hold(self, frontend: Frontend, config: OptimizeConfig, compiled: list[Compiled],
              generic: Compiled | None = None, other_templates: list[Compiled] | None = None) -> None:
        """Hold these compiled signatures (the first is the one ``graph``, ``history`` ... describe) and the
        one new shapes are specialized from (``generic``, or the first of them captured with symbolic sizes),
        and those captured with symbolic sizes for the shapes it excludes (``other_templates``): with size-1
        dims fixed (``size_one.py``), or at other sizes of the dims it holds fixed (an image's height and width)."""
        self._frontend, self._config = frontend, config
        self.training = self.compiled_training = False  # the mode captured (see train); optimize sets it
        self._first = compiled[0]
        self._generic = generic or next((c for c in compiled if c.generic is not None), None)
        self._other_templates: list[Compiled] = list(other_templates or [])
        self._sizes_seen: dict[tuple[int, int], set[int]] = {}  # fixed dims (input position, dim) other sizes came
        # in, and the sizes each came at (the graph's included)
        self._size_one_inputs: list[SizeOneInputs] = []  # inputs to capture them from, before a save
        self._told_of_mode = False  # train() warned once
        self._unmeasured_noted = False  # int8 at a size outside its calibration samples': noted once
        self._notes_added = 0  # by _note, to opt.notes
        self._size_one_refused: list[SizeOneInputs] = []  # of those, the ones the model refused (noted once)
        self._generic_tried = self._generic is not None or config.dynamic is not None or not frontend.symbolic
        kept = {c.signature for c in compiled} if frontend.fixed_shapes else set()  # loaded: nothing to capture from
        self._shapes = ShapeCache(config.max_shapes, self._first.signature, {c.signature: c for c in compiled}, kept)
        self._fast_calls: dict[tuple, tuple[Signature, Any]] = {}
        self._rotation_noted = False  # whether a signature built again after its eviction was noted
        self._padded_noted = False  # whether image sizes left out of VaryingDims were noted (_varying_dims)
        self._number_values: dict[int, set] = {}  # number input position -> the values captured for (_capture_numbers)
        self._numbers_advised = False  # whether _advise_a_tensor warned
        self._weight_bytes = _weight_bytes(self._first.program)  # freed with it (a copy shares them: 0)
        bound_torch_fake_cache()  # (an optimize or a load adds ~50 entries)
        self._refused: dict[Signature, list] = {}  # [why, calls since] a signature's capture failed, latest last
        self._structures: OrderedDict[tuple, OptimizedModule] = OrderedDict()  # inputs passed otherwise, by
        # PassedOtherwise.key: their modules, the least recently called first
        self._structure_keys: dict[Any, tuple] = {}  # a call's (in_spec, leaf kinds) -> its key there, once found
        self._structures_dropped: set[tuple] = set()  # keys let go (a way built again is noted)
        self._outer: weakref.ref | None = None  # the module this one is a way of passing inputs of: its notes go there

    @classmethod
    def from_compiled(cls, frontend: Frontend, config: OptimizeConfig, compiled: list[Compiled],
                      generic: Compiled | None = None,
                      other_templates: list[Compiled] | None = None) -> "OptimizedModule":
        """A module holding signatures compiled elsewhere (a copy, or ``pyrys.load``)."""
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        module._hold(frontend, config, compiled, generic, other_templates)
        return module

    def forward(self, *args, **kwargs):
        if torch.compiler.is_dynamo_compiling():  # dynamo tracing a module that holds this one (torch.compile,
            # strict torch.export): a call it does not trace. Not is_compiling(): one flag for the process, set
            # while any thread exports (a new shape's capture), and the disabled call's wrapper edits torch's
            # node meta that export swaps: KeyError 'custom' on other threads. A non-strict export's own
            # trace is refused in _call
            return _untraced_call(self, args, kwargs)
        return self._call(args, kwargs)

    def _call(self, args: tuple, kwargs: dict):
        """``forward``'s work: the checks of the calling context, then the call."""
        if not called_plainly() or _default_dtype() is not self._config.default_dtype:
            refuse_tracers()
            if _default_dtype() is not self._config.default_dtype:
                raise other_default_dtype(self._config.default_dtype)
            if autocast_on():  # not followed: the program's precision, and the same dtypes on every backend
                warn_of_autocast(self._config.precision)
                with without_autocast():
                    return self._run(args, kwargs)
        return self._run(args, kwargs)

    def _run(self, args: tuple, kwargs: dict):
        """The call itself (its warnings name the module's caller: ``stacklevel`` counts this, ``_call``,
        forward and torch's two frames of ``Module.__call__``)."""
        if self._first.captured.input_writes:
            _refuse_shared_memory(args, kwargs, self._first.captured)
        grad = torch.is_grad_enabled()
        fast = self._fast_calls.get(_call_key(args, grad)) if not kwargs else None
        if fast is not None:
            self._shapes.touch(fast[0])
            return fast[1](list(args))
        args, kwargs = runnable_inputs(*arranged_like(self._first.signature, self._frontend.parameters,
                                                     args, kwargs))
        signature, flat = signature_of(args, kwargs)
        compiled = self._shapes.get(signature)
        if compiled is None:
            other = self._passed_otherwise(signature, args, kwargs)
            if other is not None:
                return other(*args, **kwargs)
            compiled = self._compile(signature, flat, args, kwargs)
        wanting_grad = [i for i, v in enumerate(flat) if grad and isinstance(v, torch.Tensor) and v.requires_grad]
        if wanting_grad:
            warnings.warn(f"pyrys: input {wanting_grad[0]} requires grad, but pyrys runs inference only: the outputs "
                          "carry no gradient (their requires_grad is False). Call the model itself to train, or "
                          "torch.compile(model, backend='pyrys'), which runs such calls in torch", stacklevel=callers_level())
        call = _direct_call(compiled)  # (the program's outputs as the fast path gives them)
        if not kwargs and not wanting_grad and all(isinstance(a, torch.Tensor) for a in args):
            self._remember_fast_call(_call_key(args, grad), compiled, call)
        return call(flat)

    def _remember_fast_call(self, key: tuple, compiled: Compiled, call=None) -> None:
        self._fast_calls[key] = (compiled.signature, call or _direct_call(compiled))
        if compiled.signature not in self._shapes.entries:  # evicted meanwhile: do not keep it alive here
            self._fast_calls.pop(key, None)

    @property
    def _programs(self) -> dict[Signature, Compiled]:
        """The compiled signatures held now (at most ``max_shapes``; the first is always held)."""
        return self._shapes.entries

    def _passed_otherwise(self, signature: Signature, args: tuple, kwargs: dict) -> "OptimizedModule | None":
        """The module for a call that passes other inputs than the example (an optional input left out or added,
        ``None`` for a value, ids of another integer dtype: :meth:`_otherwise`), captured and optimized for them
        at their first call (as ``optimize`` would with them as the example; equal weights shared), at most
        :data:`MAX_STRUCTURES` of them, the least recently called let go; None for the example's way."""
        memo = (signature.in_spec, leaf_kinds(signature.leaves))
        key = self._structure_keys.get(memo)
        otherwise = None
        if key is None:
            otherwise = self._otherwise(signature, args, kwargs)
            if otherwise is None:
                return None
            key = self._structure_keys[memo] = otherwise.key  # (a dict's item set: atomic)
        module = self._structures.get(key)
        if module is not None:
            with contextlib.suppress(KeyError):  # (let go by another thread meanwhile: still this call's)
                self._structures.move_to_end(key)
            return module
        otherwise = otherwise or self._otherwise(signature, args, kwargs)
        said = f"inputs ({signature.describe()}) differ from the example's in what they pass: {otherwise.describe()}"
        if self._frontend.fixed_shapes:
            raise InputError(f"pyrys: {said}; the module optimized from this {self._frontend.kind} takes inputs passed "
                             "as its example's alone (pyrys.save keeps no other way's programs): pass them so, or "
                             "optimize the model itself for these")
        if self._config.precision == "int8":
            raise InputError(f"pyrys: {said}; with precision='int8' the program was calibrated on samples passed as "
                             "the example is: pass the inputs so, or optimize a module for these, with calibration "
                             "samples passed like them")
        with self._compiling(signature):
            module = self._structures.get(key)
            if module is None:
                try:
                    module = self._capture_otherwise(signature, key, said, args, kwargs)
                except (CaptureError, RuntimeError) as error:  # (the capture may pass, and its first run refuse:
                    # a linear's float64 input into float32 weights, in the compile's check; a helper's find)
                    if not otherwise.floating:
                        raise
                    raise self._dtype_refused(signature, args, kwargs, error) from error
        return module

    def _dtype_refused(self, signature: Signature, args: tuple, kwargs: dict, error: Exception) -> InputError:
        """A call whose floating-point tensor of another dtype the capture for it refuses (eager's ops refuse
        float64 into float32 weights; torch.export may refuse what eager runs): the signature check's dtype
        error, with torch's reason."""
        reason = _first_line(error.__cause__ or error)
        try:
            check_compatible(self._first.signature, signature, signature_of(args, kwargs)[1], args)
        except InputError as refused:
            return InputError(f"{refused}, which the model's capture for it refuses, as eager's ops do where they "
                              f"take no such dtype ({reason})")
        return InputError(f"pyrys: inputs ({signature.describe()}) whose capture torch refuses ({reason})")

    def _capture_otherwise(self, signature: Signature, key: tuple, said: str, args: tuple,
                           kwargs: dict) -> "OptimizedModule":
        """:meth:`_passed_otherwise`'s module, made (the caller holds ``COMPILING``): the bf16 guard measures on
        these inputs (the calibration samples are the example's way), its notes join ``opt.notes``."""
        calibration = self._config.calibration  # (bf16's: its budget, measured on these inputs)
        config = dataclasses.replace(self._config, calibration=calibration and Calibration(None, calibration.accuracy_budget))
        module = OptimizedModule(self._frontend, args, kwargs, config, like=self._first)
        module.training, module.compiled_training = self.training, self.compiled_training
        module._weight_bytes = 0  # this module's, shared (share_constants)
        warn_of_writes(module, caller_keeps_writes=False, stacklevel=callers_level() + 1,
                       source=f"pyrys: inputs ({signature.describe()})")
        give_back_freed_memory()  # its capture's own copies of the weights, shared away
        again = key in self._structures_dropped
        self._structures[key] = module
        self._note(f"{said}: captured and optimized for them, as optimize would with them as the example inputs "
                   "(a module of their own within this one, sharing its weights)"
                   + (f"; built again after more ways than {MAX_STRUCTURES} took turns" if again else ""))
        for note in [n for n in module.notes if n not in self._first.notes]:
            self._note(f"inputs ({signature.describe()}): {note}")
        module._outer = weakref.ref(self)  # (its later notes, a new shape's, join these too)
        while len(self._structures) > MAX_STRUCTURES:
            dropped, _ = self._structures.popitem(last=False)
            self._structures_dropped.add(dropped)
            self._structure_keys = {memo: k for memo, k in self._structure_keys.items() if k != dropped}
        return module

    def _otherwise(self, signature: Signature, args: tuple, kwargs: dict) -> PassedOtherwise | None:
        """How a call passes other inputs than the example (:func:`passed_otherwise`), or, passing the same ones,
        tensors of another dtype (:func:`other_dtypes`: index tensors of another integer dtype or bool, and
        where a capture can be made, floating-point ones of another floating-point dtype; else those stay the
        signature check's dtype error); None where neither."""
        first = self._first.signature
        otherwise = passed_otherwise(first, self._frontend.parameters, args, kwargs)
        if otherwise is None and signature.in_spec == first.in_spec:
            capturable = not self._frontend.fixed_shapes and self._config.precision != "int8"
            otherwise = other_dtypes(first.leaves, signature.leaves, leaf_names(signature.in_spec), capturable)
        if otherwise is None:
            return None  # each way's tensors' dtypes and ranks are its own: its module's first call fixes them
        return dataclasses.replace(otherwise, key=otherwise.key + (("tensors", tensor_kinds(signature.leaves)),))

    @contextlib.contextmanager
    def _compiling(self, signature: Signature):
        """``COMPILING`` held for a compile for ``signature``, whose refusal (a ``CaptureError`` or
        ``InputError``) is remembered and raised again without a capture (:meth:`_refuse`) unless this call is
        one to try again at: a capture again costs (a symbolic export each time, which torch keeps), so it is
        tried only at the 16th, 32nd, 64th ... call since (a refusal the model's state caused may pass)."""
        seen = self._refused.get(signature)
        if seen is not None:
            seen[1] += 1
            if seen[1] < RETRY_REFUSED or seen[1] & (seen[1] - 1):
                raise _again(seen[0])
        with COMPILING:
            now = self._refused.get(signature)
            if now is not None and now is not seen:  # another caller was refused meanwhile
                raise _again(now[0])
            try:
                yield
            except (CaptureError, InputError) as error:
                self._refuse(signature, error, seen[1] if seen is not None else 1)
                raise
            self._refused.pop(signature, None)

    def _compile(self, signature: Signature, flat: list, args: tuple, kwargs: dict) -> Compiled:
        """The program for a new input signature, compiled once however many threads ask at once."""
        try:
            check_compatible(self._first.signature, signature, flat, args)
        except InputError as error:  # a call eager refuses as well: say what forward says
            refused = binding_error(self._frontend.parameters, args, kwargs)
            if refused is None:
                raise
            raise InputError(f"{error}; forward itself refuses that call: {refused}") from None
        differing = differing_numbers(self._first.signature, signature)
        if differing and not self._numbers_may_differ():
            raise self._frozen_numbers_error(signature, differing)
        if self._frontend.fixed_shapes and self._generic is None:
            raise self._fixed_shapes_error(signature, "")
        with self._compiling(signature):
            compiled = self._shapes.get(signature)
            if compiled is None:
                # captured and specialized from contiguous copies (the program reads its inputs so): a shape's
                # program, its outputs' layout and a refusal followed the layout of its first call (a
                # channels-last batch refused where the model views a conv's output: every later call of that
                # batch size was, contiguous ones too; a helper's find)
                flat, args, kwargs = tree_map(_capturable, (flat, args, kwargs))
                compiled = (self._capture_numbers(signature, differing, args, kwargs) if differing
                            else self._new_shape(signature, flat, args, kwargs))
                bound_torch_fake_cache()
                self._keep(signature, compiled)
                self._note_unmeasured_sizes(compiled, flat)
                fault = getattr(compiled.program, "fault", None)  # its own check's (dnnl's self_check.py)
                if fault is not None and getattr(self._first.program, "fault", None) is None:  # (else said once)
                    self._note(f"inputs ({signature.describe()}): {fault}")
                trusted = getattr(compiled.program, "check_note", None)  # differs, as rounding explains
                if trusted:
                    self._note(f"inputs ({signature.describe()}): {trusted}")
        return compiled

    def _numbers_may_differ(self) -> bool:
        """Whether a number input (``forward(x, scale: float)``) may come at another value than the example's: a
        capture of its own then (not from a save, which cannot capture, nor with int8, calibrated at the
        example's values)."""
        return not self._frontend.fixed_shapes and self._config.precision != "int8"

    def _frozen_numbers_error(self, signature: Signature, differing: list[int]) -> InputError:
        """Why a number input may not take another value than the example's here (a loaded module, int8)."""
        names, first = leaf_names(signature.in_spec), self._first.signature

        def described(leaf) -> str:  # a value equal to the example's differs in type: say which
            value = leaf_value(leaf)
            return f"{value!r} ({with_article(type(value).__name__)})" if any(
                leaf_value(signature.leaves[i]) == leaf_value(first.leaves[i]) for i in differing) else repr(value)

        said = "; ".join(f"{names[i]} is {described(signature.leaves[i])}, the example's {described(first.leaves[i])}"
                         for i in differing[:3])
        if self._frontend.fixed_shapes:
            held = "; ".join(f"({s.describe()})" for s in self._programs)
            return InputError(f"pyrys: {said}: a number input is frozen into the graph captured for it, and the module "
                              f"optimized from this {self._frontend.kind} cannot capture another; it holds inputs "
                              f"{held}. {self._frontend.fixed_shapes}")
        return InputError(f"pyrys: {said}: with precision='int8' a number input keeps the example's value and type "
                          "(the scales were calibrated with it); pass it so, optimize a module for each value, or "
                          "pass it as a tensor")

    def _capture_numbers(self, signature: Signature, differing: list[int], args: tuple, kwargs: dict) -> Compiled:
        """The program for inputs whose numbers differ from the example's: torch.export freezes a number into
        the graph, so these are captured and optimized for themselves (each value a signature of its own,
        counted against ``max_shapes``), with a note (one was an ``InputError`` "it was specialized")."""
        compiled = compile_signature(self._frontend, args, kwargs, self._config, like=self._first)
        names = leaf_names(signature.in_spec)
        said = ", ".join(f"{names[i]} is {signature.leaves[i]!r}, the example's {self._first.signature.leaves[i]!r}"
                         for i in differing[:3])
        note = (f"inputs ({signature.describe()}) captured and optimized again: {said} (a number input is frozen "
                "into the graph captured; each value gets a program of its own)")
        compiled.notes.append(note)
        self._note(note)
        self._advise_a_tensor(signature, differing, names)
        return compiled

    def _advise_a_tensor(self, signature: Signature, differing: list[int], names: list[str]) -> None:
        """Once: a warning where a number input came at :data:`NUMBER_VALUES_ADVISED` values, each a capture and
        compile of its own (a denoising loop's ``int`` timestep: about 10 s a step for a small UNet), that a
        0-dim tensor is captured once for all its values."""
        for i in differing:
            values = self._number_values.setdefault(i, {self._first.signature.leaves[i]})
            values.add(signature.leaves[i])
            if len(values) == NUMBER_VALUES_ADVISED and not self._numbers_advised:
                self._numbers_advised = True
                kind = type(leaf_value(self._first.signature.leaves[i])).__name__  # the example's (a bool came last)
                advice = (f"{names[i]} ({with_article(kind)}) came at "
                          f"{NUMBER_VALUES_ADVISED} values, each captured and optimized on its own (a number input is "
                          "frozen into the graph captured); if it changes from call to call (a step or a timestep), "
                          "pass it as a tensor (torch.tensor(value)): a tensor input is captured once for all its values")
                self._note(advice)
                warnings.warn(f"pyrys: {advice}", UserWarning, stacklevel=callers_level())

    def _note_unmeasured_sizes(self, compiled: Compiled, flat: list) -> None:
        """Once: a note where int8 runs at a size past dim 0 outside those of the samples its plan was made on
        (the first's, or a capture's own): its scales were not measured there."""
        sizes = (compiled.generic or compiled.captured).gm.meta.get(CALIBRATED_SIZES_KEY)
        if self._unmeasured_noted or not sizes or not int8_layers(compiled.run):
            return
        names = leaf_names(compiled.signature.in_spec)
        unmeasured = [f"{names[i]} dim {d} is {value.shape[d]}, the samples' " +
                      (f"{min(held)} to {max(held)}" if len(held) > 1 else f"{min(held)}")
                      for i, value in enumerate(flat) if isinstance(value, torch.Tensor)
                      for d in range(1, value.dim()) if (held := sizes.get((i, d)))
                      and not min(held) <= value.shape[d] <= max(held)]
        if unmeasured:
            self._unmeasured_noted = True
            self._note(f"precision='int8': inputs ({compiled.signature.describe()}) are of sizes outside the "
                       f"calibration samples' ({'; '.join(unmeasured[:3])}): the scales calibrated run there "
                       "unmeasured, and an activation whose range follows that size (a mean over fewer tokens, a scale "
                       "by the length) may clip (a fuzz: error 0.3-0.55 at length 1 against 1.2e-2 at the 16 "
                       "calibrated); calibrate on samples of the sizes served (read with dynamic=True)")

    def _refuse(self, signature: Signature, error: Exception, count: int) -> None:
        """Remember why ``signature`` was refused (without tracebacks: they hold the call's frames and inputs),
        the last :data:`MAX_REFUSED` such signatures."""
        kept = copy.copy(error).with_traceback(None)
        if error.__cause__ is not None:
            kept.__cause__ = copy.copy(error.__cause__).with_traceback(None)
        self._refused.pop(signature, None)
        self._refused[signature] = [kept, count]
        while len(self._refused) > MAX_REFUSED:
            self._refused.pop(next(iter(self._refused)))

    def _keep(self, signature: Signature, compiled: Compiled) -> None:
        """Hold ``compiled`` among the signatures (the caller holds ``COMPILING``), dropping what it evicts; the
        first signature built again after it was dropped is noted (more shapes take turns than ``max_shapes``)."""
        if self._shapes.came_back(signature) and not self._rotation_noted:
            self._rotation_noted = True
            self._note(f"inputs ({signature.describe()}) built again after max_shapes={self._config.max_shapes} "
                       "dropped them: more shapes take turns than it holds, and each is rebuilt when it comes back "
                       "(raise max_shapes to keep them)")
        evicted = set(self._shapes.put(signature, compiled))
        if evicted:
            self._fast_calls = {k: v for k, v in self._fast_calls.items() if v[0] not in evicted}
            held = self._held()
            keep_held([c.program for c in held], [gm for c in held for gm in _graphs_of(c)])

    def _held(self) -> list[Compiled]:
        """Every compile this module holds: its signatures', the graph for every shape's and the templates'."""
        held = [*self._shapes.entries.values(), self._first, *self._other_templates]
        held += [self._generic] if self._generic is not None else []
        held += [c.template for c in held if c.template is not None]
        return list({id(c): c for c in held}.values())

    def _new_shape(self, signature: Signature, flat: list, args: tuple, kwargs: dict) -> Compiled:
        """The program for a new shape: specialized from the graph optimized for every shape.  With
        ``dynamic=None`` that graph is captured at the first new shape (the first signature was captured
        for its own shape only); a shape it does not hold for, or a way in without symbolic sizes, is
        captured and optimized again for that shape alone, with a note saying why."""
        if self._generic is None and not self._generic_tried:
            self._generic_tried = True
            first = [leaf[0] if is_tensor_leaf(leaf) else None for leaf in self._first.signature.leaves]
            capture_args, capture_kwargs = symbolic_example(*widened_like(args, kwargs, first))  # sizes of 1 made 2
            try:
                compiled = self._capture_generic(capture_args, capture_kwargs, args, kwargs)
            except (CaptureError, InputError):  # these inputs were refused, not symbolic sizes: the next shape tries
                self._generic_tried = False
                raise
            capture_args, capture_kwargs = (capture_args, capture_kwargs) if compiled.signature != signature \
                else (args, kwargs)
            give_back_freed_memory()  # the capture's own copies of the weights, shared away (share_constants)
            if compiled.generic is not None:
                self._generic = compiled
                self._note(f"input shapes vary: captured once more with symbolic sizes "
                           f"({describe_dims(compiled.generic.gm)}); every later shape that differs in those alone is "
                           "specialized from it")
                self._find_size_one_gaps(capture_args, capture_kwargs)
            else:
                self._note(f"inputs ({compiled.signature.describe()}) captured and optimized again: "
                           f"{static_reason(compiled)}")
            self._note_precision(compiled, compiled.signature)
            if compiled.signature == signature:
                return compiled  # (the widened inputs' program is let go: nobody called that shape)
        others: list[str] = []  # why the graphs for other sizes did not hold either (a loaded module says so)
        if self._generic is not None:
            try:
                return build_for_shape(self._generic, signature, flat, self._config, like=self._first.program,
                                       for_call=True)
            except ShapeMismatch as error:
                why = str(error)
            for template in self._other_templates:
                try:
                    return build_for_shape(template, signature, flat, self._config, like=self._first.program,
                                           for_call=True)
                except ShapeMismatch as error:
                    others.append(f"another graph saved with it: {error}")
            if not self._frontend.fixed_shapes:
                templates = [self._generic, *self._other_templates]
                fitting = next((t for t in templates if not fixed_dims_differ(t.generic.gm, flat)
                                and not pinned_dims_differ(t.generic.gm, flat)), None)
                if fitting is None and len(self._other_templates) < MAX_OTHER_TEMPLATES:
                    return self._capture_other_sizes(args, kwargs, why, flat)
                if fitting is not None and size_one_dims(fitting.generic.gm, flat):
                    return self._capture_size_one(args, kwargs, why)
        elif self._frontend.symbolic:
            why = ("dynamic=False: each new shape is captured and optimized again" if self._config.dynamic is False
                   else "the captured graph holds fixed shapes (no input dim could stay symbolic)")
        else:
            why = f"a {self._frontend.kind} import is specialized to its inputs' shapes"
        if self._frontend.fixed_shapes:
            raise self._fixed_shapes_error(signature, "; ".join([why, *others]))
        compiled = compile_signature(self._frontend, args, kwargs, self._config, like=self._first)
        note = f"inputs ({signature.describe()}) captured and optimized again: {why}"
        compiled.notes.append(note)
        self._note(note)
        self._note_precision(compiled, signature)
        return compiled

    def _capture_generic(self, widened_args: tuple, widened_kwargs: dict, args: tuple, kwargs: dict) -> Compiled:
        """The capture with symbolic sizes ``dynamic=None`` makes at its first new shape: from the inputs widened
        (sizes of 1 made 2), else, where the model refuses those (a dim it pins) or they give no symbolic graph,
        from the inputs themselves."""
        if signature_of(widened_args, widened_kwargs)[0] == signature_of(args, kwargs)[0]:
            return compile_signature(self._frontend, args, kwargs, self._config, dynamic=True, like=self._first)
        try:
            compiled = compile_signature(self._frontend, widened_args, widened_kwargs, self._config, dynamic=True,
                                         like=self._first, apart_on_data=False)
        except (CaptureError, InputError):
            compiled = None
        if compiled is None or compiled.generic is None:
            compiled = compile_signature(self._frontend, args, kwargs, self._config, dynamic=True, like=self._first)
        return compiled

    def _capture_size_one(self, args: tuple, kwargs: dict, why: str) -> Compiled:
        """The program for inputs with a size of 1 the graph for every shape excludes (``why``), from a capture
        with those dims fixed at 1 and the others symbolic, kept for every later shape it holds for (and for
        ``pyrys.save``; where that capture keeps no size symbolic, it is these shapes' alone)."""
        args, kwargs = tree_map(_capturable, (args, kwargs))  # a view's strides would become symbols of their own
        varying = self._varying_dims()
        dynamic = VaryingDims(varying, size_one_fixed=True) if varying else SIZE_ONE_FIXED
        compiled = compile_signature(self._frontend, args, kwargs, self._config, dynamic=dynamic, like=self._first)
        signature = compiled.signature.describe()
        if compiled.generic is not None:
            self._other_templates.append(compiled)
            self._note(f"inputs ({signature}) captured once more with their size-1 dims fixed ({why}); other shapes "
                       f"with those dims of size 1 are specialized from it (its symbolic dims: "
                       f"{describe_dims(compiled.generic.gm)})")
        else:
            self._note(f"inputs ({signature}) captured and optimized again: {why}; "
                       f"{static_reason(compiled, size_one_fixed=True)}")
        self._note_precision(compiled, compiled.signature)
        return compiled

    def _capture_other_sizes(self, args: tuple, kwargs: dict, why: str, flat: list) -> Compiled:
        """The program for inputs that differ from every graph for every shape in a dim it holds fixed (``why``:
        an image of another height), from a capture with symbolic sizes at these inputs' fixed dims, kept for
        every later shape it holds for (a batch of another size at that height) and for ``pyrys.save``.  A
        fixed dim that comes at a third size (a KV cache's length, growing a call at a time) is symbolic in
        that capture (``VaryingDims``): one capture for all its sizes, not one per size."""
        differing = differing_fixed_dims(self._generic.generic.gm, flat)
        first = differing_fixed_dims(self._first.captured.gm, flat)  # dynamic=None: the example's size too
        for (position, dim), fixed in differing.items():
            sizes = self._sizes_seen.setdefault((position, dim), {fixed})
            sizes.add(flat[position].shape[dim])
            if (position, dim) in first:
                sizes.add(first[position, dim])
        varying = self._varying_dims() & differing.keys()
        dynamic = VaryingDims(varying) if varying else True
        compiled = compile_signature(self._frontend, args, kwargs, self._config, dynamic=dynamic, like=self._first)
        give_back_freed_memory()  # the capture's own copies of the weights, shared away (share_constants)
        signature = compiled.signature.describe()
        if compiled.generic is not None:
            self._other_templates.append(compiled)
            self._note(f"inputs ({signature}) captured once more with symbolic sizes ({why}); other shapes with "
                       f"these fixed dims are specialized from it ({describe_dims(compiled.generic.gm)})")
            self._find_size_one_gaps(args, kwargs, compiled)
        else:
            self._note(f"inputs ({signature}) captured and optimized again: {why}; {static_reason(compiled)}")
        self._note_precision(compiled, compiled.signature)
        return compiled

    def _varying_dims(self) -> frozenset[tuple[int, int]]:
        """The fixed dims that came at three sizes or more: symbolic in the next capture (``VaryingDims``), but an
        image size of an input that reaches a pad before a convolution or pooling (``padded_window_inputs``): those
        are captured size by size, with a note."""
        padded = self._first.captured.padded_window_inputs
        varying = {where for where, sizes in self._sizes_seen.items() if len(sizes) >= 3}
        left_out = {(position, dim) for position, dim in varying if position in padded and dim >= 2}
        if left_out and not self._padded_noted:
            self._padded_noted = True
            self._note("image sizes keep changing, but each is captured for its size alone: the model pads its images "
                       "before a convolution or pooling, a pad such models compute from the size (TF 'same' padding), "
                       "and symbolic image sizes through it took torch.export minutes")
        return frozenset(varying - left_out)

    def _find_size_one_gaps(self, args: tuple, kwargs: dict, template: Compiled | None = None) -> None:
        """Remember, from the inputs at hand, the size-1 shapes the graph for every shape (``template``, else the
        first) excludes, to capture them before a save (:mod:`pyrys.size_one`)."""
        template = template or self._generic
        if template is not None and not self._frontend.fixed_shapes:  # from the inputs it was captured from:
            args, kwargs = symbolic_example(args, kwargs)  # a batch of 1 made 2, so that a length of 1 is found too
            self._size_one_inputs += [inputs for inputs in excluded_size_one_inputs(template.generic.gm, args, kwargs)
                                      if not any(_same(inputs, refused) for refused in self._size_one_refused)]

    def complete_size_one(self) -> None:
        """Capture the size-1 shapes the graph for every shape excludes and no size-1 capture holds yet, nor a
        program kept (what ``pyrys.save`` does first, since a loaded module cannot capture); one that fails to
        capture is left out, with a note."""
        with COMPILING:
            pending, index = self._size_one_inputs, 0
            while index < len(pending):  # a size-1 capture may exclude a size 1 of another dim: batch 1, length 1
                args, kwargs, alone = pending[index]
                index += 1
                signature, flat = signature_of(args, kwargs)
                template = next((t for t in self._other_templates if _holds(t, flat)), None)
                if template is None:
                    held = self._shapes.get(signature)
                    if held is not None and held.generic is None and not (
                            self._generic is not None and other_sizes_held(self._generic.generic.gm, flat)):
                        continue  # a program of these shapes alone, and no other size to take: saved as it is
                        # (a batch-1 example's, where the graph for every shape varies the length too, is not)
                    try:
                        with fake_tensor_errors_unlogged():  # a refusal is the note below, not torch's traceback
                            template = self._capture_size_one(args, kwargs, "before saving")
                        if template.generic is None:  # what the save writes, whatever max_shapes drops; done
                            self._shapes.keep(signature, template)  # (captured again at every save otherwise)
                            index -= 1
                            pending.pop(index)
                            continue
                    except Exception as error:  # noqa: BLE001 -- the model refuses these inputs: the save goes on
                        if alone and not isinstance(error, ModelChangedError):  # a mix the model need not take:
                            index -= 1  # the inputs with their other batches narrowed too come next
                            self._size_one_refused.append(pending.pop(index))
                            continue
                        line = (str(error).strip().splitlines() or [""])[0][:200]
                        said = (f"inputs ({signature.describe()}) of a size 1 the graph for every shape excludes "
                                f"could not be captured before saving ({type(error).__name__}: {line}); a module "
                                "loaded from the save refuses them")
                        self._note(said)
                        if isinstance(error, ModelChangedError):  # (a model's own refusal of a size of 1: noted)
                            warnings.warn(f"pyrys.save: {said}", stacklevel=callers_level())
                        index -= 1
                        self._size_one_refused.append(pending.pop(index))  # not tried again at the next save
                        continue
                if template.generic is not None and template.generic is not self._generic.generic:
                    more = excluded_size_one_inputs(template.generic.gm, args, kwargs)
                    pending += [inputs for inputs in more
                                if not any(_same(inputs, known) for known in pending + self._size_one_refused)]

    def _note_precision(self, compiled: Compiled, signature: Signature) -> None:
        """What a capture for new shapes did in lower precision, in ``opt.notes``: its bf16 accuracy guard's
        measure (it may keep other ops in float32: its misses say which), its own int8 calibration and its
        measure (a graph computing values otherwise than the one calibrated first: ``passes/quantize.py``),
        and fewer int8 layers than the first capture."""
        calibrated = _calibrated_on_its_own(compiled)
        kept = "; ".join(str(miss) for miss in compiled.run.misses if KEPT_BY_GUARD in str(miss))
        for note in sorted(compiled.notes, key=lambda note: not note.startswith(OWN_NOTES)):
            if note.startswith(("precision='bf16': ", *OWN_NOTES)) or (
                    calibrated and note.startswith(ACCURACY_NOTE % "int8")):
                # opt.misses are the first capture's: this one's kept ops are named here
                note = note.replace("see misses", kept) if kept else note
                self._note(f"the capture for inputs ({signature.describe()}): {note}")
        first, now = int8_layers(self._first.run), int8_layers(compiled.run)
        if now < first:
            why = ("the accuracy guard keeps more of them out of int8 there" if calibrated else
                   "their inputs are computed otherwise there than in the graph calibrated, and the calibration "
                   "samples do not fit it")
            self._note(f"precision='int8': the capture for inputs ({signature.describe()}) runs {now} of the "
                       f"{first} int8 layers in int8, the rest in floating point ({why}; its misses say which)")
        if compiled.template is not None and int8_layers(compiled.template.run) < max(now, first):
            self._note(f"precision='int8': the graph for other shapes captured with inputs ({signature.describe()}), "
                       f"which excludes their own shapes, runs {int8_layers(compiled.template.run)} of the "
                       f"{max(now, first)} int8 layers in int8, the rest in floating point (its notes: "
                       + "; ".join(n for n in compiled.template.notes if n.startswith("precision='int8'"))[:400] + ")")

    def _note(self, note: str) -> None:
        """Add to ``opt.notes`` (the first signature's); past :data:`MAX_SHAPE_NOTES` added, one last entry
        holds the latest note and counts those it replaced."""
        outer = self._outer() if self._outer is not None else None
        if outer is not None:
            outer._note(f"inputs passed as ({self._first.signature.describe()}): {note}")
        notes = self._first.notes
        self._notes_added += 1
        if self._notes_added <= MAX_SHAPE_NOTES:
            notes.append(note)
        else:
            replaced = self._notes_added - MAX_SHAPE_NOTES
            notes[-1] = (f"{replaced} notes of later shapes not kept (opt.notes keeps {MAX_SHAPE_NOTES} of them); "
                         f"the latest: {note}")

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
        programs = {signature: dataclasses.replace(compiled, program=copy.deepcopy(compiled.program, memo),
                                                   notes=list(compiled.notes))
                    for signature, compiled in self._programs.items()}
        first = programs.pop(self._first.signature)
        copied = OptimizedModule.from_compiled(self._frontend, self._config, [first, *programs.values()], self._generic,
                                               self._other_templates)
        copied._size_one_inputs, copied._size_one_refused = list(self._size_one_inputs), list(self._size_one_refused)
        copied._sizes_seen = {where: set(sizes) for where, sizes in self._sizes_seen.items()}
        copied.training, copied.compiled_training = self.training, self.compiled_training
        copied._notes_added = self._notes_added
        copied._weight_bytes = 0  # the original's, shared
        copied._structures = OrderedDict((key, copy.deepcopy(module, memo)) for key, module in self._structures.items())
        for module in copied._structures.values():
            module._outer = weakref.ref(copied)
        copied._structure_keys, copied._structures_dropped = dict(self._structure_keys), set(self._structures_dropped)
        return copied

    def _apply(self, fn, recurse: bool = True) -> "OptimizedModule":
        """What ``.to()``, ``.half()``, ``.double()``, ``.cuda()`` ... do to a module's tensors, tried on a probe of
        the inputs' floating-point dtype on the CPU: a conversion that would change it raises (the compiled
        program keeps its precision and device, and the call went unnoticed); one that changes nothing
        (``.to("cpu")``, ``.float()`` of a float32 module) is a no-op."""
        dtype = next((leaf[1] for leaf in self._first.signature.leaves
                      if is_tensor_leaf(leaf) and leaf[1].is_floating_point), torch.float32)
        probe = torch.zeros(1, dtype=dtype)
        try:
            converted = fn(probe)
            would = (f"make {str(converted.dtype).removeprefix('torch.')} on {converted.device}"
                     if isinstance(converted, torch.Tensor) and (converted.dtype, converted.device) != (dtype, probe.device)
                     else "")
        except Exception as error:  # noqa: BLE001 -- .cuda() without a GPU: torch's "no NVIDIA driver"
            would = f"move it, and fails on a tensor here ({type(error).__name__}: {str(error).strip()[:120]})"
        if would:
            raise TypeError(f"pyrys: an optimized module keeps the precision and device it was optimized for "
                            f"({str(dtype).removeprefix('torch.')} on the CPU); this conversion would {would}. Optimize with "
                            "precision='bf16' (output_dtype=torch.bfloat16 for bfloat16 outputs) for bf16, or "
                            "convert the model itself and optimize that")
        return self

    def train(self, mode: bool = True) -> "OptimizedModule":
        """Sets ``training``, as on any module, but what the module computes stays what was captured: the mode
        the model was in at ``optimize`` (``compiled_training``); asked for the other, it warns once."""
        if bool(mode) != self.compiled_training and not self._told_of_mode:
            self._told_of_mode = True
            captured = "training" if self.compiled_training else "eval"
            warnings.warn(f"pyrys: train({bool(mode)}) does not change what an optimized module computes: it runs the "
                          f"graph captured in {captured} mode (in eval mode BatchNorm is folded with its running "
                          "statistics and dropout is off). Call the model itself to train, or optimize it in the "
                          "mode wanted", UserWarning, stacklevel=callers_level())
        return super().train(mode)

    def __del__(self, note=note_module_freed) -> None:
        """Counted towards the collection the next ``optimize`` or ``load`` makes (its graphs are cyclic and hold
        the weights its program reads as they are: :func:`pyrys.machine.collect_freed_modules`): the bytes
        counted when it was made (a collection may run this anywhere, under a lock its thread holds: nothing
        here takes one).  At the interpreter's exit modules' globals may be gone already: nothing is counted then."""
        try:
            note(self.__dict__.get("_weight_bytes", 0))
        except (TypeError, AttributeError):  # (a global of pyrys.machine made None at exit)
            pass

    def __copy__(self) -> "OptimizedModule":
        return self.__deepcopy__({})

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Nothing to load (``state_dict()`` is empty: the weights are constants of the program); given
        tensors, a clear error rather than torch's "unexpected keys"."""
        if state_dict:
            raise RuntimeError("pyrys: an optimized module has no state to load: its weights were frozen into its "
                               "program at optimize (its state_dict() is empty). Load them into the model "
                               "(model.load_state_dict(...)) and optimize it again")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

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

    def _weights_unchanged(self) -> bool:
        """Whether no tensor shared with the model was written in place since optimize (version counters only:
        cheap enough for every call of ``pyrys.jit.run``)."""
        try:
            if self._frontend.writes is not None:
                self._frontend.writes.check(digests=False)
        except ModelChangedError:
            return False
        return True

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
        """Per flat input of the first compiled signature, the positional ones first, then the keyword ones in
        ``forward``'s order (what a call passing them all by position gives, where no parameter between them is
        left out: an example
        ``{"mask": m, "ids": i}`` for ``forward(ids, mask)`` gives ids first, as ``opt(i, m)`` reads them;
        ``pyrys serve`` and the Ray Predictor decode inputs so): ``(shape, dtype)`` for a tensor, the value itself
        for an input it was specialized to."""
        signature, parameters = self._first.signature, self._frontend.parameters
        positional, keywords = signature.in_spec.child(0), signature.in_spec.child(1)
        leaves = [leaf_value(leaf) for leaf in signature.leaves]
        groups, start = [], positional.num_leaves
        for name, child in zip(keywords.context, keywords.children()):
            groups.append((name, leaves[start:start + child.num_leaves]))
            start += child.num_leaves
        order = list(parameters.parameters) if parameters is not None else []
        groups.sort(key=lambda group: order.index(group[0]) if group[0] in order else len(order))
        return leaves[:positional.num_leaves] + [leaf for _, group in groups for leaf in group]

    @property
    def input_names(self) -> list:
        """Per flat input, in :attr:`input_types`' order, the name of the ``forward`` parameter it fills; None for
        one that is part of a parameter (a tuple's, a dict's) or that no named parameter takes (``*args``)."""
        signature, parameters = self._first.signature, self._frontend.parameters
        named = [p for p in parameters.parameters.values()] if parameters is not None else []
        named = [p.name for p in named if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        positional, keywords = signature.in_spec.child(0), signature.in_spec.child(1)
        names = []
        for i, child in enumerate(positional.children()):
            names += [named[i] if i < len(named) and child.is_leaf() else None] * child.num_leaves
        # (a tuple or dict of one tensor is not that tensor: its one leaf was named for the parameter, and
        # pyrys.ray's column check took the parameter for it; a helper's find)
        groups = [(name, child.num_leaves, child.is_leaf())
                  for name, child in zip(keywords.context, keywords.children())]
        order = list(parameters.parameters) if parameters is not None else []
        groups.sort(key=lambda group: order.index(group[0]) if group[0] in order else len(order))  # as input_types
        return names + [name if leaf else None for name, leaves, leaf in groups for _ in range(leaves)]

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

    def why_rows_do_not_batch(self) -> str:
        """Why :attr:`batches_rows` is False ("" where it is True)."""
        if self._generic is None:
            return ("it was saved for fixed shapes: optimize it with dynamic=True (or call it at a second batch "
                    "size before pyrys.save) and save it again to batch")
        return rows_dim_reason(self._generic.generic.gm)

    def program_text(self) -> str:
        return self._first.program.describe()

    def memory(self) -> dict[str, int]:
        """Bytes the module holds, over every input signature it keeps (see :mod:`pyrys.backends.program`), those
        of inputs passed otherwise than the example's too (:meth:`_passed_otherwise`: up to ``max_shapes`` for
        each way): ``weights`` and ``packed_weights`` once (every program shares the first's), ``activations``
        the largest call's arena, ``frames`` what every program's idle frames hold."""
        held = [compiled.program.memory() for module in [self, *list(self._structures.values())]
                for compiled in list(module._programs.values())]
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


def _weight_bytes(program) -> int:
    """What ``program`` holds of weights, plain and packed (0 where it cannot say: only counted)."""
    try:
        held = program.memory()
        return held["weights"] + held["packed_weights"]
    except Exception:  # noqa: BLE001 -- accounting never fails a compile
        return 0


def _capturable(value: Any) -> Any:
    """An input as a capture takes it: a tensor contiguous; a NumPy number torch.export refuses (``np.int64``,
    ``np.float32``) as the Python number of its value, but ``np.float64`` as it is (a float: ``torch.tensor(v)``
    of it is float64, as in eager) and ``np.bool_`` too (which torch.export refuses, clearly)."""
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    return value if isinstance(value, (int, float, complex)) else as_python_number(value)


def _same(a: SizeOneInputs, b: SizeOneInputs) -> bool:
    """Whether two calls' inputs have one signature (shapes, dtypes)."""
    return signature_of(a.args, a.kwargs)[0] == signature_of(b.args, b.kwargs)[0]


def _holds(template: Compiled, flat: list) -> bool:
    """Whether ``template``'s graph for every shape holds for these inputs' shapes."""
    return bind_symbols(template.generic.gm, flat)[1] is None


def _again(error: Exception) -> Exception:
    """A fresh copy of a remembered refusal, with its cause, to raise once more."""
    again = copy.copy(error)
    again.__cause__ = error.__cause__
    return again


@torch.compiler.disable(reason="pyrys: an optimized module runs compiled oneDNN programs, not torch ops, so "
                        "torch.compile runs it untraced, a graph break, which torch.export(strict=True) and "
                        "torch.compile(fullgraph=True) refuse; export or compile the model it was optimized from")
def _untraced_call(module: OptimizedModule, args: tuple, kwargs: dict):
    """``module(*args, **kwargs)`` where dynamo does not trace it (a graph break, without dynamo's warnings
    about the calls inside it that it cannot trace)."""
    return module._call(args, kwargs)


def _call_key(args: tuple, grad: bool) -> tuple | None:
    """A cheap key for calls made of positional tensors only (None otherwise).

    Only keys of calls that passed :func:`runnable_inputs` unchanged are ever stored, so a
    tensor on another device, with another layout, with its negation or conjugation bit set or requiring grad
    in grad mode (``grad``) never takes the fast path: it meets the checks instead; nor does a tensor of another
    class (a FakeTensor, which has no memory to run on) or a nested one (which has no one shape)."""
    try:
        return tuple((type(a), a.shape, a.dtype, a.is_cpu, a.layout, a.is_neg(), a.is_conj(),
                      grad and a.requires_grad) for a in args)
    except (AttributeError, RuntimeError):
        return None


def _calibrated_on_its_own(compiled: Compiled) -> bool:
    """Whether this capture's int8 plan is its own (it computes values otherwise than the first's), as its
    note says (``passes/quantize.py``)."""
    return any(note.startswith(OWN_NOTES) and CALIBRATED_ON_ITS_OWN in note for note in compiled.notes)


def _graphs_of(compiled: Compiled) -> list[torch.fx.GraphModule]:
    return [compiled.captured.gm] + ([compiled.generic.gm] if compiled.generic is not None else [])


def _direct_call(compiled: Compiled):
    """The program with its outputs copied apart where eager keeps them apart, views where eager's are views
    (``ir/output_views.py``), and restructured: every call's (the all-tensor fast path of ``forward`` keeps it)."""
    program, spec, copies = compiled.program, compiled.captured.out_spec, compiled.captured.output_copies
    structure = unflattener(spec)
    same, views = compiled.captured.same_outputs, compiled.captured.output_views
    if views:
        return lambda flat: structure(as_one_object(with_views(copied_apart(program(flat), copies), flat, views), same))
    if same:
        return lambda flat: structure(as_one_object(copied_apart(program(flat), copies), same))
    if copies:
        return lambda flat: structure(copied_apart(program(flat), copies))
    if spec.is_leaf():
        return lambda flat: program(flat)[0]
    return lambda flat: structure(program(flat))


def _refuse_shared_memory(args: tuple, kwargs: dict, captured) -> None:
    """``InputError`` where an input forward writes in place overlaps another input in memory: eager's write
    through one changes the other, the program (which writes no input) cannot follow it."""
    names = _input_names(captured)
    flat = tree_flatten((args, kwargs))[0]
    written = {i for i, name in enumerate(names) if name in captured.input_writes} if len(names) == len(flat) else None
    written = written or set(range(len(flat)))  # not told which: any
    spans = [(i, _span(t)) for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.numel()]
    for i, (start, end) in spans:
        for j, (other_start, other_end) in spans:
            if i in written and j != i and start < other_end and other_start < end:
                raise InputError(f"pyrys: inputs {min(i, j)} and {max(i, j)} share memory, and forward writes "
                                 f"{', '.join(captured.input_writes)} in place, which eager would see through the "
                                 "other; pass separate tensors (a .clone())")


_INPUT_NAMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # captured graph -> its inputs' names


def _input_names(captured) -> list[str]:
    """The names of ``captured``'s user inputs, in order: found once per graph (a walk over its nodes)."""
    names = _INPUT_NAMES.get(captured.gm)
    if names is None:
        names = _INPUT_NAMES[captured.gm] = [node.name for node in user_inputs(captured.gm.graph)]
    return names


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes ``tensor`` may touch: from its first element's address to past its last one's."""
    start = tensor.data_ptr()
    last = sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
    return start, start + (last + 1) * tensor.element_size()


def _first_line(error: Exception) -> str:
    """An error's first line, without its ``pyrys:``: where a message quotes another's."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].removeprefix("pyrys: ")
