"""Dynamic batching and the Ray Data predictor, without Ray: rows go back to their request, every
request gets its own error, a program saved for fixed shapes is never batched past what it holds."""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

import pyrys
from pyrys.ray import Predictor
from pyrys.ray.batching import Batcher
from tests.conftest import TOLERANCE
from tests.ray.models import images, two_heads


class Total(nn.Module):
    """An output that is not per row: a batch of it cannot be split."""

    def forward(self, x):
        return (x * 2).sum()


def _close(actual, expected) -> bool:
    if isinstance(expected, torch.Tensor):
        return pyrys.relative_error(actual, expected) <= TOLERANCE
    if isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(_close(actual[k], expected[k]) for k in expected)
    return len(actual) == len(expected) and all(_close(a, e) for a, e in zip(actual, expected))


@pytest.fixture(scope="module")
def model():
    return two_heads()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """The model saved twice: shape-generic (``dynamic=True``) and for batch 1 and 4 only."""
    root = tmp_path_factory.mktemp("ray_batching")
    generic = pyrys.optimize(model, (images(2, 0),), dynamic=True)
    fixed = pyrys.optimize(model, (images(1, 0),), dynamic=False)
    fixed(images(4, 0))
    return pyrys.save(generic, root / "generic.pyrys"), pyrys.save(fixed, root / "fixed.pyrys")


def test_requests_of_a_shape_run_as_one_batch_and_get_their_own_rows(model, saved):
    module = pyrys.load(saved[0])
    calls = []
    batcher = Batcher(lambda *inputs: calls.append(inputs[0].shape[0]) or module(*inputs))
    requests = [(images(rows, seed),) for seed, rows in enumerate([1, 3, 2, 1])]
    checked = batcher.run(requests)
    assert calls == [7, 1, 3, 2, 1, 2] and batcher.batches  # the first batch checked: each alone, then a probe
    results = batcher.run(requests)
    assert calls[6:] == [7] and [rows for _, rows in results] == [7, 7, 7, 7]
    with torch.no_grad():
        assert all(_close(result, model(*inputs)) for (result, _), inputs in zip(checked + results, requests * 2))


def test_requests_of_other_shapes_or_dtypes_run_in_their_own_batches(saved):
    module = pyrys.load(saved[0])
    calls = []
    batcher = Batcher(lambda x: calls.append(tuple(x.shape)) or module(x))
    requests = [(images(1, 0),), (torch.randn(2, 3, 10, 10),), (images(2, 1),), (torch.zeros(1, 3, 8, 8).double(),)]
    results = [outcome for outcome, _ in batcher.run(requests)]
    assert calls == [(3, 3, 8, 8), (1, 3, 8, 8), (2, 3, 8, 8), (2, 3, 8, 8), (2, 3, 10, 10), (1, 3, 8, 8)]
    assert isinstance(results[3], pyrys.InputError) and "dtype torch.float32" in str(results[3])


def test_a_bad_request_gets_its_error_and_the_others_their_outputs(model, saved):
    batcher = Batcher(pyrys.load(saved[0]))
    good = [(images(1, seed),) for seed in range(3)]
    bad = (torch.randn(1, 4, 8, 8),)  # four channels: the conv takes three
    results = [outcome for outcome, _ in batcher.run([good[0], bad, good[1], good[2]])]
    assert isinstance(results[1], pyrys.InputError) and "dim 1 is 4" in str(results[1])
    with torch.no_grad():
        assert all(_close(results[i], model(*good[j])) for i, j in [(0, 0), (2, 1), (3, 2)])


def test_a_program_saved_for_fixed_shapes_runs_request_by_request(model, saved):
    module = pyrys.load(saved[1])
    assert not module.specializes_shapes and pyrys.load(saved[0]).specializes_shapes
    assert not module.batches_rows and pyrys.load(saved[0]).batches_rows
    batcher = Batcher(module)
    requests = [(images(1, seed),) for seed in range(3)] + [(images(2, 9),)]
    results = [outcome for outcome, _ in batcher.run(requests)]
    with torch.no_grad():
        assert all(_close(results[i], model(*requests[i])) for i in range(3))
    assert isinstance(results[3], pyrys.InputError) and "compiled for inputs" in str(results[3])


