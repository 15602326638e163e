"""scaled_dot_product_attention on oneDNN (matmul -> softmax -> matmul) against eager, masks of every kind."""
import math
import re
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrys
from pyrys.backends.dnnl import attention_kernels, binding, lower_attention, measured
from pyrys.backends.threads import with_threads
from pyrys.machine import kernel_flags, native_bf16
from pyrys.numerics import relative_error
from tests.backends.dnnl.no_measuring import refuse_to_measure
from tests.conftest import TOLERANCE

# without native bf16 oneDNN has no bf16 kernels (and precision="bf16" runs fp32): these run on such CPUs only
needs_native_bf16 = pytest.mark.skipif(not native_bf16(), reason="the CPU has no native bf16 (avx512_bf16, amx_bf16)")

available, reason = binding.is_available()
pytestmark = pytest.mark.skipif(not available, reason=f"oneDNN unavailable: {reason}")


@pytest.fixture(autouse=True)
def onednn_steps(monkeypatch):
    """These tests are about oneDNN's steps: torch's fused attention, chosen where it is measured faster
    (attention_kernels.py), never is here, except where a test says so."""
    monkeypatch.setattr(attention_kernels, "FASTER", 0.0)
    monkeypatch.setattr(measured, "_DECIDED", {})


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class SeparateHeads(nn.Module):
    """Query, key and value from projections of their own, each made compact (as Whisper writes it), the
    heads merged back."""

    def __init__(self, width=128, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.heads = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width), heads
        self.eval()

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.heads, c // self.heads).transpose(1, 2).contiguous() for p in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c)


@needs_native_bf16
def test_bfloat16_one_head_blocks_write_a_compact_buffer_where_the_merge_layout_loses_the_brgemm_kernel(monkeypatch):
    """V compact already, the output laid out for the heads' merge: a one-head block's rows there lie a
    row of every head apart, which oneDNN 3.2's bf16 matmul runs in its gemm kernel; the blocks write a
    compact buffer (brgemm) that one reorder lays out for the merge."""
    forced = lambda dims, keys: [lower_attention.Blocks(len(dims) - 2, 48, singles=len(dims) - 2)]  # noqa: E731
    monkeypatch.setattr(lower_attention, "blockings", forced)
    model, x = SeparateHeads(), rand(1, 96, 128)
    opt = pyrys.optimize(model, (x,), precision="bf16")
    text = opt.program_text()
    matmuls = [line for line in text.splitlines() if "scaled_dot_product_attention" in line and "dnnl::matmul" in line]
    assert len(matmuls) == 8 and all("impl=brg" in line for line in matmuls), text
    assert "scaled_dot_product_attention.heads.reorder" in text, text
    assert relative_error(opt(x), model(x)) <= 2e-2


class Heads(nn.Module):
    """A projection split into heads, attention, the heads merged back (as BERT and GPT-2 write it)."""

    def __init__(self, width=32, heads=4, causal=False, scale=None, merge=True):
        super().__init__()
        torch.manual_seed(0)
        self.qkv, self.heads, self.causal, self.scale, self.merge = nn.Linear(width, 3 * width), heads, causal, scale, merge
        self.eval()

    def forward(self, x, mask=None):
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, -1)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale)
        return o.transpose(1, 2).reshape(b, t, c) if self.merge else o


class Plain(nn.Module):
    """Attention on its inputs as given: any rank, query and key lengths apart."""

    def __init__(self, causal=False):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)


class MergedHeads(Plain):
    """Attention on its inputs with the heads merged back, ``(B, H, L, E) -> (B, L, H*E)``; ``mask``: a constant
    one, read when the call passes none."""

    def __init__(self, mask=None):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, q, k, v, mask=None):
        o = super().forward(q, k, v, self.mask if mask is None else mask)
        return o.transpose(1, 2).reshape(o.shape[0], o.shape[2], -1)


