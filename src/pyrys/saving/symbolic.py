"""The symbolic sizes of a graph captured for every shape, as JSON: its inputs' dims, guards and ranges.

A saved module keeps the graph it specializes new shapes from (``optimized_module.py``), so a loaded one
takes new batch sizes and sequence lengths without ``torch.export``.  What the graph assumed
about its sizes is written as expression trees of named functions, never as code:

    Ne(s27, 1)          ->  {"f": "Ne", "a": [{"s": "s27"}, 1]}
    (s0 - 1)//2 + 1     ->  {"f": "Add", "a": [{"f": "FloorDiv", "a": [...]}, 1]}

and read back through a table of the sympy and torch functions that may appear
(:data:`FUNCTIONS`); anything else is a :class:`LoadError`.  At load the inputs get fresh symbols
(one per saved name), every node's shape is propagated from them, and :func:`bind_symbols
<pyrys.ir.symbolic.bind_symbols>` checks the saved guards and ranges.
"""
from __future__ import annotations

import inspect
from typing import Any

import sympy
import torch
import torch.fx as fx
import torch.utils._sympy.functions as torch_sympy
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
from torch.utils._sympy.numbers import int_oo

from pyrys.errors import LoadError, SaveError
from pyrys.ir.meta import refresh_meta
from pyrys.ir.symbolic import GUARDS_KEY, RANGES_KEY, graph_fake_mode, guards_of, hint, ranges_of, set_fake_mode

_SYMPY = ("Add", "Mul", "Pow", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Abs", "floor", "ceiling")
FUNCTIONS: dict[str, Any] = {
    **{name: getattr(sympy, name) for name in _SYMPY},
    **{cls.__name__: cls for cls in (sympy.Equality, sympy.Unequality, sympy.StrictLessThan, sympy.LessThan,
                                     sympy.StrictGreaterThan, sympy.GreaterThan)},
    **{name: value for name, value in vars(torch_sympy).items()
       if inspect.isclass(value) and issubclass(value, sympy.Function)},
    # torch's own (not sympy.Function): a slice of a constant to a sequence length (BERT's position ids[:, :L])
    "Min": torch_sympy.Min, "Max": torch_sympy.Max,
}


def encode_expr(expr: sympy.Basic) -> Any:
    """``expr`` as a JSON tree (see the module docstring); :class:`SaveError` for what it cannot name."""
    if isinstance(expr, sympy.Symbol):
        return {"s": expr.name}
    if expr is sympy.true or expr is sympy.false:
        return bool(expr)
    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Rational):
        return {"q": [int(expr.p), int(expr.q)]}
    name = expr.func.__name__
    if FUNCTIONS.get(name) is not expr.func:
        raise SaveError(f"pyrys.save: a size of the graph uses {name}, which a saved program cannot name")
    return {"f": name, "a": [encode_expr(arg) for arg in expr.args]}


def decode_expr(tree: Any, symbols: dict[str, sympy.Symbol]) -> sympy.Basic:
    """The inverse of :func:`encode_expr`, with saved symbol names mapped to ``symbols``."""
    if isinstance(tree, bool):
        return sympy.true if tree else sympy.false
    if isinstance(tree, int):
        return sympy.Integer(tree)
    if not isinstance(tree, dict) or len(tree) not in (1, 2):
        raise LoadError(f"pyrys.load: a saved size expression is malformed: {tree!r}")
    if "s" in tree:
        if tree["s"] not in symbols:
            raise LoadError(f"pyrys.load: a saved size expression reads {tree['s']}, which no input has")
        return symbols[tree["s"]]
    if "q" in tree:
        return sympy.Rational(*tree["q"])
    function = FUNCTIONS.get(tree.get("f"))
    if function is None:
        raise LoadError(f"pyrys.load: a saved size expression calls {tree.get('f')!r}, which pyrys does not read")
    return function(*(decode_expr(arg, symbols) for arg in tree["a"]))


def encode_symbolic(gm: fx.GraphModule) -> dict:
    """The dims of ``gm``'s inputs (an int, or a symbol with the example's value), its guards and ranges."""
    env = graph_fake_mode(gm).shape_env
    inputs, symbols = [], {}
    for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            inputs.append(None)
            continue
        dims = []
        for d in val.shape:
            expr = env.replace(d.node.expr) if isinstance(d, torch.SymInt) else sympy.Integer(int(d))
            if not isinstance(expr, (sympy.Symbol, sympy.Integer)):
                raise SaveError(f"pyrys.save: input {node.name} has a dim {expr}, not one size of its own")
            if isinstance(expr, sympy.Symbol):
                symbols[expr.name] = int(hint(d))
            dims.append(encode_expr(expr))
        inputs.append(dims)
    guards = [encode_expr(env.replace(guard)) for guard in guards_of(gm)]
    known = {symbol.name: bounds for symbol, bounds in ranges_of(gm).items()}
    ranges = {name: _bounds(known.get(name)) for name in symbols}
    return {"inputs": inputs, "symbols": symbols, "guards": guards, "ranges": ranges}


def _bounds(bounds: tuple | None) -> list:
    if bounds is None:
        return [0, None]
    lower, upper = bounds
    return [int(lower), None if upper is None or upper in (int_oo, sympy.oo) else int(upper)]


def decode_symbolic(gm: fx.GraphModule, record: dict) -> None:
    """Give ``gm`` (decoded with the example's shapes) symbolic inputs as saved, propagate every node's
    shape from them, and keep the saved guards and ranges on the graph (``ir/symbolic.py``)."""
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    symbols, sizes = {}, {}
    for name, example in record["symbols"].items():
        source = ConstantSource(f"pyrys_{name}")
        symbol = env.create_symbol(example, source, dynamic_dim=DimDynamic.DYNAMIC, do_not_specialize_zero_one=True)
        symbols[name], sizes[name] = symbol, env.create_symintnode(symbol, hint=example, source=source)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(record["inputs"]):
        raise LoadError("pyrys.load: the saved symbolic sizes do not match the graph's inputs")
    for node, dims in zip(placeholders, record["inputs"]):
        if dims is None:
            continue
        shape = [sizes[d["s"]] if isinstance(d, dict) else int(d) for d in dims]
        with mode:
            node.meta["val"] = torch.empty(shape, dtype=node.meta["val"].dtype)
    set_fake_mode(gm, mode)
    gm.meta[GUARDS_KEY] = [decode_expr(tree, symbols) for tree in record["guards"]]
    gm.meta[RANGES_KEY] = {symbols[name]: _checked_bounds(name, *bounds) for name, bounds in record["ranges"].items()}
    refresh_meta(gm)


def _checked_bounds(name: str, lower: Any, upper: Any) -> tuple[int, int | None]:
    """A saved range ``[lower, upper]`` of sizes (``upper`` None: unbounded), else :class:`LoadError`."""
    if type(lower) is not int or lower < 0 or not (upper is None or type(upper) is int and upper >= lower):
        raise LoadError(f"pyrys.load: the saved range of the size {name} is {[lower, upper]!r}, not [lower, upper] "
                        "sizes (upper null: unbounded)")
    return lower, upper
