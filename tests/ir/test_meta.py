"""Meta propagation at capture: a view the input's strides refuse becomes a reshape (an exported graph can hold
one: attention's output strides depend on the kernel torch picks, HF T5 and Swin met it)."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from pyrys.ir.meta import fresh_meta, refresh_meta

aten = torch.ops.aten


def transposed_then_viewed() -> tuple[fx.GraphModule, fx.Node]:
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(1, 4, 16, 8)
    heads_last = graph.call_function(aten.transpose.int, (x, 1, 2))
    merged = graph.call_function(aten.view.default, (heads_last, [1, 16, -1]))
    graph.output(merged)
    return fx.GraphModule(torch.nn.Module(), graph), merged


def test_a_view_the_strides_refuse_becomes_a_reshape_at_capture():
    gm, merged = transposed_then_viewed()
    refresh_meta(gm)
    assert merged.target is aten.reshape.default
    assert tuple(merged.meta["val"].shape) == (1, 16, 32)
    x = torch.randn(1, 4, 16, 8)
    assert torch.equal(gm(x), x.transpose(1, 2).reshape(1, 16, 32))


def test_the_verifier_s_propagation_changes_nothing():
    gm, merged = transposed_then_viewed()
    with pytest.raises((RuntimeError, ValueError), match="view"):
        fresh_meta(gm)
    assert merged.target is aten.view.default
