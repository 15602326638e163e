"""The reference backend: the optimized graph run with plain torch ops.

It runs anywhere and is the correctness oracle for the tests.  Module state that was
not frozen is passed in from the values captured with the graph.  Nothing it keeps is
ever returned: an output that shares bytes with a constant or with module state (a
constant output, or a view of one) is copied.
"""
from __future__ import annotations

import statistics
import threading
import time

import torch
import torch.fx as fx

from pyrys.backends.options import BackendOptions
from pyrys.backends.program import constant_for_caller
from pyrys.backends.threads import ThreadPinned
from pyrys.ir.finite import all_finite
from pyrys.ir.graph import copy_graph, named_constants, state_ref
from pyrys.ir.released import is_released, values_of
from pyrys.ir.ops import PYTHON_IMPLS
from pyrys.ir.printer import format_node
from pyrys.quantization.nonfinite import float_path, rounds_activations


class ReferenceProgram:
    """Calls the graph module with state values and user inputs in placeholder order.

    It holds nothing a call writes to, so one program serves any number of threads at once.
    pyrys's own ops run as their plain Python functions (see ``PYTHON_IMPLS``).  An int8 graph's call whose
    floating-point inputs hold NaN or infinities runs its float path (:mod:`pyrys.quantization.nonfinite`),
    made at the first such call."""

    def __init__(self, gm: fx.GraphModule, float_path_for_nonfinite: bool = True):
        restored = with_values(gm)
        self.restored = restored is not gm  # it holds a copy with released constants restored: discard frees it
        gm = restored
        self.gm = without_dispatch(gm)
        self.source = gm  # the graph as printed: profile's step texts
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.state = {i: state_ref(n).value for i, n in enumerate(placeholders) if state_ref(n)}
        self.arity = len(placeholders)
        self.strides = [_traced_strides(n) for i, n in enumerate(placeholders) if i not in self.state]
        kept = [*gm.buffers(), *gm.parameters(), *[v for v in self.state.values() if isinstance(v, torch.Tensor)]]
        self.internal = frozenset(p for p in _storages(kept) if p)
        self.weight_bytes = held_bytes(gm)
        user = [n for i, n in enumerate(placeholders) if i not in self.state]
        rounds = float_path_for_nonfinite and rounds_activations(gm)
        self.float_inputs = [i for i, n in enumerate(user) if _is_floating(n)] if rounds else []
        self._float_path: ReferenceProgram | None = None
        self._building = threading.Lock()

    def __call__(self, inputs: list) -> list:
        if self.float_inputs and not all_finite(inputs, self.float_inputs):
            return self.float_path(inputs)
        args = self.arguments(inputs)
        with torch.no_grad():  # (forward, not the module's call: torch's wrapper of a graph module prints the
            # traceback of a failure to stderr, and callers measuring samples that may not fit catch it)
            return [self._owned(output) for output in self.gm.forward(*args)]

    def arguments(self, inputs: list) -> list:
        """The graph's arguments in placeholder order: module state, and the user's inputs as captured."""
        user = iter(map(_as_traced, inputs, self.strides))
        return [self.state[i] if i in self.state else next(user) for i in range(self.arity)]

    def _owned(self, output):
        if isinstance(output, torch.Tensor) and output.untyped_storage().data_ptr() in self.internal:
            return constant_for_caller(output)
        return output

    @property
    def float_path(self) -> "ReferenceProgram":
        """The graph with its activations in float (weights still rounded), for calls with NaN or infinities."""
        if self._float_path is None:
            with self._building:
                if self._float_path is None:
                    self._float_path = ReferenceProgram(float_path(self.source), float_path_for_nonfinite=False)
        return self._float_path

    def discard(self) -> None:
        """Let go of the graph's constants now, for a program made to run once (``self_check.py``): its graph
        module is a reference cycle, which only a full collection (0.2 s) would free, with them."""
        for module in [*self.gm.modules(), *(self.source.modules() if self.restored else ())]:
            module._buffers.clear()
            module._parameters.clear()
        self.state.clear()

    def __deepcopy__(self, memo: dict) -> "ReferenceProgram":
        return self  # stateless between calls: a copy may share it

    def describe(self) -> str:
        return "reference backend: the optimized graph run with torch ops"

    def profile(self, inputs: list, runs: int = 20) -> list[tuple[str, float]]:
        """Median microseconds of every op over ``runs`` calls, with the op's line of the graph."""
        timer, args = _NodeTimer(self.gm), self.arguments(inputs)
        with torch.no_grad():
            for _ in range(runs):
                timer.run(*args)
        texts = {node.name: format_node(self.source, node) for node in self.source.graph.nodes}
        return [(texts[name], statistics.median(seconds) * 1e6) for name, seconds in timer.seconds.items()]

    def activations(self, inputs: list) -> tuple[list, dict[str, torch.Tensor]]:
        """The outputs, and the value of every op node that makes a tensor, by node name (for numerics)."""
        recorder, args = _ValueRecorder(self.gm), self.arguments(inputs)
        with torch.no_grad():
            outputs = recorder.run(*args)
        return [self._owned(output) for output in outputs], recorder.values

    def observe(self, inputs: list, visit) -> list:
        """The outputs; ``visit(name, tensor)`` sees every tensor an input or op node makes, when it is made
        (for calibration: nothing is kept here)."""
        recorder, args = _ValueRecorder(self.gm, visit), self.arguments(inputs)
        with torch.no_grad():
            outputs = recorder.run(*args)
        return [self._owned(output) for output in outputs]

    def memory(self) -> dict[str, int]:
        """Bytes: the graph's constants; torch allocates each call's activations and frees them after."""
        return {"weights": self.weight_bytes, "packed_weights": 0, "activations": 0, "frames": 0}


