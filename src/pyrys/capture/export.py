"""Capture an ``nn.Module`` with ``torch.export`` into pyrys's IR.

The exported program is functional: its training IR where that is what pyrys reads, in-place
ops made functional (``training_ir.py``, no second trace), else ``run_decompositions({})``
(a second trace of the model). Then it is normalized:

* parameters and buffers become state reads (``prim::GetAttr``) until ``freeze_params``;
* ``_native_batch_norm_legit_*`` + ``getitem 0`` is raised back to ``aten::batch_norm`` (the
  training IR's ``batch_norm`` is that already), whose ``training`` argument is a read of the owning module's ``training`` flag,
  so ``freeze_flags`` has a flag to freeze and BN folding can tell why it may not fold;
* outputs that only update buffers (BN running statistics in train mode) are dropped:
  the optimized module never modifies state.

A ``forward`` that needs tensor data in Python (``if x.sum() > 0:``) cannot be exported:
that is a :class:`pyrys.CaptureError` naming the line and ``torch.compile`` as the way.
Submodule names torch.export cannot follow (``class``, ``a.b``) are renamed in pyrys's
private copy first (:func:`rename_for_export`).
"""
from __future__ import annotations

import contextlib
import keyword
import linecache
import operator
import re
import sys
import warnings

import torch
import torch.fx as fx
from torch._dynamo import convert_frame
from torch._dynamo.exc import UserError, UserErrorType
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.export import ExportedProgram
from torch.nn.utils import parametrize
from torch.export.graph_signature import CustomObjArgument, InputKind, OutputKind, TensorArgument
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode, free_unbacked_symbols
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from pyrys.capture.captured import Captured, input_writes_note
from pyrys.capture.dynamic_shapes import (SIZE_ONE_FIXED, VaryingDims, keeps_size_one_fixed, symbolic_dims,
                                         symbolic_example)
from pyrys.capture.training_ir import as_inference_graph
from pyrys.errors import CaptureError, DataDependentError
from pyrys.ir.graph import STATE_KEY, StateRef, add_constant, add_placeholder, copy_graph, identifier, insert_call
from pyrys.ir.quiet_fake import export_diagnostics_unlogged
from pyrys.ir.symbolic import input_dims, set_fake_mode, set_ranges, sizes_kept_symbolic

