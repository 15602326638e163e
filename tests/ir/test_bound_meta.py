"""A symbolic graph's values at bound sizes (``ir/bound_meta.py``) are what propagating the concrete graph
gives: every node's sizes, strides and dtype, at batch sizes and lengths of 1 and more."""
import pytest
import sympy
import torch
import torch.fx as fx
import torch.nn as nn

import pyrys
from pyrys.ir.bound_meta import bound_meta
from pyrys.ir.graph import copy_graph, user_inputs
from pyrys.ir.meta import refresh_meta
from pyrys.ir.symbolic import bind_symbols, graph_fake_mode
from pyrys.passes import specialize as specializing
from tests.models import Fn


def _described(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.stride(), value.dtype
    if isinstance(value, (list, tuple)):
        return [_described(v) for v in value]
    return value


def _propagated_and_bound(gm: fx.GraphModule, inputs: list) -> tuple[dict, dict | None]:
    bindings, why = bind_symbols(gm, inputs)
    assert why is None, why
    concrete = fx.GraphModule(gm, copy_graph(gm.graph))
    for node, value in zip(user_inputs(concrete.graph), inputs):
        node.meta["val"] = value
    refresh_meta(concrete)
    propagated = {n.name: _described(n.meta.get("val")) for n in concrete.graph.nodes
                  if n.op not in ("placeholder", "output")}
    bound = bound_meta(gm, bindings, graph_fake_mode(concrete))
    return propagated, bound and {name: _described(value) for name, value in bound.items()}


def _residual_cnn():
    torch.manual_seed(0)
    return Fn(lambda m, x: m.head(torch.flatten(m.pool(torch.relu(m.b(torch.relu(m.a(x))) + x)), 1)),
              a=nn.Conv2d(8, 8, 3, padding=1), b=nn.Conv2d(8, 8, 3, padding=1), pool=nn.AdaptiveAvgPool2d(1),
              head=nn.Linear(8, 4)).eval()


def _encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2).eval()


def _positions():
    """HF's position ids (``arange(L).expand(B, L)``, an expand of a dim that is 1 in the example's trace too),
    a split projection viewed into heads and permuted, a concatenation."""
    torch.manual_seed(0)

    def forward(m, ids):
        batch, length = ids.shape
        positions = torch.arange(length).unsqueeze(0).expand(batch, length)
        h = m.tokens(ids) + m.places(positions)
        q, k = m.proj(h).split(16, dim=-1)
        q = q.view(batch, length, 4, 4).permute(0, 2, 1, 3)
        k = k.view(batch, length, 4, 4).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)).softmax(-1)
        return scores.flatten(2), torch.cat([h, q.transpose(1, 2).flatten(2)], dim=-1)

    return Fn(forward, tokens=nn.Embedding(50, 16), places=nn.Embedding(64, 16), proj=nn.Linear(16, 32)).eval()


CASES = {
    "residual_cnn": (_residual_cnn, lambda b, n: (torch.rand(b, 8, n, n),), [(2, 8), (1, 8), (3, 8), (17, 8)]),
    "encoder": (_encoder, lambda b, n: (torch.rand(b, n, 16),), [(2, 8), (3, 5), (2, 33)]),
    "positions": (_positions, lambda b, n: (torch.randint(0, 50, (b, n)),), [(2, 8), (1, 8), (1, 5), (3, 17)]),
}


@pytest.mark.parametrize("name", CASES)
def test_bound_values_are_the_propagated_ones(name):
    build, inputs, shapes = CASES[name]
    model = build()
    opt = pyrys.optimize(model, inputs(*shapes[0]), dynamic=True)
    gm = opt._generic.generic.gm
    for shape in shapes[1:]:
        flat = list(inputs(*shape))
        if bind_symbols(gm, flat)[1] is not None:
            continue  # a shape the graph does not hold for (a batch of 1 where it assumes more)
        propagated, bound = _propagated_and_bound(gm, flat)
        if 1 in bind_symbols(gm, flat)[0].values():
            assert bound is None, shape  # a symbol at 1: propagated (see the next test)
        else:
            assert bound == propagated, shape


