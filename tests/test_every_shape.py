"""One capture for every shape: a new batch size or sequence length is specialized, not captured again.

Each test counts captures (torch.export runs) and program builds, checks every output against
eager, and checks what happens where a dim cannot be symbolic (a note, and a correct result).
"""
from __future__ import annotations

import importlib
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.export import Dim

import pyrys
from pyrys.capture.dynamic_shapes import VaryingDims
from pyrys.ir.symbolic import describe_dims
from tests.conftest import TOLERANCE
from tests.models import conv_bn_relu, image

frontend_module = importlib.import_module("pyrys.capture.frontend")
compiled_module = importlib.import_module("pyrys.compiled")


@pytest.fixture
def captures(monkeypatch) -> list:
    """``dynamic`` of every nn.Module capture during the test, in order."""
    seen = []
    original = frontend_module.capture_module

    def spy(model, args, kwargs=None, dynamic=False):
        seen.append(dynamic)
        return original(model, args, kwargs, dynamic=dynamic)

    monkeypatch.setattr(frontend_module, "capture_module", spy)
    return seen


class Flattening(torch.nn.Module):
    """conv -> BN -> relu -> pool -> flatten -> linear: a view whose size is the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2))
        self.head = torch.nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


class Attention(torch.nn.Module):
    """Embedding + one self-attention block with a padding mask: batch and sequence length vary."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.embed = torch.nn.Embedding(50, width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.out = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, ids, mask):
        h = self.embed(ids)
        b, t, c = h.shape
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // self.heads) + (1 - mask[:, None, None, :]) * -1e4
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        return self.norm(h + torch.nn.functional.gelu(self.out(y)))


def tokens(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch * 100 + length)
    ids = torch.randint(0, 50, (batch, length), generator=generator)
    mask = torch.ones(batch, length)
    mask[:, length * 3 // 4:] = 0
    return ids, mask


@pytest.mark.parametrize("dynamic", [True, None])
def test_new_batch_sizes_are_specialized_not_captured_again(captures, backend, dynamic):
    model = pyrys.testing.randomize_batchnorm(Flattening()).eval()
    opt = pyrys.optimize(model, (image(1, size=8),), backend=backend, dynamic=dynamic)
    # True: symbolic from the start; None: the first shape as it is, the symbolic capture at the second
    assert captures == ([True] if dynamic else [False])
    for batch in (2, 3, 5, 1, 4):
        x = image(batch, size=8)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, batch
    assert captures == ([True] if dynamic else [False, True])  # no shape was captured again
    assert describe_dims(opt._generic.generic.gm).startswith("x dim 0 (")  # the batch only: an image
    assert len(opt._programs) == 5 and not any("again" in note for note in opt.notes)
    assert any("input shapes vary" in note for note in opt.notes) == (dynamic is None)
    x = image(2, size=12)  # another image size: captured again, and said
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    assert any("x dim 2 is 12; the graph holds it fixed at 8" in note for note in opt.notes)
    programs = [compiled.program for compiled in opt._programs.values()]
    if backend == "dnnl":  # one packing of each weight, shared by every shape's program
        assert all(p.packed is programs[0].packed for p in programs)
    for compiled in opt._programs.values():  # the graphs lowered hold literal sizes only
        assert all(n.target is not torch.ops.aten.sym_size.int for n in compiled.captured.gm.graph.nodes)


def test_the_printed_graph_shows_the_example_shape(captures):
    opt = pyrys.optimize(pyrys.testing.randomize_batchnorm(Flattening()).eval(), (image(2, size=8),),
                         backend="reference", dynamic=True)
    assert "%x : Float(2, 3, 8, 8)" in opt.graph and "Float(2, 5)" in opt.graph
    specialized = opt._first.captured.gm
    assert all(n.target is not torch.ops.aten.sym_size.int for n in specialized.graph.nodes)


def test_sequence_lengths_and_batches_of_an_attention_block(captures, backend):
    model = Attention().eval()
    opt = pyrys.optimize(model, tokens(1, 16), backend=backend)
    for batch, length in [(1, 32), (2, 7), (3, 16), (1, 77)]:
        inputs = tokens(batch, length)
        assert pyrys.relative_error(opt(*inputs), model(*inputs)) <= TOLERANCE, (batch, length)
    assert captures == [False, True]


class AlibiScores(torch.nn.Module):
    """BLOOM's attention scores: ``baddbmm`` of a bias broadcast over the queries, ``(B*H, 1, L)``."""

    def forward(self, q, k):
        bias = q[:, :1, :1].expand(-1, 1, k.shape[1])
        return torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=0.5).softmax(-1)


def test_a_baddbmm_of_a_broadcast_bias_takes_every_shape_from_one_capture(captures, backend):
    """torch's meta for it fails on symbolic sizes; its decomposition does not."""
    model, rand = AlibiScores().eval(), lambda *shape: torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    opt = pyrys.optimize(model, (rand(8, 12, 16), rand(8, 12, 16)), backend=backend, dynamic=True)
    for heads, length in [(12, 20), (4, 5), (8, 12)]:
        q, k = rand(heads, length, 16), rand(heads, length, 16)
        assert pyrys.relative_error(opt(q, k), model(q, k)) <= TOLERANCE, (heads, length)
    assert captures == [True] and not opt.notes, opt.notes