def test_outputs_that_are_not_per_row_are_never_batched():
    calls = []
    batcher = Batcher(lambda x: calls.append(len(x)) or Total()(x))
    requests = [(torch.ones(2, 3),), (torch.ones(1, 3),)]
    assert [float(r) for r, _ in batcher.run(requests)] == [12.0, 6.0]
    assert not batcher.batches and calls == [3, 2, 1]
    batcher.run(requests)
    assert calls == [3, 2, 1, 2, 1]


class Transposed(nn.Module):
    """Rows in dim 1 of the output: with eight rows of eight, its length matches the batch by chance."""

    def forward(self, x):
        return (x * 2).t()


def test_a_graph_whose_output_rows_are_not_dim_0_is_never_batched(tmp_path):
    opt = pyrys.optimize(Transposed().eval(), (torch.ones(2, 8),), dynamic=True)
    module = pyrys.load(pyrys.save(opt, tmp_path / "t.pyrys"))
    assert module.specializes_shapes and not module.batches_rows
    requests = [(torch.full((1, 8), float(i)),) for i in range(8)]
    results = Batcher(module).run(requests)
    assert [rows for _, rows in results] == [1] * 8
    assert all(torch.equal(out, (x * 2).t()) for (out, _), (x,) in zip(results, requests))