class ExpandedBeams(nn.Module):
    """Beam search's ``x.unsqueeze(1).expand(B, K, L, D).reshape(B * K, L, D)``, then ``.contiguous().view``
    (export drops the ``.contiguous()``, a no-op on the symbolic graph's copy), and ``repeat_interleave``
    written as an expand and a reshape: at a batch or length of 1 torch's reshape is a view with a 0 stride."""

    def __init__(self, beams: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.beams, self.inner, self.out = beams, nn.Linear(8, 8), nn.Linear(8 * beams, 4)

    def forward(self, x):
        batch, length, width = x.shape
        e = self.inner(x).unsqueeze(1).expand(batch, self.beams, length, width).reshape(batch * self.beams, length,
                                                                                       width)
        f = e.contiguous().view(batch, self.beams * length, width).transpose(1, 2).reshape(batch, -1,
                                                                                         self.beams * width)
        r = x.unsqueeze(2).expand(-1, -1, self.beams, -1).reshape(batch, -1, width)
        return self.out(f), r


@pytest.mark.parametrize("backend", ["dnnl", "reference"])
def test_sizes_of_1_are_propagated_where_a_reshape_is_a_view(backend):
    """A reviewer's find: bound at batch 1 or length 1, the reshape's values were the symbolic graph's copy
    (``(24, 8, 1)``) where torch's is a view (``(8, 0, 1)``), the view after it stayed a view and raised
    "view size is not compatible" at every call of that shape (and ``verify=True`` failed)."""
    model = ExpandedBeams().eval()
    opt = pyrys.optimize(model, (torch.randn(2, 5, 8),), dynamic=True, backend=backend, verify=True)
    for shape in [(3, 7), (1, 5), (2, 1), (1, 1), (4, 9)]:
        x = torch.randn(*shape, 8)
        assert pyrys.relative_error(opt(x), model(x)) < 1e-5, shape


def test_a_new_shape_is_specialized_without_propagating(monkeypatch):
    """Specializing to a new shape takes the bound values (ResNet-18: 60 ms of propagation before)."""
    def refused(gm):
        raise AssertionError("propagated")

    model = _residual_cnn()
    opt = pyrys.optimize(model, (torch.rand(2, 8, 8, 8),), dynamic=True)
    monkeypatch.setattr(specializing, "refresh_meta", refused)
    for batch in (3, 2, 5):
        x = torch.rand(batch, 8, 8, 8)
        assert pyrys.relative_error(opt(x), model(x)) < 1e-5


def test_what_cannot_be_bound_is_propagated():
    """A symbol at 0 gives an empty value (an op's shape rule may refuse it), one at 1 views where the symbolic
    graph copies: propagated instead."""
    model = _residual_cnn()
    opt = pyrys.optimize(model, (torch.rand(2, 8, 8, 8),), dynamic=True)
    gm = opt._generic.generic.gm
    symbol = next(iter(bind_symbols(gm, [torch.rand(3, 8, 8, 8)])[0]))
    assert bound_meta(gm, {symbol: sympy.Integer(0)}, graph_fake_mode(None)) is None
    assert bound_meta(gm, {symbol: sympy.Integer(1)}, graph_fake_mode(None)) is None
    assert bound_meta(gm, {symbol: sympy.Integer(3)}, graph_fake_mode(None)) is not None


def _propagations(monkeypatch) -> list:
    """Every shape propagation ``specialize`` runs from now on in the test (the graphs it propagated)."""
    propagated, original = [], specializing.refresh_meta

    def counted(gm):
        propagated.append(gm)
        original(gm)

    monkeypatch.setattr(specializing, "refresh_meta", counted)
    return propagated


def _heads():
    """A linear viewed into heads, transposed, a softmax over each head, merged back: every shape op of a batch
    of 1 and any length agrees with the symbolic graph's."""
    torch.manual_seed(0)

    def forward(m, x):
        batch, length, _ = x.shape
        heads = m.a(x).view(batch, length, 4, 4).transpose(1, 2).softmax(-1)
        return m.b(heads.transpose(1, 2).reshape(batch, length, 16))

    return Fn(forward, a=nn.Linear(16, 16), b=nn.Linear(16, 8)).eval()


def test_a_size_of_1_found_bound_alike_is_bound_after(monkeypatch):
    """The first two shapes with a symbol at 1 are propagated and their values compared with the bound ones;
    they agree here, so later shapes with that symbol at 1 are bound (a batch-1 BERT at a new length: 0.1 s of
    propagation less); shapes without one are bound as before."""
    model = _heads()
    opt = pyrys.optimize(model, (torch.rand(2, 8, 16),), dynamic=True)
    propagated = _propagations(monkeypatch)
    for batch, length in [(1, 11), (3, 9), (1, 13), (1, 21), (1, 40), (2, 7)]:  # (none within 1 of a fixed size)
        x = torch.rand(batch, length, 16)
        assert pyrys.relative_error(opt(x), model(x)) < 1e-5, (batch, length)
    assert len(propagated) == 2
    assert list(specializing.bound_at_one(opt._generic.generic.gm).values()) == [True]


def test_a_size_of_1_found_other_than_bound_is_propagated_each_time(monkeypatch):
    """Where torch's reshape views at batch 1 what the symbolic graph copies, every batch-1 shape is propagated
    (bound values there fail at every call: the reviewer's find above)."""
    model = ExpandedBeams().eval()
    opt = pyrys.optimize(model, (torch.randn(2, 5, 8),), dynamic=True)
    propagated = _propagations(monkeypatch)
    for shape in [(1, 11), (1, 13), (1, 21), (1, 27)]:
        x = torch.randn(*shape, 8)
        assert pyrys.relative_error(opt(x), model(x)) < 1e-5, shape
    assert len(propagated) == 4
    assert list(specializing.bound_at_one(opt._generic.generic.gm).values()) == [False]


def test_values_bound_at_1_where_found_alike_are_the_propagated_ones():
    """Bound with a symbol at 1 where the first such shape was found alike, the values are still propagation's
    at every other length."""
    model = _heads()
    opt = pyrys.optimize(model, (torch.rand(2, 8, 16),), dynamic=True)
    gm = opt._generic.generic.gm
    opt(torch.rand(1, 11, 16))
    opt(torch.rand(1, 13, 16))
    for length in (21, 27, 40):
        flat = [torch.rand(1, length, 16)]
        bindings, why = bind_symbols(gm, flat)
        ones = frozenset(s for s, v in bindings.items() if v == 1)
        assert why is None and specializing.bound_at_one(gm)[specializing._kind_of(gm, bindings, ones)]
        propagated, _ = _propagated_and_bound(gm, flat)
        bound = bound_meta(gm, bindings, graph_fake_mode(None), ones)
        assert {name: _described(value) for name, value in bound.items()} == propagated, length


def test_a_size_of_1_alike_at_one_shape_only_is_propagated_after(monkeypatch):
    """Bound values that agree with propagation at the first shape with a symbol at 1 but not at the second (two
    products of sizes that meet at one size) are not trusted: every later such shape is propagated."""
    answers = iter([True, False])
    monkeypatch.setattr(specializing, "_bound_alike", lambda *args: next(answers))
    model = _heads()
    opt = pyrys.optimize(model, (torch.rand(2, 8, 16),), dynamic=True)
    propagated = _propagations(monkeypatch)
    for length in (11, 13, 21, 27):
        x = torch.rand(1, length, 16)
        assert pyrys.relative_error(opt(x), model(x)) < 1e-5, length
    assert len(propagated) == 4
    assert list(specializing.bound_at_one(opt._generic.generic.gm).values()) == [False]


def test_a_size_1_dims_stride_differs_only_where_the_graph_returns_it(monkeypatch):
    """HF's position ids and masks (``expand`` of a size-1 dim to 1 keeps its input's stride there, where the
    symbolic graph has 0): no index steps over that dim, so inside the graph the bound values stand; where the
    graph returns such a value its strides are the caller's to see, and every batch-1 shape is propagated."""
    model = _positions()
    opt = pyrys.optimize(model, (torch.randint(0, 50, (2, 8)),), dynamic=True)
    propagated = _propagations(monkeypatch)
    for length in (11, 13, 21, 27, 40):
        ids = torch.randint(0, 50, (1, length))
        assert pyrys.relative_error(opt(ids), model(ids)) < 1e-5, length
    assert len(propagated) == 2

    def returned(m, ids):
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand(ids.shape[0], ids.shape[1])
        return m.tokens(ids) + m.places(positions), positions

    model = Fn(returned, tokens=nn.Embedding(50, 16), places=nn.Embedding(64, 16)).eval()
    opt = pyrys.optimize(model, (torch.randint(0, 50, (2, 8)),), dynamic=True)
    propagated.clear()
    for length in (11, 13, 21, 27):
        ids = torch.randint(0, 50, (1, length))
        got, expected = opt(ids), model(ids)
        assert torch.equal(got[1], expected[1]) and got[1].stride() == expected[1].stride(), length
        assert pyrys.relative_error(got[0], expected[0]) < 1e-5, length
    assert len(propagated) == 4


class SliceToTheOtherLength(nn.Module):
    """A helper's find: ``x[..., :L + extra]`` of x's own length M is whole where L + extra >= M, and at batch 1
    the reshape after the permute is then a view where it copies at a shorter L (the capture, made at batch 2,
    has no guard on L against M): bound at L == M after two batch-1 shapes of L < M had agreed, the view after
    it raised "view size is not compatible" at every call; a second helper's, likewise at L + 1 == M."""

    def __init__(self, extra: int = 0):
        super().__init__()
        self.extra = extra

    def forward(self, x, y):
        batch, rows, width = x.shape
        n = x.unsqueeze(-1).expand(batch, rows, width, 3)[:, :, :y.shape[1] + self.extra]
        r = n.permute(1, 2, 0, 3).reshape(-1, 3)
        return r.contiguous().view(-1) * 2 + y.sum()


@pytest.mark.parametrize("extra", [0, 1])
def test_shapes_whose_sizes_compare_otherwise_are_compared_apart(monkeypatch, extra):
    model = SliceToTheOtherLength(extra).eval()
    opt = pyrys.optimize(model, (torch.randn(2, 4, 7), torch.randn(2, 5, 8)), dynamic=True)
    propagated = _propagations(monkeypatch)
    shapes = [(12, 10), (14, 11), (13, 13), (15, 15), (16, 12), (17, 17), (12, 14), (11, 15), (13, 16), (13, 12),
              (9, 10)]  # (beyond the other sizes, 4 and 8, by 2 or more but for the last two)
    for width, length in shapes:
        x, y = torch.randn(1, 4, width), torch.randn(1, length, 8)
        assert pyrys.relative_error(opt(x, y), model(x, y)) < 1e-6, (width, length)
    widths_and_lengths = [(gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape[2],
                           gm.graph.find_nodes(op="placeholder")[1].meta["val"].shape[1]) for gm in propagated]
    assert widths_and_lengths == [shape for shape in shapes if shape != (16, 12)]  # the third shorter by 2 or more


def test_what_was_found_at_1_is_its_own_graphs():
    """A trial copy (an accuracy guard's: other ops, the same meta) starts with nothing found at 1."""
    from pyrys.ir.graph import trial_copy

    model = _heads()
    opt = pyrys.optimize(model, (torch.rand(2, 8, 16),), dynamic=True)
    for length in (11, 13):
        opt(torch.rand(1, length, 16))
    gm = opt._generic.generic.gm
    assert list(specializing.bound_at_one(gm).values()) == [True]
    assert specializing.bound_at_one(trial_copy(gm)) == {}


def test_a_view_bound_at_1_takes_what_torch_gives(monkeypatch):
    """A third helper's find: a slice to ``length + 5`` of a width 5 longer is whole, and the reshape after it
    views at batch 1, where the kind's first two shapes (widths 10 longer) copied: bound there, the ``view``
    after it raised "view size is not compatible" at every call.  Views of a graph bound at 1 are reshapes."""
    model = SliceToTheOtherLength(5).eval()
    opt = pyrys.optimize(model, (torch.randn(2, 4, 7), torch.randn(2, 5, 8)), dynamic=True)
    propagated = _propagations(monkeypatch)
    for width, length in [(20, 10), (22, 12), (15, 10), (23, 13), (18, 13), (19, 14)]:
        x, y = torch.randn(1, 4, width), torch.randn(1, length, 8)
        assert pyrys.relative_error(opt(x, y), model(x, y)) < 1e-6, (width, length)
    assert len(propagated) == 2
