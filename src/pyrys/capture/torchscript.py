"""Import a TorchScript module or function into pyrys's IR.  Nothing is traced.

The inlined TorchScript graph is walked node by node:

* ``prim::Constant`` -> a literal argument (a ``get_attr`` constant for tensors);
* ``prim::GetAttr`` on ``self`` -> submodules are followed; a parameter or buffer becomes
  a state read (``prim::GetAttr[name="conv.weight"]``), a bool attribute (``training``)
  a flag read; other attributes (ints, floats, strings) are constants of the module;
* ``prim::If`` on module state (a flag) -> a ``pyrys::If`` node whose two branches are
  graph modules held by the graph module (see :mod:`pyrys.ir.control_flow`), resolved
  once ``freeze_flags`` makes the condition a constant (``inline_constant_ifs``).  An If
  whose condition is already known at import (a shape check such as
  ``if x.dim() != 4: raise``) is resolved at import: the graph is specialized to the
  example inputs' shapes, as ``torch.export`` specializes it;
* ``prim::Loop`` -> unrolled at import; its trip count and condition must be known
  then (constants, shapes, int attributes), otherwise the import stops with a reason;
* list/tuple construction and unpacking -> Python lists and tuples of values (a NamedTuple keeps its class:
  :mod:`pyrys.capture.script_types`);
* ATen calls -> ``torch.ops.aten.<op>.<overload>`` by the node's schema; in-place ops
  become their functional form (writes to module state, such as BatchNorm's
  ``num_batches_tracked += 1``, are dropped: inference never writes state);
* scalar ops on constants and shape queries (``dim``, ``size``, ``len``) are evaluated
  at import; scalar ops on tensor *data* (``int(x.sum())``) stop the import with a reason.

Every node gets ``meta["val"]`` from fake-tensor evaluation on the example inputs.
State values are copies: the user's scripted module is never modified.
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode, UnsupportedOperatorException
from torch.utils._pytree import tree_flatten, tree_map

from pyrys.capture.captured import Captured, input_writes_note
from pyrys.capture.convolution import SPELLINGS as CONVOLUTION_SPELLINGS, named_convolution
from pyrys.capture.script_module import NO_DEFAULT, forward_defaults, script_class_name, script_parameters
from pyrys.capture.script_ops import (LAYOUT_QUERIES, LIST_WRITES, PRIM_AS_OPS, PYTHON_OPS, TENSOR_QUERIES,
                                      TorchScriptImportError, call_op, checks_shapes, functional_op, has_node,
                                      is_view_call, is_view_node, mutated_argument, op_overload, script_str,
                                      split_arguments)
from pyrys.capture.script_types import named_tuple_class
from pyrys.ir.quiet_fake import fake_tensor_errors_unlogged
from pyrys.ir.control_flow import IF, RaisingBranch, add_if, has_effects
from pyrys.ir.graph import FLAGS_READ_KEY, STATE_KEY, StateRef, add_constant, add_placeholder

SHAPE_QUERIES = frozenset({"aten::size", "aten::dim", "aten::numel", "aten::len", "aten::sym_size"})
MAX_UNROLLED_ITERATIONS = 10_000


# in-place ops that change the shape of the tensor they act on (eager runs them; the import writes values only)
_RESHAPING_IN_PLACE = frozenset({"unsqueeze_", "squeeze_", "transpose_", "t_", "swapdims_", "swapaxes_", "as_strided_",
                                 "resize_", "resize_as_"})


class _Raised(Exception):
    """The imported path reaches ``prim::RaiseException``."""


class _OpRefused(RuntimeError):
    """An op's own check refuses the values it is given (shapes that do not multiply); a RuntimeError, as
    eager's, so that a branch that fails so is one that fails on these shapes."""


@dataclass
class _ModuleRef:
    path: str
    module: Any


def capture_torchscript(obj: Any, args: tuple, kwargs: dict | None = None,
                        flag_values: dict[str, bool] | None = None) -> Captured:
    """Import ``obj`` (a ``ScriptModule`` or scripted function) specialized to ``args``.

    ``flag_values`` overrides the captured value of bool attributes by name
    (``{"training": False}``, as ``_jit_pass_freeze_flags`` requests).
    """
    if not hasattr(obj, "inlined_graph"):
        methods = sorted(m for m in obj._c._method_names() if m.startswith("forward")) if hasattr(obj, "_c") else []
        raise TorchScriptImportError(
            f"{script_class_name(obj)} has no single scripted forward to import (its methods: {', '.join(methods) or 'none'}; "
            "a module with overloaded forwards, such as a scripted nn.LSTM): script a module that calls it, or pass "
            "the nn.Module itself")
    _refuse_root_hooks(obj)
    importer = _Importer(obj, dict(flag_values or {}))
    try:
        return importer.run(args, dict(kwargs or {}))
    except TorchScriptImportError as error:  # said as pyrys's, with what to do
        said = str(error)
        if said.startswith("pyrys:"):
            raise
        advice = "" if "nn.Module itself" in said else \
            ". Pass the nn.Module itself if you have it (torch.export captures it)"
        raise TorchScriptImportError(f"pyrys: the scripted {script_class_name(obj)} cannot be imported: "
                                     f"{said.rstrip('.')}{advice}") from error


def _refuse_root_hooks(obj: Any) -> None:
    """A ``ScriptModule`` whose own forward hooks or pre-hooks were scripted with it runs them when it is called,
    outside its ``forward`` graph, the graph imported: refused, not dropped (the outputs were the hook-free
    ones; a helper's find).  A submodule's hooks are calls in the graph, imported; a trace has them run."""
    module = getattr(obj, "_c", None)
    if not hasattr(module, "_get_forward_hooks"):
        return
    counts = {"forward hook": len(module._get_forward_hooks()),
              "forward pre-hook": len(module._get_forward_pre_hooks())}
    held = " and ".join(f"{count} {kind}{'s' if count > 1 else ''}" for kind, count in counts.items() if count)
    if held:
        raise TorchScriptImportError(
            f"pyrys: the scripted {script_class_name(obj)} has {held} of its own, which TorchScript runs when it "
            "is called, outside the forward graph pyrys imports: pass the nn.Module itself (torch.export captures "
            "its hooks), or register them on a submodule before scripting (its graph calls them)")


