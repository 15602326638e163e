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


def test_inference_on_concrete_shapes_is_memoized_by_what_it_reads(monkeypatch):
    """Equal layers are inferred once; an argument's shape, strides, dtype or scalar type gives another key
    (``x * 1`` on an int tensor stays int, ``x * 1.0`` is float)."""
    from pyrys.ir import meta

    monkeypatch.setattr(meta, "_INFERRED", {})
    inferred = []
    original = meta._infer
    monkeypatch.setattr(meta, "_infer", lambda node, mode: inferred.append(node.name) or original(node, mode))
    graph = fx.Graph()
    ints, floats = graph.placeholder("ints"), graph.placeholder("floats")
    ints.meta["val"], floats.meta["val"] = torch.empty(2, 3, dtype=torch.int64), torch.empty(2, 3)
    by_int = graph.call_function(aten.mul.Tensor, (ints, 1))
    by_float = graph.call_function(aten.mul.Tensor, (ints, 1.0))
    again = graph.call_function(aten.mul.Tensor, (ints, 1))
    transposed = graph.call_function(aten.t.default, (floats,))
    moved = graph.call_function(aten.mul.Tensor, (transposed, 1))
    graph.output((by_int, by_float, again, moved))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    for node in (by_int, by_float, again, transposed, moved):
        node.meta["val"] = meta.infer_meta(node)
    assert inferred == [by_int.name, by_float.name, transposed.name, moved.name]  # `again` asked what `by_int` did
    assert by_int.meta["val"].dtype == torch.int64 and by_float.meta["val"].dtype == torch.float32
    assert moved.meta["val"].shape == (3, 2) and moved.meta["val"].stride() == transposed.meta["val"].stride()
    assert meta.fresh_meta(gm)[again].dtype == again.meta["val"].dtype


def test_inference_with_symbolic_shapes_is_not_memoized(monkeypatch):
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyrys.ir import meta

    monkeypatch.setattr(meta, "_INFERRED", {})
    mode = FakeTensorMode(shape_env=ShapeEnv())
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = mode.from_tensor(torch.empty(4, 3), static_shapes=False)
    doubled = graph.call_function(aten.mul.Tensor, (x, 2))
    graph.output(doubled)
    fx.GraphModule(torch.nn.Module(), graph)
    assert isinstance(meta.infer_meta(doubled, mode).shape[0], torch.SymInt) and meta._INFERRED == {}


def test_propagation_reuses_what_was_inferred_and_remakes_it_for_an_op_it_runs(monkeypatch):
    """A second graph's propagation takes ``relu`` from the memo (a fake tensor of the first one's mode) and
    runs ``sigmoid`` on it, remade in its own mode; the verifier's propagation runs every op itself."""
    from pyrys.ir import meta

    monkeypatch.setattr(meta, "_INFERRED", {})

    def graph_with(last) -> fx.GraphModule:
        graph = fx.Graph()
        x = graph.placeholder("x")
        x.meta["val"] = torch.empty(2, 3)
        graph.output(graph.call_function(last, (graph.call_function(aten.relu.default, (x,)),)))
        return fx.GraphModule(torch.nn.Module(), graph)

    meta.refresh_meta(graph_with(aten.neg.default))
    ran = []
    original = fx.Interpreter.call_function
    monkeypatch.setattr(fx.Interpreter, "call_function",
                        lambda self, target, args, kwargs: ran.append(target) or original(self, target, args, kwargs))
    second = graph_with(aten.sigmoid.default)
    meta.refresh_meta(second)
    assert ran == [aten.sigmoid.default]
    assert [tuple(n.meta["val"].shape) for n in second.graph.nodes if n.op == "call_function"] == [(2, 3), (2, 3)]
    ran.clear()
    meta.fresh_meta(second)
    assert ran == [aten.relu.default, aten.sigmoid.default]


def test_a_value_the_fake_mode_tracks_is_never_taken_from_the_memo(monkeypatch):
    """One-element constants keep their values through fake propagation (``item()`` reads them): 3 * 2 + 1
    and 5 * 2 + 1 are 7 and 11, whatever was inferred before for tensors of the same shape."""
    from pyrys.ir import meta

    monkeypatch.setattr(meta, "_INFERRED", {})
    graph = fx.Graph()
    values = []
    for name in ("three", "five"):
        doubled = graph.call_function(aten.mul.Tensor, (graph.get_attr(name), 2))
        values.append(graph.call_function(aten._local_scalar_dense.default,
                                          (graph.call_function(aten.add.Tensor, (doubled, 1)),)))
    graph.output(values)
    owner = torch.nn.Module()
    owner.register_buffer("three", torch.tensor([3.0]))
    owner.register_buffer("five", torch.tensor([5.0]))
    gm = fx.GraphModule(owner, graph)
    for memo in (False, True, True):
        fresh = meta.fresh_meta(gm, memo=memo)
        assert [fresh[v] for v in values] == [7.0, 11.0]


@pytest.mark.parametrize("mode, shape", [("nearest", (0, 2, 3, 3)), ("nearest", (0, 2, 5)), ("nearest", (0, 2, 2, 3, 3)),
                                         ("bilinear", (0, 2, 3, 3)), ("nearest-exact", (0, 2, 3, 3))])
def test_an_op_whose_fake_kernel_fails_on_an_empty_tensor_runs_on_a_real_one(mode, shape):
    """torch's meta of ``upsample_nearest2d`` checks ``numel() != 0 or <an int>``: a batch of 0, which eager
    interpolates, raised ``TypeError: cond must be a bool`` from ``optimize`` and from a call (a helper's
    find). The op runs on real empty tensors there, which costs nothing."""
    import pyrys

    class Resize(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, size=(6,) * (len(shape) - 2), mode=mode)

    model, empty = Resize().eval(), torch.randn(shape)
    for opt in (pyrys.optimize(model, (torch.randn(1, *shape[1:]),)), pyrys.optimize(model, (empty,))):
        assert opt(empty).shape == model(empty).shape
        assert pyrys.relative_error(opt(torch.ones(2, *shape[1:])), model(torch.ones(2, *shape[1:]))) <= 1e-6