class MaskedSdpa(torch.nn.Module):
    """Attention with the usual 4-D mask ``(batch, 1, length, length)`` beside ``(batch, length, width)`` features."""

    def __init__(self, width: int = 16, heads: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.qkv = heads, torch.nn.Linear(width, 3 * width)

    def forward(self, x, mask):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, c)


def test_a_four_dim_mask_keeps_the_sequence_length_symbolic(captures, backend):
    """Its last two dims are the features' length: fixed as an image's size, they would pin it everywhere."""
    def inputs(batch: int, length: int):
        generator = torch.Generator().manual_seed(batch * 100 + length)
        mask = torch.rand(batch, 1, length, length, generator=generator) > 0.3
        return torch.randn(batch, length, 16, generator=generator), mask | torch.eye(length, dtype=torch.bool)

    model = MaskedSdpa().eval()
    opt = pyrys.optimize(model, inputs(2, 8), backend=backend, dynamic=True)
    for batch, length in [(2, 5), (3, 12), (1, 8)]:
        assert pyrys.relative_error(opt(*inputs(batch, length)), model(*inputs(batch, length))) <= TOLERANCE
    assert captures == [True] and not any("again" in note for note in opt.notes), opt.notes


def test_a_shape_the_graph_does_not_hold_for_is_captured_again_with_a_note(captures, backend):
    class Branches(torch.nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[0] > 2 else x + 1  # a branch on the batch size

    model = Branches().eval()
    opt = pyrys.optimize(model, (torch.rand(2, 4),), backend=backend, dynamic=True)
    for batch in (1, 2, 3, 4):
        x = torch.rand(batch, 4)
        assert torch.allclose(opt(x), model(x)), batch
    assert captures == [True, False, False]  # each shape on the other side of the branch: captured again
    note = next(note for note in opt.notes if "captured and optimized again" in note)
    assert "(3, 4)" in note or "(4, 4)" in note


def test_a_dim_pinned_by_the_model_is_captured_again(captures, backend):
    class Pinned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.arange(18.0).view(3, 6))

        def forward(self, x):
            return x * self.c  # (3, 6) pins the batch to 3 ... or to 1, which broadcasts

    model = Pinned().eval()
    opt = pyrys.optimize(model, (torch.rand(3, 6),), backend=backend)
    x = torch.rand(1, 6)
    assert torch.allclose(opt(x), model(x))
    # the symbolic captures: from the batch of 1 made 2 (the model refuses it), then from the batch of 1,
    # which could not keep the batch symbolic
    assert captures == [False, True, True]
    note = next(note for note in opt.notes if "captured and optimized again" in note)
    assert "(Float(1, 6))" in note and "torch.export fails with symbolic sizes" in note
    y = torch.rand(3, 6)
    assert torch.allclose(opt(y), model(y))


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_length_pinned_through_floor_divisions_falls_back_to_these_shapes(backend, dynamic):
    """A stride-2 conv, a pooling and a linear pin the length through ``((L/2)//2)``, a guard torch's solver
    cannot solve: the symbolic capture fails, and the capture with fixed sizes after it must not inherit the
    dims torch.export marked dynamic on the input tensors (it failed the same way; and the caller's tensors
    carried the marks away)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 8, 5, stride=2, padding=4, dilation=2), torch.nn.MaxPool1d(2),
                                torch.nn.Flatten(), torch.nn.Linear(32, 6)).eval()
    example = torch.randn(1, 1, 16)
    opt = pyrys.optimize(model, (example,), backend=backend, dynamic=dynamic)
    for batch in (5, 2, 1):
        x = torch.randn(batch, 1, 16)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, batch
        assert not x.__dict__, x.__dict__  # no dynamo marks left on the caller's tensor
    assert not example.__dict__
    assert any("torch.export fails with symbolic sizes (NotImplementedError" in note for note in opt.notes), opt.notes


class PaddedToFours(torch.nn.Module):
    """A sequence padded to a multiple of 4 with zeros (a pad of 0 at some lengths), then windows of 4 averaged."""

    def forward(self, x):
        batch, length, width = x.shape
        x = torch.nn.functional.pad(x, (0, 0, 0, (4 - length % 4) % 4))
        return x.reshape(batch, -1, 4, width).mean(2)


@pytest.mark.parametrize("dynamic, example", [(True, 8), (None, 9)])
def test_a_pad_computed_from_the_length_pads_at_every_length(backend, dynamic, example, tmp_path):
    """A helper's find: the symbolic graph's pad was worked out through torch's decomposition, which skips a pad
    that is 0 at the example's sizes with no guard: no pad at any length (silently wrong shapes and values;
    with ``dynamic=None``, where the first new length needed none), and so saved."""
    model = PaddedToFours().eval()
    opt = pyrys.optimize(model, (torch.randn(2, example, 3),), backend=backend, dynamic=dynamic)
    for length in (12, 9, 13, 6, 8):
        x = torch.randn(2, length, 3)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, length
    pyrys.save(opt, tmp_path / "saved")
    x = torch.randn(3, 14, 3)
    assert pyrys.relative_error(pyrys.load(tmp_path / "saved")(x), model(x)) <= TOLERANCE


class DownUp(torch.nn.Module):
    """A strided conv, then a transposed one back to the input's length (its output padding: the length's
    parity), and the first three positions unbound and summed."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.down, self.up = torch.nn.Conv1d(3, 4, 3, stride=2, padding=1), \
            torch.nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.up(self.down(x), output_size=x.shape[-1:]) + x
        return sum(y[..., :3].unbind(-1))