def padding_mask(batch, keys, lengths):
    """(batch, 1, 1, keys) True for the first ``lengths[b]`` keys."""
    return (torch.arange(keys)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


def rows_masked(mask, rows):
    mask = mask.clone()
    mask[..., rows, :] = False
    return mask


X = rand(2, 6, 32)
DECODER_STEP = (rand(2, 4, 1, 16), rand(2, 4, 6, 16, seed=2), rand(2, 4, 6, 16, seed=3))
CASES = {
    "no mask": (Heads(), (X,)),
    "padding mask (B,1,1,S)": (Heads(), (X, padding_mask(2, 6, [6, 3]))),
    "bool mask (B,1,L,S) with queries that see no key": (
        Heads(), (X, rows_masked(torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(3)) > 0.4, [1, 4]))),
    "float mask with -inf rows": (Heads(), (X, rows_masked(rand(2, 1, 6, 6), []).masked_fill(
        torch.arange(6)[:, None] == 2, float("-inf")))),
    "finite additive mask (B,1,1,S)": (Heads(), (X, (1.0 - padding_mask(2, 6, [6, 2]).float()) * -10000.0)),
    "mask (L,S)": (Heads(), (X, torch.rand(6, 6, generator=torch.Generator().manual_seed(4)) > 0.3)),
    "mask (B,H,L,S)": (Heads(), (X, torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(5)) > 0.3)),
    "causal": (Heads(causal=True), (X,)),
    "explicit scale": (Heads(scale=0.3), (X, padding_mask(2, 6, [4, 6]))),
    "heads not merged back": (Heads(merge=False), (X, padding_mask(2, 6, [5, 6]))),
    "causal, fewer queries than keys": (Plain(causal=True), (rand(1, 2, 3, 8), rand(1, 2, 7, 8, seed=2),
                                                             rand(1, 2, 7, 5, seed=3))),
    "causal, more queries than keys": (Plain(causal=True), (rand(1, 2, 7, 8), rand(1, 2, 3, 8, seed=2),
                                                            rand(1, 2, 3, 5, seed=3))),
    "3-d inputs": (Plain(), (rand(3, 5, 8), rand(3, 7, 8, seed=2), rand(3, 7, 4, seed=3),
                             torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(6)) > 0.5)),
    # one batch of one head: K and V are slices of the projection's rows that start past its first column, and
    # oneDNN's gemm matmul ignores a descriptor's own start when there is one batch (it read Q's columns)
    "one head, batch 1": (Heads(heads=1), (X[:1],)),
    "one head, batch 1, causal": (Heads(heads=1, causal=True), (X[:1],)),
    # multi-query attention (Falcon): one key and value head serves every query head, broadcast by the matmuls
    "one key and value head for all": (Plain(), (rand(2, 4, 6, 8), rand(2, 1, 7, 8, seed=2), rand(2, 1, 7, 5, seed=3))),
    "one key and value head for all, a mask": (Plain(), (rand(2, 4, 6, 8), rand(1, 1, 7, 8, seed=2),
                                                         rand(1, 1, 7, 5, seed=3), padding_mask(2, 7, [7, 4]))),
    # a decoder step: one query written into merged heads, (B, H, 1, E) with strides (H*E, E, H*E, 1), which
    # oneDNN's descriptors call contiguous; its brgemm kernel crashed reading a broadcast mask operand there
    "a decoder step, a padding mask (B,1,1,S)": (MergedHeads(), (*DECODER_STEP, padding_mask(2, 6, [6, 3]))),
    "a decoder step, a float mask (1,S)": (MergedHeads(), (*DECODER_STEP, torch.tensor([[0.0, -1e9, 0, 0, -1e9, 0]]))),
    "a decoder step, a constant mask hiding every key": (
        MergedHeads(torch.zeros(1, 1, 1, 6, dtype=torch.bool)), DECODER_STEP),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_runs_on_onednn_and_matches_eager(name):
    model, args = CASES[name]
    opt = pyrys.optimize(model, args)
    out, expected = opt(*args), model(*args)
    assert relative_error(out, expected) <= TOLERANCE, name
    text = opt.program_text()
    assert "torch::scaled_dot_product_attention" not in text and "dnnl::softmax" in text, text


