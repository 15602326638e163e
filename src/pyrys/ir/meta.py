"""Shape and dtype of every value: ``meta["val"]``, a fake tensor, computed by fake-tensor propagation.

One rule computes it everywhere: run the node's op on fake tensors shaped like its inputs'
``meta["val"]`` (on concrete shapes, an answer is remembered by the op and what it reads of its
arguments, and given again: a network of equal layers asks the same question many times).  Capture
runs it over the whole graph (:func:`refresh_meta`); a rewrite runs it on the nodes it creates or
changes and on the users whose inputs changed (:func:`settle_meta`, through :mod:`pyrys.ir.edit`);
the verifier runs it over the whole graph again, every op, without writing (:func:`fresh_meta`) and
compares (:func:`meta_mismatch`).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch._decomp import decomposition_table
from torch._decomp.decompositions import upsample_compute_output_size
from torch._prims_common import suggest_memory_format
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.fx.node import map_aggregate
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from pyrys.ir.graph import state_ref
from pyrys.ir.released import is_released
from pyrys.ir.symbolic import dims_key, graph_fake_mode, hint, propagating

aten = torch.ops.aten


def _fake_like(mode: FakeTensorMode, val: Any, device: str | None = None) -> Any:
    """A fake tensor with ``val``'s shape, strides and dtype (lists element-wise; scalars as they are)."""
    if isinstance(val, torch.Tensor):
        with mode:
            return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=device or val.device)
    if isinstance(val, (list, tuple)):
        return type(val)(_fake_like(mode, v) for v in val)
    return val


def fake_input(mode: FakeTensorMode, node: fx.Node):
    """An input's fake value: a state input's (a parameter, a buffer) from its tensor, as constants are
    (:meth:`_Fresh.get_attr`), else from its recorded value."""
    ref = state_ref(node)
    if ref is not None:
        value = ref.value
        if _shape_is_enough(value):
            return _fake_like(mode, value)
        return mode.from_tensor(value, static_shapes=True) if isinstance(value, torch.Tensor) else value
    return _fake_like(mode, node.meta["val"])


def _shape_is_enough(value: Any) -> bool:
    """Whether a fake tensor of ``value``'s shape stands for it: a plain tensor of more than one element
    (making it from the tensor's metadata costs 50x more; a one-element one stays real or tracked, as the
    fake mode follows its value through ``item()``)."""
    return (isinstance(value, torch.Tensor) and value.layout == torch.strided and not value.is_quantized
            and value.numel() > 1)


# ops whose torch meta fails on symbolic sizes and whose value comes from torch's decomposition there:
# baddbmm's meta expands a broadcast input ((B*H, 1, L): BLOOM's alibi) with the C++ expand of concrete sizes;
# ``at::native::lstm`` reads ``numel()`` of its input (GRU's and RNN's C++ take symbolic sizes)
_DECOMPOSED_WHEN_SYMBOLIC = {op: decomposition_table[op] for op in (
    aten.baddbmm.default, aten.lstm.input, aten.lstm.data)}


