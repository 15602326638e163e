"""``torch.compile(model, backend="pyrys")``: each graph dynamo hands over becomes a pyrys program.

    compiled = torch.compile(model, backend="pyrys", options={"backend": "reference", "disable": ["fold_conv_bn"]})

``options`` are :func:`pyrys.optimize`'s keyword options (``threads``, ``layout``, ``disable`` ...).

Dynamo (torch 2.14, default config) passes a model's parameters and buffers to the graph
as inputs.  pyrys recognizes them by their source (``L['self']._modules['conv']._parameters
['weight']``), puts them back as state of a small module around the graph (``conv.weight``),
and optimizes that module like any other: parameters are frozen, BatchNorm folded, and
the program built for the default backend.  Each call passes only the real inputs on.

Graph breaks give several graphs, each its own pyrys program.  A new input shape makes
dynamo recompile; when it hands over a graph with symbolic sizes, pyrys builds one program
per concrete shape: the first at its first call, a further one from the second time it comes within
the graph's last ``max_shapes`` new shapes (its first call runs in torch).  So a generation loop,
whose cache grows by a token a call (a shape that never comes back within a loop), runs its decode
steps in torch instead of compiling at every token (GPT-2 through ``generate``: 12 compiles a
12-token loop, each loop again, with 8 shapes kept), and a server's batch sizes get programs from
their second call.  With ``options={"numerics": True}`` every graph's program is
measured against the graph run eagerly (``program.numerics`` of ``DynamoGraph.programs``), and
the report is logged at INFO on the ``"pyrys"`` logger.  Dynamo finds the backend through the
``torch_dynamo_backends`` entry point (no ``import pyrys`` needed); :func:`register_backend`
covers the rest without registering it twice.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import logging
import re
import sys
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from pyrys import compile_weights
from pyrys.compile_weights import WeightSet, WeightSets, note_state_written
from pyrys.config import check_calibration_options, make_config
from pyrys.numerics.budget import AUTO
from pyrys.capture.export import DATA_DEPENDENT_ADVICE, DYNAMO_DATA_DEPENDENT_ADVICE, EXPORT_ADVICE_END
from pyrys.errors import CaptureError, ModelChangedError
from pyrys.ir.graph import identifier
from pyrys.optimize import OptimizedModule, optimize
from pyrys.shape_cache import DEFAULT_MAX_SHAPES, ShapeCache
from pyrys.signature import signature_of

BACKEND_NAME = "pyrys"
LOG = logging.getLogger("pyrys")
# the options are optimize's keyword options, all of them
_OPTION_NAMES = frozenset(name for name, parameter in inspect.signature(optimize).parameters.items()
                          if parameter.kind is inspect.Parameter.KEYWORD_ONLY)
_NOT_THROUGH_COMPILE = frozenset({"calibration", "output_dtype"})  # refused below, each saying why
_STATE_SOURCE = re.compile(r"\['([^']+)'\]|\.([A-Za-z_]\w*)")
_SOURCE_ROOT = re.compile(r"[LG]\['([^']+)'\]")  # a local or global of the compiled frame
_COMPILED_MODULE = ("self", "fn")
MAX_WRAPPED_VALUES = 8  # distinct values of a graph's number inputs that get programs (then torch runs it)


_MODES_SAID: set = set()  # the modes pyrys_backend has said it ignores
_MODES_LOCK = threading.Lock()


def _first_time(mode: str) -> bool:
    """Whether ``mode`` is new to this process (then remembered)."""
    with _MODES_LOCK:
        new = mode not in _MODES_SAID
        _MODES_SAID.add(mode)
    return new


def pyrys_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None,
                  mode: str | None = None) -> Callable:
    """The dynamo backend: returns a callable that runs ``gm``'s pyrys program(s). ``mode`` (inductor's
    ``"reduce-overhead"``, ``"max-autotune"``) has no meaning here: said once per mode and process, and ignored,
    as torch's own ``eager`` backend does."""
    if mode not in (None, "default") and _first_time(mode):
        LOG.warning("pyrys (torch.compile): mode=%r is inductor's and is ignored; pyrys's own settings are "
                    "options={...} (precision, threads, layout ...)", mode)
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(f"pyrys: torch.compile's options= is a dict of pyrys's settings "
                        f"({sorted(_OPTION_NAMES - _NOT_THROUGH_COMPILE)}), e.g. options={{'precision': 'bf16'}}; "
                        f"got {type(options).__name__} {options!r}")
    options = dict(options or {})
    unknown = sorted(set(options) - _OPTION_NAMES)
    if unknown:
        raise ValueError(f"pyrys: unknown torch.compile option(s) {unknown}; known: "
                         f"{sorted(_OPTION_NAMES - _NOT_THROUGH_COMPILE)}")
    if options.get("precision") == "int8" or "calibration" in options:
        asked = " with ".join(f"{name}={options[name]!r}" if name == "precision" else f"{name}="
                              for name in ("precision", "calibration") if name in options)
        raise ValueError(f"pyrys: {asked} is not available through torch.compile (neither precision='int8' nor "
                         "calibration= is): calibration samples are the model's inputs, and dynamo's graphs take "
                         "other ones; use pyrys.optimize(model, x, precision=..., calibration=...)"
                         + (", or precision='bf16' without calibration= here" if options.get("precision") == "bf16"
                            else ""))
    if options.get("output_dtype") is not None:
        raise ValueError("pyrys: output_dtype is not available through torch.compile: dynamo expects the dtypes "
                         "its graph was traced with; use pyrys.optimize(model, x, output_dtype=...)")
    _check_options(options)
    return DynamoGraph(gm, example_inputs, options)


