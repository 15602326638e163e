"""A pyrys graph as JSON plus a dict of named tensors, and back: no pickle, no code.

    {"nodes": [
      {"op": "placeholder", "name": "x", "val": {"shape": [1, 3, 8, 8], "stride": [192, 64, 8, 1], "dtype": "float32"}},
      {"op": "get_attr", "name": "w", "target": "w", "tensor": "sig0/w"},
      {"op": "call_function", "name": "conv2d", "target": "pyrys::conv.default",
       "args": [{"%": "x"}, {"%": "w"}, null, [1, 1], [0, 0], [1, 1], 1, ["relu"], []], "kwargs": {}},
      {"op": "output", "args": [[{"%": "conv2d"}]]}]}

A target is an op overload by its qualified name (``aten::conv2d.default``), ``python::getitem``
or ``pyrys::If``; an argument is a node reference ``{"%": name}``, a JSON scalar or list, or a
tagged value (``{"dtype": "float32"}``, ``{"tuple": [...]}``).  Tensors (constants, unfrozen
state) go into the tensor dict under ``<prefix>/<name>``; an If's branches are nested graphs.
Anything else cannot be saved and says so.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from pyrys.errors import LoadError, SaveError
from pyrys.ir.control_flow import IF, RaisingBranch
from pyrys.ir.graph import STATE_KEY, StateRef
from pyrys.ir.symbolic import SIZE_ARITHMETIC, hint, is_symbolic_scalar_op
from pyrys.quantization import DEQUANTIZE_WEIGHT, QUANTIZATION_OPS
from pyrys.signature import ExactBool

_GETITEM, _IF = "python::getitem", "pyrys::If"
QUANTIZED_TYPES = (torch.uint8, torch.int8, torch.uint16, torch.int16, torch.int32, torch.float8_e5m2,
                   torch.float8_e4m3fn)  # what torch's quantized_decomposed ops quantize to (pyrys's own int8: the first two)
_DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.complex64,
    torch.complex128, *QUANTIZED_TYPES)}  # (a constant or an argument of one of these types: each read back)
_MEMORY_FORMATS = {str(f).removeprefix("torch."): f for f in (
    torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)}
_LAYOUTS = {str(layout).removeprefix("torch."): layout for layout in (torch.strided, torch.sparse_coo)}


def target_name(target: Any) -> str:
    """``aten::conv2d.default``, ``pyrys::conv.default``, ``python::getitem`` or ``pyrys::If``."""
    if isinstance(target, torch._ops.OpOverload):
        return f"{target._schema.name}.{target._overloadname}"
    if target is operator.getitem:
        return _GETITEM
    if target is IF:
        return _IF
    if is_symbolic_scalar_op(target):
        return f"python::{target.__name__}"
    raise SaveError(f"pyrys.save: the graph calls {target!r}, which is not an op pyrys can name in a file")


def resolve_target(name: str) -> Any:
    """The inverse of :func:`target_name`; :class:`LoadError` for an op this torch and pyrys do not have."""
    if name == _GETITEM:
        return operator.getitem
    if name == _IF:
        return IF
    if name.startswith("python::") and name.removeprefix("python::") in SIZE_ARITHMETIC:
        return SIZE_ARITHMETIC[name.removeprefix("python::")]
    namespace, _, qualified = name.partition("::")
    op, _, overload = qualified.rpartition(".")
    try:
        return getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        raise LoadError(f"pyrys.load: the saved program calls {name}, which this torch and pyrys do not have") from None


def encode_arg(arg: Any, where: str) -> Any:
    """An argument as JSON (see the module docstring); ``where`` names the node for the error."""
    if isinstance(arg, fx.Node):
        return {"%": arg.name}
    if isinstance(arg, float) and type(arg) is not float:  # a signature's ExactFloat: json tells NaN by o != o,
        return float(arg)  # which it answers False (a save of a NaN input wrote nan, which load refused)
    if type(arg) is ExactBool:  # a signature's bool (an int subclass): a JSON bool
        return bool(arg)
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    if isinstance(arg, list):
        return [encode_arg(a, where) for a in arg]
    if isinstance(arg, tuple):
        return {"tuple": [encode_arg(a, where) for a in arg]}
    if isinstance(arg, dict):
        return {"dict": [[encode_arg(k, where), encode_arg(v, where)] for k, v in arg.items()]}
    if isinstance(arg, torch.dtype):
        return {"dtype": str(arg).removeprefix("torch.")}
    if isinstance(arg, torch.device):
        return {"device": str(arg)}
    if isinstance(arg, torch.memory_format):
        return {"memory_format": str(arg).removeprefix("torch.")}
    if isinstance(arg, torch.layout):
        return {"layout": str(arg).removeprefix("torch.")}
    raise SaveError(f"pyrys.save: {where} has an argument of type {type(arg).__name__} ({arg!r}), "
                    "which a saved program cannot hold")


def decode_arg(value: Any, nodes: dict[str, fx.Node]) -> Any:
    """The inverse of :func:`encode_arg`, with node names looked up in ``nodes``."""
    if isinstance(value, list):
        return [decode_arg(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    (tag, payload), = value.items()
    if tag == "%":
        if payload not in nodes:
            raise LoadError(f"pyrys.load: the saved program reads %{payload} before it is defined")
        return nodes[payload]
    if tag == "tuple":
        return tuple(decode_arg(v, nodes) for v in payload)
    if tag == "dict":
        return {decode_arg(k, nodes): decode_arg(v, nodes) for k, v in payload}
    if tag == "device":
        return torch.device(payload)
    table = {"dtype": _DTYPES, "memory_format": _MEMORY_FORMATS, "layout": _LAYOUTS}.get(tag)
    if table is None or payload not in table:
        raise LoadError(f"pyrys.load: the saved program holds an argument {value!r} this pyrys cannot read")
    return table[payload]


def encode_value(val: Any) -> Any:
    """A placeholder's recorded value (``meta["val"]``): shape, stride and dtype of a tensor, a list of
    those, else the value itself.  Every other node's value is propagated again at load (``refresh_meta``),
    never trusted from the file: the backend sizes its buffers from it."""
    if isinstance(val, torch.Tensor):  # a symbolic size as the example's value (``saving/symbolic.py`` keeps the symbol)
        return {"shape": [int(hint(d)) for d in val.shape], "stride": [int(hint(d)) for d in val.stride()],
                "dtype": str(val.dtype).removeprefix("torch.")}
    if isinstance(val, (list, tuple)):
        return {"values": [encode_value(v) for v in val]}
    return {"value": encode_arg(val, "a recorded value")}


def decode_value(record: dict, mode: FakeTensorMode) -> Any:
    """A fake tensor (shape, stride, dtype), a list of them, or the value; the inverse of :func:`encode_value`."""
    if "value" in record:
        return decode_arg(record["value"], {})
    if "values" in record:
        return [decode_value(v, mode) for v in record["values"]]
    with mode:
        return torch.empty_strided(record["shape"], record["stride"], dtype=_DTYPES[record["dtype"]])


def encode_graph(gm: fx.GraphModule, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """``gm`` as JSON; its tensors are added to ``tensors`` under ``<prefix>/<name>``."""
    nodes = []
    for node in gm.graph.nodes:
        where = f"%{node.name}"
        record: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op == "placeholder":
            if "val" in node.meta:
                record["val"] = encode_value(node.meta["val"])
            ref = node.meta.get(STATE_KEY)
            if ref is not None:
                record["state"] = _encode_state(ref, f"{prefix}/{node.name}", tensors)
        elif node.op == "get_attr":
            record["target"] = node.target
            record.update(_encode_attribute(getattr(gm, node.target), f"{prefix}/{node.target}", tensors))
        elif node.op == "call_function":
            record.update(target=target_name(node.target), args=encode_arg(list(node.args), where),
                          kwargs=encode_arg(dict(node.kwargs), where))
        elif node.op == "output":
            record["args"] = encode_arg(list(node.args), where)
        else:
            raise SaveError(f"pyrys.save: node {where} is a {node.op}, which a pyrys graph does not hold")
        nodes.append(record)
    return {"nodes": nodes}


def _encode_state(ref: StateRef, key: str, tensors: dict) -> dict:
    value = ref.value
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        value = {"tensor": key}
    else:
        value = {"literal": encode_arg(value, f"state {ref.target}")}
    return {"target": ref.target, "kind": ref.kind, **value}


def _encode_attribute(value: Any, key: str, tensors: dict) -> dict:
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, RaisingBranch):
        return {"raises": value.message}
    if isinstance(value, fx.GraphModule):
        return {"branch": encode_graph(value, key, tensors)}
    raise SaveError(f"pyrys.save: the graph holds {type(value).__name__} at {key}, which a saved program cannot hold")


def decode_graph(record: dict, tensors: dict[str, torch.Tensor], mode: FakeTensorMode | None = None) -> fx.GraphModule:
    """The graph module :func:`encode_graph` wrote; placeholders get their recorded values as fake tensors."""
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    root, graph, nodes = torch.nn.Module(), fx.Graph(), {}
    try:
        for entry in record["nodes"]:
            node = _decode_node(entry, root, graph, nodes, tensors, mode)
            if node is not None:
                nodes[entry["name"]] = node
    except (KeyError, TypeError, ValueError) as error:
        raise LoadError(f"pyrys.load: the saved program is malformed ({type(error).__name__}: {error})") from None
    for node in graph.nodes:
        problem = _missing_tensor(node) or (node.target in QUANTIZATION_OPS and _quantization_problem(node, root))
        if problem:
            raise LoadError(f"pyrys.load: the saved program is malformed ({node.name}: {problem})")
    return fx.GraphModule(root, graph)


def _missing_tensor(node: fx.Node) -> str:
    """Which tensor argument of an aten-style op its schema requires is None ("" where none is): fake tensors
    let it through, and the op raised at every call (an int8 weight's scales set to null)."""
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    if schema is None:
        return ""
    given = {**dict(zip((argument.name for argument in schema.arguments), node.args)), **node.kwargs}
    return next((f"its {argument.name} is None, where {schema.name} takes a tensor" for argument in schema.arguments
                 if isinstance(argument.type, torch.TensorType) and argument.name in given
                 and given[argument.name] is None), "")


def _quantization_problem(node: fx.Node, root: torch.nn.Module) -> str:
    """What is wrong with a quantize or dequantize node's integer type, bounds, scales and zero points ("" where
    nothing): torch's kernels would refuse the first two at every call, and compute finite garbage from a scale
    of 0, NaN or -1 or a zero point outside the bounds (a helper's edit)."""
    _, scale, zero_point, *_, q_min, q_max, dtype = node.args[:7] if node.target is DEQUANTIZE_WEIGHT else node.args[:6]
    if dtype not in QUANTIZED_TYPES:
        return f"quantized to {dtype}, not one of {', '.join(str(t) for t in QUANTIZED_TYPES)}"
    info = torch.finfo(dtype) if dtype.is_floating_point else torch.iinfo(dtype)
    low, high = int(info.min), int(info.max)
    if not (type(q_min) is int and type(q_max) is int and low <= q_min <= q_max <= high):
        return f"bounds {q_min!r}..{q_max!r} are not within {dtype}'s {low}..{high}"
    scales, zero_points = _numbers(scale, root), _numbers(zero_point, root)
    if scales is not None and not bool((good := scales.isfinite() & (scales > 0)).all()):
        return f"a scale of {_first_bad(scales, good)} is not a positive finite number"
    if zero_points is not None and not bool((good := (zero_points == zero_points.round()) & (zero_points >= q_min)
                                             & (zero_points <= q_max)).all()):
        return f"a zero point of {_first_bad(zero_points, good)} is not a whole number within {q_min}..{q_max}"
    return ""


def _numbers(arg: Any, root: torch.nn.Module) -> torch.Tensor | None:
    """A quantization argument's numbers where they are known at load: a literal's, a constant tensor's
    (None for anything else: a value computed at each call, or a type torch's op itself refuses)."""
    if isinstance(arg, fx.Node):
        value = getattr(root, arg.target, None) if arg.op == "get_attr" else None
        return value.detach().double() if isinstance(value, torch.Tensor) and not value.is_complex() else None
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return torch.tensor([float(arg)], dtype=torch.float64)
    return None


def _first_bad(numbers: torch.Tensor, good: torch.Tensor) -> str:
    return repr(float(numbers[~good].reshape(-1)[0]))


def _decode_node(entry: dict, root: torch.nn.Module, graph: fx.Graph, nodes: dict, tensors: dict,
                 mode: FakeTensorMode) -> fx.Node | None:
    op, name = entry["op"], entry.get("name")
    if op == "placeholder":
        node = graph.placeholder(name)
        if "val" in entry:
            node.meta["val"] = decode_value(entry["val"], mode)
        if "state" in entry:
            node.meta[STATE_KEY] = _decode_state(entry["state"], tensors)
        return node
    if op == "get_attr":
        _set_attribute(root, entry, tensors, mode)
        return graph.create_node("get_attr", entry["target"], name=name)
    if op == "call_function":
        args, kwargs = decode_arg(entry["args"], nodes), decode_arg(entry["kwargs"], nodes)
        return graph.create_node("call_function", resolve_target(entry["target"]), tuple(args), kwargs, name=name)
    if op == "output":
        graph.output(*decode_arg(entry["args"], nodes))
        return None
    raise LoadError(f"pyrys.load: the saved program holds a node of kind {op!r}")


def _tensor(tensors: dict, key: str) -> torch.Tensor:
    if key not in tensors:
        raise LoadError(f"pyrys.load: the saved tensors have no {key!r}, which the saved program reads")
    return tensors[key]


def _decode_state(entry: dict, tensors: dict) -> StateRef:
    value = _tensor(tensors, entry["tensor"]) if "tensor" in entry else decode_arg(entry["literal"], {})
    return StateRef(entry["target"], entry["kind"], value)


def _set_attribute(root: torch.nn.Module, entry: dict, tensors: dict, mode: FakeTensorMode) -> None:
    target = entry["target"]
    if "tensor" in entry:
        root.register_buffer(target, _tensor(tensors, entry["tensor"]), persistent=False)
    elif "raises" in entry:
        root.add_module(target, RaisingBranch(entry["raises"]))
    else:
        root.add_module(target, decode_graph(entry["branch"], tensors, mode))