def _constant_padded(input, pad, value=0):
    """``constant_pad_nd``'s value on symbolic sizes: each padded dim (the last first) grows by its two pads
    (a negative one crops), as sizes.  Its C++ meta, size-oblivious, gives a symbolic dim's example size
    (``s0`` -> 2); its decomposition skips a pad that is 0 at the example's sizes with no guard kept:
    ``(4 - T % 4) % 4``, 0 at the example's T = 8, padded nothing at every T (a helper's find)."""
    torch._check(len(pad) % 2 == 0 and len(pad) // 2 <= input.dim(),
                 lambda: f"pad of {len(pad)} numbers for {input.dim()} dims")
    shape = list(input.shape)
    for k in range(len(pad) // 2):
        shape[-1 - k] = shape[-1 - k] + pad[2 * k] + pad[2 * k + 1]
    return input.new_empty(shape).contiguous(memory_format=suggest_memory_format(input))


_DECOMPOSED_WHEN_SYMBOLIC[aten.constant_pad_nd.default] = _constant_padded


def _unbound(input, dim=0):
    """``unbind``'s value on symbolic sizes: a ``select`` of each index.  Its reference splits and squeezes, and
    a part of a dim of ``Min(3, s)`` is ``Min(3, s) // 3`` long, not known to be 1: the squeeze kept it
    (``x[:, :3].unbind(1)``: ``(B, 1, C)`` parts, a helper's find).  How many parts: the example's (the graph's
    readers of them are that many)."""
    return tuple(input.select(dim, index) for index in range(int(input.shape[dim])))


_DECOMPOSED_WHEN_SYMBOLIC[aten.unbind.int] = _unbound


def _upsampled(input, output_size, *options):
    """An upsampling ``.vec`` overload's value on symbolic sizes (``F.interpolate(y, size=x.shape[-2:])``: FPN,
    UNet, LRASPP): its C++ takes concrete sizes only, and its decomposition (and the ``.default`` overload's
    meta, which is that decomposition) computes the values with index tensors whose broadcast fails
    (``SymIntArrayRef expected to contain only concrete integers``) where the input sums two maps of sizes
    computed apart; the result is ``input``'s batch and channels at the output size, in its memory format."""
    scale_factors = options[-1]  # (align_corners, scale_factors) or (scale_factors,)
    size = upsample_compute_output_size(input.size(), output_size, scale_factors)
    result = input.new_empty((*input.shape[:2], *size))
    return result.contiguous(memory_format=suggest_memory_format(input))


for _name in ("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact2d",
              "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d"):
    _DECOMPOSED_WHEN_SYMBOLIC[getattr(aten, _name).vec] = _upsampled


def _pad(input, pad, mode="constant", value=None):
    """``aten::pad`` (``F.pad``), whose constant mode is ``constant_pad_nd``'s C++ meta: its decomposition there."""
    if mode == "constant":
        return _DECOMPOSED_WHEN_SYMBOLIC[aten.constant_pad_nd.default](input, pad, 0 if value is None else value)
    return aten.pad.default(input, pad, mode, value)


def _string_padded_conv(*args, **kwargs):
    """``conv2d(x, W, b, s, "same")`` (1-D/3-D too): torch's meta pads with the example's sizes; spelled with
    numbers (:func:`pyrys.ir.fused.string_padded_conv`) it keeps them symbolic."""
    from pyrys.ir.fused import string_padded_conv  # fused ops import this module

    return string_padded_conv(*args, **kwargs)


_DECOMPOSED_WHEN_SYMBOLIC[aten.pad.default] = _pad
for _op in (aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding):
    _DECOMPOSED_WHEN_SYMBOLIC[_op] = _string_padded_conv


def _op_for(target: Any, mode: FakeTensorMode) -> Any:
    """What gives ``target``'s fake value under ``mode``: the op, or on symbolic sizes its decomposition
    where :data:`_DECOMPOSED_WHEN_SYMBOLIC` says so."""
    return _DECOMPOSED_WHEN_SYMBOLIC.get(target, target) if mode.shape_env is not None else target


class _Fresh(FakeTensorProp):
    """FakeTensorProp that collects each node's value in ``fresh`` and leaves ``meta`` as it was; with
    ``repair_views``, a ``view`` its input's strides refuse becomes a ``reshape`` (:func:`_repair_view`)."""

    def __init__(self, gm: fx.GraphModule, mode: FakeTensorMode, repair_views: bool = False, memo: bool = False):
        super().__init__(gm, mode)
        self.fresh: dict[fx.Node, Any] = {}
        self.repair_views, self.memo = repair_views, memo

    def call_function(self, target, args, kwargs) -> Any:
        """The op on these fake values; with ``memo``, a value remembered for arguments alike (its fake
        tensors may come from another propagation's mode: an op that is run gets them remade in this one)."""
        key = _memo_key(target, (args, kwargs), self._mode, fakes_only=True) if self.memo else None
        remembered = _INFERRED.get(key) if key is not None else None
        if remembered is not None:
            return remembered
        args, kwargs = _in_mode(args, self._mode), _in_mode(kwargs, self._mode)
        try:
            result = super().call_function(_op_for(target, self._mode), args, kwargs)
        except (TypeError, RuntimeError) as error:
            result = _on_empty_tensors(target, args, kwargs, self._mode, error)
        _remember(key, result)
        return result

    def get_attr(self, target, args, kwargs) -> Any:
        """A constant as a fake CPU tensor of its shape: a released one (:mod:`pyrys.ir.released`) has no bytes,
        and making one from a real tensor's metadata costs 50x a fresh one (ResNet-50's 216 constants: 0.26 s
        a propagation).  A one-element constant stays real: the fake mode tracks its value (``item()``)."""
        value = super().get_attr(target, args, kwargs)
        if is_released(value):
            return _fake_like(self._mode, value, device="cpu")
        if _shape_is_enough(value):
            return _fake_like(self._mode, value)
        return value

    def run_node(self, n: fx.Node) -> Any:
        missing = object()
        recorded = n.meta.get("val", missing)
        try:
            result = super().run_node(n)
        except (RuntimeError, ValueError) as error:
            if not (self.repair_views and _repair_view(n, error)):
                raise
            result = super().run_node(n)
        self.fresh[n] = n.meta.get("val")
        if recorded is missing:
            n.meta.pop("val", None)
        else:
            n.meta["val"] = recorded
        return result


def _on_empty_tensors(target: Any, args: tuple, kwargs: dict, mode: FakeTensorMode, error: Exception) -> Any:
    """``target``'s value where its fake kernel failed (``error``, raised again otherwise) on tensors with
    no elements, each of concrete sizes: the op run on real empty tensors of those shapes, which costs nothing
    (torch's meta of ``upsample_nearest2d`` checks ``numel() != 0 or <an int>`` and raises TypeError on a
    batch of 0, which eager runs)."""
    fakes: list[torch.Tensor] = []
    map_aggregate((args, kwargs), lambda v: fakes.append(v) if isinstance(v, torch.Tensor) else None)
    concrete = all(isinstance(d, int) for t in fakes for d in (*t.shape, *t.stride()))
    if not concrete or not fakes or any(t.numel() for t in fakes) or not isinstance(target, torch._ops.OpOverload):
        raise error  # (a tensor with values: an op whose shape reads them would read uninitialised memory)

    def real(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")
        return value

    with unset_fake_temporarily():
        try:
            result = target(*map_aggregate(args, real), **map_aggregate(kwargs, real))
        except Exception:  # noqa: BLE001 -- eager refuses it too: the fake kernel's error is the one to see
            raise error from None
    return map_aggregate(result, lambda v: _fake_like(mode, v) if isinstance(v, torch.Tensor) else v)


def _repair_view(node: fx.Node, error: Exception) -> bool:
    """Make ``node`` a ``reshape`` if it is a ``view`` that failed on its input's strides; whether it did.

    An exported graph keeps ``view`` where the strides torch's kernel gave at export allowed one, and drops
    a ``.contiguous()`` that was a no-op there; some ops' strides depend on the kernel torch picks
    (attention's output: (B, L, H, D) from the flash kernel, (B, H, L, D) from the math one), so the same
    view may meet strides it cannot take.  ``reshape`` gives the same values either way (a copy when it
    must), which is what the model's own code (``.contiguous().view``) asked for."""
    if node.target is not torch.ops.aten.view.default or "view" not in str(error):
        return False
    node.target = torch.ops.aten.reshape.default
    node.graph.owning_module.recompile()
    return True


def fresh_meta(gm: fx.GraphModule, repair_views: bool = False, memo: bool = False) -> dict[fx.Node, Any]:
    """Every node's value by fake-tensor propagation from the inputs, without writing ``meta``
    (under the graph's own fake mode when its shapes are symbolic: :mod:`pyrys.ir.symbolic`); with
    ``repair_views`` (:func:`refresh_meta`), a view whose input's strides refuse it becomes a reshape;
    with ``memo``, ops on concrete shapes asked before are not run again (the verifier runs every op)."""
    mode = graph_fake_mode(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_inputs = [fake_input(mode, n) for n in placeholders]
    propagation = _Fresh(gm, mode, repair_views, memo)
    with propagating(mode):
        propagation.propagate_dont_convert_inputs(*fake_inputs)
    return propagation.fresh


def refresh_meta(gm: fx.GraphModule) -> None:
    """Set every node's ``meta["val"]`` by propagation over ``gm`` (at capture, specialization and load;
    repairing views: :func:`_repair_view`)."""
    for node, val in fresh_meta(gm, repair_views=True, memo=True).items():
        if val is not None:
            node.meta["val"] = val


# inferred values of ops on concrete shapes, by (op, its arguments' descriptions): a rewrite of a graph
# with many equal layers asks the same question many times (ResNet-50's 53 convolutions: 12 shapes)
_INFERRED: dict[tuple, Any] = {}
_INFERRED_LIMIT = 4096


def _described(value: Any, fakes_only: bool) -> Any:
    """``value`` as a hashable key of what fake propagation reads from it: a tensor's shape, strides,
    dtype and device, a scalar's type and value (``1``, ``1.0`` and ``True`` give other results).
    ``fakes_only``: a real tensor (a one-element constant, whose value the fake mode tracks) has none."""
    if isinstance(value, torch.Tensor):
        if fakes_only and not isinstance(value, FakeTensor):
            raise TypeError("a real tensor")
        if isinstance(value, FakeTensor) and value.constant is not None:
            raise TypeError("a fake tensor that carries its value")  # what follows may read it
        return ("tensor", tuple(value.shape), value.stride(), value.storage_offset(), value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_described(v, fakes_only) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _described(v, fakes_only)) for k, v in value.items()))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device, torch.memory_format,
                                           torch.layout)):
        return (type(value).__name__, value)
    raise TypeError(f"no key for {type(value).__name__}")