def _check_options(options: dict) -> None:
    """``options`` checked as ``pyrys.optimize`` checks its keywords, the error naming ``torch.compile``'s
    ``options=`` (the programs are compiled at a graph's first call, where it named ``pyrys.optimize``)."""
    takes = inspect.signature(make_config).parameters
    try:
        make_config(**{name: value for name, value in options.items() if name in takes})
        check_calibration_options(options.get("precision", "fp32"), options.get("calibration"),
                                  options.get("accuracy_budget", AUTO))
    except ValueError as error:
        raise ValueError(f"pyrys: torch.compile's options=: {str(error).removeprefix('pyrys.optimize: ')}") from None


class TorchCompileGraph(torch.nn.Module):
    """The dynamo graph with its parameter/buffer inputs held as module state again."""

    caller_keeps_writes = True  # a graph that writes its inputs or state runs in torch (DynamoGraph)

    def __init__(self, gm: fx.GraphModule, positions: list[int], state: dict[int, tuple[str, torch.Tensor]],
                 scalars: dict[int, Any]):
        super().__init__()
        self.graph_module = gm
        self._positions, self._paths, self._scalars = positions, {}, scalars
        for position, (path, value) in state.items():
            self._paths[position] = _register(self, path, value)

    def forward(self, *inputs):
        full = dict(zip(self._positions, inputs))
        full.update(self._scalars)
        for position, (owner, name) in self._paths.items():
            full[position] = getattr(self.get_submodule(owner), name)
        return self.graph_module(*[full[i] for i in range(len(full))])


def _register(root: torch.nn.Module, path: str, value: torch.Tensor) -> tuple[str, str]:
    """Register ``value`` under ``graph_state`` at ``path``, creating empty submodules on the way.

    Every part becomes an :func:`identifier` (torch.export names state by its path and FX
    writes it as ``self.<path>``): ``"layer1.0.class.weight"`` -> ``graph_state.layer1._0.class_.weight``.
    Returns the (owner path, attribute name) it was registered at.
    """
    *owners, leaf = ["graph_state", *path.split(".")]
    module, names = root, []
    for part in owners:  # each part a submodule of its own, named apart from the module's attributes (a plain dict
        made = module.__dict__.setdefault("_pyrys_parts", {})  # of heads keyed "train": not nn.Module.train)
        name = made.get(part)
        if name is None:
            name = made[part] = identifier(part, set(dir(module)))
            module.add_module(name, torch.nn.Module())
        module, names = module._modules[name], names + [name]
    name = identifier(leaf, set(dir(module)))
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(name, torch.nn.Parameter(value.detach(), requires_grad=False))
    else:
        module.register_buffer(name, value.detach())
    return ".".join(names), name