@pytest.mark.parametrize("dynamic", [None, True])
def test_sizes_computed_from_the_length_hold_at_every_length(backend, dynamic, tmp_path):
    """A helper's finds: the fused transposed conv's ``int[]`` output padding took the example's number (one
    longer at every other length, silently), and ``unbind`` of a dim of ``Min(3, s)`` kept it in its parts."""
    model = DownUp().eval()
    opt = pyrys.optimize(model, (torch.randn(2, 3, 8),), backend=backend, dynamic=dynamic)
    for length in (5, 9, 6, 7):
        x = torch.randn(2, 3, length)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, length
    pyrys.save(opt, tmp_path / "saved")
    x = torch.randn(3, 3, 11)
    assert pyrys.relative_error(pyrys.load(tmp_path / "saved")(x), model(x)) <= TOLERANCE


class Chunked(torch.nn.Module):
    def forward(self, x):
        return x.chunk(3, 1)


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_chunk_at_sizes_its_guard_excludes_is_captured_again(backend, dynamic, tmp_path):
    """``x.chunk(3, 1)`` guards its count of parts, ``FloorDiv(s, CeilDiv(s, 3))``; looking for the nearest size
    that guard holds for divided by zero at s = 0: a bare ZeroDivisionError where eager runs (a helper's find).
    A loaded module refuses such a shape with the nearest one it takes."""
    model = Chunked().eval()
    opt = pyrys.optimize(model, (torch.randn(3, 5, 4),), backend=backend, dynamic=dynamic)
    for shape in [(2, 1, 4), (3, 2, 4), (2, 6, 4)]:
        x = torch.randn(*shape)
        got, want = opt(x), model(x)
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), shape
    saved = pyrys.optimize(model, (torch.randn(3, 5, 4),), backend=backend, dynamic=True)
    pyrys.save(saved, tmp_path / "saved")
    with pytest.raises(pyrys.InputError, match="nearest x dim 1"):
        pyrys.load(tmp_path / "saved")(torch.randn(3, 2, 4))


def test_an_exported_program_with_dynamic_dims_takes_new_shapes():
    model = pyrys.testing.randomize_batchnorm(Flattening()).eval()
    ep = torch.export.export(model, (image(2, size=8),), dynamic_shapes=({0: Dim("batch")},))
    opt = pyrys.optimize(ep, backend="reference")
    x = image(5, size=8)
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    with pytest.raises(pyrys.InputError, match="Export it again"):
        opt(image(2, size=10))  # the image size was exported static


def test_dynamic_false_captures_every_shape_again(captures):
    opt = pyrys.optimize(conv_bn_relu(), (image(1),), backend="reference", dynamic=False)
    opt(image(2))
    assert captures == [False, False] and opt._generic is None
    assert any("captured and optimized again: dynamic=False: each new shape is captured" in n for n in opt.notes)
    with pytest.raises(ValueError, match="dynamic must be"):
        pyrys.optimize(conv_bn_relu(), (image(1),), dynamic="yes")


def test_many_threads_at_many_shapes_at_once(backend):
    model = pyrys.testing.randomize_batchnorm(Flattening()).eval()
    opt = pyrys.optimize(model, (image(1, size=8),), backend=backend, dynamic=True)
    shapes = [(1 + i % 4, 8 + (i % 3 == 0)) for i in range(24)]  # some captured again, the rest specialized
    inputs = [image(batch, size=size) for batch, size in shapes]
    expected = [model(x) for x in inputs]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(opt, inputs))
    assert all(pyrys.relative_error(r, e) <= TOLERANCE for r, e in zip(results, expected))


def test_verify_checks_every_specialized_graph():
    model = Attention().eval()
    opt = pyrys.optimize(model, tokens(1, 8), backend="reference", verify=True, dynamic=True)
    inputs = tokens(2, 5)
    assert pyrys.relative_error(opt(*inputs), model(*inputs)) <= TOLERANCE


def test_conv_bn_relu_memory_does_not_grow_with_a_copy_of_the_weights_per_shape():
    opt = pyrys.optimize(conv_bn_relu(), (image(1),))
    before = opt.memory()
    for batch in (2, 3, 5):
        opt(image(batch))
    weights = {id(t) for c in opt._programs.values() for t in c.captured.gm.buffers()}
    first = {id(t) for t in opt._first.captured.gm.buffers()}
    assert weights == first  # every shape's graph, the symbolic capture's too, holds the same constant tensors
    assert opt.memory() == before or opt.memory()["packed_weights"] == before["packed_weights"]


