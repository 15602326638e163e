"""Symbolic dimensions: a graph captured once for every batch size and sequence length.

``torch.export`` with dynamic shapes gives values whose dims are ``SymInt`` (``s0``), tied to
one ``ShapeEnv`` that records what the trace assumed about them (*guards*: ``Ne(s1, 1)``)
and their ranges.  pyrys keeps that fake mode on the graph (:func:`set_fake_mode`), so the
passes propagate shapes under it: a decision a pass takes on a symbolic dim (a broadcast
check, a view's contiguity) adds its guard to the same record.  A graph is then valid for an
input shape exactly when binding its symbols to that shape's dims meets every range and guard
(:func:`bind_symbols`); ``passes/specialize.py`` builds the concrete graph a backend lowers.

Reading a ``SymInt`` with ``int()`` would add a guard that pins it to the example's value;
code that only shows or compares shapes reads :func:`hint` (the example's value) instead.
"""
from __future__ import annotations

import contextlib
import math
import itertools
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.fx.experimental._config as symbolic_shapes_config
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_flatten
from torch.utils._sympy.numbers import int_oo

from pyrys.ir.graph import user_inputs

aten = torch.ops.aten

FAKE_MODE_KEY = "pyrys_fake_mode"
GUARDS_KEY, RANGES_KEY = "pyrys_guards", "pyrys_ranges"  # a loaded graph's (``saving/symbolic.py``)
UNHELD_GUARDS_KEY = "pyrys_unheld_guards"  # guards of its shape env the graph does not hold to (below)
SQUEEZED_KEY = "pyrys_squeezed_sizes"  # what its squeezes of symbolic dims assume (:func:`hold_squeezed_sizes`)
PINNED_KEY = "pyrys_symbols_at_one"  # :func:`pinned_dims_differ`'s, found once per graph


def sizes_kept_symbolic(mode: FakeTensorMode | None = None):
    """The context in which torch reasons about sizes 0 and 1 like any other ("size-oblivious"): export
    keeps a batch-1 dim symbolic, and propagation adds no guard such as ``Eq(s0, 1)`` from a layout
    heuristic.  Only for a graph with symbolic shapes (``mode`` None or one with a ``ShapeEnv``).
    The option is torch's, process-wide: it is held only while pyrys captures or propagates shapes."""
    if mode is not None and mode.shape_env is None:
        return contextlib.nullcontext()
    try:
        return symbolic_shapes_config.patch(backed_size_oblivious=True)
    except (AttributeError, TypeError):  # an older torch without the option: 0/1 are specialized
        return contextlib.nullcontext()


def propagating(mode: FakeTensorMode):
    """The context of shape propagation (``ir/meta.py``): size-oblivious, and recording no guard.

    Propagation only computes what each op gives; a guard torch takes on the way (a conv's
    output-layout heuristic guards ``s0 < 16``) would pin every later shape to the example's
    side of it.  What a *pass decides* from the shapes still records its guards."""
    stack = contextlib.ExitStack()
    stack.enter_context(sizes_kept_symbolic(mode))
    if mode.shape_env is not None:
        stack.enter_context(mode.shape_env.suppress_guards())
    return stack


def keeps_shape(shape, other) -> bool:
    """Whether broadcasting ``other`` against ``shape`` gives ``shape`` for every value of their symbolic
    dims (``torch.broadcast_shapes(shape, other) == shape``, decided without a guard: a symbolic dim
    counts only where it is the very same expression)."""
    shape, other = dims_key(shape), dims_key(other)
    if len(other) > len(shape):
        return False
    return all(o == 1 or o == s for s, o in zip(shape[len(shape) - len(other):], other))


def known_contiguous(t: torch.Tensor) -> bool:
    """``t.is_contiguous()`` where that is known for every value of its symbolic dims (no guard);
    False where it is not known."""
    if not any(isinstance(d, torch.SymInt) for d in (*t.shape, *t.stride())):
        return t.is_contiguous()
    expected: Any = 1
    for size, stride in reversed(list(zip(t.shape, t.stride()))):
        if not (isinstance(size, int) and size == 1) and not statically_known_true(stride == expected):
            return False
        expected = expected * size
    return True


def set_fake_mode(gm: fx.GraphModule, mode: FakeTensorMode) -> None:
    """Keep ``mode`` (and its ``ShapeEnv``) as the one ``gm``'s symbolic shapes belong to."""
    gm.meta[FAKE_MODE_KEY] = mode