def _state_path(source_name: str) -> str | None:
    """The path of the module state a graph input reads (None for a user input).

    ``L['self']._modules['conv']._parameters['weight']`` -> ``"conv.weight"``; the compiled module
    is ``L['self']``, or ``L['fn']`` when dynamo enters through its ``__call__`` (a top-level
    ``nn.Sequential``).  State of a module reached another way keeps its root's name:
    ``G['model']._modules['bn']._buffers['running_var']`` -> ``"model.bn.running_var"``.  A module that
    sets an attribute in ``forward`` is reached through its ``__dict__``: ``._modules['0'].__dict__['_modules']``.
    """
    root = _SOURCE_ROOT.match(source_name)
    if root is None or ("._parameters[" not in source_name and "._buffers[" not in source_name):
        return None
    parts = [m.group(1) or m.group(2) for m in _STATE_SOURCE.finditer(source_name[root.end():])]
    parts = [p for p in parts if p not in ("_modules", "_parameters", "_buffers", "__dict__")]
    prefix = [] if root.group(1) in _COMPILED_MODULE else [root.group(1)]
    return ".".join(prefix + parts)


UNOWNED_PARAMETER = "parameter_"  # the path prefix of a Parameter no module attribute reaches (an argument)


def _is_state(node: fx.Node, value: Any) -> str | None:
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", None)
    path = _state_path(source() if callable(source) else source) if source else None
    if path is None and isinstance(value, torch.nn.Parameter):
        path = f"{UNOWNED_PARAMETER}{node.name}"
    return path


def _as_key(value: Any) -> Any:
    """A number as a compile key: a float by its bits (``-0.0 == 0.0`` but ``x / -0.0`` is -inf; NaN equals
    no NaN, so it compiled at every call), anything else as it is."""
    return ("float", value.hex()) if isinstance(value, float) else value


