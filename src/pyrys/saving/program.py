"""``pyrys.save(opt, path)`` and ``pyrys.load(path)``: a compiled model kept without pickle.

What is saved, per input signature the module has compiled: the optimized graph (after every
pass, in the form the backend takes) with its constants, the input and output structure,
the backend, the layout and the kernels it chose (``attention_kernels.py``), the pass history
(graph text, rule counts, misses) and the notes.  Loading rebuilds the backend's program from that
graph and those decisions: no ``torch.export``, no pass, no measuring, so the outputs are the ones the saved module
gave (bitwise, on the same machine).  On a CPU with another instruction set the layout is
measured again (a note says so); where the saved backend does not load, the reference
backend runs the same graph (a note says so).  A module that had captured its model with symbolic
sizes (``dynamic=``) is saved with that graph too, so the loaded one specializes new shapes from it;
otherwise, and for a shape that graph does not hold for, another shape raises
:class:`pyrys.InputError` saying so.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch._prims_common import is_non_overlapping_and_dense_or_false

import pyrys
from pyrys.backends import get_backend, release_constants
from pyrys.backends.options import LAYOUTS, BackendOptions
from pyrys.capture.captured import Captured
from pyrys.calling_context import autocast_off
from pyrys.errors import LoadError, SaveError
from pyrys.saving.other_cpu import MISSING_KERNELS, missing_kernels_note, refreshed_notes, warn_of_missing_kernels
from pyrys.ir.generated_source import forgetting_dead_sources
from pyrys.ir.graph import tensor_bytes, user_inputs
from pyrys.ir.meta import refresh_meta
from pyrys.ir.output_aliases import output_roots, same_outputs
from pyrys.ir.output_views import OutputView
from pyrys.ir.printer import format_tensor_type
from pyrys.ir.quiet_fake import fake_tensor_errors_unlogged
from pyrys.ir.released import values_of
from pyrys.ir.symbolic import describe_dims
from pyrys.ir.written import written_tensors
from pyrys.machine import collect_freed_modules, cpu_info
from pyrys.capture.frontend import Frontend
from pyrys.compiled import COMPILING, Compiled
from pyrys.config import OptimizeConfig, check_threads, threads_problem
from pyrys.shape_cache import DEFAULT_MAX_SHAPES
from pyrys.optimized_module import OptimizedModule
from pyrys.passes.pipeline import PipelineRun, Step
from pyrys.passes.rewrite import Miss
from pyrys.quantization.calibration import CALIBRATED_SIZES_KEY
from pyrys.saving.directory import parse_files, read_directory, write_directory
from pyrys.saving.graph_json import _DTYPES, decode_arg, decode_graph, encode_arg, encode_graph
from pyrys.saving.symbolic import decode_symbolic, encode_symbolic
from pyrys.saving.tree_spec import decode_parameters, decode_spec, encode_parameters, encode_spec
from pyrys.signature import ExactBool, ExactFloat, Signature, TypedValue, is_tensor_leaf, leaf_value

SAVED_DEFAULT_DTYPES = ("float32", "float64", "bfloat16", "float16")  # what torch.set_default_dtype takes


def save(opt: OptimizedModule, path: str | os.PathLike) -> Path:
    """Write ``opt`` (every input signature it has compiled) to the directory ``path``; returns it.

    ``path`` is written whole or not at all; an existing pyrys save there is replaced, anything
    else is refused.  Raises :class:`pyrys.SaveError`."""
    if not isinstance(opt, OptimizedModule):
        kind = type(opt).__module__ + "." + type(opt).__qualname__
        compiled_by_dynamo = (" (torch.compile's: its programs are made per graph on first call; save "
                              "pyrys.optimize(model, example_inputs) instead)") if kind.startswith("torch._dynamo") else ""
        raise SaveError(f"pyrys.save takes the module pyrys.optimize returned, got {kind}{compiled_by_dynamo}")
    if not isinstance(path, (str, os.PathLike)) or isinstance(os.fspath(path), bytes):
        raise TypeError(f"pyrys.save writes to a directory named by a str or os.PathLike path, got "
                        f"{type(path).__name__} {path!r}")
    with COMPILING:  # the rebuild check of a symbolic graph uses torch's fake tensors, as another thread's capture does
        held = list(opt._programs.values())  # one read: a compile on another thread replaces the dict
        opt.complete_size_one()  # a loaded module cannot capture the size-1 shapes the graph for every shape excludes
        signatures = {c.signature for c in held}  # what those captures may have evicted from the cache is saved too
        compiled = held + [c for c in list(opt._programs.values()) if c.signature not in signatures]
        first = compiled.index(opt._first)
        tensors: dict[str, torch.Tensor] = {}
        signatures = [_encode_compiled(c, f"sig{i}", tensors) for i, c in enumerate(compiled)]
        generic, left_out = _encode_generic(opt._generic, tensors) if opt._generic is not None else (None, None)
        size_one = [record for i, template in enumerate(list(opt._other_templates)) if generic is not None
                    and (record := _encode_generic(template, tensors, f"size_one{i}")[0]) is not None]
        if left_out is not None:  # the loaded module's notes say so (those of its captures say otherwise)
            signatures[first]["notes"].append(f"saved without the graph for every shape ({left_out}): this module "
                                              "runs the shapes compiled before saving only")
        if opt._structures:
            signatures[first]["notes"].append(
                f"saved without the programs for inputs passed otherwise than the example's ({len(opt._structures)}: "
                "an optional input left out or added): the loaded module takes inputs passed as the example's")
        written = set().union(*(written_tensors(gm) for gm in _graphs(compiled, opt)))
    tensors, aliases = _without_repeats(tensors, written)
    program = {"frontend": opt._frontend.kind.removeprefix("saved "), "threads": opt._config.threads, "layout": opt._config.layout,
               "max_shapes": opt._config.max_shapes, "default_dtype": _dtype_name(opt._config.default_dtype),
               "training": opt.compiled_training, "parameters": encode_parameters(opt._frontend.parameters),
               "first": first, "signatures": signatures, "aliases": aliases, "generic": generic, "size_one": size_one,
               "tensors": {key: {"shape": list(t.shape), "stride": list(t.stride()), "dtype": _dtype_name(t.dtype)}
                           for key, t in tensors.items()}}
    cpu, isa = cpu_info()
    about = {"pyrys": pyrys.__version__, "torch": torch.__version__, "onednn": _onednn_version(), "cpu": cpu,
             "isa": isa}
    return write_directory(path, program, _storable(tensors), about)


@forgetting_dead_sources
@autocast_off
def load(path: str | os.PathLike | Mapping[str, bytes], *, threads: int | None = None) -> OptimizedModule:
    """The module :func:`save` wrote to ``path``, ready to call; ``threads`` as in :func:`pyrys.optimize`.
    ``path`` may also be the save's files in memory (``pyrys.saving.read_files(path)``: name -> bytes).

    Raises :class:`pyrys.LoadError` for a directory that is not a whole pyrys save of a format
    this pyrys reads, or whose tensors do not match its program."""
    check_threads(threads, "pyrys.load")
    if not isinstance(path, (str, os.PathLike, Mapping)) or isinstance(path, os.PathLike) and \
            isinstance(os.fspath(path), bytes):
        raise TypeError(f"pyrys.load reads a directory named by a str or os.PathLike path (or a save's files in "
                        f"memory, a mapping of names to bytes), got {type(path).__name__} {path!r}")
    if isinstance(path, Mapping):
        manifest, program, tensors = parse_files(dict(path), "the program's files in memory")
        path = "files in memory"
    else:
        manifest, program, tensors = read_directory(path)
    collect_freed_modules()
    with COMPILING:  # loading propagates meta and builds programs, as a compile does: they take turns
        with fake_tensor_errors_unlogged():  # a failure is the LoadError, without torch's traceback on stderr
            return _load(path, manifest, program, tensors, threads)


def _load(path: str | os.PathLike, manifest: dict, program: dict, tensors: dict,
          threads: int | None) -> OptimizedModule:
    """:func:`load` of the files read (``path`` names them in errors)."""
    try:
        tensors = _checked_tensors(program["tensors"], tensors)
        tensors.update({alias: tensors[key] for alias, key in program["aliases"].items()})
        manifest = _with_checked_isa(manifest, path)
        same_cpu = manifest["isa"] == cpu_info()[1]
        _check_options(program)
        config = OptimizeConfig(threads=threads if threads is not None else program["threads"],
                                layout=program["layout"], max_shapes=program.get("max_shapes", DEFAULT_MAX_SHAPES),
                                default_dtype=_DTYPES[program.get("default_dtype", "float32")])
        if torch.get_default_dtype() != config.default_dtype:  # its graphs' types are worked out again here
            raise LoadError(f"pyrys.load: torch's default dtype is {torch.get_default_dtype()}, and {path} was "
                            f"optimized under {config.default_dtype}; load it (and call it) with "
                            f"torch.set_default_dtype({config.default_dtype})")
        records = list(program["signatures"])
        first = _decode_compiled(records.pop(program["first"]), tensors, config, same_cpu, manifest)
        compiled = [_decode_compiled(record, tensors, config, same_cpu, manifest, like=first.program)
                    for record in records]
        config = dataclasses.replace(config, backend=first.backend)
        generic = _decode_generic(program["generic"], tensors, first) if program.get("generic") else None
        size_one = [_decode_generic(record, tensors, first) for record in program.get("size_one", [])] if generic else []
        graphs = [c.captured.gm for c in (first, *compiled, *([generic] if generic else []), *size_one)]
        tensors.clear()  # the graphs hold them now: released below, freed with nothing else holding them
        release_constants(first.program, graphs)  # every signature's packed copies are the first's
        frontend = Frontend(_no_capture, f"saved {program['frontend']}",
                            fixed_shapes=f"It was loaded from {path}: optimize the model for other inputs "
                                         "(and save it again after calls with them)",
                            parameters=decode_parameters(program.get("parameters")))
    except LoadError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, StopIteration, SyntaxError) as error:
        raise LoadError(f"pyrys.load: the program in {path} is malformed ({type(error).__name__}: "
                        f"{_first_line(error)})") from None
    except (RuntimeError, AssertionError, NotImplementedError, OverflowError) as error:  # torch's, while building
        raise LoadError(f"pyrys.load: the program in {path} cannot be built here ({type(error).__name__}: "
                        f"{_first_line(error)}): it was edited, or needs what this machine lacks (memory, "
                        "an op of another torch)") from None
    warn_of_missing_kernels(next((note for c in (first, *compiled) for note in c.notes
                                  if note.startswith(MISSING_KERNELS)), ""))
    loaded = OptimizedModule.from_compiled(frontend, config, [first, *compiled], generic, size_one)
    loaded.training = loaded.compiled_training = program.get("training") is True  # (saves before it: eval)
    return loaded


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _with_checked_isa(manifest: dict, path: Any) -> dict:
    """The manifest with its ``isa`` (the instruction sets of the CPU it was saved on: a list of names; none
    recorded is read as an unknown CPU's), else :class:`LoadError` naming that field."""
    isa = manifest.get("isa", [])
    if not isinstance(isa, list) or not all(isinstance(name, str) for name in isa):
        raise LoadError(f"pyrys.load: {path}: manifest.json's 'isa' must be a list of instruction set names (the "
                        f"CPU it was saved on), got {isa!r}")
    return {**manifest, "isa": isa}


def _check_options(program: dict) -> None:
    """The saved options are ones :func:`pyrys.optimize` takes (``LoadError`` for an edited program)."""
    threads, layout = program["threads"], program["layout"]
    if problem := threads_problem(threads):
        raise LoadError(f"pyrys.load: the saved program's {problem}")
    if layout not in LAYOUTS:
        raise LoadError(f"pyrys.load: the saved layout {layout!r} is not one of {LAYOUTS}")
    if program.get("training", False) not in (True, False):
        raise LoadError(f"pyrys.load: the saved program is malformed (training is {program['training']!r:.40}, "
                        "not true or false)")
    default_dtype = program.get("default_dtype", "float32")  # (saves before it: torch's default)
    if default_dtype not in SAVED_DEFAULT_DTYPES:
        raise LoadError(f"pyrys.load: the saved default_dtype {default_dtype!r:.40} is not one of {SAVED_DEFAULT_DTYPES}")
    max_shapes = program.get("max_shapes", DEFAULT_MAX_SHAPES)  # (saves before it: the default)
    if type(max_shapes) is not int or max_shapes < 1:
        raise LoadError(f"pyrys.load: the saved max_shapes {max_shapes!r:.40} is not a positive int")
    for record in program["signatures"]:
        if record.get("layout") not in (None, *LAYOUTS[1:]):
            raise LoadError(f"pyrys.load: a saved signature's layout {record.get('layout')!r} is not one of {LAYOUTS[1:]}")


def _encode_generic(template: Compiled, tensors: dict, prefix: str = "generic") -> tuple[dict | None, str | None]:
    """The graph new shapes are specialized from, with its symbolic sizes (``saving/symbolic.py``), and None;
    or None and why where they cannot be written (the module is saved without it: its shapes only)."""
    captured = template.generic
    try:
        symbolic = encode_symbolic(captured.gm)
        graph = encode_graph(captured.gm, prefix, tensors)
    except SaveError as error:
        warnings.warn(f"{error}; the graph for every shape is left out: the loaded module runs the shapes "
                      "compiled so far only", stacklevel=3)
        return None, str(error).removeprefix("pyrys.save: ")
    try:  # what load does: torch's fake tensors cannot rebuild some views over symbolic sizes (a negative
        with fake_tensor_errors_unlogged():  # padding's slices), which load would raise on
            decode_symbolic(decode_graph(graph, tensors), symbolic)
    except RuntimeError as error:
        why = str(error).splitlines()[0]
        warnings.warn(f"pyrys.save: the graph with symbolic sizes ({describe_dims(captured.gm)}) cannot be rebuilt "
                      f"from its saved form ({why}); it is left out: the loaded module runs the shapes compiled so "
                      "far and those the other graphs saved hold for", stacklevel=3)
        return None, f"it cannot be rebuilt from its saved form: {why}"
    calibrated = captured.gm.meta.get(CALIBRATED_SIZES_KEY) or {}
    record = {"graph": graph, "symbolic": symbolic, "in_spec": encode_spec(captured.in_spec),
              "out_spec": encode_spec(captured.out_spec), "class_name": captured.class_name,
              "output_copies": list(captured.output_copies),
              "same_outputs": [list(pair) for pair in captured.same_outputs],
              "output_views": _encode_output_views(captured, prefix, tensors),
              "calibrated_sizes": [[place[0], place[1], sorted(held)] for place, held in sorted(calibrated.items())]}
    return record, None


def _decode_generic(record: dict, tensors: dict, first: Compiled) -> Compiled:
    """A template for new shapes: the symbolic graph, with the first signature's history and notes."""
    made: list[str] = []
    gm = decode_graph(record["graph"], tensors)
    decode_symbolic(gm, record["symbolic"])
    if calibrated := _decode_calibrated_sizes(record):
        gm.meta[CALIBRATED_SIZES_KEY] = calibrated
    in_spec, out_spec = _decode_in_spec(record["in_spec"], made), decode_spec(record["out_spec"], made)
    _check_structures(gm, in_spec, out_spec, len(first.signature.leaves))
    copies = _decode_output_copies(record, gm)
    captured = Captured(gm, in_spec, out_spec, record["class_name"], [], output_copies=copies,
                        same_outputs=_decode_same_outputs(record, gm, copies),
                        output_views=_decode_output_views(record, gm, tensors))
    return Compiled(first.signature, captured, first.run, first.program, first.backend, first.notes, captured)


def _decode_calibrated_sizes(record: dict) -> dict[tuple[int, int], frozenset[int]]:
    """The saved sizes an int8 plan's samples had, ``[[flat input, dim, [sizes]], ...]`` (saves before them:
    none), each checked: what a new shape outside them is told of (``OptimizedModule._note_unmeasured_sizes``)."""
    saved = record.get("calibrated_sizes", [])
    if not isinstance(saved, list) or not all(
            isinstance(entry, list) and len(entry) == 3 and all(type(v) is int and v >= 0 for v in entry[:2])
            and isinstance(entry[2], list) and entry[2] and all(type(v) is int and v >= 0 for v in entry[2])
            for entry in saved):
        raise LoadError(f"pyrys.load: the saved program is malformed (calibrated_sizes {saved!r} are not "
                        "[input, dim, [sizes]] entries)")
    return {(entry[0], entry[1]): frozenset(entry[2]) for entry in saved}


def _decode_output_copies(record: dict, gm: fx.GraphModule) -> tuple[int, ...]:
    """The saved positions of outputs copied apart at each call (saves before them: none), each checked."""
    copies = record.get("output_copies", [])
    count = len(output_roots(gm, as_backends_run=True))
    if not isinstance(copies, list) or not all(type(c) is int and 0 <= c < count for c in copies):
        raise LoadError(f"pyrys.load: the saved program is malformed (output_copies {copies!r} are not positions "
                        f"among its {count} outputs)")
    return tuple(copies)


def _decode_same_outputs(record: dict, gm: fx.GraphModule, copies: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The saved ``(position, earlier)`` pairs of outputs that are one object (saves before them: those of the
    saved graph, but for the copies), each checked."""
    pairs = record.get("same_outputs")
    if pairs is None:
        return same_outputs(gm, copies)
    count = len(output_roots(gm, as_backends_run=True))
    if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p)
                                              and 0 <= p[1] < p[0] < count for p in pairs):
        raise LoadError(f"pyrys.load: the saved program is malformed (same_outputs {pairs!r} are not pairs of "
                        f"positions among its {count} outputs)")
    return tuple((later, earlier) for later, earlier in pairs)


def _encode_output_views(captured: Captured, prefix: str, tensors: dict) -> list[dict]:
    return [{"position": view.position, "of_output": view.of_output, "of_input": view.of_input,
             "graph": encode_graph(view.replay, f"{prefix}/view{i}", tensors)}
            for i, view in enumerate(captured.output_views)]


def _decode_output_views(record: dict, gm: fx.GraphModule, tensors: dict) -> tuple[OutputView, ...]:
    """The saved outputs made again at each call as views (saves before them: none), each checked: a position
    among the outputs, viewing an input or an earlier-placed output, by a graph of the inputs and that output."""
    views = record.get("output_views", [])
    count, inputs = len(output_roots(gm, as_backends_run=True)), len(user_inputs(gm.graph))
    decoded, placed = [], set()
    viewed = {view.get("position") for view in views if isinstance(view, dict)} if isinstance(views, list) else set()
    for view in views if isinstance(views, list) else [None]:
        position, of_output, of_input = (view.get("position"), view.get("of_output"), view.get("of_input")) \
            if isinstance(view, dict) else (None, None, None)
        if not (type(position) is int and 0 <= position < count and position not in placed
                and (of_output is None) != (of_input is None)
                and (of_input is None or type(of_input) is int and 0 <= of_input < inputs)
                and (of_output is None or type(of_output) is int and 0 <= of_output < count and of_output != position
                     and (of_output in placed or of_output not in viewed))):
            raise LoadError(f"pyrys.load: the saved program is malformed (output_views: {view!r:.200} is not a "
                            f"view of an input or of another of its {count} outputs)")
        replay = decode_graph(view.get("graph"), tensors)
        if len(user_inputs(replay.graph)) != inputs + 1:
            raise LoadError(f"pyrys.load: the saved program is malformed (output_views: the view at {position} "
                            f"reads {len(user_inputs(replay.graph)) - 1} inputs, the graph {inputs})")
        decoded.append(OutputView(position, of_output, of_input, replay))
        placed.add(position)
    return tuple(decoded)


def _no_capture(args: tuple, kwargs: dict, dynamic: bool) -> Captured:
    raise AssertionError("a loaded module never captures")  # fixed_shapes stops every new shape before this


def _onednn_version() -> str:
    try:
        from pyrys.backends.dnnl import binding

        return binding.version()
    except Exception:  # noqa: BLE001 -- no oneDNN here: the save records that
        return "not loaded"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _graphs(compiled: list[Compiled], opt: OptimizedModule) -> list[fx.GraphModule]:
    """Every graph a save holds: each signature's, and those for every shape."""
    templates = [opt._generic] if opt._generic is not None else []
    return [c.captured.gm for c in compiled] + [t.generic.gm for t in templates + list(opt._other_templates)]


def _without_repeats(tensors: dict[str, torch.Tensor],
                     written: set[int]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(stored, aliases)``: each distinct tensor once (the signatures of one model hold equal weights),
    with its values (restored, for a released constant), and every other key -> the stored key with
    the same shape, strides, dtype and bytes; a tensor a graph writes (``written``, by ``id``) is
    stored apart from the others of equal bytes (:mod:`pyrys.ir.written`)."""
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_content: dict[tuple, str] = {}
    by_object: dict[int, str] = {}
    for key, tensor in tensors.items():
        if id(tensor) in by_object:  # the same tensor in another graph: no need to read it again
            aliases[key] = by_object[id(tensor)]
            continue
        values = values_of(tensor)  # a released constant's values, read back from the backend's copy
        content = (tuple(values.shape), tuple(values.stride()), values.dtype, _digest(values))
        if id(tensor) in written:
            content = (*content, id(tensor))
        if content in by_content:
            aliases[key] = by_content[content]
        else:
            by_content[content], stored[key] = key, values
        by_object[id(tensor)] = aliases.get(key, key)
    return stored, aliases


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor_bytes(tensor)).hexdigest()


def _storable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor dense, contiguous and owning its bytes (safetensors refuses tensors that share memory);
    the program records the strides, and :func:`load` restores them."""
    seen: set[int] = set()
    result = {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.layout != torch.strided or tensor.is_sparse:
            raise SaveError(f"pyrys.save: {key} is a {tensor.layout} tensor; a saved program holds dense ones")
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in seen or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        seen.add(tensor.untyped_storage().data_ptr())
        result[key] = tensor
    return result


def _encode_leaf(leaf: Any) -> Any:
    if isinstance(leaf, tuple) and len(leaf) == 2 and isinstance(leaf[1], torch.dtype):
        return {"tensor": [list(leaf[0]), _dtype_name(leaf[1])]}
    if type(leaf) is TypedValue:  # its type by name: load imports nothing
        return {"typed": [leaf.type_name, encode_arg(leaf.plain, f"an input of type {leaf.type_name}")]}
    return {"value": encode_arg(leaf, "an input")}


def _decode_leaf(record: dict) -> Any:
    if "tensor" in record:
        shape, dtype = record["tensor"]
        return tuple(shape), _DTYPES[dtype]
    if "typed" in record:
        typed = record["typed"]
        if not (isinstance(typed, list) and len(typed) == 2 and isinstance(typed[0], str)):
            raise LoadError(f"pyrys.load: the saved program is malformed (an input's typed value {typed!r:.120} is "
                            "not [type name, value])")
        return TypedValue(typed[0], decode_arg(typed[1], {}))
    value = decode_arg(record["value"], {})  # as a call's signature holds it (a NaN finds it, a bool not an int)
    return ExactFloat(value) if type(value) is float else ExactBool(value) if type(value) is bool else value


def _encode_compiled(compiled: Compiled, prefix: str, tensors: dict) -> dict:
    captured, program = compiled.captured, compiled.program
    return {
        "in_spec": encode_spec(compiled.signature.in_spec),
        "leaves": [_encode_leaf(leaf) for leaf in compiled.signature.leaves],
        "out_spec": encode_spec(captured.out_spec),
        "class_name": captured.class_name,
        "capture_notes": captured.notes,
        "input_writes": list(captured.input_writes),
        "state_writes": list(captured.state_writes),
        "output_copies": list(captured.output_copies),
        "same_outputs": [list(pair) for pair in captured.same_outputs],
        "output_views": _encode_output_views(captured, prefix, tensors),
        "graph": encode_graph(captured.gm, prefix, tensors),
        "backend": compiled.backend,
        "layout": getattr(program, "layout", None),
        "policy": getattr(program, "policy", None),
        "kernel_choices": getattr(program, "kernel_choices", {}),
        "notes": compiled.notes[len(captured.notes):],
        "history": [{"name": s.name, "graph": s.graph, "fired": dict(s.fired), "seconds": s.seconds,
                     "misses": [[m.rule, m.node, m.reason] for m in s.misses], "error": s.error}
                    for s in compiled.run.history],
    }


def _decode_in_spec(record: Any, made: list[str]):
    """A saved structure of a call's inputs: ``((positional...), {name: keyword...})``, else ``LoadError``."""
    spec = decode_spec(record, made)
    if not (spec.type is tuple and spec.num_children == 2 and spec.child(0).type is tuple
            and spec.child(1).type is dict and all(isinstance(key, str) for key in spec.child(1).context)):
        raise LoadError("pyrys.load: the saved program is malformed (its inputs are not (positional inputs, "
                        f"{{name: keyword input}}): {record!r:.200})")
    return spec


def _decode_compiled(record: dict, tensors: dict, config: OptimizeConfig, same_cpu: bool, manifest: dict,
                     like: Any = None) -> Compiled:
    """One saved signature, its program built (``like``: the first signature's, whose engine, layout and
    packed weights it shares)."""
    made: list[str] = []
    in_spec = _decode_in_spec(record["in_spec"], made)
    signature = Signature(in_spec, tuple(_decode_leaf(leaf) for leaf in record["leaves"]))
    gm = decode_graph(record["graph"], tensors)
    refresh_meta(gm)
    _check_inputs(gm, signature)
    out_spec = decode_spec(record["out_spec"], made)
    _check_structures(gm, in_spec, out_spec, len(signature.leaves))
    copies = _decode_output_copies(record, gm)
    captured = Captured(gm, in_spec, out_spec, record["class_name"],
                        _texts(record["capture_notes"], "capture_notes"),
                        tuple(record.get("input_writes", ())), tuple(record.get("state_writes", ())), copies,
                        _decode_same_outputs(record, gm, copies), _decode_output_views(record, gm, tensors))
    history = [Step(s["name"], s["graph"], dict(s["fired"]), [Miss(*m) for m in s["misses"]], s["seconds"],
                    s.get("error")) for s in record["history"]]
    compile_program, backend, notice = get_backend("auto" if record["backend"] == "dnnl" else record["backend"])
    notes = _texts(record["notes"], "notes")
    notes += [f"the class {name} is not imported here: it comes back as a namedtuple of that name and fields "
              "made at load (a namedtuple), or as a dict of its keys (a pytree class such as a ModelOutput or a dataclass; "
              "a tuple where its keys are not known)"
              for name in dict.fromkeys(made)]
    if backend != record["backend"]:
        notes.append(f"saved for the {record['backend']} backend, running on {backend}: {notice}")
    layout = config.layout
    if backend == "dnnl" and record["layout"]:
        if same_cpu:
            layout = record["layout"]
        else:
            notes.append(f"saved on a CPU with {'/'.join(manifest['isa']) or 'other instructions'}; "
                         f"the layout was chosen again here ({config.layout})")
    building, saved_choices = contextlib.nullcontext(), None
    if backend == "dnnl" and same_cpu:
        from pyrys.backends.dnnl import measured
        saved_choices = measured.SavedChoices.of(record.get("kernel_choices", {}))
        building = measured.saved(saved_choices)  # the kernels it was saved with, nothing measured
    # on another CPU the program gets other kernels, whose faults the compile's check never saw: checked here too,
    # on seeded random inputs (zeros would hide a wrong convolution behind its bias)
    options = BackendOptions(config.threads, layout, check=not same_cpu)
    with building:
        program = compile_program(gm, _example_inputs(signature, random=not same_cpu), options, like=like)
    if saved_choices is not None and hasattr(program, "saved_choices"):
        program.saved_choices = saved_choices  # its programs for other thread counts, built at a call
    if backend == "dnnl" and same_cpu and record["policy"]:
        program = _with_policy(program, record["policy"])
    if not same_cpu:  # checked again here: the save's check notes are the other CPU's
        from pyrys.backends.dnnl.self_check import TRUSTED
        notes = [note for note in notes if TRUSTED not in note] + \
            [note for note in [getattr(program, "check_note", None)] if note]
    fault = getattr(program, "fault", None)
    if fault is not None:
        notes.append(fault)
        backend = "reference"
    if not same_cpu:
        saved_on = "/".join(manifest["isa"]) or "other instructions"
        notes = refreshed_notes(notes, missing_kernels_note(program.describe(), saved_on))
    return Compiled(signature, captured, PipelineRun(history), program, backend, captured.notes + notes)


def _check_inputs(gm: fx.GraphModule, signature: Signature) -> None:
    """:class:`LoadError` unless each of the graph's inputs has its signature's shape and dtype (a program whose
    ``val`` was edited, its digest made to match, returned one row of three, silently)."""
    inputs = user_inputs(gm.graph)
    if len(inputs) != len(signature.leaves):  # (an entry added to the signature: every call was refused, asking for it)
        raise LoadError(f"pyrys.load: the saved program is malformed (its graph takes {len(inputs)} inputs where "
                        f"its signature lists {len(signature.leaves)}: {signature.describe()})")
    for node, leaf in zip(inputs, signature.leaves):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and (not is_tensor_leaf(leaf) or (tuple(val.shape), val.dtype) != leaf):
            raise LoadError(f"pyrys.load: the saved program's input {node.name} is "
                            f"{format_tensor_type(val.shape, val.dtype)} where its signature says "
                            f"{signature.describe()}")


def _check_structures(gm: fx.GraphModule, in_spec, out_spec, inputs: int) -> None:
    """:class:`LoadError` unless the saved structure of the inputs holds the signature's ``inputs`` values and
    that of the outputs as many as the graph returns (an edit of either, its digest made to match, loaded and
    then failed every call in torch's pytree: a helper's find)."""
    if in_spec.num_leaves != inputs:
        raise LoadError(f"pyrys.load: the saved program is malformed (its inputs' structure holds "
                        f"{in_spec.num_leaves} values where its signature lists {inputs})")
    returned = gm.graph.output_node().args[0]
    count = len(returned) if isinstance(returned, (tuple, list)) else 1
    if out_spec.num_leaves != count:
        raise LoadError(f"pyrys.load: the saved program is malformed (its outputs' structure holds "
                        f"{out_spec.num_leaves} values where its graph returns {count})")


def _with_policy(program: Any, policy: str) -> Any:
    """The saved program text names the layout as it was chosen (with the timings measured then)."""
    for built in program.programs.values():
        built.policy = policy
    return program


def _texts(values: Any, name: str) -> list[str]:
    """A saved list of texts (notes), as a list; ``TypeError`` (a malformed program) for anything else."""
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        raise TypeError(f"{name} must be a list of texts, got {values!r:.80}")
    return list(values)


def _example_inputs(signature: Signature, random: bool = False) -> list:
    """Inputs of the signature's shapes and dtypes for the backend's compile: zeros, or with ``random`` seeded
    uniform [0, 1) floating-point ones (integer and boolean inputs stay zeros: valid ids and masks)."""
    generator = torch.Generator().manual_seed(0)

    def made(shape, dtype):
        if random and dtype.is_floating_point:
            return torch.rand(shape, generator=generator).to(dtype)
        return torch.zeros(shape, dtype=dtype)

    return [made(*leaf) if isinstance(leaf, tuple) and len(leaf) == 2 and isinstance(leaf[1], torch.dtype)
            else leaf_value(leaf) for leaf in signature.leaves]


def _checked_tensors(recorded: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every tensor the program records, with its shape, dtype and strides; :class:`LoadError` if one is
    missing or different, or if there is another."""
    missing = sorted(set(recorded) - set(tensors))
    extra = sorted(set(tensors) - set(recorded))
    if missing or extra:
        raise LoadError(f"pyrys.load: the saved tensors do not match the program: missing {missing[:5]}, "
                        f"unexpected {extra[:5]}")
    for key, meta in recorded.items():
        tensor = tensors[key]
        if list(tensor.shape) != meta["shape"] or _dtype_name(tensor.dtype) != meta["dtype"]:
            raise LoadError(f"pyrys.load: the saved tensor {key} is {_dtype_name(tensor.dtype)}{list(tensor.shape)}, "
                            f"the program expects {meta['dtype']}{meta['shape']}")
        if list(tensor.stride()) != meta["stride"]:
            _check_dense(key, tensor.shape, meta["stride"])
            tensors[key] = torch.empty_strided(tensor.shape, meta["stride"], dtype=tensor.dtype).copy_(tensor)
    return tensors



def _check_dense(key: str, shape: torch.Size, stride: Any) -> None:
    """:class:`LoadError` unless ``stride`` lays out ``shape`` densely, each element once (what a saved tensor's
    strides are: a program edited to other ones would allocate far more, or alias its elements)."""
    if not (isinstance(stride, list) and len(stride) == len(shape) and all(type(s) is int and s >= 0 for s in stride)
            and is_non_overlapping_and_dense_or_false(torch.empty_strided(shape, stride, device="meta"))):
        raise LoadError(f"pyrys.load: the saved tensor {key}'s strides {stride!r} do not lay out its shape "
                        f"{list(shape)} densely")