def _memo_key(target: Any, arguments: Any, mode: FakeTensorMode, fakes_only: bool = False) -> tuple | None:
    """The memo key of ``target`` on ``arguments`` (values) and the default dtype; None where there is
    none (symbolic shapes, not an ATen or pyrys op, an op that writes to an argument, an argument that is
    not a tensor, a scalar or a list of them, a fake tensor that carries its value)."""
    if mode.shape_env is not None or not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return None
    try:
        key = (target, torch.get_default_dtype(), _described(arguments, fakes_only))
        hash(key)
    except TypeError:
        return None
    return key


TORCH_FAKE_CACHE_LIMIT = 4096  # torch's own dispatch cache of fake-tensor answers (FakeTensorMode.cache)


def bound_torch_fake_cache() -> None:
    """Empty torch's class-wide cache of fake-tensor answers past :data:`TORCH_FAKE_CACHE_LIMIT` entries: it
    has no bound, and each new shape's capture and specialization add ~35 (a server meeting a new shape at
    every call grew by 99 MiB over 900 shapes, all but 3% of its objects that cache's, with 8 programs kept;
    a helper's find).  A cache: emptied, it answers again."""
    if len(FakeTensorMode.cache) > TORCH_FAKE_CACHE_LIMIT:
        FakeTensorMode.cache_clear()