aten = torch.ops.aten
_BN_VARIANTS = {
    aten._native_batch_norm_legit_no_training.default: (5, 6),  # (momentum, eps) positions
    aten._native_batch_norm_legit_functional.default: (6, 7),
}
_STATE_KINDS = {InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer"}
# the user's line in torch.export's message:
#     The following call raised this error:
#       File "model.py", line 7, in forward
#         if y.sum() > 0:
_USER_LINE = re.compile(r'raised this error:\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in \w+\n(?P<code>[^\n]+)')
# torch's other form: the frame that guarded, its path cut at the front ("mp/me/model.py" for /tmp/me/model.py)
_CAUSED_BY = re.compile(r"Caused by: \((?P<file>[^()\n]+?):(?P<line>\d+) in (?P<function>[\w<>]+)\)")


def rename_for_export(model: torch.nn.Module) -> list[str]:
    """Rename, in place, the submodules whose names torch.export cannot follow; a note per rename.

    torch.export names state by its path, and FX writes ``self.<path>``: a submodule called
    ``class`` (a Python keyword) makes that a syntax error, one called ``a.b`` (set with
    ``setattr``; ``add_module`` refuses it) reads as two levels.  Such a submodule is renamed
    (``class_``, ``a_b``) and stays reachable under its old name, so ``forward`` runs unchanged.
    Only for pyrys's private copy of a model.
    """
    notes = []
    for owner in list(model.modules()):
        if not all(_exportable(name) for name in owner._modules):
            notes += _rename_children(owner)
    return notes


def _rename_children(owner: torch.nn.Module) -> list[str]:
    """Rebuild ``owner._modules`` in its order, each name torch.export cannot follow made an identifier."""
    children, taken = list(owner._modules.items()), set(dir(owner))
    owner._modules.clear()
    notes = []
    for name, child in children:
        if not _exportable(name):
            object.__setattr__(owner, name, child)  # forward's getattr(self, name) still finds it
            new = identifier(name, taken)
            taken.add(new)
            notes.append(f"submodule {name!r} of {type(owner).__name__} is called {new!r} in the graph "
                         "(torch.export cannot name it)")
            name = new
        owner._modules[name] = child
    return notes


def _exportable(name: str) -> bool:
    return "." not in name and not keyword.iskeyword(name)


def tracing() -> contextlib.AbstractContextManager:
    """Take turns with dynamo's compiles (``torch._dynamo.convert_frame.compile_lock``): torch.export traces
    with the machinery a ``torch.compile`` in another thread uses at the same time (its proxy and fake modes),
    and the two interleaved fail (``ProxyTorchDispatchMode slot already occupied``, "Trying to pop empty mode
    stack").  Dynamo holds it while it compiles a frame, and a dynamo backend (``compile_backend.py``) builds
    nothing then, so a capture under ``pyrys.optimize``'s own lock waits on it without a cycle."""
    return convert_frame.compile_lock


@contextlib.contextmanager
def parametrizations_unspoiled():
    """``torch.nn.utils.parametrize``'s cache as the trace found it: inside the user's ``parametrize.cached()``
    the trace's fake weights were cached under the user's module (a copy's parametrization keys its cache by the
    module it was registered on), which the user's model then returned for the rest of the block (a helper's
    find; torch.export alone does the same).  What the trace put there that is not a plain tensor is taken out
    (a value it replaced put back); the cache's process-wide counter is left alone, which other threads' blocks
    count on (turning it off for the trace broke theirs: a review's find).  A call of the model on another
    thread inside such a block during the trace may still read a fake weight: torch's cache is process-wide."""
    before = dict(parametrize._cache)
    try:
        yield
    finally:
        cache = parametrize._cache  # (a new dict where every block was left meanwhile)
        for key, value in list(cache.items()):
            if before.get(key) is not value and type(value) not in (torch.Tensor, torch.nn.Parameter):
                if key in before:
                    cache[key] = before[key]
                else:
                    cache.pop(key, None)


def export_module(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                  dynamic: bool | str = False) -> ExportedProgram:
    """``torch.export`` at ATen level, functional; the model itself is not modified.

    ``dynamic``: batch and sequence dims ``Dim.AUTO`` (``dynamic_shapes.py``; ``SIZE_ONE_FIXED``: those of
    size 1 kept), for a graph that holds for every size torch.export could keep symbolic."""
    args, kwargs = _unaliased(*_own_tensor_objects(args, kwargs or {}))
    with tracing(), torch.no_grad(), sizes_kept_symbolic() if dynamic else contextlib.nullcontext(), \
            export_diagnostics_unlogged(), parametrizations_unspoiled():
        try:
            varying = dynamic if isinstance(dynamic, VaryingDims) else frozenset()
            shapes = symbolic_dims(model, args, kwargs, keeps_size_one_fixed(dynamic), varying) if dynamic else None
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=shapes)
        except (UserError, GuardOnDataDependentSymNode, DataDependentOutputException) as error:
            if isinstance(error, UserError) and error.error_type != UserErrorType.DYNAMIC_CONTROL_FLOW:
                raise
            raise DataDependentError(_data_dependent_message(model, error)) from error
        except (RuntimeError, ValueError) as error:
            unknown = _UNKNOWN_TYPE.search(str(error))
            if unknown is None:
                raise
            raise CaptureError(_unknown_type_message(model, unknown["type"] or unknown["type2"],
                                                     unknown["where"] or unknown["where2"])) from error
        if _reads_as_inference(exported):
            return exported
        return exported.run_decompositions({})


