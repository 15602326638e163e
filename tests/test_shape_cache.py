"""max_shapes: compiled shapes are bounded, the least recently called goes first, the first never."""
from __future__ import annotations

import copy
import importlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import pyrys
from pyrys.optimized_module import MAX_SHAPE_NOTES
from pyrys.shape_cache import ShapeCache
from tests.conftest import TOLERANCE, spy_dynamo_graphs
from tests.models import conv_bn_relu, image

BUILDERS = [importlib.import_module(name) for name in ("pyrys.compiled", "pyrys.optimized_module")]  # both call it


def test_the_least_recently_used_entry_goes_and_the_pinned_one_stays():
    cache = ShapeCache(3, "first", {"first": 0})
    assert cache.put("a", 1) == [] and cache.put("b", 2) == []
    cache.get("a")  # now b is the least recently used
    assert cache.put("c", 3) == ["b"]
    cache.touch("first")
    assert cache.put("d", 4) == ["a"]
    assert set(cache.entries) == {"first", "c", "d"}
    assert cache.came_back("b") and cache.came_back("a") and not cache.came_back("c")  # evicted before or not
    tiny = ShapeCache(1, "first", {"first": 0})
    assert tiny.put("a", 1) == ["a"] and set(tiny.entries) == {"first"}  # nothing else to drop: not kept
    loaded = ShapeCache(2, "first", {"first": 0, "saved": 1}, kept={"first", "saved"})  # cannot compile them again
    assert loaded.put("a", 2) == [] and loaded.put("b", 3) == [] and loaded.put("c", 4) == ["a"]
    assert set(loaded.entries) == {"first", "saved", "b", "c"}  # two besides the two kept (the README's promise)


@pytest.fixture
def compiles(monkeypatch) -> list:
    """The batch size of every program built during the test (a capture, or a shape specialized), in order."""
    seen = []
    original = BUILDERS[0].build_for_shape

    def spy(template, signature, flat, config, like=None, **options):
        seen.append(flat[0].shape[0])
        return original(template, signature, flat, config, like, **options)

    for module in BUILDERS:
        monkeypatch.setattr(module, "build_for_shape", spy)
    return seen


def test_an_optimized_module_keeps_at_most_max_shapes(compiles, backend):
    model = conv_bn_relu()
    opt = pyrys.optimize(model, (image(1),), backend=backend, max_shapes=2)
    first_graph = opt.graph
    rebuilt = []  # after each call, how many notes say a dropped shape was built again
    for batch in (2, 3, 2, 1, 3, 4):
        x = image(batch)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
        assert len(opt._programs) <= 2
        rebuilt.append(sum("built again after max_shapes=2 dropped them" in note for note in opt.notes))
    assert rebuilt == [0, 0, 1, 1, 1, 1]  # from batch 2's comeback on, noted once
    # 1 is pinned; 2 was dropped for 3, came back (dropping 3), 3 came back, then 4 dropped 3
    assert compiles == [1, 2, 3, 2, 3, 4]
    held = {signature.leaves[0][0][0] for signature in opt._programs}
    assert held == {1, 4}
    assert {key[0][1][0] for key in opt._fast_calls} <= held  # (type, shape, ...): no fast path keeps a dropped one
    assert opt.graph == first_graph  # still the first shape's


def test_many_callers_with_many_shapes_stay_correct_and_bounded(backend):
    model = conv_bn_relu()
    opt = pyrys.optimize(model, (image(1),), backend=backend, max_shapes=2)
    inputs = [image(1 + i % 4) * (i + 1) for i in range(24)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(opt, inputs))
    assert all(pyrys.relative_error(r, e) <= TOLERANCE for r, e in zip(results, expected))
    assert len(opt._programs) <= 2


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8"])
def test_max_shapes_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match="max_shapes must be a positive int"):
        pyrys.optimize(conv_bn_relu(), (image(),), max_shapes=value)


def test_torch_compile_graphs_keep_at_most_max_shapes(monkeypatch):
    from pyrys.compile_backend import DynamoGraph

    compiled_shapes: dict[int, list[int]] = {}
    original = DynamoGraph._optimize

    def spy(self, inputs, scalars, state):
        compiled_shapes.setdefault(id(self), []).append(inputs[0].shape[0])
        return original(self, inputs, scalars, state)

    monkeypatch.setattr(DynamoGraph, "_optimize", spy)
    made = spy_dynamo_graphs(monkeypatch)
    torch._dynamo.reset()
    model = conv_bn_relu()
    compiled = torch.compile(model, backend="pyrys", options={"backend": "reference", "max_shapes": 2})
    try:
        for batch in (2, 2, 3, 3, 4, 4, 5, 5):  # a further shape is compiled at its second call
            x = image(batch)
            assert pyrys.relative_error(compiled(x), model(x)) <= TOLERANCE
    finally:
        torch._dynamo.reset()
    assert max(len(shapes) for shapes in compiled_shapes.values()) >= 3  # dynamo's dynamic graph saw 3 shapes
    assert made and all(len(graph.programs) <= 2 for graph in made)


def test_notes_past_their_bound_keep_the_latest_and_count_the_rest():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    opt = pyrys.optimize(model, torch.randn(1, 4), dynamic=False, max_shapes=32)
    before = len(opt.notes)
    for batch in range(2, 2 + MAX_SHAPE_NOTES + 3):  # each a capture of its own, each noted
        opt(torch.randn(batch, 4))
    assert len(opt.notes) == before + MAX_SHAPE_NOTES
    assert opt.notes[-1].startswith("3 notes of later shapes not kept") and "Float(20, 4)" in opt.notes[-1]
    assert "Float(2, 4)" in opt.notes[before]  # the first ones stay


def test_a_copy_notes_its_own_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()
    opt = pyrys.optimize(model, torch.randn(1, 4), dynamic=False)
    twin = copy.deepcopy(opt)
    twin(torch.randn(3, 4))
    assert any("Float(3, 4)" in note for note in twin.notes)
    assert not any("Float(3, 4)" in note for note in opt.notes)


def test_torchs_cache_of_fake_answers_stays_bounded_as_shapes_come(monkeypatch):
    """torch's class-wide FakeTensorMode.cache has no bound: a server meeting a new shape at every call grew
    by 99 MiB over 900 shapes, with max_shapes programs kept (a helper's find)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from pyrys.ir import meta

    monkeypatch.setattr(meta, "TORCH_FAKE_CACHE_LIMIT", 0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)).eval()
    opt = pyrys.optimize(model, (torch.rand(2, 5, 8),), dynamic=True, max_shapes=2)
    for length in range(6, 10):
        x = torch.rand(3, length, 8)
        assert pyrys.relative_error(opt(x), model(x)) <= pyrys.FP32_TOLERANCE
        assert len(FakeTensorMode.cache) == 0
    pyrys.optimize(model, (torch.rand(2, 5, 8),))  # optimize itself adds ~50 (a reviewer's find)
    assert len(FakeTensorMode.cache) == 0