def test_unfrozen_state_inputs_do_not_shift_the_user_inputs(backend):
    model = pyrys.testing.randomize_batchnorm(Flattening()).eval()
    opt = pyrys.optimize(model, (image(1, size=8),), backend=backend, freeze_params=(), dynamic=True)
    for batch in (2, 3):
        x = image(batch, size=8)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, batch
    assert not any("again" in note for note in opt.notes)


def test_a_symbolic_compile_that_fails_compiles_the_shape_as_it_is_with_a_note(monkeypatch, backend):
    from pyrys.ir.symbolic import is_symbolic

    original = compiled_module.run_pipeline

    def fails_on_symbolic_sizes(gm, *args, **kwargs):
        if is_symbolic(gm):
            raise RuntimeError("a pass met a size it cannot take")
        return original(gm, *args, **kwargs)

    monkeypatch.setattr(compiled_module, "run_pipeline", fails_on_symbolic_sizes)
    model = pyrys.testing.randomize_batchnorm(Flattening()).eval()
    opt = pyrys.optimize(model, (image(1, size=8),), backend=backend, dynamic=True)
    for batch in (1, 2):
        x = image(batch, size=8)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, batch
    assert opt._generic is None
    assert any("the compile with symbolic sizes failed (RuntimeError: a pass met a size" in n for n in opt.notes)


def test_a_forward_taking_star_args_is_captured_once_for_every_shape(captures, backend):
    class StarArgs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = Attention()

        def forward(self, *inputs):
            return self.attention(*inputs)

    model = StarArgs().eval()
    opt = pyrys.optimize(model, tokens(1, 16), backend=backend)
    for batch, length in [(2, 16), (3, 9)]:
        inputs = tokens(batch, length)
        assert pyrys.relative_error(opt(*inputs), model(*inputs)) <= TOLERANCE, (batch, length)
    assert captures == [False, True] and not any("again" in note for note in opt.notes), opt.notes


class BatchOnePath(torch.nn.Module):
    """A path taken at batch 1 only (HF GPT-2's mask code has one): a batch-1 example would pin the batch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        return y * 2.0 if x.shape[0] == 1 else y


def test_a_batch_1_call_does_not_pin_the_batch_of_the_graph_for_every_shape(captures, backend):
    """The symbolic capture at a batch-1 call runs from a batch of 2 (the inputs repeated): batch 1 gets a
    program of its own, every other batch is specialized from the symbolic graph."""
    model = BatchOnePath().eval()
    opt = pyrys.optimize(model, (torch.rand(3, 4),), backend=backend)
    for batch in (1, 4, 5, 1, 2):
        x = torch.rand(batch, 4)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, batch
    # the example; the symbolic capture; batch 1 (it breaks Ne(s, 1)) with its size-1 dims fixed, the rest symbolic
    assert captures == [False, True, "size-1 dims fixed"]
    assert not any("(4, 4)" in note or "(5, 4)" in note for note in opt.notes), opt.notes


def test_a_model_that_takes_a_batch_of_1_only_is_captured_from_its_own_example(captures, backend):
    class OneOnly(torch.nn.Module):
        def forward(self, x):
            assert x.shape[0] == 1, "one at a time"
            return x.sum(-1)

    model = OneOnly().eval()
    opt = pyrys.optimize(model, (torch.rand(1, 4),), backend=backend)
    x = torch.rand(1, 6)
    assert torch.allclose(opt(x), model(x))


def test_a_batch_1_example_captured_for_every_shape_holds_the_weights_once(backend):
    """dynamic=True from a batch-1 example whose symbolic graph assumes ``Ne(s, 1)``: the example gets a static
    program, later shapes come from the symbolic graph, and both read the same constant tensors."""
    class BatchOneRelu(BatchOnePath):  # its batch-1 path changes no weight
        def forward(self, x):
            y = self.linear(x)
            return y.relu() if x.shape[0] == 1 else y

    model = BatchOneRelu().eval()
    opt = pyrys.optimize(model, (torch.rand(1, 4),), backend=backend, dynamic=True)
    assert any("captured for these input shapes only" in note and "Ne(" in note for note in opt.notes), opt.notes
    for batch in (3, 4):
        x = torch.rand(batch, 4)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, batch
    weights = {id(t) for c in opt._programs.values() for t in c.captured.gm.buffers()}
    first = {id(t) for t in opt._first.captured.gm.buffers()}
    assert weights == first  # one copy of each weight, packed once


@pytest.mark.parametrize("dynamic", [None, False])
def test_an_empty_batch_gives_empty_outputs_as_eager_does(backend, dynamic):
    """A batch of 0 rows: the ops on tensors without elements run in torch (oneDNN takes none)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    opt = pyrys.optimize(layer, (torch.rand(2, 5, 16),), backend=backend, dynamic=dynamic)
    empty = torch.rand(0, 5, 16)
    assert opt(empty).shape == layer(empty).shape == (0, 5, 16)
    convs = pyrys.optimize(conv_bn_relu(), (image(),), backend=backend, dynamic=dynamic)
    assert convs(image(batch=0)).shape == conv_bn_relu()(image(batch=0)).shape