def _reads_as_inference(ep: ExportedProgram) -> bool:
    """Whether ``ep``'s training IR, its in-place ops made functional, is the graph pyrys reads
    (``training_ir.py``); it writes no state or input either way."""
    if any(spec.kind != OutputKind.USER_OUTPUT for spec in ep.graph_signature.output_specs):
        return False
    if not as_inference_graph(ep.graph_module):
        return False
    ep.graph_module.recompile()  # the program stays runnable, its outputs named as they are now
    output = next(n for n in ep.graph_module.graph.nodes if n.op == "output")
    for spec, value in zip(ep.graph_signature.output_specs, output.args[0]):
        if isinstance(value, fx.Node) and isinstance(spec.arg, TensorArgument):
            spec.arg.name = value.name
    return True


def _own_tensor_objects(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The inputs with each tensor a new object over the same memory (``detach``): torch.export with
    ``Dim.AUTO`` marks the tensors it is given as dynamic (``_dynamo_weak_dynamic_indices``) and leaves the
    marks, so the caller's tensors would carry them into their own ``torch.compile``, and a capture with
    fixed sizes after a failed symbolic one would trace those dims symbolically again and fail the same way."""
    own = lambda value: value.detach() if isinstance(value, torch.Tensor) else value  # noqa: E731
    return tree_map(own, args), tree_map(own, kwargs)


def _unaliased(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The example inputs with each tensor that shares memory with an earlier one replaced by a copy.

    ``torch.export(model, (x, x))`` gives one graph input for both (the other is left unread), so a
    later call with two different tensors would read one of them twice."""
    leaves, spec = tree_flatten((args, kwargs))
    seen: set[int] = set()
    changed = False
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor) or leaf.numel() == 0:
            continue
        try:
            memory = leaf.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # a tensor without storage of its own
            continue
        if memory in seen:
            leaves[i], changed = leaf.detach().clone(), True
        seen.add(memory)
    return tree_unflatten(leaves, spec) if changed else (args, kwargs)


_UNKNOWN_TYPE = re.compile(r"Found <class '(?P<type>[^']+)'> in (?P<where>output|input), which is not a known type"
                           r"|Unsupported (?P<where2>input) type <class '(?P<type2>[^']+)'>")


def _unknown_type_message(model: torch.nn.Module, type_name: str, where: str) -> str:
    """What torch.export's "not a known type" (a class it cannot take apart, say a HuggingFace cache) means."""
    cache = "Cache" in type_name.rsplit(".", 1)[-1]
    advice = ""
    if type_name.startswith("numpy.") and where != "output":  # np.bool_ (other NumPy numbers are made Python's)
        return (f"pyrys: {type(model).__name__}.forward takes a {type_name}, which torch.export cannot take: pass a "
                "Python number (bool(value), int(value), float(value)) or a tensor (torch.from_numpy)")
    if cache and where == "output":
        advice = "pass use_cache=False among the inputs (the cache is what the model returns beside its outputs), or "
    elif cache:
        advice = ("run decoder steps with a cache through torch.compile(model, backend=\"pyrys\") (dynamo takes the "
                  "cache apart), or ")
    return (f"pyrys: {type(model).__name__}.forward {'returns' if where == 'output' else 'takes'} a {type_name}, "
            "which torch.export cannot take apart into tensors (pyrys captures tensors and numbers in tuples, "
            f"lists, dicts, namedtuples and registered classes); {advice}wrap the model so that forward "
            f"{'returns' if where == 'output' else 'takes'} its tensors, or register the class: "
            "torch.export.register_dataclass for a dataclass, else torch.utils._pytree.register_pytree_node")


