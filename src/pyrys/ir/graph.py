"""Helpers over ``torch.fx`` graphs: pyrys's IR is an ``fx.GraphModule`` with conventions.

* a user input is a ``placeholder``;
* module state that is not frozen (a parameter, a buffer, or a boolean flag such as
  ``training``) is a ``placeholder`` whose ``meta["pyrys_state"]`` is a :class:`StateRef`
  (printed as ``prim::GetAttr``);
* a constant tensor is a ``get_attr`` node (printed as ``prim::Constant``); scalar
  constants are literal arguments;
* every value node carries ``meta["val"]`` (a fake tensor: shape and dtype).
"""
from __future__ import annotations

import builtins
import keyword
import re
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Container, Iterator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.operator_schemas import normalize_function

from pyrys.ir.fingerprint import fingerprint
from pyrys.ir.released import is_released, released_fingerprint, values_of
from pyrys.ir.written import written_constants, written_tensors

STATE_KEY = "pyrys_state"
FLAGS_READ_KEY = "pyrys_flags_read"  # gm.meta: names of the flags the model reads, those resolved at import too
# names generated code must not take: keywords, builtins, forward's own ``self`` and the globals of FX's code
_RESERVED = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | {
    "self", "torch", "inf", "nan", "NoneType", "device", "fx_pytree", "pytree"}


@dataclass
class StateRef:
    """A read of module state: ``target`` is its attribute path, e.g. ``"bn.running_var"``."""

    target: str
    kind: str  # "parameter" | "buffer" | "flag"
    value: Any

    @property
    def attribute(self) -> str:
        """The last component of the path: ``"running_var"``, ``"training"``."""
        return self.target.rsplit(".", 1)[-1]


def state_ref(node: fx.Node) -> StateRef | None:
    return node.meta.get(STATE_KEY) if node.op == "placeholder" else None