def test_a_sequence_first_model_whose_rows_mix_is_never_batched(tmp_path):
    """``(S, B, E)`` in and out: dim 0 is one symbolic size, but attention mixes it; batched requests got
    each other's positions (0.17-0.36 off)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0).eval()
    module = pyrys.load(pyrys.save(pyrys.optimize(layer, (torch.randn(5, 2, 8),), dynamic=True), tmp_path / "s"))
    batcher = Batcher(module)
    requests = [(torch.randn(5, 2, 8),), (torch.randn(3, 2, 8),)]
    for _ in range(2):
        results = batcher.run(requests)
        assert not batcher.batches and [rows for _, rows in results] == [5, 3]
        with torch.no_grad():
            assert all(_close(out, layer(*inputs)) for (out, _), inputs in zip(results, requests))


def test_many_threads_batching_at_once_each_get_their_own_rows(model, saved):
    batcher = Batcher(pyrys.load(saved[0]))
    wrong = []

    def caller(thread: int) -> None:
        for call in range(6):
            requests = [(images(1 + (thread + i) % 3, 100 * thread + 10 * call + i),) for i in range(3)]
            with torch.no_grad():
                expected = [model(*inputs) for inputs in requests]
            wrong.extend((thread, call) for (r, _), e in zip(batcher.run(requests), expected) if not _close(r, e))

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(caller, range(6)))
    assert wrong == []


def test_the_predictor_adds_named_output_columns_to_a_batch(model, saved):
    predictor = Predictor(saved[0], column="pixels", output_column="out")
    x = images(5, 3).numpy()
    batch = predictor({"pixels": x, "id": np.arange(5)})
    assert sorted(batch) == ["id", "out_0", "out_1_features", "pixels"]
    with torch.no_grad():
        logits, rest = model(torch.from_numpy(x))
    assert pyrys.relative_error(torch.from_numpy(batch["out_0"]), logits) <= TOLERANCE
    assert pyrys.relative_error(torch.from_numpy(batch["out_1_features"]), rest["features"]) <= TOLERANCE
    named = Predictor(saved[0], column="pixels", output_column=["logits", "features"])({"pixels": x})
    assert np.array_equal(named["logits"], batch["out_0"])


@pytest.mark.parametrize("arguments, error, says", [
    ({"column": 5}, TypeError, "column must be a column name or a list of them, got 5"),
    ({"output_column": 5}, TypeError, "output_column must be a column name or a list of them"),
    ({"column": ["pixels", None]}, TypeError, "column must be a column name"),
    ({"column": "pixels", "output_column": "pixels"}, ValueError, "'pixels' is an input column too")])
def test_the_predictor_refuses_column_names_it_cannot_use(saved, arguments, error, says):
    """A helper's find: an int column raised "'int' object is not iterable"; an int output column passed, to fail
    at the first batch; outputs named as the input replaced it."""
    with pytest.raises(error, match=says):
        Predictor(saved[0], **arguments)


def test_the_predictors_columns_are_distinct_where_output_names_read_alike(tmp_path):
    """``"a_b"`` and ``{"a": {"b": ...}}`` both became the column ``out_a_b``: one was lost."""
    class Alike(nn.Module):
        def forward(self, x):
            return {"a_b": x + 1, "a": {"b": x + 2}}

    path = pyrys.save(pyrys.optimize(Alike().eval(), (torch.zeros(2, 3),)), tmp_path / "alike.pyrys")
    batch = Predictor(path, column="x", output_column="out")({"x": np.zeros((2, 3), np.float32)})
    assert {k: float(v[0, 0]) for k, v in batch.items() if k != "x"} == {"out_a_b": 1.0, "out_a_b~1": 2.0}


def test_the_predictor_stacks_a_column_of_per_row_arrays(saved):
    x = images(3, 4).numpy()
    rows = np.empty(3, dtype=object)
    rows[:] = list(x)
    predictor = Predictor(saved[0], output_column=["a", "b"])
    assert np.array_equal(predictor({"image": rows})["a"], predictor({"image": x})["a"])


def test_the_predictor_takes_an_empty_object_column_and_names_a_row_that_is_not_numbers(saved):
    predictor = Predictor(saved[0], output_column=["a", "b"])
    assert predictor({"image": np.empty(0, dtype=object)})["a"].shape[0] == 0
    rows = np.empty(2, dtype=object)
    rows[:] = [images(1, 4).numpy()[0], None]
    with pytest.raises(pyrys.InputError, match="row 1 of column 'image' is NoneType None, not an array of numbers"):
        predictor({"image": rows})
    rows[:] = [[[1.0, 2.0], [3.0]], [[1.0, 2.0], [3.0, 4.0]]]  # numbers nested unevenly
    with pytest.raises(pyrys.InputError, match="holds rows of different shapes"):
        predictor({"image": rows})


def test_the_predictor_runs_rows_one_by_one_when_the_program_holds_only_single_rows(model, saved):
    x = images(3, 5).numpy()  # batch 3 was not saved; batch 1 was
    batch = Predictor(saved[1], output_column=["logits", "features"])({"image": x})
    with torch.no_grad():
        assert pyrys.relative_error(torch.from_numpy(batch["logits"]), model(torch.from_numpy(x))[0]) <= TOLERANCE


@pytest.mark.parametrize("batch, column, says", [
    ({"pixels": np.zeros((2, 3, 8, 8), np.float32)}, "image", "no column 'image'"),
    ({"image": np.zeros((2, 3, 8, 8), np.float64)}, "image", "dtype torch.float32"),
    ({"image": np.array(["a", "b"])}, "image", "numbers or booleans"),
])
def test_the_predictor_names_what_a_bad_batch_lacks(saved, batch, column, says):
    with pytest.raises(pyrys.InputError, match=says):
        Predictor(saved[0], column=column)(batch)


def test_the_predictor_refuses_outputs_that_are_not_per_row(tmp_path):
    opt = pyrys.optimize(Total().eval(), (torch.ones(2, 3),))
    with pytest.raises(ValueError, match="one row per input row"):
        Predictor(pyrys.save(opt, tmp_path / "total.pyrys"), column="x")({"x": np.ones((2, 3), np.float32)})


def test_the_predictor_is_safe_to_call_from_many_threads(model, saved):
    predictor = Predictor(saved[0], output_column=["logits", "features"])
    inputs = [images(1 + i % 4, 50 + i).numpy() for i in range(24)]
    with torch.no_grad():
        expected = [model(torch.from_numpy(x))[0] for x in inputs]
    barrier = threading.Barrier(6)

    def call(i: int) -> float:
        if i < 6:
            barrier.wait()
        return pyrys.relative_error(torch.from_numpy(predictor({"image": inputs[i]})["logits"]), expected[i])

    with ThreadPoolExecutor(6) as pool:
        assert max(pool.map(call, range(24))) <= TOLERANCE


def test_the_predictor_rounds_float32_rows_for_a_bfloat16_input(tmp_path):
    """numpy has no bfloat16: a float32 column was refused, so Ray Data could not feed such a program at all."""
    layer = nn.Linear(6, 3).eval()
    opt = pyrys.optimize(layer.to(torch.bfloat16), (torch.randn(2, 6).to(torch.bfloat16),), dynamic=True)
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    got = Predictor(pyrys.save(opt, tmp_path / "bf16.pyrys"), column="x")({"x": x})["output"]
    with torch.no_grad():
        expected = layer(torch.from_numpy(x).to(torch.bfloat16)).float()
    assert pyrys.relative_error(torch.from_numpy(np.asarray(got, np.float32)), expected) <= 1e-2


class TwoInputs(nn.Module):
    def forward(self, ids, mask):
        return (ids * mask).float().cumsum(-1)


def test_the_predictor_reads_one_column_per_input_and_pandas_batches(tmp_path):
    pandas = pytest.importorskip("pandas", reason="pandas batches need pandas")
    opt = pyrys.optimize(TwoInputs().eval(), (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)),
                         dynamic=True)
    predictor = Predictor(pyrys.save(opt, tmp_path / "two.pyrys"), column=["ids", "mask"])
    ids, mask = np.arange(15).reshape(3, 5), (np.arange(15).reshape(3, 5) % 2)
    expected = np.cumsum(ids * mask, axis=-1).astype(np.float32)
    assert np.array_equal(predictor({"ids": ids, "mask": mask})["output"], expected)
    frame = pandas.DataFrame({"ids": list(ids), "mask": list(mask)})
    answered = predictor(frame)
    assert isinstance(answered, pandas.DataFrame) and np.array_equal(np.stack(answered["output"]), expected)


def test_a_warm_up_of_copies_does_not_pass_the_row_check_for_good(tmp_path):
    """Copies (and a request twice along dim 0) agree even where rows mix: the check passed on them, and later
    callers got each other's rows."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0).eval()
    module = pyrys.load(pyrys.save(pyrys.optimize(layer, (torch.randn(5, 2, 8),), dynamic=True), tmp_path / "s"))
    batcher, warm = Batcher(module), torch.randn(4, 2, 8)
    warmed = batcher.run([(warm,), (warm.clone(),), (torch.cat([warm, warm]),)])  # attend alike: agree batched
    assert not batcher.batches  # the probe, rows unlike the first request's, shows them mixing
    requests = [(torch.randn(5, 2, 8),), (torch.randn(3, 2, 8),)]
    results = batcher.run(requests)
    assert not batcher.batches
    with torch.no_grad():
        assert all(_close(out, layer(*inputs)) for (out, _), inputs in zip(results + warmed[:1], requests + [(warm,)]))