def _data_read_at(error: str) -> tuple[str, int, str] | None:
    """The file, line and code where torch's data-dependent ``error`` says the data was read: its traceback of the
    user's frame, else its ``Caused by: (path:line in function)`` (the path's head cut: found again where one
    module's file alone ends so, else as torch gave it; none for torch.nn's own ``Module`` call machinery)."""
    place = _USER_LINE.search(error)
    if place:
        return place["file"], int(place["line"]), place["code"].strip()
    caused = _CAUSED_BY.search(error)
    if caused is None or caused["function"] in ("_call_impl", "_wrapped_call_impl"):
        return None
    tail, line = caused["file"], int(caused["line"])
    files = {getattr(module, "__file__", None) for module in list(sys.modules.values())}
    found = sorted(f for f in files if isinstance(f, str) and f.endswith(tail))
    if len(found) != 1:  # none, or several (a cut as short as "model.py" matches "xmodel.py" too): as torch gave it
        return tail, line, ""
    return found[0], line, linecache.getline(found[0], line).strip()


def _data_dependent_message(model: torch.nn.Module, error: Exception) -> str:
    """What torch.export's data-dependent errors mean for the user, with the line that needs the data."""
    place = _data_read_at(str(error))
    where = f" at {place[0]}:{place[1]}" + (f" (`{place[2]}`)" if place[2] else "") if place else ""
    return (f"pyrys: {type(model).__name__}.forward branches on tensor data{where}: Python needs a tensor's "
            "values (an `if x.sum() > 0:`, a loop count or a size computed from data), and a captured graph holds "
            "one path through forward, so torch.export cannot capture it. Use "
            "torch.compile(model, backend=\"pyrys\") instead: dynamo breaks the graph where Python needs the data "
            "and pyrys compiles each piece")


def capture_module(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                   dynamic: bool | str = False) -> Captured:
    """``model`` in pyrys IR; ``dynamic``: for every shape (``SIZE_ONE_FIXED``: every shape with these inputs'
    dims of size 1), falling back to these inputs' shapes (with a note saying why) when torch.export cannot
    trace it with symbolic sizes."""
    _warn_of_global_hooks()
    if not dynamic:
        return from_exported(_exported_for_these_shapes(model, args, kwargs), model)
    try:
        if keeps_size_one_fixed(dynamic):
            exported = export_module(model, args, kwargs, dynamic=dynamic)
        else:
            exported = _export_symbolic(model, args, kwargs or {}, dynamic)
    except CaptureError:
        raise
    except Exception as error:  # noqa: BLE001 -- whatever fails with symbolic sizes is tried again with fixed ones
        captured = None
        if any(1 in t.shape for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor)):
            ones_fixed = (VaryingDims(dynamic, size_one_fixed=True) if isinstance(dynamic, VaryingDims)
                          else SIZE_ONE_FIXED)
            try:  # first with the dims of size 1 fixed: a mask's (batch, 1, length) broadcast is no symbol
                captured = from_exported(export_module(model, args, kwargs, dynamic=ones_fixed), model)
            except CaptureError:
                raise
            except Exception:  # noqa: BLE001 -- then with every dim fixed, below
                pass
            if captured is not None and input_dims(captured.gm):
                return captured
        captured = captured or from_exported(_exported_for_these_shapes(model, args, kwargs), model)
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        captured.notes.append(f"captured for these input shapes only: torch.export fails with symbolic sizes "
                              f"({type(error).__name__}: {first_line[:300]}); a new shape is captured again")
        return captured
    return from_exported(exported, model)


def _exported_for_these_shapes(model: torch.nn.Module, args: tuple, kwargs: dict | None) -> ExportedProgram:
    """:func:`export_module` with the inputs' own shapes; torch's failure there (forward itself failing on
    these inputs under torch.export's tracing: a batch of 0 through a reshape to -1) a ``CaptureError`` naming
    the model and the shapes, torch's error chained."""
    try:
        return export_module(model, args, kwargs)
    except CaptureError:
        raise
    except Exception as error:  # noqa: BLE001 -- every torch failure gets the pyrys message, its cause chained
        shapes = ", ".join(str(tuple(t.shape)) for t in tree_flatten((args, kwargs or {}))[0] if isinstance(t, torch.Tensor))
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        if "__obj_flatten__" in str(error):  # a TorchScript class torch.export cannot take apart
            raise CaptureError(f"pyrys: {type(model).__name__} holds a TorchScript class object torch.export cannot "
                               f"trace (torch.ao's quantized packed parameters: a model quantized already): "
                               f"{first_line}. {SCRIPT_OBJECTS_ADVICE.capitalize()}, or give "
                               "pyrys the float model (precision=\"int8\" quantizes it)") from error
        if _SIZE_FROM_TENSOR.search(str(error)):  # a size argument given a tensor: sizes made from its values
            raise DataDependentError(
                f"pyrys: {type(model).__name__}'s forward makes a size from a tensor's values (here a size argument "
                f"was given a tensor: {first_line}), as pack_padded_sequence does from its lengths: torch.export "
                "traces without values. Use torch.compile(model, backend=\"pyrys\"), which runs that part in "
                "torch") from error
        raise CaptureError(f"pyrys: torch.export cannot capture {type(model).__name__} on inputs of shapes ({shapes}): "
                           f"{type(error).__name__}: {first_line}. " + _export_advice(model)) from error