def _remember(key: tuple | None, val: Any) -> None:
    """Keep ``val`` under ``key`` where it may be kept (:func:`_memorable`).

    Compiles and loads take turns (``pyrys.compiled.COMPILING``), so one thread at a time reads and
    writes the memo, and a fake tensor of one compile's mode is read in another's only after it."""
    if key is not None and _memorable(val):
        if len(_INFERRED) >= _INFERRED_LIMIT:
            _INFERRED.clear()
        _INFERRED[key] = val


def _in_mode(value: Any, mode: FakeTensorMode) -> Any:
    """``value`` with every fake tensor of another mode remade in ``mode`` (same shape, strides, dtype)."""
    if isinstance(value, FakeTensor):
        return value if value.fake_mode is mode else _fake_like(mode, value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, (FakeTensor, list, tuple)) for v in value):
        return type(value)(_in_mode(v, mode) for v in value) if not hasattr(value, "_fields") else value
    if isinstance(value, dict):
        return {k: _in_mode(v, mode) for k, v in value.items()}
    return value


_NOT_RECORDED = object()  # an argument without a recorded value: no key (inference raises, naming it)


def infer_meta(node: fx.Node, mode: FakeTensorMode | None = None) -> Any:
    """``node``'s value computed from its inputs' recorded ``meta["val"]``: its op run on fake tensors
    (on concrete shapes, an op asked again with arguments alike gives the value it gave before)."""
    mode = mode or graph_fake_mode(node.graph.owning_module)
    recorded = fx.map_arg((node.args, node.kwargs), lambda arg: arg.meta.get("val", _NOT_RECORDED))
    key = _memo_key(node.target, recorded, mode)
    remembered = _INFERRED.get(key) if key is not None else None
    if remembered is not None:
        return remembered
    val = _infer(node, mode)
    _remember(key, val)
    return val