class RowsByChance(nn.Module):
    """Four rows out, whatever comes in: with four rows in, it looks per row."""

    def forward(self, x):
        return x.sum(0, keepdim=True).expand(4, -1) * 1.0


def test_an_output_whose_rows_only_matched_by_chance_answers_each_request():
    """The check compared outputs of two shapes and raised, losing every request of the batch."""
    batcher = Batcher(RowsByChance())
    requests = [(torch.ones(1, 3),), (torch.ones(3, 3) * 2,)]
    results = batcher.run(requests)
    assert not batcher.batches and [tuple(out.shape) for out, _ in results] == [(4, 3), (4, 3)]


def test_inputs_given_by_keyword_in_another_order_are_decoded_in_forward_s(tmp_path):
    """An example ``{"mask": m, "ids": i}`` for ``forward(ids, mask)``: ``input_types`` came in the example's
    order while ``pyrys serve`` and the Predictor pass inputs by position, as ``opt(ids, mask)`` takes them, so a
    JSON request's ids were read as floats and the Predictor's empty batch got the wrong dtypes (a helper's find)."""
    from pyrys.ray.codec import decode

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 4)

        def forward(self, ids, mask):
            return self.embed(ids).sum(-1) * mask

    model = Tokens().eval()
    ids, mask = torch.randint(0, 50, (2, 5)), torch.rand(2, 5)
    path = pyrys.save(pyrys.optimize(model, (), {"mask": mask, "ids": ids}, dynamic=True), tmp_path / "tokens")
    loaded = pyrys.load(path)
    assert [dtype for _, dtype in loaded.input_types] == [torch.int64, torch.float32]
    request = decode(json.dumps({"inputs": [ids.tolist(), mask.tolist()]}).encode(),
                     [dtype for _, dtype in loaded.input_types])
    assert torch.equal(loaded(*request.inputs), loaded(ids, mask))
    predictor = Predictor(path, column=["ids", "mask"], output_column="out")
    assert predictor({"ids": np.empty(0, dtype=object), "mask": np.empty(0, dtype=object)})["out"].shape[0] == 0
    got = predictor({"ids": ids.numpy(), "mask": mask.numpy()})["out"]
    with torch.no_grad():
        assert pyrys.relative_error(torch.from_numpy(got), model(ids, mask)) <= TOLERANCE