def _trains_batch_norm(gm: fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.nn.functional.batch_norm:
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            if training is True:
                return True
    return _updates_instance_norm_statistics(gm)


def _updates_instance_norm_statistics(gm: fx.GraphModule) -> bool:
    """Whether an instance norm of ``gm`` updates running statistics (``track_running_stats`` in training:
    ``F.instance_norm`` given them, with ``use_input_stats``), which its capture drops (rule
    ``training_norm_stats``) without naming them written, as it names a batch norm's."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.nn.functional.instance_norm:
            running_mean = node.kwargs.get("running_mean", node.args[1] if len(node.args) > 1 else None)
            use_input_stats = node.kwargs.get("use_input_stats", node.args[5] if len(node.args) > 5 else True)
            if running_mean is not None and use_input_stats is not False:
                return True
    return False


def _enables_grad(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` turns grad on where its caller has it off (``with torch.enable_grad():`` in a forward called
    under ``torch.no_grad()``); dynamo guards on the grad mode, so the caller's is the one at this compile.  Under
    inference mode nothing records autograd, whatever the grad mode."""
    return not torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and any(
        node.target is torch._C._set_grad_enabled and node.args[:1] == (True,) for node in gm.graph.nodes)


def _under_autocast(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` runs under autocast (the caller's: dynamo guards on it, so this graph is called under it
    only; or its own), whose dtypes a pyrys program would not follow."""
    return torch.is_autocast_enabled("cpu") or any(node.target is torch.amp.autocast_mode._enter_autocast
                                                   for node in gm.graph.nodes)


def _wrapped_number(node: fx.Node) -> bool:
    """A Python number dynamo passes as a 0-dim tensor (``pass_arg_as_tensor``; not a NumPy array, which it
    passes so too) that the graph reads only with ``.item()``."""
    grapharg = node.meta.get("grapharg")
    return (getattr(grapharg, "pass_arg_as_tensor", False) and not getattr(grapharg, "is_tensor", True)
            and bool(node.users) and all(u.op == "call_method" and u.target == "item" for u in node.users))


def _unwrapped(gm: fx.GraphModule, wrapped: list[int], scalars: dict) -> tuple[fx.GraphModule, dict]:
    """``gm`` with each ``.item()`` of a wrapped number replaced by its value (torch.export would take it for
    tensor data), and the scalars with an unread 0-dim tensor in those places."""
    if not wrapped:
        return gm, scalars
    graph = copy.deepcopy(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for position in wrapped:
        for user in [u for u in placeholders[position].users if u.op == "call_method" and u.target == "item"]:
            for reader in list(user.users):
                reader.replace_input_with(user, scalars[position])
            graph.erase_node(user)
    scalars = {i: torch.tensor(v) if i in wrapped else v for i, v in scalars.items()}  # unread now
    return fx.GraphModule(gm, graph), scalars


_GRAPH_NUMBERS = itertools.count()  # dynamo graphs made in this process, in order


class DynamoGraph:
    """The callable dynamo runs for one graph: one pyrys program per concrete input signature."""

    def __init__(self, gm: fx.GraphModule, example_inputs: list, options: dict):
        self.gm, self.options = gm, options
        self.number, self._compiles = next(_GRAPH_NUMBERS), itertools.count()  # for dump_dir's folders
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        state: dict[int, tuple[str, torch.Tensor]] = {}
        for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
            path = _is_state(node, value) if isinstance(value, torch.Tensor) else None
            if path is not None:
                state[i] = (path, value)
        self.state = {i: path for i, (path, _) in state.items()}  # positions -> paths (not the example's tensors:
        # its model, deleted, takes its weights with it)
        # Python numbers dynamo passes as 0-dim tensors (a module's float attribute, a float argument, with
        # dynamic=True) and reads with .item(): each value is a compile key, as the ints are
        self.wrapped = [i for i, node in enumerate(placeholders) if _wrapped_number(node)]
        self._wrapped_seen: set[tuple] = set()  # the values they took
        self._seeing = threading.Lock()
        self._new_keys: OrderedDict[tuple, None] = OrderedDict()  # the last new shapes, run in torch once
        self._compiled_keys: OrderedDict[tuple, None] = OrderedDict()  # shapes compiled (to tell a recompile)
        self._recompiles = 0  # compiles of shapes compiled before and dropped since
        self.inputs = [i for i, v in enumerate(example_inputs)
                       if i not in self.state and i not in self.wrapped and isinstance(v, torch.Tensor)]
        self.scalars = [i for i, v in enumerate(example_inputs) if not isinstance(v, torch.Tensor)]
        self.training = _trains_batch_norm(gm)
        self.layouts = _output_layouts(gm)  # what eager's outputs are laid out in, where not contiguous
        self._grad_noted = False
        self._state_names: dict[int, str] = {}  # state position -> its name in the optimized module
        self._writes_state: list[int] = []  # the state positions this graph writes (it runs in torch)
        self._buffers = [i for i, (_, value) in state.items() if not isinstance(value, torch.nn.Parameter)]
        self._unowned_parameters = [i for i, path in self.state.items() if path.startswith(UNOWNED_PARAMETER)]
        self._compiling = threading.Lock()
        # per set of state tensors (compile_weights.py), one program per concrete signature, compiled outside
        # dynamo's tracing at the set's first call, and for a further signature at its second (``_came_again``);
        # at most max_shapes of them, the least recently called dropped first
        self._weights = WeightSets(self.state, self._compiling)
        # why this graph runs in torch as dynamo gave it (None: it runs as pyrys programs)
        self.runs_in_torch: str | None = None
        if not self.inputs:  # a graph of constants: nothing to compile for, nothing to warn about
            self.runs_in_torch = "it has no tensor input to compile for: it runs in torch"
        elif _updates_instance_norm_statistics(gm):
            self._run_in_torch("it updates an instance norm's running statistics in place (track_running_stats in "
                               "training mode), which a pyrys program would not")
        elif _enables_grad(gm):
            self._run_in_torch("it turns grad on (torch.enable_grad()) where its caller has it off: its outputs carry "
                               "an autograd graph (forces as -dE/dx, saliency), which a pyrys program's would not")
        elif _under_autocast(gm):
            self._run_in_torch("it runs under torch.autocast, whose dtypes a pyrys program would not follow (for "
                               "bfloat16, options={'precision': 'bf16'} without autocast)")

    @property
    def programs(self) -> dict[Any, OptimizedModule]:
        return self._weights.programs()

    def _compile(self, args: list, weights: WeightSet) -> OptimizedModule | None:
        scalars = {i: int(args[i]) if isinstance(args[i], torch.SymInt) else args[i] for i in self.scalars}
        scalars.update({i: args[i].item() for i in self.wrapped})
        if self.wrapped:
            self._bound_wrapped_values(tuple(_as_key(scalars[i]) for i in self.wrapped))
            if self.runs_in_torch:
                return None
        inputs = tuple(args[i] for i in self.inputs)
        key = (signature_of(inputs, {})[0], tuple(sorted((i, _as_key(v)) for i, v in scalars.items())))
        shapes = weights.shapes  # read once: a change of weights on another thread makes it None
        program = None if shapes is None else shapes.get(key)
        if program is None:
            if shapes is not None and not self._came_again(key):
                return None  # torch runs a shape's first call: a loop's growing cache may never bring it back
            with self._compiling:
                if self.runs_in_torch:  # decided by another thread's compile meanwhile
                    return None
                program = None if weights.shapes is None else weights.shapes.get(key)
                if program is None:
                    try:
                        program = self._optimize(inputs, scalars, weights.state(args))
                    except CaptureError as error:  # what torch.export cannot take, torch runs
                        why = str(error).replace(DATA_DEPENDENT_ADVICE, DYNAMO_DATA_DEPENDENT_ADVICE).replace(
                            EXPORT_ADVICE_END, " Otherwise report it")  # (torch.compile is what it uses)
                        self._run_in_torch(f"pyrys cannot capture it ({why})")
                        return None
                    except ModelChangedError:  # a weight written while it compiled: torch runs this call,
                        self._came_again(key)  # the next compiles from the weights then (counted as seen)
                        return None
                    if program.writes:
                        written = ", ".join(re.sub(r"^inputs_(\d+)$", r"input \1", name.removeprefix("graph_state."))
                                            for name in program.writes)
                        self._writes_state = [i for i, name in self._state_names.items() if name in program.writes]
                        self._run_in_torch(f"the graph writes {written} in place, which a pyrys program would not")
                        return None
                    if program._first.captured.state_views:
                        self._run_in_torch("it returns module state or a view of it (a buffer's slice), which eager "
                                           "returns as the state's own memory and a pyrys program as a copy: the "
                                           "code after it may write through it")
                        return None
                    if weights.shapes is None:
                        limit = self.options.get("max_shapes", DEFAULT_MAX_SHAPES)
                        weights.shapes = ShapeCache(limit, key, {key: program})
                        with self._seeing:  # new weights: their shapes' compiles are not recompiles
                            self._compiled_keys.clear()
                            self._recompiles = 0
                    else:
                        weights.shapes.put(key, program)
        return program

    def _optimize(self, inputs: tuple, scalars: dict, state: dict) -> OptimizedModule:
        gm, scalars = _unwrapped(self.gm, self.wrapped, scalars)
        module = TorchCompileGraph(gm, self.inputs, state, scalars).train(self.training)
        self._state_names = {i: f"{owner}.{name}" for i, (owner, name) in module._paths.items()}
        options = self.options
        if options.get("dump_dir"):  # each graph's (and shape's, and weights') graphs in a folder of their own
            options = {**options, "dump_dir": str(Path(options["dump_dir"]) / f"graph{self.number}_{next(self._compiles)}")}
        with torch.no_grad():
            program = optimize(module, inputs, **options)
        shapes = ", ".join(str(tuple(x.shape)) for x in inputs if isinstance(x, torch.Tensor))
        for note in program.notes:
            LOG.info("pyrys, a torch.compile graph on inputs %s: %s", shapes, note)
        if program.numerics is not None:
            LOG.info("pyrys numerics of a torch.compile graph on inputs %s:\n%s", shapes, program.numerics.render())
        return program

    def _came_again(self, key: tuple) -> bool:
        """Whether the shape ``key`` (no program yet) came among the graph's last ``max_shapes`` new shapes
        before; if not, it is counted among them now.  With ``max_shapes=1`` no shape but the first keeps a
        program: the others always run in torch (a compile would be dropped at once).  Shapes that cycle past
        ``max_shapes`` (9 batch sizes taking turns) would be compiled, dropped and compiled again forever:
        after ``max_shapes`` such recompiles, a shape compiled before runs in torch."""
        limit = self.options.get("max_shapes", DEFAULT_MAX_SHAPES)
        if limit <= 1:
            return False
        with self._seeing:
            if key in self._new_keys:
                del self._new_keys[key]
                if key in self._compiled_keys:  # dropped since: more shapes come back than are kept
                    if self._recompiles >= limit:
                        return False  # enough compiles thrown away: it runs in torch from now on
                    self._recompiles += 1
                self._compiled_keys[key] = None
                while len(self._compiled_keys) > 64 * limit:
                    self._compiled_keys.popitem(last=False)
                return True
            self._new_keys[key] = None
            if len(self._new_keys) > limit:
                self._new_keys.popitem(last=False)
            return False

    def _bound_wrapped_values(self, values: tuple) -> None:
        """Numbers that take a new value call after call (a random draw, a counter) would compile on every
        call: past :data:`MAX_WRAPPED_VALUES` values the graph runs in torch."""
        if values in self._wrapped_seen:
            return
        with self._seeing:  # not the compile lock: a call whose values were seen never waits for a compile
            self._wrapped_seen.add(values)
            if len(self._wrapped_seen) > MAX_WRAPPED_VALUES and not self.runs_in_torch:
                self._run_in_torch(f"its number inputs took more than {MAX_WRAPPED_VALUES} values, each a compile")

    def _run_in_torch(self, why: str) -> None:
        """This graph runs in torch as dynamo gave it, from now on: torch.compile keeps a graph's in-place writes
        to its inputs and module state (a counter, a cache, BatchNorm's statistics in training), which a pyrys
        program drops, and some graphs torch.export cannot capture."""
        self.runs_in_torch = f"{why}: it runs in torch"
        LOG.warning("pyrys (torch.compile): %s", self.runs_in_torch)

    def _grad_in_torch(self, args: tuple) -> bool:
        """Whether this call records autograd for inputs that require grad: then torch runs it (gradients
        w.r.t. the inputs are what the caller wants); parameters that require grad alone get the program,
        whose outputs carry no autograd graph, noted once."""
        if not torch.is_grad_enabled():
            return False
        if any(isinstance(args[i], torch.Tensor) and args[i].requires_grad for i in self.inputs) or \
                any(args[i].requires_grad for i in self._unowned_parameters):
            self._note_grad("inputs that require grad (or parameters passed as arguments: torch.func.functional_call), "
                            "in grad mode: torch runs the graph, so that gradients reach them")
            return True
        if not self._grad_noted and any(args[i].requires_grad for i in self.state):  # scanned until noted once
            self._note_grad("parameters that require grad, in grad mode: the program's outputs carry no "
                            "autograd graph (pyrys compiles for inference; call under torch.no_grad() or "
                            "torch.inference_mode(), or train with another backend)")
        return False

    def _in_torch(self, args: tuple):
        """The graph run as dynamo gave it; where it writes state (what its captured program said it writes, or,
        not captured, a graph that trains a BatchNorm), noted for the graphs that froze it (compile_weights.py)."""
        outputs = self.gm(*args)
        written = self._writes_state or (self._buffers if self.training else ())
        if written:
            note_state_written([args[i] for i in written])
        return outputs

    def _note_grad(self, what: str) -> None:
        if not self._grad_noted:
            self._grad_noted = True
            LOG.warning("pyrys (torch.compile): a graph called with %s", what)

    def __call__(self, *args):
        if not self.runs_in_torch and self._grad_in_torch(args):
            return self._in_torch(args)
        weights = None if self.runs_in_torch else self._weights.of(args)
        if weights is None and not self.runs_in_torch:
            self._run_in_torch(f"its parameters or buffers changed at nearly every call, more than {compile_weights.MAX_CHANGES} "
                               "times, each a compile (written, replaced, or a model of its class deleted and "
                               "another built)")
        program = None if self.runs_in_torch else self._compile(list(args), weights)
        if program is None:
            return self._in_torch(args)
        with torch.no_grad():
            outputs = program(*[args[i] for i in self.inputs])
        return _laid_out(outputs, self.layouts) if self.layouts else outputs


CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # by rank


def _output_layouts(gm: fx.GraphModule) -> dict[int, torch.memory_format]:
    """``{output position: memory format}`` for each output dynamo's trace has channels-last and not
    contiguous (a channels-last image's conv): a program's outputs are contiguous (README, "Memory layout"),
    and code after a graph break that views eager's layout failed on them (a helper's find).  Only what the
    trace's strides say for certain (a symbolic one that may be either: left as the program gives it)."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    (output,) = [node for node in gm.graph.nodes if node.op == "output"]
    values = output.args[0] if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    layouts = {}
    for position, node in enumerate(values):
        val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
        layout = CHANNELS_LAST.get(val.dim()) if isinstance(val, torch.Tensor) else None
        if layout is not None and guard_or_false(val.is_contiguous(memory_format=layout)) \
                and not guard_or_false(val.is_contiguous()):
            layouts[position] = layout
    return layouts


def _laid_out(outputs, layouts: dict[int, torch.memory_format]):
    """``outputs`` (a tuple or list, as dynamo's graph returns them) with those at ``layouts``' positions in
    their memory format (a copy where they are not already); one tensor as output 0."""
    if isinstance(outputs, torch.Tensor):
        return outputs.contiguous(memory_format=layouts[0]) if 0 in layouts else outputs
    laid = [y.contiguous(memory_format=layouts[i]) if i in layouts and isinstance(y, torch.Tensor) else y
            for i, y in enumerate(outputs)]
    return type(outputs)(laid) if isinstance(outputs, tuple) else laid


def register_backend() -> None:
    """Make ``"pyrys"`` known to dynamo exactly once, however pyrys is reached.

    Dynamo finds the ``torch_dynamo_backends`` entry point itself: ``lookup_backend("pyrys")``
    records it in its registry's ``_BACKENDS``, loads it (which imports pyrys, and so runs
    this function) and only then registers the function, refusing a name registered twice.
    So pyrys registers itself only when dynamo is loaded and does not know the name yet
    (``import torch._dynamo; import pyrys`` with entry points not yet read, or pyrys run
    from a source tree without its entry point installed); otherwise it leaves it to dynamo.
    """
    if "torch._dynamo" not in sys.modules:
        return  # dynamo reads the entry point when it loads
    from torch._dynamo.backends import registry

    if BACKEND_NAME not in registry._BACKENDS:
        registry.register_backend(pyrys_backend, name=BACKEND_NAME)