def _memorable(val: Any) -> bool:
    """Whether ``val`` may be kept: a tensor or a list of them, every size and stride concrete, none
    carrying its value (the fake mode tracks a one-element constant's: another graph's has another)."""
    refused = []
    map_aggregate(val, lambda v: refused.append(v) if isinstance(v, torch.Tensor) and (
        not all(isinstance(d, int) for d in (*v.shape, *v.stride()))
        or (isinstance(v, FakeTensor) and v.constant is not None)) else None)
    return isinstance(val, (torch.Tensor, tuple, list)) and not refused


def _infer(node: fx.Node, mode: FakeTensorMode) -> Any:
    """``node``'s op run on fake tensors made from its arguments' recorded values."""

    def fake(arg: fx.Node) -> Any:
        if "val" not in arg.meta:
            raise ValueError(f"%{node.name} reads %{arg.name}, whose value was never recorded")
        return _fake_like(mode, arg.meta["val"])

    args, kwargs = fx.map_arg(node.args, fake), fx.map_arg(node.kwargs, fake)
    with mode, propagating(mode):
        try:
            result = _op_for(node.target, mode)(*args, **kwargs)
        except (TypeError, RuntimeError) as error:
            result = _on_empty_tensors(node.target, args, kwargs, mode, error)
    return map_aggregate(result, lambda v: v.detach() if isinstance(v, torch.Tensor) else v)


def settle_meta(nodes: Iterable[fx.Node]) -> None:
    """Infer ``meta["val"]`` of ``nodes``, then of the users of each node whose value changed, until none does."""
    forced = dict.fromkeys(nodes)
    mode = graph_fake_mode(next(iter(forced)).graph.owning_module) if forced else None
    pending = deque(forced)
    while pending:
        node = pending.popleft()
        if node.op == "output" and "val" in node.meta:  # the outputs' values, as propagation records them
            node.meta["val"] = map_aggregate(node.args[0], lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a)
        if node.op != "call_function":
            continue
        val = infer_meta(node, mode)
        changed = "val" not in node.meta or meta_mismatch(node.meta["val"], val) is not None
        if changed or node in forced:
            node.meta["val"] = val
        if changed:
            pending.extend(node.users)


def meta_mismatch(recorded: Any, fresh: Any) -> str | None:
    """How ``recorded`` differs from ``fresh`` (None if it does not): kind, shape, dtype, or layout.

    Layout compares the strides of dims longer than 1 (the stride of a dim of size 1 is never used)."""
    if isinstance(fresh, torch.Tensor):
        if not isinstance(recorded, torch.Tensor):
            return f"{_kind(recorded)} where a tensor is computed"
        if (dims_key(recorded.shape), recorded.dtype) != (dims_key(fresh.shape), fresh.dtype):
            return f"{_describe(recorded)} where {_describe(fresh)} is computed"
        if _layout(recorded) != _layout(fresh):
            return f"strides {tuple(recorded.stride())} where {tuple(fresh.stride())} are computed"
        return None
    if isinstance(fresh, (list, tuple)):
        if not isinstance(recorded, (list, tuple)) or len(recorded) != len(fresh):
            return f"{_kind(recorded)} where {len(fresh)} values are computed"
        return next((m for m in map(meta_mismatch, recorded, fresh) if m), None)
    if fresh is None or type(recorded) is type(fresh):
        return None
    return f"{_kind(recorded)} where {_kind(fresh)} is computed"


def _layout(t: torch.Tensor) -> tuple:
    return dims_key(stride for size, stride in zip(t.shape, t.stride()) if hint(size) > 1)


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}"


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