@pytest.mark.parametrize("other, says", [(lambda y: None, "got NoneType"), (lambda y: y.sum(), "got shape \\(\\)")])
def test_an_output_that_is_no_tensor_is_refused_by_name_when_rows_run_one_by_one(tmp_path, other, says):
    """A program for one row run row by row: joining a None output raised torch.cat's TypeError, a 0-d one its
    RuntimeError (a helper's and a review's finds)."""
    class WithOther(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            y = self.linear(x)
            return {"p": y, "other": other(y)}

    path = pyrys.save(pyrys.optimize(WithOther().eval(), (torch.ones(1, 4),)), tmp_path / "with_other")
    with pytest.raises(ValueError, match=f"output 'out_other' must have one row per input row \\(3\\), {says}"):
        Predictor(path, column="x", output_column="out")({"x": np.ones((3, 4), np.float32)})


class IdMix(nn.Module):
    """Token ids in, each row's embeddings plus the batch's mean embedding out: rows mix."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 8)

    def forward(self, ids):
        y = self.embed(ids)
        return y + y.mean(0, keepdim=True)


def test_a_warm_up_of_padding_ids_decides_nothing_and_a_later_batch_is_checked(tmp_path):
    """Two all-zero id requests agree batched, and the probe shuffled ids that were all 0: the check passed for
    good, and 16/16 later batched answers were wrong (a helper's find)."""
    model = IdMix().eval()
    module = pyrys.load(pyrys.save(pyrys.optimize(model, (torch.randint(0, 50, (2, 6)),), dynamic=True),
                                   tmp_path / "idmix"))
    batcher, pad = Batcher(module), torch.zeros(1, 6, dtype=torch.long)
    batcher.run([(pad,), (pad.clone(),)])
    assert batcher.batches  # undecided: one value everywhere cannot show rows mixing
    requests = [(torch.randint(1, 50, (1, 6), generator=torch.Generator().manual_seed(i)),) for i in range(3)]
    for _ in range(2):
        results = batcher.run(requests)
        assert not batcher.batches and [rows for _, rows in results] == [1, 1, 1]
        with torch.no_grad():
            assert all(_close(out, model(*inputs)) for (out, _), inputs in zip(results, requests))


def test_the_probe_moves_every_id_to_another_id_seen():
    from pyrys.ray.batching import _unlike

    ids = torch.tensor([[3, 3, 7], [7, 9, 3]])
    made = _unlike(ids, [ids, torch.tensor([[3, 3, 3]])])
    assert not (made == ids).any() and set(made.unique().tolist()) <= {3, 7, 9}
    assert not torch.equal(made[0], made[1]) and torch.equal(_unlike(ids[:1] * 0, [ids[:1] * 0]), ids[:1] * 0)


class SmallFeatureMix(nn.Module):
    """Column 0 per row and ~1000; column 1 centered over the batch (rows mix), ~1."""

    def forward(self, x):
        return torch.cat([1000 * x[:, :1], x[:, 1:] - x[:, 1:].mean(0, keepdim=True)], 1)


def test_rows_mixing_in_a_small_feature_beside_a_large_one_are_seen(tmp_path):
    """An error over the whole output's largest value (1000) hid column 1's O(1) one: batched answers were wrong
    (a helper's find)."""
    model = SmallFeatureMix().eval()
    module = pyrys.load(pyrys.save(pyrys.optimize(model, (torch.rand(2, 2),), dynamic=True), tmp_path / "mix"))
    batcher = Batcher(module)
    requests = [(torch.rand(1, 2, generator=torch.Generator().manual_seed(i)) + 0.5,) for i in range(4)]
    for _ in range(2):
        results = batcher.run(requests)
        assert not batcher.batches
        assert all(torch.allclose(out, model(*inputs), atol=1e-4) for (out, _), inputs in zip(results, requests))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))

    def forward(self, x):
        return self.layers(x)