def test_another_image_size_is_captured_once_for_every_batch_at_that_size(captures, backend, tmp_path):
    """Each batch at a second image size was captured again (6 s each for ResNet-18), batch 1 first with a
    note blaming the model ("kept no input dim symbolic")."""
    model = pyrys.testing.randomize_batchnorm(Flattening()).eval()
    opt = pyrys.optimize(model, (image(2, size=8),), backend=backend, dynamic=True)
    for batch in (1, 2, 3, 5):  # a batch of 1 first at the new size
        x = image(batch, size=12)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, batch
    assert captures == [True, True], captures  # one capture with symbolic sizes at the new height and width
    note = next(note for note in opt.notes if "x dim 2 is 12" in note)
    assert "captured once more with symbolic sizes" in note and "pins" not in note
    for size in (8, 12):
        x = image(4, size=size)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    assert captures == [True, True]
    pyrys.save(opt, tmp_path / "saved")
    loaded = pyrys.load(tmp_path / "saved")
    for size in (8, 12):  # shapes it never compiled, at both sizes
        x = image(6, size=size)
        assert pyrys.relative_error(loaded(x), model(x)) <= TOLERANCE
    with pytest.raises(pyrys.InputError) as refused:  # a third size: no saved graph holds for it
        loaded(image(2, size=10))
    assert "dim 2 is 10" in str(refused.value) and "fixed at 12" in str(refused.value)  # each graph's why


class CachedAttention(torch.nn.Module):
    """A decoder step with its KV cache as tensors: ``(batch, heads, length, width)``, one token longer a call."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.q, self.k, self.v = heads, *(torch.nn.Linear(width, width) for _ in range(3))

    def forward(self, x, past_k, past_v):
        batch, length, width = x.shape
        q, k, v = (layer(x).view(batch, length, self.heads, -1).transpose(1, 2) for layer in (self.q, self.k, self.v))
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        attended = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return attended.transpose(1, 2).reshape(batch, length, width), k, v


@pytest.mark.parametrize("dynamic", [True, None])
def test_a_kv_cache_growing_a_token_a_call_is_captured_with_its_length_symbolic(captures, backend, dynamic):
    """Every cache length was a capture of its own (0.5-1 s each for a one-layer step, ~8 s under load), past
    eight of them each for its shape alone: a rank-4 dim stays fixed, as an image's height does."""
    model = CachedAttention().eval()
    step = lambda length: (torch.rand(1, 1, 32), torch.rand(1, 4, length, 8), torch.rand(1, 4, length, 8))  # noqa: E731
    opt = pyrys.optimize(model, step(1), backend=backend, dynamic=dynamic)
    for length in range(2, 14):
        inputs = step(length)
        for got, expected in zip(opt(*inputs), model(*inputs)):
            assert pyrys.relative_error(got, expected) <= TOLERANCE, length
        if length == 4:  # length 2 captured at 2, 3 with the length symbolic (from a batch of 2), then batch 1's
            so_far = list(captures)
    assert captures == so_far and any(isinstance(dynamic, VaryingDims) for dynamic in captures), captures
    assert any("past_k dim 2 (s" in note for note in opt.notes), opt.notes