# torch's refusal of a fake tensor where it wants ints (a size): ``zeros(): argument 'size' failed to unpack the
# object at pos 2 with error "type must be tuple of ints,but got FakeTensor"`` (a helper's find: the message
# asked whether eager runs with gradients on)
_SIZE_FROM_TENSOR = re.compile(r"(tuple of ints|of SymInts|an int), ?but got FakeTensor")


EXPORT_ADVICE_END = " Otherwise use torch.compile(model, backend=\"pyrys\"), or report it"


def _export_advice(model: torch.nn.Module) -> str:
    """What to check where torch.export failed on a model, and what to use instead (a torch.compile graph's
    failure says otherwise: ``compile_backend.py``)."""
    return ("Does eager forward run on these inputs with gradients on (torch.export traces that path)?" +
            _hooks_hint(model) + EXPORT_ADVICE_END)


def _warn_of_global_hooks() -> None:
    """Process-wide module hooks run in torch.export's capture, where they may run once more than in eager
    (a pre-hook adding 1 to every module's input: twice in eager ``nn.Sequential(nn.Linear)``, three times
    in its export), and on each call of the optimized module, an ``nn.Module`` itself (a helper's find:
    outputs doubled once more than eager's): say so, since a hook that changes tensors changes the outputs."""
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        warnings.warn("pyrys.optimize: process-wide module hooks are registered (register_module_forward_hook "
                      "or register_module_forward_pre_hook); torch.export runs them in the capture (where it may "
                      "run them once more than eager does) and torch runs them on each call of the optimized module "
                      "too: one that changes tensors gives other outputs than eager's. Remove them before "
                      "optimizing (a hook that only reads, returning None, changes nothing)", stacklevel=2)


def _hooks_hint(model: torch.nn.Module) -> str:
    """Where modules of ``model`` (or every module) have forward hooks or pre-hooks, that torch.export runs
    them too, on fake tensors: one reading values (``.numpy()``) fails the capture, one recording ``.item()``
    records a symbolic number (a helper's find: the message named forward alone)."""
    hooked = [repr(name) if name else type(model).__name__ for name, module in model.named_modules()
              if module._forward_hooks or module._forward_pre_hooks]
    hooked += ["every module (register_module_forward_hook)"] * bool(
        torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)
    if not hooked:
        return ""
    return (f" The forward hooks of {', '.join(hooked[:3])}{' ...' * (len(hooked) > 3)} run in the capture too, "
            "on tensors without values: a hook that reads them (.numpy()) fails it; remove it before optimizing.")


def _export_symbolic(model: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool | VaryingDims = True) -> ExportedProgram:
    """``export_module(dynamic=...)`` from :func:`symbolic_example` (a batch of 1 made 2), or, where the
    model refuses that example, from the inputs as given."""
    wide_args, wide_kwargs = symbolic_example(args, kwargs)
    if wide_args is args and wide_kwargs is kwargs:
        return export_module(model, args, kwargs, dynamic=dynamic)
    try:
        return export_module(model, wide_args, wide_kwargs, dynamic=dynamic)
    except Exception:  # noqa: BLE001 -- a model that takes a batch of 1 only: its own example
        return export_module(model, args, kwargs, dynamic=dynamic)