def test_rows_that_do_not_mix_keep_batching_through_float32_rounding(model, saved, tmp_path):
    """The per-feature check is tight: the kernels of another batch size must not turn batching off."""
    mlp = pyrys.load(pyrys.save(pyrys.optimize(Mlp().eval(), (torch.randn(2, 32),), dynamic=True), tmp_path / "mlp"))
    cases = [(mlp, [(torch.randn(1 + i % 3, 32) * 10 ** (i - 2),) for i in range(5)]),
             (pyrys.load(saved[0]), [(images(1 + i % 2, 20 + i),) for i in range(5)])]
    for module, requests in cases:
        batcher = Batcher(module)
        for _ in range(2):
            assert [rows for _, rows in batcher.run(requests)] == [sum(len(r[0]) for r in requests)] * 5
        assert batcher.batches


def test_the_predictor_refuses_input_columns_listed_out_of_forwards_order(tmp_path):
    """``column=["attention_mask", "input_ids"]`` for ``forward(input_ids, attention_mask)`` ran with the two
    swapped, silently (a helper's find): columns fill the inputs by position."""
    opt = pyrys.optimize(TwoInputs().eval(), (torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)),
                         dynamic=True)
    path = pyrys.save(opt, tmp_path / "two.pyrys")
    assert pyrys.load(path).input_names == ["ids", "mask"]
    with pytest.raises(ValueError, match=r"column= \['mask', 'ids'\] names forward's parameters in another order "
                                         r"than its inputs \['ids', 'mask'\].*column=\['ids', 'mask'\]"):
        Predictor(path, column=["mask", "ids"])
    Predictor(path, column=["ids", "mask"])
    Predictor(path, column=["b", "a"])  # other names: by position, as documented


def test_the_predictor_refuses_to_replace_a_column_the_batch_has(saved):
    """A label column named ``output`` was replaced by the outputs, silently (a helper's find)."""
    batch = {"image": images(2, 1).numpy(), "out_0": np.array([7, 7])}
    with pytest.raises(ValueError, match="the batch has a column 'out_0' already.*pass output_column= another name"):
        Predictor(saved[0], output_column="out")(batch)
    assert batch["out_0"].tolist() == [7, 7] and sorted(batch) == ["image", "out_0"]