def graph_fake_mode(gm: fx.GraphModule | None) -> FakeTensorMode:
    """The fake mode of ``gm``'s symbolic shapes; a fresh one for a graph of concrete shapes."""
    mode = gm.meta.get(FAKE_MODE_KEY) if gm is not None else None
    return mode if mode is not None else FakeTensorMode(allow_non_fake_inputs=True)


def is_symbolic(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s shapes are symbolic (captured for every shape)."""
    return gm.meta.get(FAKE_MODE_KEY) is not None


def hint(dim: Any) -> Any:
    """The example's value of ``dim`` (an int stays as it is); never adds a guard."""
    if isinstance(dim, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return dim.node.hint
    return dim


def dims_key(dims) -> tuple:
    """Sizes or strides in a form to compare without adding a guard: a symbolic one as its expression."""
    return tuple(d.node.expr if isinstance(d, torch.SymInt) else d for d in dims)


# arithmetic on sizes in a graph with symbolic shapes (``mul(s1, 32)``), by name
SIZE_ARITHMETIC: dict[str, Any] = {f.__name__: f for f in (
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod, operator.neg,
    operator.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_float, torch.sym_int, torch.sym_ite, torch.sym_sqrt,
    math.ceil, math.floor, math.trunc)}  # (timm's MobileViT: ``math.ceil(H / 2) * 2`` of a symbolic height)


def is_symbolic_scalar_op(target: Any) -> bool:
    """Arithmetic on sizes in a symbolic graph: ``operator.mul(s0, 32)``, ``torch.sym_max`` ..."""
    return SIZE_ARITHMETIC.get(getattr(target, "__name__", None)) is target


def view_shape(shape) -> list[int] | None:
    """A size argument for ``view`` that gives ``shape`` on any input of the right number of elements:
    the ints, with ``-1`` for the one symbolic dim; None when more than one dim is symbolic."""
    dims = list(shape)
    symbolic = [i for i, d in enumerate(dims) if isinstance(d, torch.SymInt)]
    if len(symbolic) > 1:
        return None
    return [-1 if i in symbolic else int(d) for i, d in enumerate(dims)]


def input_dims(gm: fx.GraphModule) -> list[tuple[str, int, sympy.Expr]]:
    """``(input name, dim, expression)`` of every symbolic dim of the graph's user inputs."""
    dims = []
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, FakeTensor):
            exprs = [(i, d.node.expr) for i, d in enumerate(val.shape) if isinstance(d, torch.SymInt)]
            dims += [(node.name, i, expr) for i, expr in exprs if expr.free_symbols]
    return dims


def describe_dims(gm: fx.GraphModule) -> str:
    """``x dim 0 (s77), x dim 2 (s53)``: which input dims the graph keeps symbolic."""
    return ", ".join(f"{name} dim {i} ({expr})" for name, i, expr in input_dims(gm))


def fixed_dims_differ(gm: fx.GraphModule, inputs: list) -> str | None:
    """Why ``inputs`` (``gm``'s flat user inputs) differ from ``gm`` in a dim it holds fixed (or in rank),
    or None where every fixed dim matches: then only a symbol's range or guard can exclude them."""
    for node, value in zip(user_inputs(gm.graph), inputs):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        if why := _fixed_dim_differs(node, val, value):
            return why
    return None


def differing_fixed_dims(gm: fx.GraphModule, inputs: list) -> dict[tuple[int, int], int]:
    """The size ``gm`` holds fixed, by ``(position, dim)``, of every dim ``inputs`` (its flat user inputs) differ in."""
    return {(position, i): fixed for position, (node, value) in enumerate(zip(user_inputs(gm.graph), inputs))
            for val in [node.meta.get("val")]
            if isinstance(val, torch.Tensor) and isinstance(value, torch.Tensor) and val.dim() == value.dim()
            for i, fixed, _ in _fixed_sizes_differing(val, value)}


def _fixed_sizes_differing(val: torch.Tensor, value: torch.Tensor) -> list[tuple[int, int, int]]:
    """``(dim, size held fixed, size given)`` of every dim ``val`` holds fixed that ``value`` (of its rank) differs in."""
    return [(i, int(dim), size) for i, (dim, size) in enumerate(zip(val.shape, value.shape))
            if not isinstance(dim, torch.SymInt) and int(dim) != size]


def _fixed_dim_differs(node: fx.Node, val: torch.Tensor, value: torch.Tensor) -> str | None:
    if val.dim() != value.dim():
        return f"{node.name} has {value.dim()} dims, the graph {val.dim()}"
    differing = _fixed_sizes_differing(val, value)
    if not differing:
        return None
    i, fixed, size = differing[0]
    return f"{node.name} dim {i} is {size}; the graph holds it fixed at {fixed}"


def bind_symbols(gm: fx.GraphModule, inputs: list, explain: bool = False) -> tuple[dict, str | None]:
    """Bind the symbols of ``gm``'s user inputs to the dims of ``inputs`` (its flat user inputs, in
    order); ``(bindings, None)`` when every range and guard holds, else ``({}, why not)``; ``explain``: a
    broken guard's why names the nearest sizes it holds for (which costs up to milliseconds)."""
    mode = gm.meta[FAKE_MODE_KEY]
    env = mode.shape_env
    placeholders = user_inputs(gm.graph)
    bindings: dict[sympy.Symbol, sympy.Integer] = {}
    checks: list[tuple[sympy.Expr, int, str]] = []
    for node, value in zip(placeholders, inputs):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(value, torch.Tensor):
            continue
        if why := _fixed_dim_differs(node, val, value):
            return {}, why
        for i, (dim, size) in enumerate(zip(val.shape, value.shape)):
            where = f"{node.name} dim {i}"
            if not isinstance(dim, torch.SymInt):
                continue
            expr = env.replace(dim.node.expr)
            if isinstance(expr, sympy.Symbol) and expr not in bindings:
                bindings[expr] = sympy.Integer(size)
            else:
                checks.append((expr, size, where))
    _solve_derived(checks, bindings)
    for expr, size, where in checks:
        value = _evaluate(expr, bindings)
        if getattr(value, "free_symbols", None):
            return {}, (f"{where} is {size}, where the graph has {expr}, which gives {size} for no whole "
                        f"{', '.join(map(str, sorted(value.free_symbols, key=str)))}")
        if value != size:
            return {}, f"{where} is {size}, where the graph has {expr} = {value}"
    why = _refused(gm, bindings, explain)
    return ({}, why) if why is not None else (bindings, None)


def pinned_dims_differ(gm: fx.GraphModule, inputs: list) -> str | None:
    """Why ``inputs`` (``gm``'s flat user inputs) do not fit ``gm`` at dims its example had of size 1 that it
    keeps symbolic (a decoder step's one query token), or None.  A trace from such an example may hold for 1
    alone (it assumed ``Eq(s27, 1)``: a range ``[1, 2]``), or have given one symbol to every dim of size 1
    (torch's duck sizing: a mask's 1 and the length's), which other inputs give sizes of their own; such a
    graph fits them no more than one holding those dims fixed at 1 would."""
    if PINNED_KEY not in gm.meta:
        gm.meta[PINNED_KEY] = _symbols_at_one(gm)
    bindings, at_one = gm.meta[PINNED_KEY]
    placeholders = user_inputs(gm.graph)
    for symbol, where in at_one.items():
        sizes = {(position, i): inputs[position].shape[i] for position, i in where
                 if position < len(inputs) and isinstance(inputs[position], torch.Tensor)
                 and inputs[position].dim() > i}
        given = set(sizes.values())
        refused = len(given) == 1 and given != {1} and _refused(gm, {**bindings, symbol: sympy.Integer(*given)})
        if len(given) > 1 or refused:
            (position, i), size = next((at, size) for at, size in sizes.items() if size != 1)
            return (f"{placeholders[position].name} dim {i} is {size}; the graph, captured with 1 there, "
                    f"holds for 1 alone")
    return None


def _symbols_at_one(gm: fx.GraphModule) -> tuple[dict, dict[sympy.Symbol, list[tuple[int, int]]]]:
    """The example's bindings of ``gm``'s symbols (from the hints of its inputs' sizes), and the ``(position,
    dim)`` of every input dim that is a symbol of value 1 there, by symbol (none where a size has no hint)."""
    env, at_one = gm.meta[FAKE_MODE_KEY].shape_env, {}
    example = []
    for position, node in enumerate(user_inputs(gm.graph)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            example.append(None)
            continue
        sizes = [hint(d) for d in val.shape]
        if any(size is None for size in sizes):
            return {}, {}
        example.append(torch.empty(sizes, dtype=val.dtype, device="meta"))
        for i, (dim, size) in enumerate(zip(val.shape, sizes)):
            expr = env.replace(dim.node.expr) if isinstance(dim, torch.SymInt) and size == 1 else None
            if isinstance(expr, sympy.Symbol):
                at_one.setdefault(expr, []).append((position, i))
    bindings, why = bind_symbols(gm, example)
    return (bindings, at_one) if why is None else ({}, {})


def _symbol_at(gm: fx.GraphModule, symbol) -> str:
    """``input_ids dim 1 (s53)``: the first input dim that is ``symbol``, or the symbol alone."""
    for node in user_inputs(gm.graph):
        val = node.meta.get("val")
        for i, dim in enumerate(val.shape if isinstance(val, torch.Tensor) else ()):
            if isinstance(dim, torch.SymInt) and dim.node.expr == symbol:
                return f"{node.name} dim {i} ({symbol})"
    return str(symbol)


def _refused(gm: fx.GraphModule, bindings: dict, explain: bool = False) -> str | None:
    """Which of the graph's ranges or guards its symbols bound so break, or None where all hold."""
    ranges, env = ranges_of(gm), gm.meta[FAKE_MODE_KEY].shape_env
    for symbol, value in bindings.items():
        lower, upper = ranges.get(symbol, (0, None))
        if value < lower or (upper is not None and value > upper):
            return f"{_symbol_at(gm, symbol)} = {value} is outside its range [{lower}, {upper}]"
    for guard in guards_of(gm):
        expr = env.replace(guard)
        if _evaluate(expr, bindings) is not sympy.true:
            return (f"the graph assumes {expr}, which {_bound_text(gm, expr, bindings)} breaks"  # in the input symbols
                    f"{_holding_text(gm, expr, bindings) if explain else ''}")
    return None


def _solve_derived(checks: list[tuple[sympy.Expr, int, str]], bindings: dict) -> None:
    """Bind each symbol seen only inside an expression (a derived dim, ``2*s0``: ``torch.export``'s
    ``2 * Dim("h")``) from the size it must give: ``expr(s) = size`` solved for ``s``, where exactly one
    non-negative integer does; what stays unsolved is refused by the checks."""
    solved = True
    while solved:
        solved = False
        for expr, size, _ in checks:
            unbound = [s for s in expr.free_symbols if s not in bindings]
            if len(unbound) != 1:
                continue
            try:
                roots = sympy.solve(sympy.Eq(expr.xreplace(bindings), size), unbound[0])
            except (NotImplementedError, TypeError, ValueError):
                continue
            whole = [r for r in roots if r.is_integer and r.is_nonnegative]
            if len(whole) == 1:
                bindings[unbound[0]] = sympy.Integer(whole[0])
                solved = True


def guards_of(gm: fx.GraphModule) -> list[sympy.Basic]:
    """What the graph assumes about its sizes: its ``ShapeEnv``'s guards (a loaded graph: the saved ones),
    but those :func:`unhold_size_guards` set aside."""
    if GUARDS_KEY in gm.meta:
        return list(gm.meta[GUARDS_KEY])
    unheld = gm.meta.get(UNHELD_GUARDS_KEY, ())
    return [guard.expr for guard in gm.meta[FAKE_MODE_KEY].shape_env.guards
            if guard.expr not in unheld] + list(gm.meta.get(SQUEEZED_KEY, ()))


def hold_squeezed_sizes(gm: fx.GraphModule) -> None:
    """A squeeze of a symbolic dim removes it where it is 1 alone, which the graph, traced where it is not,
    does not follow (``x.squeeze(0).softmax(0)`` at a batch of 1 gave ones): the graph holds for that size
    not 1 (``Ne(s, 1)`` among :func:`guards_of`), and a size of 1 is captured on its own (``size_one.py``)
    or refused. Read before the passes, which turn a squeeze into a view."""
    env, held = gm.meta[FAKE_MODE_KEY].shape_env, []
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) is not aten.squeeze:
            continue
        val = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        if not isinstance(val, torch.Tensor):
            continue
        dims = node.args[1] if len(node.args) > 1 else range(val.dim())
        for d in [dims] if isinstance(dims, int) else dims:
            size = val.shape[d]
            expr = env.replace(size.node.expr) if isinstance(size, torch.SymInt) else None
            if expr is not None and not expr.is_number:
                held.append(sympy.Ne(expr, 1))
    if held:
        gm.meta[SQUEEZED_KEY] = tuple(dict.fromkeys(held))


def unhold_size_guards(gm: fx.GraphModule, guards: list[sympy.Basic], ranges: dict,
                       excluded: frozenset[int] | None) -> None:
    """Set aside those of ``guards`` that only exclude a size ``ranges`` (a program's promise) allow and the
    program's own guards do not (``excluded``: the sizes they exclude; None: unknown, then size 1 alone):
    ``Ne(s, 1)`` where ``s`` may be 1. ``run_decompositions`` of an ExportedProgram read back by
    ``torch.export.load`` adds them (its shape env then ranges from 1 where export's ranged from 2, and the
    retrace guards what export's size-oblivious trace did not), which the program itself does not hold to.
    A branch on a size (``Ne(s, 3)``, in the program's guards as text) is held: its graph is not that size's."""
    def allowed(symbol: sympy.Symbol, size: int) -> bool:
        """Whether the program allows ``symbol`` to be ``size``, which a guard excludes."""
        if (excluded is None and size != 1) or (excluded is not None and size in excluded):
            return False
        lower, upper = ranges.get(symbol, (None, None))
        return lower is not None and lower <= size and (upper is None or size <= upper)

    unheld = []
    for guard in guards:
        if isinstance(guard, sympy.Ne) and isinstance(guard.lhs, sympy.Symbol) and guard.rhs.is_Integer:
            size_held = allowed(guard.lhs, int(guard.rhs))
        else:
            ones = _sizes_at_one_excluded(guard, ranges)
            size_held = bool(ones) and all(allowed(symbol, 1) for symbol in ones)
        if size_held:
            unheld.append(guard)
    if unheld:
        gm.meta[UNHELD_GUARDS_KEY] = tuple(unheld)


_TRIED_SIZES = (1, 2, 3, 4, 5, 6, 8, 12)


def _sizes_at_one_excluded(guard: sympy.Basic, ranges: dict) -> set[sympy.Symbol]:
    """The symbols ``guard`` excludes from 1 where it holds for every size of at least 2 (as torch.export's
    size-oblivious trace took them) and fails only where some size is 1 (``Ne(s0*s1, s1)``,
    ``Ne(Mod(s1, s0*s1), 0)``, ``Ne(s0*s1, 1)``): tried on the sizes 1 to 12 its ranges allow (of at most three
    symbols), and where its sides differ by a polynomial, that difference proven non-zero for sizes from 2
    (``Ne(s0*s1, s2)``, which the sizes tried may miss, is not); empty for any other guard."""
    symbols = sorted(guard.free_symbols, key=str)
    if not symbols or len(symbols) > 3 or not isinstance(guard, sympy.Ne) or _differs_from_two(guard, symbols) is False:
        return set()
    at_one: set[sympy.Symbol] = set()
    for sizes in itertools.product(_TRIED_SIZES, repeat=len(symbols)):
        if not all(_within(ranges.get(symbol), size) for symbol, size in zip(symbols, sizes)):
            continue
        holds = guard.xreplace({symbol: sympy.Integer(size) for symbol, size in zip(symbols, sizes)})
        if holds is sympy.true:
            continue
        if holds is not sympy.false or 1 not in sizes:
            return set()  # not decided by sizes alone, or fails where no size is 1: a guard the graph holds to
        at_one.update(symbol for symbol, size in zip(symbols, sizes) if size == 1)
    return at_one


def _differs_from_two(guard: sympy.Ne, symbols: list[sympy.Symbol]) -> bool | None:
    """Whether ``lhs - rhs`` is non-zero for every size of at least 2, where it is a polynomial: each size
    written ``2 + t`` (``t >= 0``), the expanded difference positive or negative by its terms' signs; None
    for a difference that is no polynomial (``Mod``: the sizes tried decide)."""
    above_two = {s: sympy.Symbol(f"t_{s}", integer=True, nonnegative=True) for s in symbols}
    difference = sympy.expand((guard.lhs - guard.rhs).xreplace({s: t + 2 for s, t in above_two.items()}))
    if not difference.is_polynomial(*above_two.values()):
        return None
    return bool(difference.is_positive or difference.is_negative)


def _within(bounds: tuple | None, size: int) -> bool:
    lower, upper = bounds or (None, None)
    return (lower is None or lower <= size) and (upper is None or size <= upper)


def set_ranges(gm: fx.GraphModule, ranges: dict[sympy.Symbol, tuple]) -> None:
    """Hold ``symbol -> (lower, upper)`` as the graph's ranges (``torch.export``'s promise, or a save's), those of
    sizes: a float symbol's ``(-oo, oo)`` (``zuf0``: a float torch.export could not specialize, YOLO's anchors)
    is no size's (``int(-oo)`` raised, and the capture with symbolic sizes was given up)."""
    gm.meta[RANGES_KEY] = {symbol: (int(lower), None if upper in (int_oo, sympy.oo) else int(upper))
                           for symbol, (lower, upper) in ranges.items()
                           if lower not in (-int_oo, -sympy.oo) and getattr(lower, "is_integer", True)}


def ranges_of(gm: fx.GraphModule) -> dict[sympy.Symbol, tuple]:
    """``symbol -> (lower, upper)`` (upper None: unbounded) of the graph's sizes."""
    if RANGES_KEY in gm.meta:
        return dict(gm.meta[RANGES_KEY])
    env = gm.meta[FAKE_MODE_KEY].shape_env
    return {symbol: (bounds.lower, None if bounds.upper in (int_oo, sympy.oo) else bounds.upper)
            for symbol, bounds in env.var_to_range.items()}


def _evaluate(expr: sympy.Expr, bindings: dict) -> Any:
    """``expr`` at ``bindings``; NaN where it divides by zero there (a chunk's ``FloorDiv(s, CeilDiv(s, 3))``
    at s = 0, tried for the nearest size a guard holds for: a bare ZeroDivisionError): no guard holds then,
    no dim matches."""
    try:
        value = expr.xreplace(bindings)
    except ZeroDivisionError:
        return sympy.nan
    if isinstance(value, sympy.Integer):
        return int(value)
    return value


def _bound_text(gm: fx.GraphModule, expr: sympy.Expr, bindings: dict) -> str:
    used = sorted(expr.free_symbols & set(bindings), key=str)
    return ", ".join(f"{_symbol_at(gm, s)} = {bindings[s]}" for s in used) or "this shape"


HOLDING_SEARCH = 256  # sizes tried each way from the one refused, for the nearest that a guard holds for


def _holding_text(gm: fx.GraphModule, expr: sympy.Expr, bindings: dict) -> str:
    """Where a guard of one symbol breaks, the nearest sizes below and above within its range that it holds
    for (a table of 32 positions: ``Eq(s, Min(32, s))`` holds up to 32), as text; "" where it has more symbols
    or none is near."""
    used = list(expr.free_symbols & set(bindings))
    if len(used) != 1:
        return ""
    symbol, value = used[0], int(bindings[used[0]])
    lower, upper = ranges_of(gm).get(symbol, (0, None))

    def holds(size: int) -> bool:
        return (lower <= size and (upper is None or size <= upper)
                and _evaluate(expr, {**bindings, symbol: sympy.Integer(size)}) is sympy.true)

    below = next((size for size in range(value - 1, max(value - HOLDING_SEARCH, -1), -1) if holds(size)), None)
    above = next((size for size in range(value + 1, value + HOLDING_SEARCH) if holds(size)), None)
    sizes = [f"{size}" for size in (below, above) if size is not None]
    return f" (the nearest {_symbol_at(gm, symbol)} it holds for: {' and '.join(sizes)})" if sizes else ""


def rows_dim(gm: fx.GraphModule) -> sympy.Expr | None:
    """The symbol that is dim 0 of every user input and every output of ``gm`` (its rows, which calls
    can be joined along), else None: a fixed dim 0, another dim 0 somewhere (a transposed output, a
    per-batch statistic), or an input or output that is not a tensor."""
    output = next(node for node in reversed(gm.graph.nodes) if node.op == "output")
    values = [node.meta.get("val") for node in user_inputs(gm.graph)]
    values += [a.meta.get("val") if isinstance(a, fx.Node) else a for a in tree_flatten(output.args[0])[0]]
    dims = {_dim0(value) for value in values}
    if len(dims) != 1:
        return None
    (dim,) = dims
    return dim if isinstance(dim, sympy.Symbol) else None


def rows_dim_reason(gm: fx.GraphModule) -> str:
    """Why :func:`rows_dim` finds no rows in ``gm`` ("" where it does)."""
    inputs = [_dim0(node.meta.get("val")) for node in user_inputs(gm.graph)]
    if rows_dim(gm) is not None:
        return ""
    if any(not isinstance(dim, sympy.Symbol) for dim in inputs):
        return "an input's dim 0 is a fixed size in the captured graph, or the input is not a tensor"
    if len(set(inputs)) > 1:
        return (f"the inputs' dims 0 are separate symbols in the captured graph ({', '.join(map(str, inputs))}): "
                "no op ties them to one size, so they cannot be read as the same rows")
    return "an output's dim 0 is not the inputs' rows (a fixed size, another size, or not a tensor)"


def _dim0(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and isinstance(value.shape[0], torch.SymInt):
        return value.shape[0].node.expr
    return None
