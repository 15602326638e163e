"""Compile-time state of a lowering: values per graph node, the steps so far, reorders, weights."""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from pyrys.backends.dnnl.constants import ARG_FROM, ARG_SCRATCHPAD, ARG_TO
from pyrys.backends.dnnl.descriptors import reorder_pd
from pyrys.backends.dnnl.frame import Frame
from pyrys.backends.dnnl.layout import any_md, plain_md
from pyrys.backends.dnnl.primitives import Engine, Memory, MemoryDesc, Primitive, PrimitiveDesc, Stream
from pyrys.backends.dnnl.program import Step
from pyrys.backends.dnnl.tensors import DNNL_TO_TORCH, dnnl_dtype, to_layout, to_tensor
from pyrys.backends.dnnl.values import CONSTANT, PLANNED, Value
from pyrys.ir.graph import state_ref
from pyrys.ir.printer import format_arg, format_tensor_type, format_type
from pyrys.ir.released import is_released, release, released_base, values_of


class Unsupported(Exception):
    """This node cannot be lowered to oneDNN; it runs through torch instead."""


class PackedWeights:
    """Constants packed into oneDNN layouts, shared by the programs built from one graph
    (one per layout candidate, thread count and input shape): a weight is packed once per layout.

    :meth:`release` hands out a stand-in (:mod:`pyrys.ir.released`) for a constant held here only
    in other layouts (or, for a linear run as a matmul, only its transpose; or, for an int8 weight
    whose linears run in float32, only as its float32 values: :class:`Int8Form`), so that the graph's
    plain copy can be freed; a stand-in's values come back from its packed copy, and a further layout
    is packed from them."""

    def __init__(self) -> None:
        self.entries: dict[tuple, list[tuple[MemoryDesc, torch.Tensor]]] = {}  # source -> [(md, bytes)]
        self.sources: dict[tuple, torch.Tensor] = {}  # keeps each source alive while its address is a key
        self.read_as_is: set[tuple] = set()  # constants torch code reads by address: never released
        self.int8_forms: dict[tuple, Int8Form] = {}  # (int8 weight, scales) -> how its linears run (int8_or_float.py)
        self._lock = threading.Lock()  # programs of several shapes and thread counts build at once

    def packed(self, engine: Engine, stream: Stream, tensor: torch.Tensor, md: MemoryDesc | None,
               made: list | None = None) -> tuple:
        """``(md, bytes)`` of ``tensor`` in layout ``md`` (its own plain layout for None), packed once;
        ``made``: where to note a copy packed by this call (:meth:`forget` takes it back)."""
        with self._lock:
            key, count = _key(tensor), len(self.entries.get(_key(tensor), ()))
            entry = self._packed(engine, stream, tensor, md)
            if made is not None and len(self.entries[key]) > count:
                made.append((key, entry))
            return entry

    def forget(self, made: list) -> None:
        """Drop the copies ``made`` noted (a lowering undone: no program reads them)."""
        with self._lock:
            for key, entry in made:
                entries = self.entries.get(key, [])
                entries[:] = [e for e in entries if e is not entry]
                if not entries and key in self.entries:
                    del self.entries[key], self.sources[key]
            self._drop_unread_int8_forms()

    def int8_form(self, weight: torch.Tensor, scales: torch.Tensor) -> "Int8Form | None":
        """How the linears reading the int8 ``weight`` with ``scales`` run, as the first build chose; None
        before that.  By both: two linears may read one int8 tensor with other scales (a save keeps equal
        bytes once: ``W`` and ``2 W`` quantize alike)."""
        with self._lock:
            return self.int8_forms.get(_form_key(weight, scales))

    def choose_int8_form(self, weight: torch.Tensor, scales: torch.Tensor, memo: str, choice: dict) -> "Int8Form":
        """Record the choice (``memo`` and ``choice``, as :func:`measured.decide` gives them) for ``weight``
        read with ``scales``, unless one is recorded already; the one recorded."""
        with self._lock:
            return self.int8_forms.setdefault(_form_key(weight, scales), Int8Form(weight, scales, memo, choice))

    def float_copy(self, form: "Int8Form", make) -> torch.Tensor:
        """The float32 values of ``form``'s weight (``make()``: ``s_W[o] q_W``), made once and read by every
        program that runs it in float32 (so that they are packed once); the int8 weight is then released to
        a stand-in that reads them back (:meth:`release`)."""
        with self._lock:
            made = form.float_copy
        if made is not None:
            return made
        made = make()  # (outside the lock: reading a weight's values may take it)
        with self._lock:
            if form.float_copy is None:
                form.float_copy = made
            return form.float_copy

    def release_float_copies(self, engine: Engine) -> int:
        """A stand-in for each float32 copy held only packed in another layout (:meth:`release`): its plain
        values are freed.  How many were released."""
        with self._lock:
            forms = [form for form in self.int8_forms.values() if form.float_copy is not None]
        released = 0
        for form in forms:
            stand_in = self.release(engine, form.float_copy)
            if stand_in is not None:
                with self._lock:
                    form.float_copy = stand_in
                released += 1
        return released

    def _drop_unread_int8_forms(self) -> None:
        """Forget the choices for int8 weights no packed entry reads any more, in either form (every program
        reading them was let go)."""
        def read(form: Int8Form) -> bool:
            copies = [form.weight, form.weight.t()] + ([form.float_copy] if form.float_copy is not None else [])
            return any(_key(t) in self.entries for t in copies)

        self.int8_forms = {key: form for key, form in self.int8_forms.items() if read(form)}

    def values(self, engine: Engine, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s values for torch code that reads them as they lie: itself, marked so that it is never
        released; for a stand-in, its plain copy, restored once and shared by every program."""
        with self._lock:
            if not is_released(tensor):
                self.read_as_is.add(_key(tensor))
                return tensor
            storage = self._packed(engine, Stream(engine), tensor, None)[1]  # plain: a tensor, or its bytes
        if storage.dtype != tensor.dtype:
            storage = storage.view(tensor.dtype)[:tensor.numel()]
        return storage.view(tensor.shape)

    def layouts_of(self, tensor: torch.Tensor, plain: bool = False) -> list[MemoryDesc]:
        """The layouts ``tensor`` is already packed in (its own plain layout left out unless ``plain``)."""
        with self._lock:
            entries = list(self.entries.get(_key(tensor), ()))
        own = plain_md(tensor.shape, tensor.dtype)
        return [md for md, _ in entries if plain or md != own]

    def _packed(self, engine: Engine, stream: Stream, tensor: torch.Tensor, md: MemoryDesc | None) -> tuple:
        key = _key(tensor)
        candidates = self.entries.setdefault(key, [])
        self.sources[key] = tensor
        wanted = plain_md(tensor.shape, tensor.dtype) if md is None else md
        for known_md, storage in candidates:
            if known_md == wanted:
                return known_md, storage
        source = values_of(tensor).detach().contiguous()
        if source.is_meta:
            raise RuntimeError(f"pyrys: a constant {tuple(tensor.shape)} without values reached the packer (made "
                               "from a released constant without pyrys.ir.released.values_of)")
        if md is None:
            entry = (wanted, source)
        else:
            entry = (md, to_layout(engine, stream, source.reshape(md.dims), md).keepalive)
        candidates.append(entry)
        return entry

    def copied_bytes(self) -> int:
        """Bytes of the packed copies (a constant read in its own contiguous layout is not copied)."""
        copies = {}
        with self._lock:  # a release on another thread re-keys both dicts
            held = [(self.sources[key].untyped_storage().data_ptr(), entries) for key, entries in self.entries.items()]
        for source, entries in held:
            for _, storage in entries:
                if storage.untyped_storage().data_ptr() != source:
                    copies[storage.untyped_storage().data_ptr()] = storage.untyped_storage().nbytes()
        return sum(copies.values())

    def retain(self, used: set[int]) -> None:
        """Forget every packed copy whose bytes (storage address) are not in ``used`` (a stand-in's
        copies are all kept: its values live nowhere else)."""
        with self._lock:
            self._retain(used)
            self._drop_unread_int8_forms()

    def _retain(self, used: set[int]) -> None:
        for key in list(self.entries):
            if not is_released(self.sources[key]):
                self.entries[key] = [(md, s) for md, s in self.entries[key] if s.data_ptr() in used]
            if not self.entries[key]:
                del self.entries[key], self.sources[key]

    def keep_held(self, used: set[int], constants: list[torch.Tensor]) -> int:
        """Forget every constant no held program reads (none of its packed copies' addresses in ``used``) and
        no held graph holds (``constants``: theirs, stand-ins or plain): what a dropped input signature alone
        packed (a slice of a weight its capture folded for its own length).  How many were forgotten."""
        bases = {id(base) for t in constants if (base := released_base(t)) is not None}
        storages = {t.untyped_storage().data_ptr() for t in constants if released_base(t) is None}
        forgotten = 0
        with self._lock:
            for key in list(self.entries):
                source = self.sources[key]
                base = released_base(source)
                held = id(base) in bases if base is not None else source.untyped_storage().data_ptr() in storages
                if not held and not any(s.data_ptr() in used for _, s in self.entries[key]):
                    del self.entries[key], self.sources[key]
                    self.read_as_is.discard(key)
                    forgotten += 1
            self._drop_unread_int8_forms()
        return forgotten

    def release(self, engine: Engine, tensor: torch.Tensor) -> torch.Tensor | None:
        """A stand-in for ``tensor`` if every copy held of it (or, where it has none, of its transpose: a
        linear's weight run as a matmul) is packed in another layout, with its dtype (read back, it gives
        the same values exactly), or, where none is, if it is an int8 weight held as its float32 values
        (:meth:`_release_int8_weight`); else None (it is read as it is, or not packed here, or a single
        number)."""
        with self._lock:
            key = packed_key = _key(tensor)
            entries = self.entries.get(key)
            if not entries and tensor.dim() == 2 and not is_released(tensor):
                packed_key = _key(tensor.t())  # a linear run as a matmul packs its weight's transpose
                entries = self.entries.get(packed_key)
            if not entries and not is_released(tensor):
                return self._release_int8_weight(tensor, key)
            own = tensor.untyped_storage().data_ptr()
            if (not entries or tensor.numel() <= 1 or is_released(tensor) or key in self.read_as_is
                    or any(s.untyped_storage().data_ptr() == own or DNNL_TO_TORCH.get(md.dtype) != tensor.dtype
                           for md, s in entries)
                    or any(k not in (key, packed_key) and s.untyped_storage().data_ptr() == own
                           for k, s in self.sources.items())):
                return None  # read as it is, not packed, a number, or packed through a view of another shape
            md, storage = entries[0]
            transposed = packed_key != key
            unpack = functools.partial(_unpack_transposed if transposed else _unpack, engine, md, storage,
                                       tuple(tensor.t().shape if transposed else tensor.shape))
            if tensor.dtype == torch.int8 and not torch.equal(unpack(), tensor):
                # packed halved (oneDNN's AVX2 convolutions reading s8 halve their int8 weights, which pyrys
                # gives them even): read back doubled, or kept as it is where that is not exact
                unpack = functools.partial(_doubled, unpack)
                if not torch.equal(unpack(), tensor):
                    return None
            stand_in = release(tensor, unpack)
            self._rekey_int8_form(key, stand_in)  # (an int8 weight packed in int8: its choice follows it)
            packed_view = stand_in.t() if transposed else stand_in  # what later builds pack and look up
            self.entries[_key(packed_view)] = self.entries.pop(packed_key)
            self.sources[_key(packed_view)] = packed_view
            del self.sources[packed_key]
            return stand_in

    def _release_int8_weight(self, tensor: torch.Tensor, key: tuple) -> torch.Tensor | None:
        """A stand-in for an int8 weight no program reads in int8, whose linears run on its float32 copy,
        packed (the caller holds the lock): its values come back from that copy, ``round(W_f32 / s_W[o])``,
        exactly (checked: else None)."""
        form = next((f for k, f in self.int8_forms.items() if k[0] == key and f.float_copy is not None
                     and _key(f.float_copy) in self.entries), None)  # (any: each gives it back exactly)
        if (form is None or tensor.dtype != torch.int8 or key in self.read_as_is
                or any(s.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
                       for s in self.sources.values())):
            return None
        restore = functools.partial(_requantized, form)
        if not torch.equal(restore(), tensor):
            return None
        stand_in = release(tensor, restore)
        self._rekey_int8_form(key, stand_in)
        return stand_in

    def _rekey_int8_form(self, key: tuple, stand_in: torch.Tensor) -> None:
        """The choices for the weight whose key was ``key``, found by its stand-in from now on."""
        for form_key in [k for k in self.int8_forms if k[0] == key]:
            form = self.int8_forms.pop(form_key)
            form.weight = stand_in
            self.int8_forms[(_key(stand_in), form_key[1])] = form


def _requantized(form: "Int8Form") -> torch.Tensor:
    """The int8 weight whose float32 copy ``form`` holds: ``round(W_f32 / s_W[o])`` (``W_f32 = s_W[o] q_W`` is
    one rounding from the exact product, far within half a step of ``q_W``, |q_W| <= 127)."""
    values = values_of(form.float_copy)
    scales = values_of(form.scales)
    return torch.round(values / scales.reshape(-1, *[1] * (values.dim() - 1))).to(torch.int8)


@dataclass
class Int8Form:
    """How the linears reading one int8 weight run (``int8_or_float.py``): the choice its first build made
    (``choice["float32"]``; ``memo``: what it is remembered and saved under), and where they run in float32,
    the weight's float32 values."""

    weight: torch.Tensor  # the int8 weight (held: its address is the key), or its stand-in once released
    scales: torch.Tensor  # s_W[o]
    memo: str
    choice: dict
    float_copy: torch.Tensor | None = None


def _form_key(weight: torch.Tensor, scales: torch.Tensor) -> tuple:
    return _key(weight), values_of(scales).detach().contiguous().numpy().tobytes()


def _unpack(engine: Engine, md: MemoryDesc, storage: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A plain tensor of ``shape`` with the values packed in ``storage`` (layout ``md``), read back."""
    return to_tensor(engine, Stream(engine), Memory(engine, md, storage.data_ptr(), keepalive=storage)).reshape(shape)


def _unpack_transposed(engine: Engine, md: MemoryDesc, storage: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The plain tensor whose transpose (of ``shape``) is packed in ``storage``."""
    return _unpack(engine, md, storage, shape).t().contiguous()


def _doubled(unpack) -> torch.Tensor:
    return (unpack().to(torch.int16) * 2).to(torch.int8)


def _key(tensor: torch.Tensor) -> tuple:
    """A constant's identity here: its bytes (address, shape, strides, dtype), or its stand-in's object."""
    base = released_base(tensor)
    if base is not None:
        return "released", id(base), tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset()
    return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


class Builder:
    """What lowering one graph under one layout policy needs.  ``reuse_packed``: a weight already packed
    (for another input shape) is offered to oneDNN in that layout first (:meth:`weight_layouts`), so
    that every shape's program reads the one packed copy."""

    def __init__(self, gm: fx.GraphModule, policy: str, engine: Engine, packed: PackedWeights | None = None,
                 reuse_packed: bool = False):
        self.gm, self.policy, self.engine, self.reuse_packed = gm, policy, engine, reuse_packed
        self.stream = Stream(engine)  # compile-time reorders of constants
        self.packed = packed or PackedWeights()
        self.values: dict[fx.Node, Value] = {}
        self.parts: dict[fx.Node, list[Value]] = {}  # the tensors of a tuple-valued node (split)
        self.kernel_choices: dict[str, dict] = {}  # measured kernel choices (measured.py), saved with the program
        self.packed_here: list = []  # the copies this build packed, in order (restore forgets the later ones)
        self.steps: list[Step] = []
        self.converted: dict[tuple, Value] = {}
        self.deferred: dict[fx.Node, Any] = {}  # node -> what defines its value, run when something reads it
        self.restored: dict[tuple, torch.Tensor] = {}  # released constants torch steps read: their values
        self.weight_bytes = 0
        self.scratchpad_bytes = 0
        self.sees_nonfinite = False  # the node lowered now may read an infinity the graph made (``lower.py``)

    # -- values -------------------------------------------------------------------------
    def value_of(self, arg: Any, in_memory: bool = True) -> Value:
        """The value of a computed tensor; with ``in_memory``, only one oneDNN can read (not a rank-0
        tensor, a dtype oneDNN has no type for, or a torch result that is not a tensor)."""
        if isinstance(arg, fx.Node) and arg not in self.values and arg in self.deferred:
            self.deferred.pop(arg)()  # defines it now, before the step that reads it
        if not isinstance(arg, fx.Node) or arg not in self.values:
            raise Unsupported(f"{format_arg(arg)} is not a computed tensor")
        value = self.values[arg]
        if in_memory and value.md is None:
            raise Unsupported(f"%{arg.name} ({format_type(arg.meta.get('val'))}) is not a tensor oneDNN reads")
        return value

    def constant(self, arg: Any) -> torch.Tensor | None:
        """The tensor of a constant argument, or None if it is not a constant tensor.

        Module state left unfrozen is a constant too: the program runs on the captured values."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return getattr(self.gm, arg.target)
        ref = state_ref(arg) if isinstance(arg, fx.Node) else None
        return ref.value if ref is not None and isinstance(ref.value, torch.Tensor) else None

    def constant_values(self, arg: Any) -> torch.Tensor | None:
        """Like :meth:`constant`, for torch code that reads the numbers (:meth:`PackedWeights.values`; a
        released constant's plain copy is kept in :attr:`restored`, so that outputs viewing it are copied)."""
        constant = self.constant(arg)
        if not isinstance(constant, torch.Tensor):
            return constant  # None, or a branch (a graph module) an If reads
        values = self.packed.values(self.engine, constant)
        if values is not constant:
            self.restored[_key(constant)] = values
        return values

    def define(self, node: fx.Node, md: MemoryDesc | None, kind: str = PLANNED, alias_of: Value | None = None) -> Value:
        value = Value(node.name, md, kind, alias_of)
        self.values[node] = value
        return value

    def defer(self, node: fx.Node, define) -> None:
        """``define()`` gives ``node`` its value when a step first reads it (:meth:`value_of`), not before: a
        dequantized int8 activation exists only where something reads it in float32."""
        self.deferred[node] = define

    def weight_layouts(self, tensor: torch.Tensor) -> list[MemoryDesc]:
        """The layouts to offer a primitive for ``tensor`` as its weights, in order: those it is packed in
        already (with ``reuse_packed``), then ``format_tag_any`` (oneDNN's choice)."""
        known = self.packed.layouts_of(tensor) if self.reuse_packed else []
        return [*known, any_md(tensor.shape, tensor.dtype)]

    def constant_value(self, tensor: torch.Tensor, md: MemoryDesc | None = None, name: str = "const") -> Value:
        """A compile-time value holding ``tensor`` in layout ``md`` (reordered once, now)."""
        md, storage = self.packed.packed(self.engine, self.stream, tensor, md, self.packed_here)
        self.weight_bytes += md.size()
        return Value(name, md, CONSTANT, storage=storage)

    def convert(self, value: Value, md: MemoryDesc) -> Value:
        """``value`` in layout ``md``: itself if it already is, else the output of a (cached) reorder."""
        if value.md == md:
            return value
        key = (id(value), md.format_summary(), md.dims)
        if key not in self.converted:
            self.converted[key] = self._reorder(value, md)
        return self.converted[key]

    def copy(self, value: Value, md: MemoryDesc) -> Value:
        """A new value holding ``value`` in layout ``md`` (a reorder, even to the same layout: a buffer to
        overwrite)."""
        return self._reorder(value, md)

    def to_plain(self, value: Value) -> Value:
        return self.convert(value, plain_md(value.md.dims, DNNL_TO_TORCH[value.md.dtype]))

    def _reorder(self, value: Value, md: MemoryDesc) -> Value:
        out = Value(f"{value.name}.reorder", md)
        pd = reorder_pd(self.engine, value.md, md)
        info = f"format_info=[{value.layout()} -> {out.layout()}]"
        self.add_primitive(f"%{out.name} : {md_type(md)} = dnnl::reorder[{info}](%{value.name})",
                           pd, {ARG_FROM: value, ARG_TO: out}, reads=[value], writes=[out])
        return out

    # -- steps --------------------------------------------------------------------------
    def add_primitive(self, text: str, pd: PrimitiveDesc, args: dict[int, Value], reads: list[Value],
                      writes: list[Value], unlike_eager_on_nonfinite: bool = False) -> None:
        """A step running a primitive made from ``pd`` (created in oneDNN's user scratchpad mode);
        ``unlike_eager_on_nonfinite``: its kernel gives another result than eager's for NaN or infinities."""
        primitive = Primitive(pd)
        scratchpad_md = pd.scratchpad_md()
        self.scratchpad_bytes = max(self.scratchpad_bytes, scratchpad_md.size())
        engine = self.engine

        def bind(frame: Frame):
            memories = {arg: frame.memories[_slot_of(value)] for arg, value in args.items()}
            if scratchpad_md.size() > 0:
                memories[ARG_SCRATCHPAD] = Memory(engine, scratchpad_md, frame.scratchpad.data_ptr())
            return primitive.bind(frame.stream, memories).run

        constants = [value for value in args.values() if value.kind == CONSTANT]
        mds = {arg: value.md for arg, value in args.items()}
        self.steps.append(Step(text, reads, writes, bind, constants, unlike_eager_on_nonfinite, primitive=(primitive, mds)))

    def add_torch(self, text: str, bind, reads: list[Value], writes: list[Value]) -> None:
        """A step running torch code; ``bind(frame)`` returns the call for one frame."""
        self.steps.append(Step(text, reads, writes, bind))

    def snapshot(self) -> tuple:
        return (len(self.steps), dict(self.converted), self.weight_bytes, self.scratchpad_bytes, len(self.values),
                dict(self.deferred), len(self.packed_here))

    def restore(self, snapshot: tuple, node: fx.Node) -> None:
        """Back to ``snapshot``: the steps, values and packed copies made since are forgotten (deferred ones
        defined since are deferred again); measured kernel choices are kept."""
        count, converted, weight_bytes, scratchpad_bytes, defined, deferred, packed = snapshot
        self.packed.forget(self.packed_here[packed:])
        del self.packed_here[packed:]
        del self.steps[count:]
        self.converted, self.weight_bytes, self.scratchpad_bytes = converted, weight_bytes, scratchpad_bytes
        for later in list(self.values)[defined:]:  # values are only added between a snapshot and its restore
            del self.values[later]
        self.deferred = deferred
        self.values.pop(node, None)
        self.parts.pop(node, None)


def _slot_of(value: Value) -> int:
    if value.slot < 0:
        raise RuntimeError(f"pyrys: {value.name} was given no slot when the program was assembled")
    return value.slot


def md_type(md: MemoryDesc) -> str:
    return f"{_TYPE_NAMES.get(md.dtype.name, md.dtype.name)}({', '.join(str(d) for d in md.dims)})"


_TYPE_NAMES = {"f32": "Float", "bf16": "BFloat16", "f16": "Half", "s32": "Int", "s8": "Char", "u8": "Byte"}


def node_text(node: fx.Node, label: str, attrs: str, operands: list[str], out: Value | None = None) -> str:
    """A program line in the seed's form: ``%y : Float(...) = dnnl::conv2d_relu[attrs](%x, ...)``; ``out``: the
    value written where it is not the node's own (a mean's keepdim result, which the node's is a view of), or
    where it has another data type than the node's (a bf16 conv writing the float32 its reader converts to)."""
    attrs = f"[{attrs}]" if attrs else ""
    meta = node.meta.get("val")
    named = out is not None and out.name != node.name and out.md is not None
    if named:
        written = f"%{out.name} : {md_type(out.md)}"
    elif out is not None and out.md is not None and isinstance(meta, torch.Tensor):
        written = f"%{node.name} : {format_tensor_type(meta.shape, DNNL_TO_TORCH[out.md.dtype])}"
    else:
        written = f"%{node.name} : {format_type(meta)}"
    return f"{written} = {label}{attrs}({', '.join(operands)})"


F32 = frozenset({torch.float32})
F32_OR_BF16 = frozenset({torch.float32, torch.bfloat16})  # where the lowering is written for either


def check_dtype(*tensors_meta, dtypes: frozenset = F32) -> None:
    """Every value is a tensor of one dtype, one of ``dtypes`` (float32 unless the lowering takes bfloat16
    too); else :class:`Unsupported` (the op runs through torch)."""
    for meta in tensors_meta:
        if not isinstance(meta, torch.Tensor):
            raise Unsupported("not a tensor")
        try:
            dnnl_dtype(meta.dtype)
        except TypeError as error:
            raise Unsupported(str(error)) from None
        if meta.dtype not in dtypes:
            raise Unsupported(f"dtype {meta.dtype} is lowered through torch")
    if len({meta.dtype for meta in tensors_meta}) > 1:
        raise Unsupported(f"mixed dtypes {sorted(str(m.dtype) for m in tensors_meta)}")
