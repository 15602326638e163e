"""TorchScript's builtin table holds no op torch has let go (``capture/script_builtins.py``)."""
from __future__ import annotations

import torch
import torch.jit._builtins as builtins

import pyrys  # noqa: F401 -- its import registers torch's quantize ops, whose second overloads replace the first
from pyrys.capture.script_builtins import drop_stale_builtins


def _stale_names() -> list[str]:
    names = []
    for key, name in builtins._get_builtin_table().items():
        namespace, _, op = name.partition("::")
        space = torch.ops.__dict__.get(namespace) if namespace not in ("aten", "prim") else None
        packet = space.__dict__.get(op) if space is not None else None
        if packet is not None and id(packet._op) != key:
            names.append(name)
    return names


def test_importing_pyrys_leaves_no_stale_builtin():
    """quantized_decomposed's first quantize_per_tensor and dequantize_per_tensor were left in the table: a
    list allocated at a freed op's address was then taken for that op, and scripting a Conv2d failed with
    "builtin cannot be used as a value" (about one pyrys demo in ten)."""
    assert _stale_names() == []


def test_an_op_replaced_by_a_later_overload_is_dropped():
    library = torch.library.Library("pyrys_builtins_test", "DEF")
    library.define("twice(Tensor x) -> Tensor")
    first = torch.ops.pyrys_builtins_test.twice._op  # its packet, registered as a builtin
    library.define("twice.scaled(Tensor x, float s) -> Tensor")  # refreshes the packet: a new op object
    assert torch.ops.pyrys_builtins_test.twice._op is not first
    assert "pyrys_builtins_test::twice" in _stale_names()
    assert drop_stale_builtins() >= 1
    assert _stale_names() == [] and id(first) not in builtins._get_builtin_table()
