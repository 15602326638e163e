"""TorchScript's calls as torch ops: a node's ATen op by its schema, its arguments split as the overload takes
them, what it writes or views; and the list, dict and tensor-property operations TorchScript spells as ATen ops,
applied to the Python values the importer holds."""
from __future__ import annotations

import functools
import keyword
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from pyrys.capture.in_place import functional_twin
from pyrys.errors import CaptureError


class TorchScriptImportError(CaptureError):
    """The scripted code uses something pyrys cannot import; the message says what and why."""


def has_node(obj: Any) -> bool:
    return any(isinstance(v, fx.Node) for v in tree_flatten(obj)[0])


def checks_shapes(op: torch._ops.OpOverload) -> bool:
    """Whether an error of ``op`` on fake tensors is its check of the arguments, which eager makes too: an ATen
    op's (another library's may have no fake kernel at all: its error says nothing of the inputs)."""
    return op.namespace == "aten"


def op_overload(name: str, overload_name: str, node: torch._C.Node):
    namespace, base = name.split("::")
    try:
        packet = getattr(getattr(torch.ops, namespace), base)
        return getattr(packet, overload_name or "default")
    except (AttributeError, RuntimeError):
        raise TorchScriptImportError(f"no torch op {name}.{overload_name or 'default'} for {node.kind()}") from None


def split_arguments(schema, values: list) -> tuple[list, dict]:
    """Positional and keyword arguments as the op overload takes them; keyword defaults left out."""
    args, kwargs = [], {}
    for argument, value in zip(schema.arguments, values):
        if argument.kwarg_only:
            if not _is_default(argument, value):
                kwargs[argument.name] = value
        else:
            args.append(value)
    return args, kwargs


def _is_default(argument, value) -> bool:
    if not argument.has_default_value() or has_node(value) or isinstance(value, torch.Tensor):
        return False
    default = argument.default_value
    return type(default) is type(value) and default == value or (default is None and value is None)


def script_str(value: Any, type_text: str) -> str:
    """TorchScript's ``str(value)`` for a value of TorchScript type ``type_text`` (its IR spelling: ``float[]``),
    run by TorchScript itself (``aten::str`` takes a generic argument, which torch's Python binding cannot take):
    its text is not Python's (``str(1.0)`` is ``'1.'``, ``str(['a'])`` is ``'[a]'``)."""
    return _str_function(type_text)(value)


@functools.lru_cache(maxsize=64)
def _str_function(type_text: str):
    graph = torch._C.parse_ir(f"graph(%x : {type_text}):\n  %y : str = aten::str(%x)\n  return (%y)")
    return torch._C._create_function_from_graph("pyrys_str", graph)


def call_op(op, schema, values: list):
    args, kwargs = split_arguments(schema, values)
    return op(*args, **kwargs)


def mutated_argument(schema) -> int | None:
    for i, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            return i
    return None


def functional_op(schema, node: torch._C.Node):
    twin = functional_twin(schema)
    if twin is None:
        raise TorchScriptImportError(f"{node.kind()} writes to its input and has no functional form pyrys knows")
    if keyword.iskeyword(twin._overloadname):  # torch.fx writes the call as Python: `aten.random.from(...)` is not
        raise TorchScriptImportError(f"{node.kind()}'s functional form {twin} has an overload named like a Python "
                                     "keyword, which torch.fx cannot call; pyrys does not import it")
    return twin


def returns_view(schema) -> bool:
    return any(r.alias_info is not None and not r.alias_info.is_write for r in schema.returns)


# ops whose schema says they may return their input, which they do only when they change nothing
_CONVERSIONS = frozenset({"aten::to", "aten::type_as"})


def is_view_call(schema, first: Any, result: Any) -> bool:
    """Whether a call of ``schema`` on ``first`` (its first argument's value) returned a view of it: as the
    schema says, but for a conversion to another dtype (``x.int()``), a new tensor."""
    if not returns_view(schema):
        return False
    return not (schema.name in _CONVERSIONS and isinstance(first, torch.Tensor) and isinstance(result, torch.Tensor)
                and result.dtype != first.dtype)


def is_view_node(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    first = node.args[0] if node.args else None
    return schema is not None and is_view_call(schema, first.meta.get("val") if isinstance(first, fx.Node) else first,
                                                node.meta.get("val"))


# list operations TorchScript spells as ATen ops, applied to the Python lists the importer holds
PYTHON_OPS = {"aten::__getitem__": operator.getitem, "aten::len": len, "aten::add": operator.add,
               "aten::eq": operator.eq, "aten::ne": operator.ne, "aten::__contains__": operator.contains,
               "aten::copy": lambda items: items.copy(),  # list.copy() (torchvision's Swin), dict.copy(); a tensor's
               # aten::copy takes a tensor first
               "aten::slice": lambda items, start=None, end=None, step=1: items[start:end:step], "aten::list": list,
               "aten::mul": operator.mul, "aten::keys": lambda d: list(d.keys()), "aten::values": lambda d: list(d.values()),
               "aten::items": lambda d: list(d.items()), "aten::get": lambda d, key, default=None: d.get(key, default),
               "aten::dict": dict}
# list and dict operations that write it in place (a loop collecting outputs, a ModuleDict's outputs by name); no
# outputs but the list, or none
LIST_WRITES = {"aten::append": lambda items, item: (items.append(item), items)[1],
                "aten::extend": lambda items, more: (items.extend(more), ())[1],
                "aten::insert": lambda items, index, item: (items.insert(index, item), ())[1],
                "aten::pop": lambda items, *where: items.pop(*where),
                "aten::remove": lambda items, item: (items.remove(item), ())[1],
                "aten::Delete": lambda items, key: (items.__delitem__(key), ())[1],
                "aten::setdefault": lambda items, key, default: items.setdefault(key, default),
                "aten::update": lambda items, more: (items.update(more), ())[1],
                "aten::_set_item": lambda items, key, item: (items.__setitem__(key, item), items)[1],
                "aten::sort": lambda items, reverse=False: (items.sort(reverse=reverse), ())[1],
                "aten::reverse": lambda items: (items.reverse(), ())[1],
                "aten::clear": lambda items: (items.clear(), ())[1]}
LAYOUT_QUERIES = frozenset({"aten::is_contiguous", "aten::stride"})
# tensor properties TorchScript asks about, read from the example's: an inference program's own
TENSOR_QUERIES = {"aten::is_floating_point": lambda t: t.is_floating_point(), "aten::is_complex": lambda t: t.is_complex(),
                   "aten::element_size": lambda t: t.element_size(), "aten::is_signed": lambda t: t.is_signed(),
                   "prim::is_nested": lambda t: False, "prim::is_cuda": lambda t: False, "prim::is_mkldnn": lambda t: False,
                   "prim::is_sparse": lambda t: False, "prim::is_quantized": lambda t: False, "prim::is_meta": lambda t: False,
                   "prim::requires_grad": lambda t: False, "prim::layout": lambda t: torch.strided,
                   "prim::type": lambda device: device.type}  # x.device.type
PRIM_AS_OPS = frozenset({"prim::min", "prim::max", "prim::abs"})