def state_inputs(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder" and STATE_KEY in n.meta]


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A new graph with a copy of every node (meta included), for another graph module."""
    copied = fx.Graph()
    copied.output(copied.graph_copy(graph, {}))
    return copied


def trial_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` to rewrite and run (an accuracy guard's trial): its own nodes, ``gm``'s constants
    shared, not copied, and ``gm``'s meta (a symbolic graph's fake mode: its rewrites then propagate
    shapes without adding guards to the graph's sizes)."""
    trial = fx.GraphModule(gm, copy_graph(gm.graph))
    trial.meta.update(gm.meta)
    return trial


def nodes_in(args) -> list[fx.Node]:
    """The nodes among ``args`` (nested tuples, lists, dicts), in order."""
    found: list[fx.Node] = []
    fx.map_arg(args, found.append)
    return found


def user_inputs(graph: fx.Graph) -> list[fx.Node]:
    """The placeholders of the caller's inputs, in order (module state left unfrozen is not one)."""
    return [n for n in graph.nodes if n.op == "placeholder" and STATE_KEY not in n.meta]


def is_constant(arg: Any) -> bool:
    """True for a ``get_attr`` node or any non-node literal (scalars, lists of scalars, None)."""
    if isinstance(arg, fx.Node):
        return arg.op == "get_attr"
    if isinstance(arg, (list, tuple)):
        return all(is_constant(a) for a in arg)
    return True


def constant_value(gm: fx.GraphModule, arg: Any) -> Any:
    """The value of a constant argument (see :func:`is_constant`)."""
    if isinstance(arg, fx.Node):
        return getattr(gm, arg.target)
    if isinstance(arg, (list, tuple)):
        return type(arg)(constant_value(gm, a) for a in arg)
    return arg


def identifier(hint: str, taken: Container[str] = frozenset()) -> str:
    """``hint`` as a Python identifier that FX's generated code can use as a name, not in ``taken``.

    FX writes a placeholder's target verbatim as a parameter of ``forward`` and a
    ``get_attr`` target as ``self.<name>``, so every name pyrys generates goes through here::

        "1.training" -> "_1_training"      "my-bn.weight" -> "my_bn_weight"
        "class" -> "class_"                "input" -> "input_"  (a builtin)
        "x" with "x" taken -> "x_1"
    """
    name = re.sub(r"\W", "_", hint, flags=re.ASCII) or "_"
    if name[0].isdigit():
        name = "_" + name
    if name in _RESERVED:
        name += "_"
    base, i = name, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def add_placeholder(graph: fx.Graph, hint: str, val: Any) -> fx.Node:
    """A new input after the existing ones; its target (and name) is an :func:`identifier` from ``hint``."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    taken = {n.name for n in graph.nodes} | {n.target for n in placeholders}
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(None):
        node = graph.placeholder(identifier(hint, taken))
    node.meta["val"] = val
    return node


def add_constant(gm: fx.GraphModule, value: torch.Tensor, name_hint: str) -> fx.Node:
    """Register ``value`` on ``gm`` and insert a ``get_attr`` node for it (at the graph's insert point)."""
    name = identifier(name_hint or "const", _Attributes(gm))
    gm.register_buffer(name, value, persistent=False)
    node = gm.graph.get_attr(name)
    node.meta["val"] = shape_of(value)
    return node


def shape_of(value: torch.Tensor) -> torch.Tensor:
    """A fake tensor with ``value``'s shape, strides, dtype and device, for ``meta["val"]``: a node's
    recorded value never holds the bytes of a constant (FX keeps erased nodes named, meta and all).
    Constants alike share one (a recorded value is never written to; making one takes ~0.2 ms)."""
    key = (tuple(value.shape), value.stride(), value.dtype, value.device)
    with _SHAPES_LOCK:
        fake = _SHAPES_MADE.get(key)
        if fake is None:
            if len(_SHAPES_MADE) >= 4096:
                _SHAPES_MADE.clear()
            with _SHAPES:
                fake = _SHAPES_MADE[key] = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                                                device=value.device)
        return fake


_SHAPES = FakeTensorMode(allow_non_fake_inputs=True)  # one mode (making one takes ~10 ms), one thread at a time
_SHAPES_LOCK = threading.Lock()
_SHAPES_MADE: dict[tuple, torch.Tensor] = {}


class _Attributes:
    """The attribute names of a module as a container: ``name in _Attributes(gm)`` is ``hasattr``."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __contains__(self, name: object) -> bool:
        return hasattr(self.module, str(name))


def call_nodes(graph: fx.Graph, targets=None) -> Iterator[fx.Node]:
    """``call_function`` nodes, optionally only those whose target is in ``targets``."""
    for node in list(graph.nodes):
        if node.op == "call_function" and (targets is None or node.target in targets):
            yield node


def op_args(node: fx.Node) -> dict[str, Any]:
    """All arguments of an ATen call by schema name, defaults filled in."""
    pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if pair is None:
        raise ValueError(f"cannot normalize the arguments of {node.format_node()}")
    return dict(pair.kwargs)


def tensor_meta(node: fx.Node) -> torch.Tensor | None:
    val = node.meta.get("val")
    return val if isinstance(val, torch.Tensor) else None


def named_constants(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """Every tensor constant of ``gm`` by name, one held under several names once per name (two layers of
    equal weights shared by :func:`share_constants`, tied weights): ``named_buffers`` lists such a tensor
    once, and code that replaces constants by name would leave its other names holding the old one."""
    return list(gm.named_buffers(recurse=False, remove_duplicate=False))


def drop_unused_constants(gm: fx.GraphModule) -> int:
    """Delete ``get_attr`` nodes with no users, then release every tensor no node reads."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            removed += 1
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [name for name, _ in named_constants(gm) if name not in read]:
        delattr(gm, name)
    return removed


def share_constants(gm: fx.GraphModule, other: fx.GraphModule) -> int:
    """Point every constant of ``gm`` equal to one of ``other``'s (shape, dtype, strides and values) at
    ``other``'s tensor, so that two captures of one model hold (and a backend packs) its weights once;
    how many were shared.  ``other``'s released constants (:mod:`pyrys.ir.released`) are compared by the
    fingerprint their values had (:mod:`pyrys.ir.fingerprint`), each restored once to confirm a match (one
    without a fingerprint: restored once for a digest of every byte and once more to confirm).  Constants
    either graph writes as it runs (:mod:`pyrys.ir.written`) are not shared."""
    held: dict[tuple, list[torch.Tensor]] = {}
    written = written_tensors(other)  # a training norm's running statistics: each graph writes its own
    for tensor in other.buffers():
        if id(tensor) not in written:
            held.setdefault(_tensor_key(tensor), []).append(tensor)
    digests: dict = {}  # (by id: CRCs of every byte, and fingerprints)
    shared = 0
    own = written_constants(gm)
    for name, tensor in named_constants(gm):
        if name in own:
            continue
        match = next((t for t in held.get(_tensor_key(tensor), ()) if _same_values(t, tensor, digests)), None)
        if match is not None and match is not tensor:
            setattr(gm, name, match)
            shared += 1
    return shared


def _same_values(held: torch.Tensor, tensor: torch.Tensor, digests: dict) -> bool:
    if held is tensor:
        return True
    if not is_released(held):
        return same_bits(held, tensor)
    if ("fingerprint", id(tensor)) not in digests:  # (a stand-in's own: kept at its release)
        own = released_fingerprint(tensor) if is_released(tensor) else fingerprint(tensor)
        digests["fingerprint", id(tensor)] = own
    kept, own = released_fingerprint(held), digests["fingerprint", id(tensor)]
    if kept is not None and own is not None:  # (restored only where its samples match)
        return kept == own and same_bits(values_of(held), values_of(tensor))
    digest = _digest(held, digests)
    return digest is not None and digest == _digest(tensor, digests) and same_bits(values_of(held), values_of(tensor))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one shape and dtype hold the same bytes: ``torch.equal`` takes -0.0 for 0.0 (a
    capture at ``s = -0.0`` was given the 0.0 capture's folded ``w * s``: x / it gave inf for -inf; a
    reviewer's find) and a NaN for no value; by value where the bytes are not the values (quantized)."""
    try:
        return a.dtype == b.dtype and torch.equal(flat_bytes(a), flat_bytes(b))
    except (RuntimeError, TypeError, ValueError):
        return torch.equal(a, b)


def _digest(tensor: torch.Tensor, digests: dict[int, int | None]) -> int | None:
    """:func:`values_crc`, computed once per tensor (by identity, in ``digests``)."""
    if id(tensor) not in digests:
        digests[id(tensor)] = values_crc(tensor)
    return digests[id(tensor)]


def values_crc(tensor: torch.Tensor) -> int | None:
    """CRC-32 of the tensor's values (a released one's restored: :func:`~pyrys.ir.released.values_of`); None
    where its bytes are not its values (a quantized or sparse tensor)."""
    try:
        return zlib.crc32(tensor_bytes(values_of(tensor)))
    except (RuntimeError, TypeError, ValueError):
        return None


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as one flat uint8 tensor of its bytes (a copy only where it is not contiguous);
    raises for a tensor whose bytes are not its values (quantized, sparse)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def tensor_bytes(tensor: torch.Tensor):
    """:func:`flat_bytes` as a numpy array, for a digest."""
    return flat_bytes(tensor).numpy()


def _tensor_key(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def replace_with_literal(node: fx.Node, value: Any) -> None:
    """Substitute a Python value for ``node`` in all its users, then erase it."""
    for user in list(node.users):
        user.args = fx.map_arg(user.args, lambda a: value if a is node else a)
        user.kwargs = fx.map_arg(user.kwargs, lambda a: value if a is node else a)
    node.graph.erase_node(node)


def insert_call(graph: fx.Graph, target, args: tuple, name: str | None = None) -> fx.Node:
    """``graph.call_function`` with a readable node name (``conv``, not ``conv_default``)."""
    if name is None:
        name = target._schema.name.split("::")[-1] if hasattr(target, "_schema") else target.__name__
    return graph.create_node("call_function", target, args, {}, name=name)