def from_exported(ep: ExportedProgram, model: torch.nn.Module | None = None) -> Captured:
    """Turn an ``ExportedProgram`` into pyrys IR (``model`` supplies module flags such as ``training``)."""
    owner = type(model).__name__ if model is not None else "ExportedProgram"
    _refuse_script_objects(ep, owner)
    _refuse_data_dependent_shapes(ep.graph_module, owner)
    _refuse_control_flow_ops(ep.graph_module, owner)
    gm = fx.GraphModule(torch.nn.Module(), copy_graph(ep.graph_module.graph))
    _keep_symbolic_shapes(gm, ep)
    _bind_inputs(gm, ep)
    notes, input_writes, state_writes = _drop_state_updates(gm, ep)
    _raise_batch_norms(gm, model)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    signature = ep.module_call_graph[0].signature
    class_name = type(model).__name__ if model is not None else "ExportedProgram"
    return Captured(gm, signature.in_spec, signature.out_spec, class_name, notes, input_writes, state_writes)


def _keep_symbolic_shapes(gm: fx.GraphModule, ep: ExportedProgram) -> None:
    """A graph whose inputs have symbolic dims keeps the fake mode they belong to (``ir/symbolic.py``), and
    the program's ranges: ``Dim("B", min=1)`` gives ``[1, 64]`` there, where its shape env says ``[2, 64]``."""
    mode = detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"])
    if mode is not None and mode.shape_env is not None and input_dims(gm):
        set_fake_mode(gm, mode)
        set_ranges(gm, {symbol: (bounds.lower, bounds.upper) for symbol, bounds in ep.range_constraints.items()})


SCRIPT_OBJECTS_ADVICE = ("use torch.compile(model, backend=\"pyrys\"): dynamo runs what it cannot give pyrys in "
                         "torch and pyrys compiles the rest")


def _refuse_script_objects(ep: ExportedProgram, owner: str) -> None:
    """A graph that passes a script object (a ``torch.Generator``, torch.ao's packed parameters) between its
    ops: pyrys's programs hold tensors and numbers only."""
    objects = [spec for spec in ep.graph_signature.input_specs if spec.kind in (InputKind.CUSTOM_OBJ, InputKind.TOKEN)]
    inputs = [spec for spec in ep.graph_signature.input_specs
              if spec.kind is InputKind.USER_INPUT and isinstance(spec.arg, CustomObjArgument)]
    members = [spec for spec in inputs if (getattr(spec.arg, "class_fqn", None) or "").startswith("enum.")]
    if members:  # an Enum member passed to forward (an IntEnum's too): torch.export holds it as an object
        raise CaptureError(f"pyrys: {owner}.forward is passed an Enum member ({', '.join(s.arg.name for s in members)})"
                           ", which torch.export holds as an opaque object and a pyrys program cannot: pass its plain "
                           f"value (member.value, int(member)) or {SCRIPT_OBJECTS_ADVICE}")
    objects += inputs
    if objects:
        kinds = sorted({getattr(spec.arg, "class_fqn", None) or spec.kind.name for spec in objects})
        raise CaptureError(f"pyrys: {owner}.forward uses {', '.join(kinds)} (a script object, such as a "
                           f"torch.Generator passed to a random op), which a pyrys program cannot hold: "
                           f"{SCRIPT_OBJECTS_ADVICE}")


DATA_DEPENDENT_ADVICE = ("Use torch.compile(model, backend=\"pyrys\"): dynamo breaks the graph there and pyrys "
                         "compiles each piece")
# what the torch.compile backend says instead: dynamo put the op into the graph it gives pyrys
DYNAMO_DATA_DEPENDENT_ADVICE = ("Dynamo put it in this graph (torch._dynamo.config.capture_scalar_outputs or "
                                "capture_dynamic_output_shape_ops is on); with them off it breaks the graph there "
                                "and pyrys compiles each piece")