# the cases that run in blocks: more than 4 queries, and no mask computed each call (its bias and keep are one
# buffer each, which a block cannot read a slice of)
IN_BLOCKS = {"no mask", "causal", "causal, more queries than keys", "one head, batch 1", "one head, batch 1, causal",
             "one key and value head for all"}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_in_blocks_of_queries_matches_eager(name, monkeypatch):
    """Long sequences run a block of queries at a time (their scores stay in cache): forced here with a tiny
    budget and blocks of 4 queries (the 6 and 7 queries of these cases: a block and a tail)."""
    monkeypatch.setattr(lower_attention, "SCORES_BLOCK_BYTES", 64)
    monkeypatch.setattr(lower_attention, "MIN_BLOCK_ROWS", 4)
    model, args = CASES[name]
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE, name
    text = opt.program_text()
    assert "torch::scaled_dot_product_attention" not in text and (", 0:4] :" in text) == (name in IN_BLOCKS), text


class ConstantMask(Plain):
    def __init__(self, mask):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        return super().forward(q, k, v, self.mask)


def keeps_the_first_key(mask):
    """``mask`` with every query keeping key 0 (no query without a key, so no keep operand)."""
    mask = mask.clone()
    mask[..., 0] = True
    return mask


Q5, K5, V5 = rand(5, 3, 6, 8), rand(5, 3, 7, 8, seed=2), rand(5, 3, 7, 4, seed=3)
RANDOM_MASK = torch.rand(5, 1, 6, 7, generator=torch.Generator().manual_seed(7)) > 0.5
# attention whose scores take more than the budget, in blocks of 2 indices of its outermost batch or head dim
# longer than 1 (5 of them: 2 blocks and a tail); the second item is how the first block's slice prints
BATCH_BLOCK_CASES = {
    "batch of 5": (Plain(), (Q5, K5, V5), "[0:2]"),
    "heads outermost (batch 1), causal": (Plain(causal=True), (Q5[None, :, 0], K5[None, :, 0], V5[None, :, 0]),
                                           "[:, 0:2]"),
    "one key and value head for all": (Plain(), (Q5, K5[:, :1], V5[:, :1]), "[0:2]"),
    "keys and values shared by the batch": (Plain(), (Q5, K5[:1], V5[:1]), "[0:2]"),
    "3-d inputs": (Plain(), (Q5[:, 0], K5[:, 0], V5[:, 0]), "[0:2]"),
    "a constant mask per batch element": (ConstantMask(keeps_the_first_key(RANDOM_MASK)), (Q5, K5, V5), "[0:2]"),
    "a constant mask for all": (ConstantMask(keeps_the_first_key(RANDOM_MASK[:1])), (Q5, K5, V5), "[0:2]"),
    "heads of a projection": (Heads(), (rand(5, 6, 32),), "[0:2]"),
}


@pytest.mark.parametrize("name", list(BATCH_BLOCK_CASES))
def test_attention_in_blocks_of_its_batch_matches_eager(name, monkeypatch):
    """Where one batch index's scores fit the budget, a block takes as many batch indices as fit: a slice of
    the outermost dim keeps every operand's layout (and oneDNN's kernel)."""
    model, args, first = BATCH_BLOCK_CASES[name]
    query_dims, keys = ((5, 4, 6, 8), 6) if isinstance(model, Heads) else (args[0].shape, args[1].shape[-2])
    outer = next(n for n in query_dims[:-2] if n > 1)
    per_index = math.prod(query_dims[:-1]) * keys * 4 // outer
    monkeypatch.setattr(lower_attention, "SCORES_BLOCK_BYTES", 2 * per_index)
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE, name
    text = opt.program_text()
    tail = first.replace("0:2", "4:5")
    assert f"scores{first}" in text and f"scores{tail}" in text, text
    if name == "a constant mask per batch element":
        assert f"bias{tail}" in text, text