class _NodeTimer(fx.Interpreter):
    """Runs a graph module node by node, recording the seconds each op takes."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.seconds: dict[str, list[float]] = {}

    def run_node(self, node: fx.Node):
        if node.op != "call_function":
            return super().run_node(node)
        start = time.perf_counter()
        result = super().run_node(node)
        self.seconds.setdefault(node.name, []).append(time.perf_counter() - start)
        return result


class _ValueRecorder(fx.Interpreter):
    """Runs a graph module node by node, keeping the tensor each op makes (or, with ``visit``, showing it
    ``visit(name, tensor)``, inputs' tensors too, and keeping nothing)."""

    def __init__(self, gm: fx.GraphModule, visit=None):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}
        self.visit = visit

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        if not isinstance(result, torch.Tensor):
            return result
        if self.visit is not None:
            if node.op in ("call_function", "placeholder"):
                self.visit(node.name, result)
        elif node.op == "call_function":
            self.values[node.name] = result
        return result


def _traced_strides(placeholder: fx.Node) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The shape and strides the graph was captured with for this input, where they are numbers."""
    value = placeholder.meta.get("val")
    if not isinstance(value, torch.Tensor) or not all(isinstance(s, int) for s in (*value.shape, *value.stride())):
        return None
    return tuple(value.shape), tuple(value.stride())


def _as_traced(value, traced: tuple[tuple[int, ...], tuple[int, ...]] | None):
    """``value`` laid out with the strides it was captured with (a copy where they differ): the captured graph's
    views (``flatten`` decomposed to ``view``) hold for those strides only, while a caller may pass any layout."""
    if traced is None or not isinstance(value, torch.Tensor) or tuple(value.shape) != traced[0]:
        return value
    shape, strides = traced
    if all(a == b for a, b, size in zip(value.stride(), strides, shape) if size > 1):
        return value
    if any(stride == 0 and size > 1 for stride, size in zip(strides, shape)):
        return value  # captured from an expanded tensor: one element per row, no layout to copy into
    return torch.empty_strided(shape, strides, dtype=value.dtype).copy_(value)


def _is_floating(placeholder: fx.Node) -> bool:
    value = placeholder.meta.get("val")
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _storages(tensors) -> dict[int, int]:
    """Storage address -> bytes, each storage once (stand-ins of released constants hold none)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if not t.is_meta}


def held_bytes(gm: fx.GraphModule) -> int:
    """Bytes of the constants and parameters ``gm`` holds as tensors (each storage once)."""
    return sum(_storages([*gm.buffers(), *gm.parameters()]).values())


def with_values(gm: fx.GraphModule, values=values_of) -> fx.GraphModule:
    """``gm``, or a copy of it whose released constants (:mod:`pyrys.ir.released`) hold their values again
    (``values(stand_in)``: a backend may give the plain copy it keeps)."""
    released = [(name, t) for name, t in named_constants(gm) if is_released(t)]
    if not released:
        return gm
    copied = fx.GraphModule(gm, copy_graph(gm.graph), gm.__class__.__name__)
    restored: dict[int, torch.Tensor] = {}  # one copy of a constant held under several names
    for name, tensor in released:
        if id(tensor) not in restored:
            restored[id(tensor)] = values(tensor)
        setattr(copied, name, restored[id(tensor)])
    return copied


def without_dispatch(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every pyrys op node calling its Python function directly (constants shared, not copied)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in graph.nodes:
        if node.op == "call_function" and node.target in PYTHON_IMPLS:
            node.target = PYTHON_IMPLS[node.target]
    return fx.GraphModule(gm, graph)


def compile_program(gm: fx.GraphModule, example_inputs: list, options: BackendOptions = BackendOptions(),
                    like=None):
    """The reference backend (``like``, another shape's program, has nothing to share here)."""
    program = ReferenceProgram(gm)
    return ThreadPinned(program, options.threads) if options.threads else program