def _refuse_data_dependent_shapes(graph_module: fx.GraphModule, owner: str) -> None:
    """torch.export captures ops whose output *shape* depends on data (``x[x > 0]``, ``nonzero``,
    ``unique``) with unbacked sizes; pyrys compiles every shape it runs, so it cannot take them."""
    for node in graph_module.graph.nodes:
        if free_unbacked_symbols(node.meta.get("val")):
            line = (node.meta.get("stack_trace") or "").strip().splitlines()
            where = f" ({line[-2].strip()}: `{line[-1].strip()}`)" if len(line) >= 2 else ""
            what = ("reads a tensor's value into a Python number"
                    if node.target in (aten.item.default, aten._local_scalar_dense.default)
                    else "makes a tensor whose shape depends on its data")
            raise DataDependentError(
                f"pyrys: {owner}.forward {what} at {node.name}{where} (`.item()`, `float(t)`; boolean-mask "
                f"indexing, nonzero, unique): pyrys compiles tensors of known shapes. {DATA_DEPENDENT_ADVICE}")


_CONTROL_FLOW_OPS = frozenset(getattr(torch.ops.higher_order, name) for name in ("cond", "while_loop", "map_impl", "scan")
                              if hasattr(torch.ops.higher_order, name))  # (others, a custom op's auto_functionalized: ops)


def _refuse_control_flow_ops(graph_module: fx.GraphModule, owner: str) -> None:
    """``torch.cond`` and ``while_loop`` (higher-order ops holding graphs, which ``run_decompositions`` leaves as
    they are): a branch or loop on tensor data, which a pyrys program, built for one path, cannot take."""
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target in _CONTROL_FLOW_OPS:
            raise CaptureError(
                f"pyrys: {owner}.forward uses torch.ops.higher_order.{node.target.name()} at {node.name} (a branch or "
                "loop on tensor data, torch.cond or while_loop): a pyrys program runs one path. Write it as Python "
                "(`if x.sum() > 0:`) and use torch.compile(model, backend=\"pyrys\"): dynamo breaks the graph "
                "there and pyrys compiles each piece (a graph that holds the op itself runs in torch)")


def _bind_inputs(gm: fx.GraphModule, ep: ExportedProgram) -> None:
    """Mark state placeholders with a :class:`StateRef`; lifted tensor constants become constants.

    Placeholders are matched by position: copying the graph may rename one (an input named
    ``input`` becomes ``input_1``, since FX avoids Python builtins)."""
    specs = {spec.arg.name: spec for spec in ep.graph_signature.input_specs}
    originals = [n.name for n in ep.graph_module.graph.nodes if n.op == "placeholder"]
    for node, original in zip([n for n in gm.graph.nodes if n.op == "placeholder"], originals):
        spec = specs[original]
        if spec.kind in _STATE_KINDS:
            value = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            node.meta[STATE_KEY] = StateRef(spec.target, _STATE_KINDS[spec.kind], value)
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            _inline_constant(gm, node, ep.constants[spec.target])


def _inline_constant(gm: fx.GraphModule, node: fx.Node, value) -> None:
    with gm.graph.inserting_before(node):
        const = add_constant(gm, value, node.name)
    node.replace_all_uses_with(const)
    gm.graph.erase_node(node)