@pytest.mark.parametrize("name", list(CASES))
def test_attention_one_head_at_a_time_matches_eager(name, monkeypatch):
    """Blocks of 4 queries of one batch index and head at a time (what bfloat16 attention over long sequences
    runs where blocks of every head lose oneDNN's brgemm kernel), forced here on every case."""
    forced = lambda dims, keys: [lower_attention.Blocks(len(dims) - 2, 4, singles=len(dims) - 2),  # noqa: E731
                                 lower_attention.Blocks(len(dims) - 2, dims[-2])]
    monkeypatch.setattr(lower_attention, "blockings", forced)
    model, args = CASES[name]
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE, name
    text = opt.program_text()
    one_head = "scores[0, 0:4] :" in text or "scores[0, 0, 0:4] :" in text
    assert "torch::scaled_dot_product_attention" not in text and one_head == (name in IN_BLOCKS), text


@pytest.mark.skipif("amx_bf16" not in kernel_flags(), reason="the CPU has no AMX (the kernel choice this is about)")
def test_bfloat16_attention_over_long_sequences_runs_one_head_at_a_time(monkeypatch):
    """Blocks of queries of every head lose oneDNN's brgemm kernel in bfloat16; blocks of one head's queries
    keep it (Whisper's encoder: 1500 queries, 9 MB of scores per head), writing a compact buffer that one
    reorder lays out for the heads' merge."""
    monkeypatch.setattr(lower_attention, "SCORES_BLOCK_BYTES", 6 << 20)  # 9.4 MB a head: blocks of 768 queries
    model, x = Heads(width=128, heads=2), rand(1, 1536, 128)
    opt = pyrys.optimize(model, (x,), precision="bf16")
    text = opt.program_text()
    scores = [line for line in text.splitlines() if ".scores" in line and "dnnl::matmul" in line]
    assert len(scores) == 4 and "scores[0, 1, 768:1536] :" in text, text
    assert len({line.split("impl=")[1].split("]")[0] for line in scores}) == 1, text
    assert "scaled_dot_product_attention.heads.reorder" in text, text
    assert relative_error(opt(x), model(x)) <= 2e-2


@pytest.mark.parametrize("mask", [torch.ones(6, 6, dtype=torch.bool), torch.zeros(1, 1, 6, 6)], ids=["all True", "all 0.0"])
def test_a_constant_mask_that_masks_nothing_is_not_read(mask):
    """HF's ViT passes an all-True mask to every attention: adding it changes no score, so no matmul reads it."""
    model = ConstantMask(mask)
    args = (rand(2, 4, 6, 8), rand(2, 4, 6, 8, seed=2), rand(2, 4, 6, 8, seed=3))
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE
    text = opt.program_text()
    assert "dnnl::softmax" in text and ".bias" not in text and ".keep" not in text, text


def test_a_constant_mask_is_sliced_into_one_buffer_per_block(monkeypatch):
    monkeypatch.setattr(lower_attention, "SCORES_BLOCK_BYTES", 64)
    monkeypatch.setattr(lower_attention, "MIN_BLOCK_ROWS", 4)

    class Banded(Heads):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.ones(6, 6, dtype=torch.bool).triu(-2).tril(2))

        def forward(self, x):
            return super().forward(x, self.mask)

    model = Banded()
    opt = pyrys.optimize(model, (X,))
    assert relative_error(opt(X), model(X)) <= TOLERANCE
    assert "bias[:, :, 4:6]" in opt.program_text()


def test_a_query_that_sees_no_key_gives_zeros_as_in_torch():
    model, (x, mask) = CASES["bool mask (B,1,L,S) with queries that see no key"]
    out = pyrys.optimize(model, (x, mask))(x, mask)
    heads = Heads(merge=False)
    empty = pyrys.optimize(heads, (x, mask))(x, mask)[:, :, [1, 4]]
    assert torch.isfinite(out).all() and torch.equal(empty, torch.zeros_like(empty))


