"""Compile-time state of a lowering: values per graph node, the steps so far, reorders, weights."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from pyrys.backends.dnnl.constants import ARG_FROM, ARG_TO
from pyrys.backends.dnnl.layout import plain_md
from pyrys.backends.dnnl.primitives import (
    DNNL_TO_TORCH, Engine, MemoryDesc, Primitive, PrimitiveDesc, Stream, dnnl_dtype, reorder_pd, tensor_memory, to_layout,
)
from pyrys.backends.dnnl.program import Step
from pyrys.backends.dnnl.values import CONSTANT, PLANNED, Value
from pyrys.ir.printer import format_arg, format_type


class Unsupported(Exception):
    """This node cannot be lowered to oneDNN; it runs through torch instead."""


class Builder:
    def __init__(self, gm: fx.GraphModule, policy: str, engine: Engine, stream: Stream):
        self.gm, self.policy, self.engine, self.stream = gm, policy, engine, stream
        self.values: dict[fx.Node, Value] = {}
        self.parts: dict[fx.Node, list[Value]] = {}  # the tensors of a tuple-valued node (split)
        self.steps: list[Step] = []
        self.converted: dict[tuple, Value] = {}
        self.weight_bytes = 0

    # -- values -------------------------------------------------------------------------
    def value_of(self, arg: Any) -> Value:
        if not isinstance(arg, fx.Node) or arg not in self.values:
            raise Unsupported(f"{format_arg(arg)} is not a computed tensor")
        return self.values[arg]

    def constant(self, arg: Any) -> torch.Tensor | None:
        """The tensor of a constant argument, or None if it is not a constant tensor."""
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            return getattr(self.gm, arg.target)
        return None

    def define(self, node: fx.Node, md: MemoryDesc | None, kind: str = PLANNED, alias_of: Value | None = None) -> Value:
        value = Value(node.name, md, kind, alias_of)
        self.values[node] = value
        return value

    def constant_value(self, tensor: torch.Tensor, md: MemoryDesc | None = None, name: str = "const") -> Value:
        """A compile-time value holding ``tensor`` in layout ``md`` (reordered once, now)."""
        tensor = tensor.detach().contiguous()
        if md is None:
            memory = tensor_memory(self.engine, tensor)
        else:
            memory = to_layout(self.engine, self.stream, tensor.reshape(md.dims), md)
        self.weight_bytes += memory.md.size()
        return Value(name, memory.md, CONSTANT, memory=memory)

    def convert(self, value: Value, md: MemoryDesc) -> Value:
        """``value`` in layout ``md``: itself if it already is, else the output of a (cached) reorder."""
        if value.md == md:
            return value
        key = (id(value), md.format_summary(), md.dims)
        if key not in self.converted:
            self.converted[key] = self._reorder(value, md)
        return self.converted[key]

    def to_plain(self, value: Value) -> Value:
        return self.convert(value, plain_md(value.md.dims, DNNL_TO_TORCH[value.md.dtype]))

    def _reorder(self, value: Value, md: MemoryDesc) -> Value:
        out = Value(f"{value.name}.reorder", md)
        pd = reorder_pd(self.engine, value.md, md)
        info = f"format_info=[{value.layout()} -> {out.layout()}]"
        self.add_primitive(f"%{out.name} : {_md_type(md)} = dnnl::reorder[{info}](%{value.name})",
                           pd, {ARG_FROM: value, ARG_TO: out}, reads=[value], writes=[out])
        return out

    # -- steps --------------------------------------------------------------------------
    def add_primitive(self, text: str, pd: PrimitiveDesc, args: dict[int, Value], reads: list[Value],
                      writes: list[Value]) -> None:
        primitive = Primitive(pd)

        def make_call(stream: Stream):
            memories = {arg: value.memory for arg, value in args.items()}
            return primitive.bind(stream, memories).run

        self.steps.append(Step(text, reads, writes, make_call))

    def add_torch(self, text: str, call, reads: list[Value], writes: list[Value]) -> None:
        self.steps.append(Step(text, reads, writes, lambda stream: call))

    def snapshot(self) -> tuple:
        return len(self.steps), dict(self.converted), self.weight_bytes

    def restore(self, snapshot: tuple, node: fx.Node) -> None:
        count, converted, weight_bytes = snapshot
        del self.steps[count:]
        self.converted, self.weight_bytes = converted, weight_bytes
        self.values.pop(node, None)
        self.parts.pop(node, None)


def _md_type(md: MemoryDesc) -> str:
    return f"{_TYPE_NAMES.get(md.dtype.name, md.dtype.name)}({', '.join(str(d) for d in md.dims)})"


_TYPE_NAMES = {"f32": "Float", "bf16": "BFloat16", "f16": "Half", "s32": "Int", "s8": "Char", "u8": "Byte"}


def node_text(node: fx.Node, label: str, attrs: str, operands: list[str]) -> str:
    """A program line in the seed's form: ``%y : Float(...) = dnnl::conv2d_relu[attrs](%x, ...)``."""
    attrs = f"[{attrs}]" if attrs else ""
    return f"%{node.name} : {format_type(node.meta.get('val'))} = {label}{attrs}({', '.join(operands)})"


def check_dtype(*tensors_meta) -> None:
    for meta in tensors_meta:
        if not isinstance(meta, torch.Tensor):
            raise Unsupported("not a tensor")
        try:
            dnnl_dtype(meta.dtype)
        except TypeError as error:
            raise Unsupported(str(error)) from None
        if meta.dtype != torch.float32:
            raise Unsupported(f"dtype {meta.dtype} is lowered through torch")