def _drop_state_updates(gm: fx.GraphModule, ep: ExportedProgram) -> tuple[list[str], tuple, tuple]:
    """Keep only the user outputs: the optimized module never writes module state or inputs.

    Returns the notes, the inputs written and the state written (``pyrys.optimize`` warns of the
    inputs: eager changes the caller's tensors, the optimized module leaves them as they were)."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    kinds = [spec.kind for spec in ep.graph_signature.output_specs]
    values = output.args[0]
    kept = tuple(v for v, kind in zip(values, kinds) if kind == OutputKind.USER_OUTPUT)
    output.args = (kept,)
    specs = ep.graph_signature.output_specs
    inputs = [s.target for s in specs if s.kind == OutputKind.USER_INPUT_MUTATION]
    state = [s.target for s in specs if s.kind not in (OutputKind.USER_OUTPUT, OutputKind.USER_INPUT_MUTATION)]
    notes = [f"state updates dropped (inference never writes them): {', '.join(state)}"] if state else []
    if inputs:
        notes.append(input_writes_note(inputs))
    return notes, tuple(inputs), tuple(state)


def _raise_batch_norms(gm: fx.GraphModule, model: torch.nn.Module | None) -> None:
    raised = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.batch_norm.default]
    for node in [n for n in gm.graph.nodes if n.op == "call_function" and n.target in _BN_VARIANTS]:
        _raise_batch_norm(gm, node, model)
    for node in raised:  # the training IR's, raised already: its training argument becomes a flag read
        node.args = (*node.args[:5], _training_flag(gm, node, model), *node.args[6:])


def _raise_batch_norm(gm: fx.GraphModule, node: fx.Node, model: torch.nn.Module | None) -> None:
    """``getitem(_native_batch_norm_legit_*(x, w, b, mean, var, ...), 0)`` -> ``aten::batch_norm``."""
    outputs = [u for u in node.users if u.target is operator.getitem]
    if any(u.args[1] != 0 and u.users for u in outputs):
        return  # saved mean/rstd are used: keep the low-level op
    momentum_at, eps_at = _BN_VARIANTS[node.target]
    flag = _training_flag(gm, node, model)
    x, w, b, mean, var = node.args[:5]
    with gm.graph.inserting_before(node):
        bn_args = (x, w, b, mean, var, flag, node.args[momentum_at], node.args[eps_at], False)
        bn = insert_call(gm.graph, aten.batch_norm.default, bn_args)
    bn.meta.update(node.meta)
    for user in outputs:
        if user.args[1] == 0:
            user.replace_all_uses_with(bn)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)


def _training_flag(gm: fx.GraphModule, node: fx.Node, model: torch.nn.Module | None):
    """The ``training`` flag of the module that owns ``node``, as a state read; the literal captured where the
    owner is unknown or its flag is not what the call passed (``F.batch_norm(..., training=True)`` in an eval
    module: batch statistics, whatever the module's mode)."""
    path = _owner_path(node)
    captured_value = node.target is aten._native_batch_norm_legit_functional.default
    if node.target is aten.batch_norm.default and isinstance(node.args[5], bool):  # the training IR's
        captured_value = node.args[5]
    owner = _owner(model, path) if model is not None and path is not None else None
    if path is None or model is not None and (owner is None or bool(owner.training) != captured_value):
        return captured_value
    target = f"{path}.training" if path else "training"
    for existing in gm.graph.nodes:
        ref = existing.meta.get(STATE_KEY)
        if existing.op == "placeholder" and ref is not None and ref.target == target:
            return existing
    value = bool(owner.training if owner is not None else captured_value)
    flag = add_placeholder(gm.graph, target, value)  # "0.training" (a Sequential's BatchNorm) -> _0_training
    flag.meta[STATE_KEY] = StateRef(target, "flag", value)
    return flag


_SLICE = re.compile(r"slice\((-?\d+|None), (-?\d+|None), (-?\d+|None)\)")


def _owner(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The module at ``path`` of a node's module stack in ``model``, else None.  A stack names a slice of a
    container called in forward by it (``features.slice(1, 3, None).1.bn`` for ``self.features[1:3](x)``):
    the slice is taken as forward took it (a ``ModuleList``'s numbers its parts from 0 again)."""
    module = model
    for name in path.split(".") if path else ():
        sliced = _SLICE.fullmatch(name)
        try:
            if sliced:
                module = module[slice(*(None if v == "None" else int(v) for v in sliced.groups()))]
            else:
                module = module.get_submodule(name)
        except (AttributeError, TypeError, IndexError, KeyError):
            return None
        if not isinstance(module, torch.nn.Module):
            return None
    return module


def _owner_path(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]