def far_masks(batch: int, queries: int, keys: int, infinite: bool) -> torch.Tensor:
    """Float masks of every depth: a query whose keys are all masked below -1e30 but one less than the rest
    (torch attends to that one alone); ``infinite``: one mixing -inf with finfo.min, one all -inf (torch:
    zeros), one -inf but for one key (an input whose sum is not finite runs its call on torch ops)."""
    mask = torch.zeros(batch, 1, queries, keys)
    mask[0, 0, 1] = -1e35
    mask[0, 0, 1, 2] = -1e31
    if infinite:
        mask[0, 0, 2, :] = torch.finfo(torch.float32).min
        mask[0, 0, 2, keys // 2:] = float("-inf")
        mask[-1, 0, 3] = float("-inf")
        mask[-1, 0, 0, 1:] = float("-inf")
    return mask


@pytest.mark.parametrize("constant", [False, True], ids=["input", "constant"])
def test_a_float_mask_far_below_minus_1e30_keeps_its_order(constant):
    """The mask was raised to -1e30 everywhere: a query masked by -1e31 and -1e35 attended to every key alike
    where torch attends to the -1e31 one (0.89 off, unseen for an input mask; a constant one failed the
    self-check, blamed on oneDNN; a helper's find).  Only a query whose every key is -inf is raised."""
    q, k, v = rand(2, 2, 6, 8, seed=1), rand(2, 2, 7, 8, seed=2), rand(2, 2, 7, 8, seed=3)
    mask = far_masks(2, 6, 7, infinite=constant)
    model = MergedHeads(mask if constant else None).eval()
    inputs = (q, k, v) if constant else (q, k, v, mask)
    opt = pyrys.optimize(model, inputs if constant else (q, k, v, torch.zeros_like(mask)), backend="dnnl")
    with torch.no_grad():
        got, want = opt(*inputs), model(*inputs)
    assert opt._first.backend == "dnnl" and opt._first.program.fault is None, opt.notes
    assert relative_error(got, want) <= TOLERANCE


def test_one_mask_step_serves_every_layer_and_the_heads_are_views():
    layer = Heads()
    x, mask = X, padding_mask(2, 6, [6, 3])

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, mask):
            return self.layer(self.layer(x, mask), mask)

    two = Two().eval()
    opt = pyrys.optimize(two, (x, mask))
    assert relative_error(opt(x, mask), two(x, mask)) <= TOLERANCE
    text = opt.program_text()
    assert text.count("torch::attention_bias") == 1, text
    assert text.count("dnnl::softmax") == 2, text
    reorders = [line for line in text.splitlines() if "dnnl::reorder" in line and ".out :" not in line]
    assert not reorders, text  # q, k, v read where the projection wrote them; the heads merged back as a view


def test_a_constant_mask_is_read_once_when_the_program_is_built():
    class Buffered(Heads):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", rows_masked(torch.ones(6, 6, dtype=torch.bool).tril(), [2]))

        def forward(self, x):
            return super().forward(x, self.mask)

    model = Buffered().eval()
    opt = pyrys.optimize(model, (X,))
    assert relative_error(opt(X), model(X)) <= TOLERANCE
    text = opt.program_text()
    assert "attention_bias" not in text and "dnnl::matmul_mul" in text, text  # the keep of row 2, a constant


def test_grouped_query_attention_falls_back_with_the_reason():
    q, k, v = rand(1, 4, 5, 8), rand(1, 2, 5, 8, seed=2), rand(1, 2, 5, 8, seed=3)

    class Gqa(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    opt = pyrys.optimize(Gqa(), (q, k, v))
    assert relative_error(opt(q, k, v), Gqa()(q, k, v)) <= TOLERANCE
    assert "grouped-query attention" in opt.program_text()


@needs_native_bf16
def test_bfloat16_attention_runs_on_onednn():
    model = Heads().to(torch.bfloat16)
    x, mask = X.to(torch.bfloat16), padding_mask(2, 6, [6, 4])
    opt = pyrys.optimize(model, (x, mask))
    out = opt(x, mask)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), model(x, mask).float()) <= 2e-2
    assert "dnnl::softmax" in opt.program_text()