class _Scope:
    """One graph being built: the top level, or a branch of an If (which captures outer values)."""

    def __init__(self, gm: fx.GraphModule, parent: "_Scope | None" = None):
        self.gm, self.graph, self.parent = gm, gm.graph, parent
        self.env: dict[int, Any] = {}
        self.captures: dict[fx.Node, fx.Node] = {}  # outer node -> placeholder here
        self.versions: dict[fx.Node, fx.Node] = {}  # outer node -> its value here since an in-place write here

    def bind(self, value: torch._C.Value, obj: Any) -> None:
        self.env[value.unique()] = obj

    def outer_of(self, node: fx.Node) -> fx.Node | None:
        """The outer node ``node`` stands for in this branch (a placeholder capturing it, or its version since
        a write here); None for a value of the branch's own."""
        return next((outer for table in (self.captures, self.versions) for outer, here in table.items()
                     if here is node), None)

    def lookup(self, value: torch._C.Value) -> Any:
        key = value.unique()
        if key in self.env:
            return self.env[key]
        if self.parent is None:
            raise TorchScriptImportError(f"value %{value.debugName()} is used before it is defined")
        return self.capture(self.parent.lookup(value))

    def capture(self, outer: Any) -> Any:
        if self.parent is None:
            return outer
        return tree_map(lambda v: self.versions.get(v) or self._capture_node(v) if isinstance(v, fx.Node) else v, outer)

    def _capture_node(self, outer: fx.Node) -> fx.Node:
        if outer not in self.captures:
            if not isinstance(outer.meta.get("val"), torch.Tensor):
                raise TorchScriptImportError(
                    f"a branch of an If uses %{outer.name}, which is not a tensor; pyrys passes only "
                    "tensors into If branches (a flag used inside a branch on another flag, say)")
            self.captures[outer] = add_placeholder(self.graph, outer.name, outer.meta["val"])
        return self.captures[outer]


_IDENTITY_TESTS = {"aten::__is__": operator.is_, "aten::__isnot__": operator.is_not}
_DROPOUTS = {f"aten::{kind}dropout{suffix}" for kind in ("", "feature_", "alpha_", "feature_alpha_")
             for suffix in ("", "_")}


def _swapped(obj: Any, old: fx.Node, new: fx.Node, seen: set | None = None) -> Any:
    """``obj`` with ``old`` replaced by ``new`` at any depth: lists and dicts changed in place (every holder sees
    them), tuples rebuilt."""
    if obj is old:
        return new
    seen = set() if seen is None else seen
    if not isinstance(obj, (list, dict, tuple)) or id(obj) in seen:
        return obj
    seen.add(id(obj))
    if isinstance(obj, list):
        obj[:] = [_swapped(v, old, new, seen) for v in obj]
    elif isinstance(obj, dict):
        obj.update({k: _swapped(v, old, new, seen) for k, v in obj.items()})
    else:
        items = [_swapped(v, old, new, seen) for v in obj]
        if any(a is not b for a, b in zip(items, obj)):
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _known_false(value: Any) -> bool:
    """``False``, or a flag read whose captured value is False (what the program reads for it)."""
    return value is False or (isinstance(value, fx.Node) and value.meta.get("val") is False)


def _node_name(value: torch._C.Value, fallback: str) -> str:
    """A name hint from TorchScript's debug name (``x.1`` -> ``x``); FX and :func:`identifier` make it valid."""
    name = value.debugName().split(".")[0]
    return name if name and not name.isdigit() else fallback


def _constant_values(obj: Any) -> Any:
    """``obj`` with each constant node (``get_attr``) replaced by its tensor; None if it reads a computed one."""
    leaves = tree_flatten(obj)[0]
    if any(isinstance(v, fx.Node) and v.op != "get_attr" for v in leaves):
        return None
    return tree_map(lambda v: getattr(v.graph.owning_module, v.target) if isinstance(v, fx.Node) else v, obj)


