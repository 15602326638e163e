"""Shape and dtype of every value: ``meta["val"]`` recomputed by fake-tensor propagation."""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from pyrys.ir.graph import state_ref


def _fake_input(mode: FakeTensorMode, node: fx.Node):
    ref = state_ref(node)
    if ref is not None:
        value = ref.value
        return mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
    val = node.meta["val"]
    with mode:
        return torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)


def refresh_meta(gm: fx.GraphModule) -> None:
    """Re-run fake-tensor propagation over ``gm`` so every node's ``meta["val"]`` is current."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_inputs = [_fake_input(mode, n) for n in placeholders]
    FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*fake_inputs)