def test_many_threads_with_their_own_masks_get_their_own_answers():
    model = Heads()
    x = rand(2, 6, 32)
    opt = pyrys.optimize(model, (x, padding_mask(2, 6, [6, 6])))
    masks = [padding_mask(2, 6, [6, 6]), padding_mask(2, 6, [1, 6]), padding_mask(2, 6, [3, 2]),
             rows_masked(padding_mask(2, 6, [6, 6]).expand(2, 1, 6, 6), [0])]
    expected = [model(x, m) for m in masks]
    errors = []

    def work(index):
        for round in range(25):
            which = (index + round) % len(masks)
            if relative_error(opt(x, masks[which]), expected[which]) > TOLERANCE:
                errors.append((index, round))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@pytest.mark.parametrize("mask", [(1.0 - padding_mask(2, 6, [6, 3]).float()) * -1e9, padding_mask(2, 6, [6, 3])],
                         ids=["float mask", "boolean mask"])
@needs_native_bf16
def test_precision_bf16_runs_attention_in_bfloat16_with_its_mask_as_it_is(mask):
    model, x = Heads(), rand(2, 6, 32)
    opt = pyrys.optimize(model, (x, mask), precision="bf16")
    text = opt.program_text()
    attention = next(line for line in text.splitlines() if line.lstrip().startswith("%scaled_dot_product_attention :"))
    assert "BFloat16" in attention and "dnnl::matmul" in attention, text
    assert not [line for line in text.splitlines() if "_f32 :" in line and "transpose" in line], text  # q, k, v stay bf16
    assert relative_error(opt(x, mask), model(x, mask)) <= 2e-2


@needs_native_bf16
def test_bfloat16_heads_of_a_merged_projection_are_copied_compact_for_the_brgemm_kernel():
    """The heads of one merged projection have its row's stride: oneDNN's bf16 matmul on them is its gemm
    kernel; on compact copies, its brgemm kernel (1.6-2.5x faster)."""
    model, x = Heads(width=128, heads=2), rand(2, 40, 128)
    opt = pyrys.optimize(model, (x,), precision="bf16")
    text = opt.program_text()
    matmuls = [line for line in text.splitlines() if "dnnl::matmul" in line and "attention" in line]
    assert len(matmuls) == 2 and all("impl=brg" in line for line in matmuls), text
    assert len([line for line in text.splitlines() if "transpose" in line and "dnnl::reorder" in line]) == 3, text
    assert relative_error(opt(x), model(x)) <= 2e-2


def test_float32_heads_stay_views_whatever_the_kernel():
    """In float32 the gemm kernel is within 7-17% of brgemm's, less than the copies would cost."""
    opt = pyrys.optimize(Heads(width=128, heads=2), (rand(2, 40, 128),))
    text = opt.program_text()
    assert not [line for line in text.splitlines() if "transpose" in line and "dnnl::reorder" in line], text


@pytest.mark.parametrize("strides", [(640, 16, 128, 1), (0, 16, 64, 1), (1000, 1, 128, 4)])
def test_a_compact_descriptor_keeps_the_dims_order_in_memory(strides):
    from pyrys.backends.dnnl.constants import DataType
    from pyrys.backends.dnnl.primitives import MemoryDesc

    md = MemoryDesc.from_strides([1, 4, 5, 16], DataType.bf16, strides)
    compact = lower_attention._compact_md(md)
    moving = [d for d in range(4) if md.dims[d] > 1]  # a dim of 1 has no place in memory (canonical_strides)
    assert sorted(moving, key=lambda d: compact.strides[d]) == sorted(moving, key=lambda d: strides[d])
    assert compact.size() == 1 * 4 * 5 * 16 * 2