class SamePadded(torch.nn.Module):
    """Convolutions padded TF "same" way, the pad computed from the size (timm's ``Conv2dSame``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(c, 4, 3, stride=2) for c in (3, 4, 4))

    def forward(self, x):
        for conv in self.convs:
            pads = [max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0) for size in x.shape[-2:]]
            x = torch.relu(conv(torch.nn.functional.pad(x, [pads[1] // 2, pads[1] - pads[1] // 2,
                                                            pads[0] // 2, pads[0] - pads[0] // 2])))
        return x


@pytest.mark.parametrize("dynamic", [None, True])
def test_image_sizes_padded_from_the_size_are_captured_one_by_one(captures, backend, dynamic):
    """A helper's find: timm's tf_mobilenetv3_small_100 at a third image width was captured with the width
    symbolic, and each layer's "same" pad made it a nested Max/ceil of the last: torch.export and sympy ran for
    more than 9 minutes.  Such an input's image sizes are never made symbolic (a capture per size, seconds);
    with dynamic=True too (a reviewer's find: the first graph kept for it was a copy without the mark)."""
    model = SamePadded().eval()
    opt = pyrys.optimize(model, (torch.rand(1, 3, 17, 17),), backend=backend, dynamic=dynamic)
    for size in (18, 21, 25, 18):
        x = torch.rand(1, 3, 17, size)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, size
    assert not any(isinstance(dynamic, VaryingDims) and dynamic for dynamic in captures), captures
    assert any("each is captured for its size alone" in note for note in opt.notes), opt.notes


class CachedAttentionThenCausalConv(CachedAttention):
    """A decoder step whose attention output goes through a causal convolution (padded on the left)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(32, 32, 3)

    def forward(self, x, past_k, past_v):
        attended, k, v = super().forward(x, past_k, past_v)
        return self.conv(torch.nn.functional.pad(attended.transpose(1, 2), (2, 0))).transpose(1, 2), k, v


def test_a_kv_cache_before_a_padded_convolution_keeps_its_length_symbolic(captures, backend):
    """A reviewer's find: every input the pad's data came from was taken for an image (the cache, through
    attention), and its length was captured one by one again."""
    model = CachedAttentionThenCausalConv().eval()
    step = lambda length: (torch.rand(1, 1, 32), torch.rand(1, 4, length, 8), torch.rand(1, 4, length, 8))  # noqa: E731
    opt = pyrys.optimize(model, step(1), backend=backend)
    for length in range(2, 10):
        inputs = step(length)
        for got, expected in zip(opt(*inputs), model(*inputs)):
            assert pyrys.relative_error(got, expected) <= TOLERANCE, length
        if length == 5:
            so_far = list(captures)
    assert captures == so_far and any(isinstance(dynamic, VaryingDims) and dynamic for dynamic in captures), captures


def test_a_graph_captured_from_one_query_token_is_not_the_graph_for_every_length(captures, backend):
    """A symbolic capture from a step of one token (``x`` of length 1) would hold for length 1 alone (its trace
    assumes it): the first new shape, of one token, is captured symbolically from two tokens, and length 1
    once more with its size-1 dims fixed; not a capture for each length."""
    model = CachedAttention().eval()
    step = lambda batch, length: (torch.rand(batch, length, 32), torch.rand(batch, 4, 5, 8),  # noqa: E731
                                  torch.rand(batch, 4, 5, 8))
    opt = pyrys.optimize(model, step(2, 3), backend=backend)
    for batch, length in [(3, 1), (3, 4), (2, 6), (2, 2), (4, 1), (3, 7)]:
        inputs = step(batch, length)
        for got, expected in zip(opt(*inputs), model(*inputs)):
            assert pyrys.relative_error(got, expected) <= TOLERANCE, (batch, length)
    assert captures == [False, True, "size-1 dims fixed"], captures
    assert not any("optimized again" in note for note in opt.notes), opt.notes


class BroadcastMask(torch.nn.Module):
    """Scores of ``x`` against a cache plus a mask ``(batch, 1, cached + length)`` that broadcasts over the
    queries: its 1 cannot be a symbol, and from one query token torch gives it the length's."""

    def forward(self, x, past, mask):
        keys = torch.cat([past, x], 1)
        return torch.softmax(x @ keys.transpose(1, 2) + mask, -1) @ keys


def test_a_broadcast_mask_beside_one_query_token_takes_every_length_from_two_captures(captures, backend):
    model = BroadcastMask().eval()
    step = lambda batch, length: (torch.rand(batch, length, 8), torch.rand(batch, 5, 8),  # noqa: E731
                                  torch.rand(batch, 1, 5 + length))
    opt = pyrys.optimize(model, step(2, 2), backend=backend)
    for batch, length in [(3, 1), (3, 3), (2, 4), (2, 5), (2, 1), (4, 6)]:
        inputs = step(batch, length)
        assert pyrys.relative_error(opt(*inputs), model(*inputs)) <= TOLERANCE, (batch, length)
    # the example; from one token made two, which the model refuses (the mask's length is the cache's plus
    # one); from one token; from three, its 1 fixed
    assert captures == [False, True, True, True], captures
    assert not any("optimized again" in note for note in opt.notes), opt.notes


def test_a_size_one_capture_with_nothing_left_to_vary_says_so():
    """Not that the model pins every dim: every dim that may vary is of size 1 there."""
    model = CachedAttention().eval()
    step = lambda batch, length: (torch.rand(batch, length, 32), torch.rand(batch, 4, 5, 8),  # noqa: E731
                                  torch.rand(batch, 4, 5, 8))
    opt = pyrys.optimize(model, step(2, 3), backend="reference")
    for batch, length in [(3, 3), (1, 1)]:
        opt(*step(batch, length))
    assert any("every dim that may vary is of size 1 here" in note for note in opt.notes), opt.notes
    assert not any("pins every one" in note for note in opt.notes), opt.notes


class UpsampledToItsInput(torch.nn.Module):
    """A segmentation head's way back: ``F.interpolate(y, size=x.shape[-2:])``."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.mode, self.conv = mode, torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return torch.nn.functional.interpolate(self.conv(x), size=x.shape[-2:], mode=self.mode)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_an_upsampling_to_the_input_size_takes_symbolic_sizes(captures, mode):
    """torch's meta of the ``.vec`` upsamplings takes concrete sizes only: every image size was a capture."""
    model = UpsampledToItsInput(mode).eval()
    opt = pyrys.optimize(model, (image(1, size=16),), dynamic=True)
    for size in (20, 24, 17, 33, 31):
        x = image(1, size=size)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, size
        if size == 24:
            so_far = list(captures)
    assert captures == so_far, captures  # sizes 20 and 24, then symbolic: nothing more


class TwoLevelHead(torch.nn.Module):
    """LRASPP's head: a coarse map upsampled to a finer one's size, added to it, the sum upsampled to the
    input's size."""

    def __init__(self, mode: str):
        super().__init__()
        torch.manual_seed(0)
        self.mode = mode
        self.low, self.high = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.low_head, self.high_head = torch.nn.Conv2d(4, 2, 1), torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        low = self.low(x)
        coarse = torch.nn.functional.interpolate(self.high_head(self.high(low)), size=low.shape[-2:], mode=self.mode)
        return torch.nn.functional.interpolate(self.low_head(low) + coarse, size=x.shape[-2:], mode=self.mode)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_an_upsampled_sum_of_two_levels_takes_symbolic_sizes(mode):
    """The decomposition of the second bilinear upsampling failed on symbolic sizes (its index tensors did not
    broadcast), so every image size of LRASPP was captured and optimized on its own (a helper's find)."""
    model = TwoLevelHead(mode).eval()
    opt = pyrys.optimize(model, (image(1, size=32),), verify=True)
    for size in (36, 40, 44, 52):
        x = image(1, size=size)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, size
    assert not any("symbolic sizes failed" in note for note in opt.notes), opt.notes
    assert any("captured once more with symbolic sizes (x dim 2" in note for note in opt.notes), opt.notes
    channels_last = image(1, size=48).to(memory_format=torch.channels_last)
    assert pyrys.relative_error(opt(channels_last), model(channels_last)) <= TOLERANCE


def test_the_graphs_for_other_image_sizes_are_bounded(captures, monkeypatch):
    monkeypatch.setattr(importlib.import_module("pyrys.optimized_module"), "MAX_OTHER_TEMPLATES", 1)
    model = pyrys.testing.randomize_batchnorm(Flattening()).eval()
    opt = pyrys.optimize(model, (image(2, size=8),), backend="reference", dynamic=True)
    for size in (10, 12):
        x = image(2, size=size)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    assert captures == [True, True, False] and len(opt._other_templates) == 1  # the third: its shape alone


class Recurrent(torch.nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        layer = getattr(torch.nn, kind)
        self.rnn = layer(16, 24, num_layers=2, batch_first=True, bidirectional=True)
        self.fc = torch.nn.Linear(48, 7)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_recurrent_layers_take_every_batch_from_one_capture(captures, kind, tmp_path):
    """``at::native::lstm`` reads ``numel()``, which fake propagation on symbolic sizes refuses: every LSTM
    and GRU model fell back to its example's shapes (a saved one refused batch 5).  torch.export fixes the
    length (its decomposition steps through time): each length is one more capture for every batch."""
    model = Recurrent(kind).eval()
    opt = pyrys.optimize(model, (torch.randn(3, 20, 16),), backend="reference", dynamic=True)
    assert not any("symbolic sizes failed" in note for note in opt.notes), opt.notes
    for batch, length in ((5, 20), (2, 20), (3, 7), (8, 7)):
        x = torch.randn(batch, length, 16)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, (batch, length)
    assert captures == [True, True]
    pyrys.save(opt, tmp_path / "saved")
    loaded = pyrys.load(tmp_path / "saved")
    for length in (20, 7):
        x = torch.randn(4, length, 16)
        assert pyrys.relative_error(loaded(x), model(x)) <= TOLERANCE


class _UpsampledAfterStride(torch.nn.Module):
    """A strided conv, then a bilinear upsampling: its symbolic capture at other image sizes failed in torch's
    meta of ``_unsafe_index`` (each such size captured for itself), as it does still where pyrys takes that
    upsampling's value from torch's decomposition (``ir/meta.py`` no longer does)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        x = torch.nn.functional.interpolate(torch.relu(self.conv(x)), scale_factor=2, mode="bilinear")
        return torch.nn.functional.layer_norm(x, (x.shape[-1],))


def test_a_failed_symbolic_capture_leaves_no_torch_traceback_and_says_why_plainly(capfd, monkeypatch):
    """torch's fake tensors logged a traceback of about 20 lines per new image size on stderr, and the note
    quoted torch's C++ build path."""
    upsampling = torch.ops.aten.upsample_bilinear2d.vec  # its value from torch's decomposition, as it was
    monkeypatch.setitem(importlib.import_module("pyrys.ir.meta")._DECOMPOSED_WHEN_SYMBOLIC, upsampling,
                        torch._decomp.decomposition_table[upsampling])
    torch.manual_seed(0)
    model = _UpsampledAfterStride().eval()
    opt = pyrys.optimize(model, (torch.randn(1, 4, 16, 16),), dynamic=True)
    capfd.readouterr()
    for size in (6, 8, 10):  # (below 4 the layer norm is of equal numbers: rounding noise)
        x = torch.randn(3, 4, size, size)
        with torch.no_grad():
            assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    assert "failed while attempting to run meta" not in capfd.readouterr().err
    failed = [note for note in opt.notes if "the compile with symbolic sizes failed" in note]
    assert failed and not any(".cpp:" in note for note in failed), opt.notes


def test_the_widened_capture_of_a_first_new_shape_leaves_the_first_program_alone(tmp_path):
    """A batch-2 example, then a batch of 1: the symbolic capture runs from the batch made 2, the example's own
    signature, and its program replaced the first one held (``pyrys.save`` then raised a bare ValueError)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Softmax(-1)).eval()
    opt = pyrys.optimize(model, (torch.randn(2, 8, 16),))
    first = opt._first
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    assert opt._programs[first.signature] is first
    assert len(opt._programs) == 2  # the example's and the batch of 1's: the widened program is not kept
    loaded = pyrys.load(pyrys.save(opt, tmp_path / "saved"))
    assert pyrys.relative_error(loaded(x), opt(x)) == 0


class _Positions(torch.nn.Module):
    """A table of 8 positions, added to a sequence of any length up to 8."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return x + self.table[: x.shape[1]].expand(x.shape[1], 4)


def test_a_shape_the_model_refuses_raises_without_torch_traceback(capfd):
    """torch's fake tensors logged a traceback before the CaptureError on a capture for fixed shapes too."""
    opt = pyrys.optimize(_Positions().eval(), (torch.randn(2, 6, 4),), dynamic=False)
    capfd.readouterr()
    with pytest.raises(pyrys.CaptureError):
        opt(torch.randn(2, 12, 4))
    assert "failed while attempting to run meta" not in capfd.readouterr().err


def test_a_loaded_graph_refusing_a_size_names_the_input_dim_and_the_nearest_size_it_takes(tmp_path):
    """A helper's note: the refusal quoted ``Eq(s28, Min(32, s28)) | ...`` with its symbol alone."""
    opt = pyrys.optimize(_Positions().eval(), (torch.randn(2, 6, 4),), dynamic=True)
    pyrys.save(opt, tmp_path / "saved")
    with pytest.raises(pyrys.InputError, match=r"which x dim 1 \(s\d+\) = 12 breaks \(the nearest x dim 1 \(s\d+\) "
                                               r"it holds for: 8\)"):
        pyrys.load(tmp_path / "saved")(torch.randn(2, 12, 4))


class _SqueezesTheBatch(torch.nn.Module):
    def forward(self, x):
        return x.squeeze(0).softmax(0).flatten()


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_squeeze_of_a_symbolic_dim_is_right_at_size_one(dynamic, tmp_path):
    """The graph, traced where the batch is not 1, does not squeeze it: at a batch of 1 the passes' view kept
    it, and the softmax over it gave ones (a reviewer's find). Size 1 is captured on its own now, and a
    program that cannot be captured again refuses it."""
    model = _SqueezesTheBatch().eval()
    opt = pyrys.optimize(model, (torch.randn(3, 4),), dynamic=dynamic)
    for batch in (2, 1, 5):
        x = torch.randn(batch, 4)
        assert opt(x).shape == model(x).shape and pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, batch
    pyrys.save(opt, tmp_path / "saved")
    x = torch.randn(1, 4)
    assert torch.allclose(pyrys.load(tmp_path / "saved")(x), model(x), atol=1e-6)
    ep = torch.export.export(model, (torch.randn(3, 4),), dynamic_shapes=({0: torch.export.Dim("B", min=1)},))
    with pytest.raises(pyrys.InputError, match=r"Ne\(s\d+, 1\)"):
        pyrys.optimize(ep)(x)


class ReadsASizeThroughATensor(torch.nn.Module):
    """A size read into a Python number through a tensor (HF DeBERTa's relative-position buckets): data to a
    capture with symbolic sizes, a constant to one of fixed sizes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x):
        span = int(torch.tensor(x.size(1)).clamp(max=4))
        return self.linear(x) * span


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_model_the_capture_with_symbolic_sizes_refuses_compiles_each_shape(dynamic):
    """Every new shape (``dynamic=None``), or ``optimize`` itself (``True``), raised the symbolic capture's
    CaptureError where a capture of the shape alone works (a helper's find on HF DeBERTa)."""
    model = ReadsASizeThroughATensor().eval()
    opt = pyrys.optimize(model, (torch.randn(2, 6, 8),), dynamic=dynamic)
    for length in (3, 6, 9):
        x = torch.randn(2, length, 8)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE, length
    assert any("the compile with symbolic sizes failed (DataDependentError" in note for note in opt.notes), opt.notes


class RoundedUpToPatches(torch.nn.Module):
    """timm's MobileViT: the feature map resized to a whole number of patches, ``math.ceil(H / 4) * 4``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        height, width = y.shape[-2:]
        rows, columns = math.ceil(height / 4) * 4, math.ceil(width / 4) * 4
        y = torch.nn.functional.interpolate(y, size=(rows, columns), mode="bilinear", align_corners=False)
        return y.reshape(y.shape[0], 8, rows // 4, 4, columns // 4, 4).mean((3, 5)).flatten(1)


def test_a_size_rounded_up_with_math_ceil_is_size_arithmetic(tmp_path):
    """A helper's find: the capture with symbolic image sizes held ``math.ceil`` of a size, which the verifier
    refused ("not an op overload", the call failed) and specialization did not make a literal."""
    model = RoundedUpToPatches().eval()
    opt = pyrys.optimize(model, (torch.randn(2, 3, 32, 32),), dynamic=True, verify=True)
    for size in [(48, 48), (40, 24), (30, 30), (33, 65)]:
        x = torch.randn(2, 3, *size)
        assert pyrys.relative_error(opt(x), model(x)) < TOLERANCE, size
    pyrys.save(opt, tmp_path / "saved")
    loaded, x = pyrys.load(tmp_path / "saved"), torch.randn(3, 3, 26, 38)
    assert pyrys.relative_error(loaded(x), model(x)) < TOLERANCE