def _as_declared(value: torch._C.Value, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in the dtype the TorchScript graph declares for ``value`` (where it declares one)."""
    declared = value.type().dtype() if isinstance(value.type(), torch._C.TensorType) else None
    return tensor if declared is None else tensor.to(declared)


def _numbers_only(obj: Any) -> bool:
    """Every tensor in ``obj`` is a 0-dim one (a number)."""
    return all(v.dim() == 0 for v in tree_flatten(obj)[0] if isinstance(v, torch.Tensor))


def _val(obj: Any) -> Any:
    return tree_map(lambda v: v.meta["val"] if isinstance(v, fx.Node) else v, obj)


def _is_tensor_type(t: torch._C.JitType) -> bool:
    if isinstance(t, torch._C.TensorType):
        return True
    if isinstance(t, (torch._C.ListType, torch._C.OptionalType)):
        return _is_tensor_type(t.getElementType())
    if isinstance(t, torch._C.TupleType):
        return any(_is_tensor_type(e) for e in t.elements())
    return False


_STALE_VIEW = ("reads a view of a tensor after writing that tensor in place; pyrys does not import that (take the "
               "view after the write)")
_STALE_PATH_ALIAS = ("reads a tensor after writing in place a value an If gave, which on one of its paths was that "
                     "tensor itself (`r = y` in one branch, then `r.add_(1)`); pyrys does not import that read (write "
                     "the tensor by its own name)")
_RECORDS = ("views_of", "stale", "view_parts", "path_aliases", "notes", "input_writes", "state_writes", "written_state",
            "branch_written_state", "flags_read")  # the _Importer's records of what the import did


class _Importer:
    def __init__(self, obj: Any, flag_values: dict[str, bool]):
        self.obj = obj
        self.flag_values = flag_values
        self.class_name = script_class_name(obj)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.root = _Scope(fx.GraphModule(torch.nn.Module(), fx.Graph()))
        self.state: dict[str, fx.Node] = {}
        self.views_of: dict[fx.Node, list[fx.Node]] = {}  # a tensor -> the views taken of it
        self.stale: dict[fx.Node, str] = {}  # values a write made stale (views of a tensor written in place
        # since; a tensor an If's output was on one path, written since): reading one is refused, saying why
        self.view_parts: set[fx.Node] = set()  # the parts of a chunk or split: views too
        self.path_aliases: dict[fx.Node, list[fx.Node]] = {}  # If outputs that are, on one path, a tensor of
        # the If's scope: those tensors
        self.notes: list[str] = []
        self.input_writes: list[str] = []  # inputs forward writes in place (placeholder names)
        self.state_writes: list[str] = []  # state it writes (paths)
        self.written_state: dict[str, fx.Node] = {}  # path -> its value after a write at the top level
        self.branch_written_state: set[str] = set()  # paths written inside a branch taken at run time
        self.attribute_containers: dict[str, Any] = {}  # path -> the list or dict a module attribute holds
        self.tensor_containers: dict[int, tuple[str, Any]] = {}  # id -> (path, the list or dict of its tensors read)
        self.flags_read: set[str] = set()  # the flags read (attribute names), also those resolved at import

    # -- the whole graph -------------------------------------------------------------------
    def run(self, args: tuple, kwargs: dict) -> Captured:
        graph = self.obj.inlined_graph
        inputs = list(graph.inputs())
        if isinstance(self.obj, torch.jit.ScriptModule):
            self.root.bind(inputs.pop(0), _ModuleRef("", self.obj))
        traced = isinstance(self.obj, torch.jit.TracedModule)
        if traced:
            self.notes.append("a traced module: its control flow and flags (training) were fixed when it was "
                              "traced, so freeze_flags has nothing to freeze; script it to keep them")
        self._bind_inputs(inputs, args, kwargs)
        try:
            with fake_tensor_errors_unlogged():
                outputs = self._import_block(self.root, graph.nodes(), list(graph.outputs()))
        except _Raised as raised:
            raise TorchScriptImportError(f"{self.class_name} raises on inputs like these: {raised}") from None
        except _OpRefused as error:  # eager fails there too
            fixed = (" (a traced module keeps the sizes it was traced at where its code read them, a reshape to "
                     "the traced batch: if these are not those, script the model or trace it at them)") if traced else ""
            raise TorchScriptImportError(f"{self.class_name} fails on inputs like these{fixed}: {error}") from error
        leaves, out_spec = tree_flatten(outputs[0] if len(outputs) == 1 else tuple(outputs))
        self._refuse_stale(leaves)
        self.root.graph.output(tuple(leaves))
        self.root.graph.eliminate_dead_code(is_impure_node=has_effects)
        for node in [n for n in self.state.values() if not n.users]:
            self.root.graph.erase_node(node)  # state only a dropped update read
        self.root.gm.recompile()
        self.root.gm.meta[FLAGS_READ_KEY] = frozenset(self.flags_read)
        _, in_spec = tree_flatten((tuple(args), kwargs))
        return Captured(self.root.gm, in_spec, out_spec, self.class_name, self.notes, tuple(self.input_writes),
                        tuple(self.state_writes))

    def _bind_inputs(self, inputs: list, args: tuple, kwargs: dict) -> None:
        """Each graph input bound: a placeholder per tensor the call passes (by position, then by keyword, in the
        order the call's inputs flatten), a constant for None and for an argument left to its default."""
        parameters = script_parameters(self.obj)
        names = list(parameters.parameters) if parameters is not None and len(parameters.parameters) == len(inputs) \
            else [v.debugName() for v in inputs]
        if len(args) > len(inputs) or any(name not in names[len(args):] for name in kwargs):
            raise TorchScriptImportError(f"{self.class_name}.forward takes {len(inputs)} input(s) "
                                         f"({', '.join(names)}), got {len(args)} by position"
                                         + (f" and {', '.join(kwargs)} by keyword" if kwargs else ""))
        by_name = dict(zip(names, inputs))
        for name, value, default in zip(names, inputs, forward_defaults(self.obj) or [NO_DEFAULT] * len(inputs)):
            if name not in kwargs and names.index(name) >= len(args):
                if default is NO_DEFAULT:
                    raise TorchScriptImportError(f"{self.class_name}.forward takes {len(inputs)} input(s) "
                                                 f"({', '.join(names)}); the example leaves out {name}, which has "
                                                 "no default")
                self.root.bind(value, default)  # an argument the example leaves to its default: a constant
        for value, example in [*zip(inputs, args), *((by_name[k], v) for k, v in kwargs.items())]:
            if example is None and isinstance(value.type(), torch._C.OptionalType):
                self.root.bind(value, None)  # an Optional input passed None: calls must pass None there too
                add_placeholder(self.root.graph, _node_name(value, "input"), None)  # its place among the inputs
                continue
            if not isinstance(example, torch.Tensor):
                raise TorchScriptImportError("pyrys imports scripted code with tensor inputs (and None for an "
                                             f"Optional one) only; input %{value.debugName()} takes {value.type()}, "
                                             f"the example passes {type(example).__name__} ({example!r:.60})"
                                             + (": optimize the nn.Module itself, whose capture takes numbers, or "
                                                "script a forward that takes a tensor" if isinstance(
                                                    value.type(), (torch._C.IntType, torch._C.FloatType,
                                                                   torch._C.BoolType)) else ""))
            node = add_placeholder(self.root.graph, _node_name(value, "input"), self.mode.from_tensor(example))
            self.root.bind(value, node)

    def _import_block(self, scope: _Scope, nodes, outputs: list) -> list:
        for node in nodes:
            self._import_node(scope, node)
        return [scope.lookup(v) for v in outputs]

    # -- one node ----------------------------------------------------------------------------
    def _import_node(self, scope: _Scope, node: torch._C.Node) -> None:
        kind = node.kind()
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, scope, node)
        elif kind.startswith("prim::") and kind not in PRIM_AS_OPS:
            raise TorchScriptImportError(f"pyrys cannot import {kind} yet (in {self.class_name}): {node}".strip())
        else:
            self._op(scope, node)

    def _constant(self, scope: _Scope, node: torch._C.Node) -> None:
        value = node.output().toIValue()
        if isinstance(value, torch.Tensor):
            value = add_constant(scope.gm, value.detach().clone(), _node_name(node.output(), "constant"))
        scope.bind(node.output(), value)

    def _get_attr(self, scope: _Scope, node: torch._C.Node) -> None:
        owner = scope.lookup(node.input())
        name = node.s("name")
        if not isinstance(owner, _ModuleRef):
            raise TorchScriptImportError(f"prim::GetAttr[name={name!r}] on a value that is not a module")
        path = f"{owner.path}.{name}" if owner.path else name
        value = getattr(owner.module, name)
        if isinstance(value, bool):
            self.flags_read.add(name)
        if isinstance(value, torch.nn.Module):
            result: Any = _ModuleRef(path, value)
        elif isinstance(value, bool) and scope.parent is not None:
            # a flag read inside a branch (``StochasticDepth``'s ``training`` under ``if self.use_res_connect:``):
            # its captured value, which is what the program reads for an unfrozen flag too, so that an If on it
            # is resolved here (branches take tensors only)
            result = bool(self.flag_values.get(name, value))
        elif isinstance(value, torch.Tensor) and path in self.branch_written_state:
            raise TorchScriptImportError(f"{self.class_name} reads {path} after a branch taken at run time writes it "
                                         "in place; pyrys does not import that (freeze the flag the branch is on)")
        elif isinstance(value, torch.Tensor) and path in self.written_state:
            result = scope.capture(self.written_state[path])  # read after this call wrote it, as eager reads it
        elif isinstance(value, torch.Tensor) or isinstance(value, bool):
            result = scope.capture(self._state(owner.module, path, name, value))
        elif isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
            # a list of the module's tensors (a scripted nn.LSTM's _flat_weights): each its state read
            result = type(value)(self._held(scope, owner, v, f"{path}_{i}") if isinstance(v, torch.Tensor) else v
                                 for i, v in enumerate(value))
            self.tensor_containers[id(result)] = (path, result)
        elif isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            # a Dict[str, Tensor] attribute: each tensor as the read of the state it is, else a constant
            result = {k: self._held(scope, owner, v, f"{path}_{k}") if isinstance(v, torch.Tensor) else v
                      for k, v in value.items()}
            self.tensor_containers[id(result)] = (path, result)
        elif isinstance(value, (list, dict)):  # one object per attribute, so that a write to it is read later
            result = self.attribute_containers.setdefault(path, copy.copy(value))
        else:
            result = value  # an int/float/str attribute: a constant of the module
        scope.bind(node.output(), result)

    def _held(self, scope: _Scope, owner: "_ModuleRef", tensor: torch.Tensor, hint: str) -> fx.Node:
        """A tensor held in a list attribute: the read of the parameter or buffer of ``owner`` it is, else a
        constant."""
        held = [*owner.module.named_parameters(recurse=False), *owner.module.named_buffers(recurse=False)]
        for name, state in held:
            if (state.data_ptr(), state.shape, state.stride(), state.dtype) == \
                    (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype):
                path = f"{owner.path}.{name}" if owner.path else name
                return scope.capture(self._state(owner.module, path, name, state))
        return add_constant(scope.gm, tensor.detach().clone(), hint)

    def _state(self, module: Any, path: str, name: str, value: Any) -> fx.Node:
        """The root graph's read of module state at ``path`` (one placeholder per attribute)."""
        if path not in self.state:
            if isinstance(value, bool):
                ref = StateRef(path, "flag", bool(self.flag_values.get(name, value)))
                val = ref.value
            else:
                kind = "parameter" if name in dict(module.named_parameters(recurse=False)) else "buffer"
                ref = StateRef(path, kind, value.detach().clone())
                val = self.mode.from_tensor(ref.value)
            prefix = {"flag": "", "parameter": "p_", "buffer": "b_"}[ref.kind]  # as torch.export names them
            node = add_placeholder(self.root.graph, prefix + path, val)  # "0.training" -> _0_training
            node.meta[STATE_KEY] = ref
            self.state[path] = node
        return self.state[path]

    def _if(self, scope: _Scope, node: torch._C.Node) -> None:
        cond = scope.lookup(node.input())
        blocks = list(node.blocks())
        if isinstance(cond, fx.Node) and isinstance(cond.meta.get("val"), bool) and \
                not all(isinstance(v.type(), torch._C.TensorType) for v in node.outputs()):
            # an If on flags that makes numbers, bools or optional tensors (``not training or p == 0.0``, a
            # short-circuit ``or``; GoogLeNet's auxiliary logits, None in eval): branches pass tensors only, so it
            # is resolved by the flags' captured values, as the program reads them
            cond = cond.meta["val"]
        branches = None if not isinstance(cond, fx.Node) else self._branches_or_none(scope, cond, blocks)
        if branches is None:  # a known condition, or flags whose branches do what a pyrys::If cannot hold
            cond = cond.meta["val"] if isinstance(cond, fx.Node) else cond
            outputs = self._import_block(scope, blocks[0 if cond else 1].nodes(), list(blocks[0 if cond else 1].outputs()))
            for value, out in zip(node.outputs(), outputs):
                scope.bind(value, out)
            return
        written = list(dict.fromkeys(outer for b in branches for outer in b.scope.versions))  # tensors of this
        # scope a branch writes in place (through any name, list or dict entry): the If passes their new values out
        for branch in branches:
            if branch.outputs is not None:
                branch.outputs += [branch.scope.versions.get(outer) or branch.scope._capture_node(outer)
                                   for outer in written]
                _check_tensors(branch.outputs)
        values = list(node.outputs())
        if not values and not written and all(b.raises is None and not _has_effects(b.gm) for b in branches):
            return  # both arms only wrote module state, which inference drops
        items = self._emit_if(scope, values + written, cond, branches)
        for i, (value, item) in enumerate(zip(values, items)):
            scope.bind(value, item)
            aliased = [outer for b in branches if b.outputs is not None and (outer := b.scope.outer_of(b.outputs[i]))]
            if aliased:  # on one path the tensor of this scope itself (`r = y`): a write to it reaches that tensor
                self.path_aliases[item] = aliased  # on that path only
        for outer, item in zip(written, items[len(values):]):
            self._write(scope, outer, item)

    def _branches_or_none(self, scope: _Scope, cond: fx.Node, blocks: list) -> list | None:
        """Both branches of a run-time If, or None where its condition is flags (a bool at import) and a branch
        writes a list or module state (``if self.keep: outs.append(h)``; BatchNorm's ``num_batches_tracked``
        read later): such an If is resolved by the flags' captured values, as the program reads them."""
        on_flags = isinstance(cond.meta.get("val"), bool)
        records = self._records()
        try:
            branches = [self._branch(scope, block) for block in blocks]
        except TorchScriptImportError:
            if not on_flags:
                raise
            branches = None
        if on_flags and (branches is None or self.branch_written_state != records["branch_written_state"]):
            vars(self).update(records)  # what the branches' imports recorded is thrown away with them
            return None
        return branches

    def _records(self) -> dict[str, Any]:
        """Copies of what the import has recorded so far (writes, views, notes): restored where branches'
        imports are thrown away."""
        return {name: {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
                if isinstance(value, dict) else type(value)(value) for name in _RECORDS
                for value in [getattr(self, name)]}

    def _branch(self, scope: _Scope, block) -> _PendingBranch:
        sub = _Scope(fx.GraphModule(torch.nn.Module(), fx.Graph()), scope)
        try:
            with fake_tensor_errors_unlogged():
                outputs = self._import_block(sub, block.nodes(), list(block.outputs()))
        except _Raised as raised:
            return _PendingBranch(sub, None, str(raised))
        except (RuntimeError, IndexError) as error:  # shapes that do not broadcast, an index past a dim: eager
            # would fail on this path too
            return _PendingBranch(sub, None, f"this branch fails on inputs of these shapes: {error}")
        _check_tensors(outputs)
        return _PendingBranch(sub, outputs, None)

    def _emit_if(self, scope: _Scope, outputs: list, cond: fx.Node, pending: list) -> list[fx.Node]:
        """The If node and one item node per output (a TorchScript value, or a tensor of this scope written)."""
        operands = list(dict.fromkeys(outer for p in pending for outer in p.scope.captures))
        then, otherwise = [p.finish(operands) for p in pending]
        call = add_if(scope.gm, cond, then, otherwise, operands)
        with self.mode:
            call.meta["val"] = IF(cond.meta["val"], then, otherwise, [o.meta["val"] for o in operands])
        items = []
        for i, out in enumerate(outputs):
            name = f"{out.name}_written" if isinstance(out, fx.Node) else _node_name(out, "if_out")
            item = scope.graph.create_node("call_function", operator.getitem, (call, i), {}, name=name)
            item.meta["val"] = call.meta["val"][i]
            items.append(item)
        return items

    def _loop(self, scope: _Scope, node: torch._C.Node) -> None:
        trip, cond, *carried = [scope.lookup(v) for v in node.inputs()]
        if has_node(trip) or has_node(cond):
            raise TorchScriptImportError("pyrys unrolls loops at import, so a loop's trip count and condition must be "
                                         "known then (constants, shapes, int attributes); this one depends on "
                                         f"values computed at run time: {node}".strip())
        block = next(node.blocks())
        params, results = list(block.inputs()), list(block.outputs())
        i = 0
        while cond and i < trip:
            if i >= MAX_UNROLLED_ITERATIONS:
                raise TorchScriptImportError(f"a loop runs more than {MAX_UNROLLED_ITERATIONS} iterations; "
                                             "pyrys unrolls loops and stops here")
            for value, obj in zip(params, [i, *carried]):
                scope.bind(value, obj)
            cond, *carried = self._import_block(scope, block.nodes(), results)
            if has_node(cond):
                raise TorchScriptImportError("a loop's condition depends on values computed at run time; "
                                             "pyrys unrolls loops at import and cannot")
            i += 1
        for value, obj in zip(node.outputs(), carried):
            scope.bind(value, obj)

    def _raise(self, scope: _Scope, node: torch._C.Node) -> None:
        message = scope.lookup(next(node.inputs()))
        raise _Raised(message if isinstance(message, str) else "an exception")

    def _list(self, scope: _Scope, node: torch._C.Node) -> None:
        items = [scope.lookup(v) for v in node.inputs()]
        if node.kind() != "prim::TupleConstruct":
            scope.bind(node.output(), items)
            return
        named = named_tuple_class(node.output())
        scope.bind(node.output(), named(*items) if named else tuple(items))

    def _dict(self, scope: _Scope, node: torch._C.Node) -> None:
        items = [scope.lookup(v) for v in node.inputs()]
        if has_node(items[0::2]):
            raise TorchScriptImportError(f"a dict with keys computed at run time (in {self.class_name}) is not supported")
        scope.bind(node.output(), dict(zip(items[0::2], items[1::2])))

    def _unpack(self, scope: _Scope, node: torch._C.Node) -> None:
        packed = scope.lookup(node.input())
        for i, value in enumerate(node.outputs()):
            scope.bind(value, self._index(scope, packed, i, value))

    def _tuple_index(self, scope: _Scope, node: torch._C.Node) -> None:
        packed, index = [scope.lookup(v) for v in node.inputs()]
        scope.bind(node.output(), self._index(scope, packed, index, node.output()))

    def _index(self, scope: _Scope, packed: Any, index: Any, value: torch._C.Value) -> Any:
        if isinstance(index, fx.Node):
            raise TorchScriptImportError("indexing a list with a value computed at run time is not supported")
        if isinstance(packed, (list, tuple)):
            return packed[index]
        item = scope.graph.create_node("call_function", operator.getitem, (packed, index), {}, name=_node_name(value, "item"))
        item.meta["val"] = packed.meta["val"][index]
        return item

    def _identity(self, scope: _Scope, node: torch._C.Node) -> None:
        scope.bind(node.output(), scope.lookup(node.input()))

    def _format(self, scope: _Scope, node: torch._C.Node) -> None:
        template, *values = [_val(scope.lookup(v)) for v in node.inputs()]
        scope.bind(node.output(), template.format(*values))

    def _tensor_property(self, scope: _Scope, node: torch._C.Node) -> None:
        val = _val(scope.lookup(node.input()))
        scope.bind(node.output(), val.dtype if node.kind() == "prim::dtype" else torch.device("cpu"))

    def _tensor_query(self, scope: _Scope, node: torch._C.Node) -> None:
        """``x.is_nested``, ``x.is_cuda``, ``x.requires_grad``: the answer for an inference program's tensors."""
        scope.bind(node.output(), TENSOR_QUERIES[node.kind()](_val(scope.lookup(node.input()))))

    def _warn(self, scope: _Scope, node: torch._C.Node) -> None:
        self.notes.append(f"{self.class_name} calls warnings.warn; pyrys does not repeat the warning at run time")

    def _num_to_tensor(self, scope: _Scope, node: torch._C.Node) -> None:
        """A number as a 0-dim tensor (a traced ``x.size(1)`` is one): a constant, the number being known."""
        number = scope.lookup(node.input())
        if has_node(number):
            raise TorchScriptImportError(f"prim::NumToTensor of a computed number (in {self.class_name}): {node}".strip())
        scope.bind(node.output(), add_constant(scope.gm, _as_declared(node.output(), torch.tensor(number)),
                                               _node_name(node.output(), "number")))

    def _uninitialized(self, scope: _Scope, node: torch._C.Node) -> None:
        scope.bind(node.output(), None)

    # -- ATen calls ------------------------------------------------------------------------------
    def _op(self, scope: _Scope, node: torch._C.Node) -> None:
        schema = torch._C.parse_schema(node.schema())
        op = op_overload(schema.name, schema.overload_name, node)
        values = [scope.lookup(v) for v in node.inputs()]
        self._refuse_stale(values)
        tensor_out = any(_is_tensor_type(v.type()) for v in node.outputs())
        if schema.name in _IDENTITY_TESTS:  # `query is not key`, `bias_k is not None`: the values imported are
            self._bind_results(scope, node, _IDENTITY_TESTS[schema.name](*values))  # the tensors eager compares
            return
        if schema.name in ("aten::tensor", "aten::as_tensor") and not has_node(values):  # torch.tensor([0, 2])
            literal = torch.tensor(values[0], dtype=_as_dtype(values[1]) if len(values) > 1 else None)
            scope.bind(node.output(), add_constant(scope.gm, literal, _node_name(node.output(), "tensor")))
            return
        if schema.name in LAYOUT_QUERIES:
            raise TorchScriptImportError(f"{schema.name} asks for a tensor's memory layout (in {self.class_name}), "
                                         "which a call may change and a program does not specialize on")
        if schema.name in TENSOR_QUERIES and isinstance(values[0], fx.Node):
            self._bind_results(scope, node, TENSOR_QUERIES[schema.name](*_val(values)))
            return
        if schema.name in LIST_WRITES and id(values[0]) in self.tensor_containers:
            raise TorchScriptImportError(f"{schema.name} writes {self.tensor_containers[id(values[0])][0]} (in "
                                         f"{self.class_name}), a list or dict attribute holding tensors: pyrys reads "
                                         "such an attribute as the module's tensors and does not import writes to it")
        if schema.name in LIST_WRITES and isinstance(values[0], (list, dict)):
            if scope.parent is not None:
                raise TorchScriptImportError(f"{schema.name} on a list inside a branch taken at run time (in "
                                             f"{self.class_name}) is not supported")
            self._bind_results(scope, node, self._python(LIST_WRITES[schema.name], values, node))  # the importer's
            return
        python_op = PYTHON_OPS.get(schema.name)
        concatenated = schema.name == "aten::add" and isinstance(values[1], (list, tuple))  # tensors in it too
        container = bool(values) and isinstance(values[0], (list, tuple, dict))
        if python_op is not None and container and (concatenated or schema.name == "aten::__getitem__" and
                                                    isinstance(values[0], dict) or not has_node(values[1:])):
            self._bind_results(scope, node, self._python(python_op, values, node))  # a list of values, possibly tensors
            return
        if not tensor_out and not has_node(values):
            self._bind_results(scope, node, self._scalar(op, schema, values, node))  # arithmetic on constants
            return
        if not tensor_out and schema.name in SHAPE_QUERIES:
            self._bind_results(scope, node, call_op(op, schema, _val(values)))  # specialized to the example shapes
            return
        constants = _constant_values(values)
        if constants is not None and _numbers_only(constants) and has_node(values) and \
                torch.Tag.nondeterministic_seeded not in op.tags and mutated_argument(schema) is None:
            # arithmetic on sizes a trace made tensors (prim::NumToTensor): computed now, as the sizes are
            result = call_op(op, schema, constants)
            if isinstance(result, torch.Tensor):  # in the trace's dtype: a traced number promotes like a Python one
                result = add_constant(scope.gm, _as_declared(node.output(), result), _node_name(node.output(), "number"))
            if not any(isinstance(v, torch.Tensor) for v in tree_flatten(result)[0]):
                self._bind_results(scope, node, result)
                return
        if not tensor_out and any(isinstance(v, torch.Tensor) for v in tree_flatten(_val(values))[0]):
            raise TorchScriptImportError(
                f"{schema.name} turns tensor data into a Python value ({node.kind()} in {self.class_name}); "
                "pyrys imports scripted code without running it, so data-dependent control flow is not supported "
                "(torch.compile(model, backend='pyrys') handles it with graph breaks)")
        if schema.name in _DROPOUTS and _known_false(values[2]):
            scope.bind(node.output(), values[0])  # dropout with train=False returns its input itself (a write to
            return  # either is a write to both, in TorchScript as in eager)
        if schema.name in CONVOLUTION_SPELLINGS and (named := named_convolution(values, _val(values[1]))):
            op, values = named  # a trace's _convolution: conv2d, as the passes and backends know it
            schema = op._schema
        mutated = mutated_argument(schema)
        if mutated is not None:
            op = functional_op(schema, node)
        args, kwargs = split_arguments(schema, values)
        outputs = list(node.outputs())
        base = op.__name__.split(".")[0]
        name = _node_name(outputs[0], base) if len(outputs) == 1 else base
        call = scope.graph.create_node("call_function", op, tuple(args), kwargs, name=name)
        try:
            with self.mode:
                call.meta["val"] = op(*_val(args), **_val(kwargs))
        except DynamicOutputShapeException:
            raise TorchScriptImportError(
                f"{schema.name} makes a shape that depends on tensor data (in {self.class_name}: `x[x > 0]`, "
                "nonzero); pyrys imports scripted code without running it (torch.compile(model, backend='pyrys') "
                "runs such ops in torch)") from None
        except TypeError as error:  # (torch's own shape function failing: upsample_nearest2d's at a batch of 0
            # checks `numel != 0 or prod(sizes)`, an int; a helper's find)
            raise TorchScriptImportError(
                f"torch's shape function of {schema.name} fails on these inputs (in {self.class_name}: {error}); "
                "eager may run them: optimize the nn.Module itself, or pass inputs of other sizes") from error
        except (NotImplementedError, UnsupportedOperatorException):
            raise
        except (RuntimeError, IndexError) as error:  # the op's own check of its arguments (an index past a
            # dim raises IndexError): eager fails there too
            if not checks_shapes(op):
                raise
            raise _OpRefused(f"{schema.name}: {(str(error).strip().splitlines() or [''])[0]}") from error
        if mutated is not None:
            call = self._as_written(scope, schema, call, _val(values[mutated]))
        if len(outputs) == 1 and isinstance(outputs[0].type(), torch._C.ListType) and \
                isinstance(call.meta["val"], (list, tuple)):  # chunk, split, unbind: a list of known length
            parts = [self._index(scope, call, i, outputs[0]) for i in range(len(call.meta["val"]))]
            if is_view_call(schema, _val(values[0]) if values else None, call.meta["val"]):
                self.view_parts.update(parts)
                self._note_views(values, parts)
            scope.bind(outputs[0], parts)
        elif len(outputs) == 1:
            if is_view_call(schema, _val(values[0]) if values else None, call.meta["val"]):
                self._note_views(values, [call])
            scope.bind(outputs[0], call)
        else:
            for i, value in enumerate(outputs):
                scope.bind(value, self._index(scope, call, i, value))
        if mutated is not None:
            self._rebind_mutated(scope, node, list(node.inputs())[mutated], values[mutated], call)

    def _as_written(self, scope: _Scope, schema, result: fx.Node, written: Any) -> fx.Node:
        """The functional result of an in-place op as the tensor it writes holds it: eager computes
        ``acc.add_(x.double())`` in the promoted dtype and writes it into ``acc``'s (int64 into int32 wraps),
        and refuses a result of another shape."""
        value = result.meta["val"]
        if not isinstance(written, torch.Tensor) or not isinstance(value, torch.Tensor):
            return result
        if value.shape != written.shape and schema.name.removeprefix("aten::") in _RESHAPING_IN_PLACE:
            raise TorchScriptImportError(f"{self.class_name}: pyrys imports no in-place op that changes a tensor's "
                                         f"shape, as {schema.name} does (eager runs it); write y = "
                                         f"y.{schema.name.removeprefix('aten::').rstrip('_')}(...) in the scripted "
                                         "code, or optimize the nn.Module itself")
        if value.shape != written.shape:
            raise _OpRefused(f"{schema.name}: its result of shape {tuple(value.shape)} does not fit the tensor "
                             f"it writes, of shape {tuple(written.shape)}")
        if value.dtype == written.dtype:
            return result
        if not torch.can_cast(value.dtype, written.dtype):  # eager's rule: a float result into an integer tensor
            raise _OpRefused(f"{schema.name}: result type {value.dtype} can't be cast to the desired output type "
                             f"{written.dtype}")
        cast = scope.graph.create_node("call_function", torch.ops.aten._to_copy.default, (result,),
                                       {"dtype": written.dtype}, name=f"{result.name}_as_written")
        with self.mode:
            cast.meta["val"] = torch.ops.aten._to_copy.default(value, dtype=written.dtype)
        return cast

    def _note_views(self, values: list, views: list[fx.Node]) -> None:
        for base in tree_flatten(values)[0]:
            if isinstance(base, fx.Node):
                self.views_of.setdefault(base, []).extend(views)

    def _stale_views_of(self, written: Any) -> None:
        """The views taken of ``written`` (and of them) before this write hold its old values from now on."""
        pending = [written] if isinstance(written, fx.Node) else []
        while pending:
            views = self.views_of.pop(pending.pop(), [])
            self.stale.update(dict.fromkeys(views, _STALE_VIEW))
            pending.extend(views)

    def _refuse_stale(self, values: Any) -> None:
        if self.stale and (read := next((v for v in tree_flatten(values)[0] if isinstance(v, fx.Node) and v in self.stale),
                                        None)) is not None:
            raise TorchScriptImportError(f"{self.class_name} {self.stale[read]}")

    def _scalar(self, op, schema, values: list, node: torch._C.Node) -> Any:
        """An op on Python values (numbers, strings): torch's, or TorchScript's own ``str`` (``str(i)``: its
        ATen op takes a generic argument, which torch's Python binding cannot)."""
        try:
            if schema.name == "aten::str":
                return script_str(values[0], node.inputsAt(0).type().str())  # (its IR spelling: "float[]")
            return call_op(op, schema, values)
        except RuntimeError as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise TorchScriptImportError(f"{node.kind()} on the values {values!r:.80} fails when called from Python "
                                         f"(in {self.class_name}): {first_line}") from None

    def _python(self, operation, values: list, node: torch._C.Node) -> Any:
        """A list or dict operation applied to the importer's own, its failure (eager's too) a reason."""
        try:
            return operation(*values)
        except (TypeError, KeyError, IndexError, ValueError) as error:
            raise TorchScriptImportError(f"{node.kind()} fails on the values it is given at import (in "
                                         f"{self.class_name}: {type(error).__name__}: {error})") from None

    def _rebind_mutated(self, scope: _Scope, node, value: torch._C.Value, old: Any, new: fx.Node) -> None:
        """After ``x.add_(y)``, later reads of ``x`` see the functional result, through every name and list that
        held it (``y = x.add_(1); y.mul_(2)`` writes ``x`` twice)."""
        if isinstance(old, fx.Node) and (old in self.view_parts or old.op == "call_function" and is_view_node(old)):
            raise TorchScriptImportError(f"{node.kind()} writes to a view of another tensor; pyrys does not import "
                                         "in-place ops on views")
        if isinstance(old, fx.Node) and (aliased := self._path_aliased(scope, old)):
            self.stale.update(dict.fromkeys(aliased, _STALE_PATH_ALIAS))  # read again, they would be the old values
        self._stale_views_of(old)
        if isinstance(old, fx.Node) and (old.meta.get(STATE_KEY) or old in scope.captures.values()
                                         and _captured_state(scope, old)):
            target = _state_target(scope, old)
            self.notes.append(f"state update dropped (inference never writes module state): {node.kind()} on {target}")
            self.state_writes.append(target)
            if scope.parent is None:  # later reads in this call see the value written, as in eager
                self.written_state[target] = new
                scope.bind(value, new)
                self._rebind_aliases(scope, old, new)
            else:  # written in a branch taken at run time: a read after it is refused (_get_attr)
                self.branch_written_state.add(target)
            return
        written = _written_input(scope, old) if isinstance(old, fx.Node) else None
        if written is not None and written not in self.input_writes:
            self.input_writes.append(written)  # the optimized module leaves the caller's tensor as it was
            self.notes.append(input_writes_note([written]))
        scope.bind(value, new)
        if isinstance(old, fx.Node):
            self._write(scope, old, new)

    def _path_aliased(self, scope: _Scope, node: fx.Node | None) -> list[fx.Node]:
        """The tensors ``node`` (an If's output, or a branch's capture of one) is on one of the If's paths."""
        while node is not None and node not in self.path_aliases and scope.parent is not None:
            node, scope = scope.outer_of(node), scope.parent
        return self.path_aliases.get(node, [])

    def _write(self, scope: _Scope, old: fx.Node, new: fx.Node) -> None:
        """``old`` of ``scope`` holds ``new`` from now on, through every name and list entry; in a branch, a tensor
        of an outer scope written is passed out of the If (its names and lists there are the same tensor)."""
        self._stale_views_of(old)  # (an If's write-back: the views of the outer tensor taken before it)
        self._rebind_aliases(scope, old, new)
        outer = scope.outer_of(old) if scope.parent is not None else None
        if outer is not None:
            scope.versions[outer] = new

    def _rebind_aliases(self, scope: _Scope, old: fx.Node, new: fx.Node) -> None:
        """Every other name, list, tuple or dict entry of ``scope`` that held ``old`` holds ``new`` (they are one
        tensor in eager), and so does a state read after a write."""
        for key, obj in list(scope.env.items()):
            scope.env[key] = _swapped(obj, old, new)
        for target, read in list(self.written_state.items()):
            if read is old:
                self.written_state[target] = new

    def _bind_results(self, scope: _Scope, node: torch._C.Node, result: Any) -> None:
        outputs = list(node.outputs())
        if len(outputs) == 1:
            scope.bind(outputs[0], result)
        else:
            for value, item in zip(outputs, result):
                scope.bind(value, item)


@dataclass
class _PendingBranch:
    scope: _Scope
    outputs: list | None
    raises: str | None

    def finish(self, operands: list[fx.Node]) -> torch.nn.Module:
        """The branch as a module taking one operand per placeholder, in the If's operand order."""
        if self.raises is not None:
            return RaisingBranch(self.raises)
        graph = self.scope.graph
        placeholders = [self.scope._capture_node(outer) for outer in operands]
        first = next(iter(graph.nodes), None)  # None: an empty branch without operands
        if placeholders and first is not placeholders[0]:
            first.prepend(placeholders[0])
        for before, ph in zip(placeholders, placeholders[1:]):
            before.append(ph)
        graph.output(list(self.outputs))
        graph.eliminate_dead_code(is_impure_node=has_effects)
        self.scope.gm.recompile()
        return self.scope.gm

    @property
    def gm(self) -> fx.GraphModule:
        return self.scope.gm


def _check_tensors(outputs: list) -> None:
    for out in outputs:
        if not (isinstance(out, fx.Node) and isinstance(out.meta.get("val"), torch.Tensor)):
            raise TorchScriptImportError("pyrys supports If branches on module state that produce tensors; "
                                         f"a branch produces {out!r}")


def _has_effects(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and has_effects(n) for n in gm.graph.nodes)


def _captured_state(scope: _Scope, placeholder: fx.Node) -> bool:
    outer = next(o for o, p in scope.captures.items() if p is placeholder)
    return bool(outer.meta.get(STATE_KEY)) or (outer.op == "placeholder" and scope.parent is not None
                                               and outer in scope.parent.captures.values()
                                               and _captured_state(scope.parent, outer))


def _written_input(scope: _Scope, node: fx.Node) -> str | None:
    """The name of the model input ``node`` is (in a branch: the value it stands for), else None."""
    while scope.parent is not None and node.op == "placeholder":
        node = next((o for o, p in scope.captures.items() if p is node), None)
        if node is None:
            return None
        scope = scope.parent
    return node.name if node.op == "placeholder" and node.meta.get(STATE_KEY) is None else None


def _state_target(scope: _Scope, node: fx.Node) -> str:
    while node.meta.get(STATE_KEY) is None and scope is not None:
        node = next(o for o, p in scope.captures.items() if p is node)
        scope = scope.parent
    return node.meta[STATE_KEY].target




_HANDLERS = {
    "prim::Constant": _Importer._constant,
    "prim::GetAttr": _Importer._get_attr,
    "prim::If": _Importer._if,
    "prim::Loop": _Importer._loop,
    "prim::RaiseException": _Importer._raise,
    "prim::ListConstruct": _Importer._list,
    "prim::TupleConstruct": _Importer._list,
    "prim::DictConstruct": _Importer._dict,
    "prim::ListUnpack": _Importer._unpack,
    "prim::TupleUnpack": _Importer._unpack,
    "prim::TupleIndex": _Importer._tuple_index,
    "prim::unchecked_cast": _Importer._identity,
    "prim::Uninitialized": _Importer._uninitialized,
    "prim::NumToTensor": _Importer._num_to_tensor,
    "prim::dtype": _Importer._tensor_property,
    "prim::device": _Importer._tensor_property,
    "aten::format": _Importer._format,
    **{kind: _Importer._tensor_query for kind in TENSOR_QUERIES if kind.startswith("prim::")},
    "aten::warn": _Importer._warn,
}


def _as_dtype(value):
    """A dtype as TorchScript's graph holds it, a ScalarType's number (``torch.tensor([0, 2])`` of an index
    list is ``aten::tensor(list, 4, ...)``), as a ``torch.dtype`` (``torch.tensor`` takes no number: a helper's
    find); None and a dtype as they are."""
    return torch.ops.aten.scalar_tensor.default(0, dtype=value).dtype if isinstance(value, int) else value