@needs_native_bf16
def test_bfloat16_attention_runs_unblocked_where_blocks_would_lose_the_brgemm_kernel(monkeypatch):
    """A block of queries of a batched Q is not compact: oneDNN 3.2 gives it a slower kernel than the whole
    (ViT-base at batch 8 ran 0.87x, Whisper's encoder 0.89x of the blocked time unblocked)."""
    monkeypatch.setattr(lower_attention, "SCORES_BLOCK_BYTES", 1 << 16)  # blocks of 16 queries here
    model, x = Heads(width=128, heads=2), rand(2, 96, 128)
    opt = pyrys.optimize(model, (x,), precision="bf16")
    text = opt.program_text()
    scores = [line for line in text.splitlines() if ".scores" in line and "dnnl::matmul" in line]
    assert scores and all("impl=brg" in line for line in scores), text
    assert relative_error(opt(x), model(x)) <= 2e-2


def test_float32_attention_keeps_its_blocks(monkeypatch):
    monkeypatch.setattr(lower_attention, "SCORES_BLOCK_BYTES", 1 << 16)
    opt = pyrys.optimize(Heads(width=128, heads=2), (rand(2, 96, 128),))
    assert len([line for line in opt.program_text().splitlines() if ".scores[" in line]) > 1


TORCH_CASES = {name: CASES[name] for name in ("no mask", "padding mask (B,1,1,S)", "bool mask (B,1,L,S) with queries "
                                              "that see no key", "causal", "explicit scale", "heads not merged back",
                                              "one key and value head for all, a mask",
                                              "a decoder step, a padding mask (B,1,1,S)")}
TORCH_CASES["a constant mask"] = (ConstantMask(keeps_the_first_key(RANDOM_MASK)), (Q5, K5, V5))


@pytest.mark.parametrize("name", list(TORCH_CASES))
def test_torch_fused_attention_runs_where_it_is_measured_faster(name, monkeypatch, tmp_path):
    """Over scores larger than ``TIMED_SCORES_BYTES`` both kernels are timed; torch's runs where it takes at
    most ``FASTER`` of oneDNN's time (forced here), on the query, key and value as eager gives them."""
    monkeypatch.setenv("PYRYS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(attention_kernels, "TIMED_SCORES_BYTES", 0)
    monkeypatch.setattr(attention_kernels, "FASTER", float("inf"))
    model, args = TORCH_CASES[name]
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE, name
    text = opt.program_text()
    assert "torch::scaled_dot_product_attention" in text and "# chosen: torch's fused attention" in text, text
    assert "dnnl::softmax" not in text and "# fallback" not in text.split("scaled_dot_product_attention")[1], text


def test_the_kernel_choice_is_measured_once_and_kept(monkeypatch, tmp_path):
    """One timing per signature: the attentions of one shape share it, and the next compile reads it from
    the tuning cache."""
    monkeypatch.setenv("PYRYS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(attention_kernels, "TIMED_SCORES_BYTES", 0)
    monkeypatch.setattr(attention_kernels, "FASTER", 0.9)
    timed = []
    original = attention_kernels.best_seconds
    monkeypatch.setattr(attention_kernels, "best_seconds", lambda calls, runs: timed.append(1) or original(calls, runs))

    class TwoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = Heads(), Heads()

        def forward(self, x):
            return self.second(self.first(x))

    model = TwoLayers().eval()
    first = pyrys.optimize(model, (X,))
    assert len(timed) == 1
    monkeypatch.setattr(measured, "_DECIDED", {})  # a new process: only the cache remembers
    second = pyrys.optimize(model, (X,))
    assert len(timed) == 1 and list((tmp_path / "attention_kernel").glob("*.json"))
    assert first.program_text() == second.program_text()
    assert relative_error(second(X), model(X)) <= TOLERANCE


def test_short_attention_is_not_timed(monkeypatch):
    """Below ``TIMED_SCORES_BYTES`` of scores oneDNN's steps run, with nothing measured."""
    monkeypatch.setattr(attention_kernels, "FASTER", float("inf"))
    monkeypatch.setattr(attention_kernels, "best_seconds", lambda calls, runs: pytest.fail("timed"))
    opt = pyrys.optimize(Heads().eval(), (X,))
    assert "dnnl::softmax" in opt.program_text()


def test_a_loaded_program_runs_the_attention_kernel_it_was_saved_with(monkeypatch, tmp_path):
    """The choice is saved with the program; loading (in a process that never measured it, with no tuning
    cache) measures nothing and gives the saved module's outputs bit for bit."""
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")
    monkeypatch.setattr(attention_kernels, "TIMED_SCORES_BYTES", 0)
    monkeypatch.setattr(attention_kernels, "FASTER", float("inf"))
    model = Heads().eval()
    opt = pyrys.optimize(model, (X,))
    pyrys.save(opt, tmp_path / "saved")
    monkeypatch.setattr(measured, "_DECIDED", {})  # another process
    monkeypatch.setattr(attention_kernels, "best_seconds", lambda calls, runs: pytest.fail("measured at load"))
    loaded = pyrys.load(tmp_path / "saved")
    assert "# chosen: torch's fused attention" in loaded.program_text()
    assert torch.equal(loaded(X), opt(X))


def test_a_mask_of_one_head_is_packed_once_for_every_head(monkeypatch):
    """Blocks of one head at a time share the parts of a mask that every head reads alike (causal)."""
    forced = lambda dims, keys: [lower_attention.Blocks(len(dims) - 2, 4, singles=len(dims) - 2),  # noqa: E731
                                 lower_attention.Blocks(len(dims) - 2, dims[-2])]
    monkeypatch.setattr(lower_attention, "blockings", forced)
    model = Heads(causal=True).eval()
    opt = pyrys.optimize(model, (X,))
    assert relative_error(opt(X), model(X)) <= TOLERANCE
    parts = set(re.findall(r"%scaled_dot_product_attention\.bias\[[^\]]*\]", opt.program_text()))
    assert len(parts) == 2, parts  # queries 0:4 and 4:6, for 2 images x 4 heads


def test_choosing_torch_keeps_none_of_the_constants_the_onednn_steps_packed(monkeypatch):
    """The oneDNN steps built (and timed) before torch's kernel won are undone with what they packed."""
    monkeypatch.setattr(lower_attention, "SCORES_BLOCK_BYTES", 64)  # a causal bias packed block by block
    monkeypatch.setattr(attention_kernels, "TIMED_SCORES_BYTES", 0)
    monkeypatch.setattr(attention_kernels, "FASTER", float("inf"))
    model = Heads(causal=True).eval()
    opt = pyrys.optimize(model, (X,))
    assert "# chosen: torch's fused attention" in opt.program_text()
    assert relative_error(opt(X), model(X)) <= TOLERANCE
    runtime = opt._first.program
    shapes = sorted(tuple(source.shape) for source in runtime.packed.sources.values())
    assert all(len(shape) <= 2 for shape in shapes), shapes  # the projection's weight and bias only


def test_a_loaded_program_built_for_another_thread_count_takes_the_saved_kernel(monkeypatch, tmp_path):
    """A program built at a call for a thread count the save has none for takes the save's choice (of the
    nearest count) rather than time the kernels again in the caller's call (a review's find)."""
    monkeypatch.setenv("PYRYS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(attention_kernels, "TIMED_SCORES_BYTES", 0)
    monkeypatch.setattr(attention_kernels, "FASTER", float("inf"))  # torch's kernel chosen: not the default
    model = Heads().eval()
    opt = with_threads(2, pyrys.optimize, model, (X,))
    assert "# chosen: torch's fused attention" in opt.program_text()
    pyrys.save(opt, tmp_path / "saved")
    monkeypatch.setattr(measured, "_DECIDED", {})
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")
    refuse_to_measure(monkeypatch)
    loaded = with_threads(2, pyrys.load, tmp_path / "saved")
    assert relative_error(with_threads(1, loaded, X), model(X)) <= TOLERANCE  # builds the 1-thread program
    assert "# chosen: torch's fused attention" in loaded._first.program.programs[1].describe()
