"""A call that passes other inputs than the example (an optional input left out or added, ``None`` for a
value, ids as int32) runs as eager does: a capture of its own, once per way, its weights shared; where none
can be made (int8, a loaded module) the error names the input."""
import copy
import importlib

import pytest
import torch

import pyrys
from pyrys import precision_notes
from pyrys.machine import native_bf16
from pyrys.input_structures import at_default, passed_otherwise
from pyrys.signature import signature_of
from tests.caller_helpers import run_together
from tests.conftest import TOLERANCE


class OptionalInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.bn.running_mean.uniform_(-0.5, 0.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x, mask=None, bias=None, scale: float = 1.0):
        y = torch.relu(self.bn(self.conv(x)))
        if mask is not None:
            y = y * mask
        if bias is not None:
            y = y + bias
        return y * scale


def inputs(batch=2):
    generator = torch.Generator().manual_seed(batch)
    return (torch.rand(batch, 3, 8, 8, generator=generator), torch.rand(batch, 8, 8, 8, generator=generator),
            torch.rand(batch, 8, 8, 8, generator=generator))


CALLS = {  # (positional, keyword) from (x, mask, bias)
    "mask left out": (lambda x, m, b: ((x,), {})),
    "bias added": (lambda x, m, b: ((x,), {"mask": m, "bias": b})),
    "mask None by position": (lambda x, m, b: ((x, None), {})),
    "mask None by keyword, bias by position": (lambda x, m, b: ((x, None, b), {})),
    "everything by keyword": (lambda x, m, b: ((), {"x": x, "mask": m, "bias": b, "scale": 2.0})),
    "as the example, by position": (lambda x, m, b: ((x, m), {})),
}


@pytest.mark.parametrize("backend", ["dnnl", "reference"])
def test_optional_inputs_left_out_or_added_run_as_eager(backend):
    model = OptionalInputs().eval()
    x, m, _ = inputs()
    opt = pyrys.optimize(model, (x,), {"mask": m}, backend=backend)
    for batch in (2, 3):
        for name, call in CALLS.items():
            args, kwargs = call(*inputs(batch))
            assert pyrys.relative_error(opt(*args, **kwargs), model(*args, **kwargs)) <= TOLERANCE, name
    said = [note for note in opt.notes if "differ from the example's in what they pass" in note]
    assert any("mask left out, the example passed it" in note for note in said), opt.notes
    assert any("bias passed, the example left it out" in note for note in said), opt.notes
    assert any("mask is None, the example's is not" in note for note in said), opt.notes
    # (x,) and (x, None) give forward the same: one module for both; "as the example" none at all
    assert len(opt._structures) == len(said) == 4, opt.notes
    assert any(note.startswith("inputs passed as (Float(2, 3, 8, 8)): input shapes vary") for note in opt.notes)


def test_a_value_at_its_default_the_example_left_out_is_the_example_s_call():
    """``opt(x, None, b)`` for an example ``(x, bias=b)``: what eager's ``m(x, bias=b)`` is, no capture of its own."""
    model = OptionalInputs().eval()
    x, _, b = inputs()
    opt = pyrys.optimize(model, (x,), {"bias": b})
    assert pyrys.relative_error(opt(x, None, b), model(x, None, b)) <= TOLERANCE
    assert pyrys.relative_error(opt(x, bias=b, scale=1.0), model(x, bias=b)) <= TOLERANCE
    assert not opt._structures, opt.notes


def test_the_key_says_what_forward_is_given():
    model = OptionalInputs()
    x, m, b = inputs()
    first = signature_of((x,), {"mask": m})[0]
    parameters = pyrys.optimize(model.eval(), (x,), {"mask": m}, backend="reference")._frontend.parameters
    left_out = passed_otherwise(first, parameters, (x,), {})
    assert left_out.key == (("x", False),) and left_out.differences == ("mask left out, the example passed it",)
    assert passed_otherwise(first, parameters, (x, None), {}).key == left_out.key
    assert passed_otherwise(first, parameters, (x,), {"mask": m}) is None
    assert passed_otherwise(first, parameters, (x, m, b, 2.0), {}).key == \
        (("x", False), ("mask", False), ("bias", False), ("scale", False))
    assert passed_otherwise(first, parameters, (x,), {"other": m}) is None  # forward refuses it: not a way in


def test_a_call_forward_refuses_says_what_forward_says():
    model = OptionalInputs().eval()
    x, m, _ = inputs()
    opt = pyrys.optimize(model, (x,), {"mask": m}, backend="reference")
    with pytest.raises(pyrys.InputError, match="forward itself refuses that call: got an unexpected keyword "
                                               "argument 'masks'"):
        opt(x, masks=m)


def test_many_threads_passing_inputs_two_ways_get_eager_s_answers_from_one_capture_each():
    model = OptionalInputs().eval()
    x, m, _ = inputs()
    opt = pyrys.optimize(model, (x,), {"mask": m})

    def caller(index):
        def calls():
            worst = 0.0
            for round_ in range(6):  # released together: the first calls without the mask race to capture it
                x, m, _ = inputs(2 + (index + round_) % 2)
                args, kwargs = ((x,), {}) if (index + round_) % 2 else ((x,), {"mask": m})
                worst = max(worst, pyrys.relative_error(opt(*args, **kwargs), model(*args, **kwargs)))
            return worst
        return calls

    assert max(run_together([caller(i) for i in range(4)])) <= TOLERANCE
    assert len(opt._structures) == 1


def test_a_copy_keeps_its_other_ways_and_memory_counts_them():
    model = OptionalInputs().eval()
    x, m, _ = inputs()
    opt = pyrys.optimize(model, (x,), {"mask": m})
    before = opt.memory()
    opt(x)
    after = opt.memory()
    assert after["weights"] == before["weights"] and after["packed_weights"] == before["packed_weights"]
    assert after["frames"] > before["frames"]
    copied = copy.deepcopy(opt)
    assert len(copied._structures) == 1
    assert pyrys.relative_error(copied(x), model(x)) <= TOLERANCE


def test_where_no_capture_can_be_made_the_error_names_the_input(tmp_path):
    model = OptionalInputs().eval()
    x, m, _ = inputs()
    samples = [inputs(2)[:2] for _ in range(2)]
    int8 = pyrys.optimize(model, (x, m), precision="int8", calibration=samples)
    with pytest.raises(pyrys.InputError, match="mask left out, the example passed it; with precision='int8'"):
        int8(x)
    opt = pyrys.optimize(model, (x,), {"mask": m})
    opt(x)
    pyrys.save(opt, tmp_path / "saved")
    loaded = pyrys.load(tmp_path / "saved")
    assert any("saved without the programs for inputs passed otherwise" in note for note in loaded.notes)
    assert pyrys.relative_error(loaded(x, mask=m), model(x, m)) <= TOLERANCE
    with pytest.raises(pyrys.InputError, match="mask left out, the example passed it; the module optimized from"):
        loaded(x)


def test_a_loaded_module_takes_an_input_passed_at_the_default_the_example_left_out(tmp_path):
    """The save kept "has a default", not its value: a loaded module refused ``opt(x, None)`` and
    ``opt(x, scale=1.0)``, which give ``forward`` what the example gave it.  A default of another type stays
    a mark (a call passing it is refused, naming the input)."""
    import json

    from pyrys.saving.tree_spec import decode_parameters, encode_parameters

    model = OptionalInputs().eval()
    x, m, _ = inputs()
    opt = pyrys.optimize(model, (x,))
    pyrys.save(opt, tmp_path / "saved")
    loaded = pyrys.load(tmp_path / "saved")
    for args, kwargs in [((x, None), {}), ((x,), {"bias": None, "scale": 1.0}), ((x, None, None, float("1.0")), {})]:
        assert torch.equal(loaded(*args, **kwargs), opt(x)), (args, kwargs)
    with pytest.raises(pyrys.InputError, match="scale passed, the example left it out; the module optimized from"):
        loaded(x, scale=2.0)
    with pytest.raises(pyrys.InputError, match="mask passed, the example left it out"):
        loaded(x, m)

    def forward(x, size=(2, 2), *, nan=float("nan"), flag=True, name="a", count=3, big=10**5000, zero=-0.0):
        pass

    import inspect
    import math
    signature = inspect.signature(forward)
    decoded = decode_parameters(json.loads(json.dumps(encode_parameters(signature))))  # (json.dumps refuses 10**5000)
    assert [p.name for p in decoded.parameters.values()] == list(signature.parameters)
    for mark in ("size", "big"):  # kept as a mark: a call may leave it out, and one passing it is a way of its own
        assert decoded.parameters[mark].default is not inspect.Parameter.empty
        assert not at_default(decoded, mark, signature.parameters[mark].default)
    assert [decoded.parameters[n].default for n in ("flag", "name", "count")] == [True, "a", 3]
    assert type(decoded.parameters["count"].default) is int and math.isnan(decoded.parameters["nan"].default)
    assert at_default(decoded, "nan", float("nan")) and at_default(decoded, "zero", -0.0)
    assert not at_default(decoded, "zero", 0.0) and not at_default(decoded, "count", 3.0)
    assert decoded.parameters["x"].default is inspect.Parameter.empty
    with pytest.raises(ValueError, match="a saved parameter's default"):
        decode_parameters([["x", "POSITIONAL_OR_KEYWORD", {"default": [1]}]])


def test_a_huggingface_model_called_without_the_mask_it_was_optimized_with():
    transformers = pytest.importorskip("transformers", reason="needs HuggingFace transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 12))
    opt = pyrys.optimize(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    for call in ({"input_ids": ids}, {"input_ids": ids[:1, :7]}, {"input_ids": ids, "token_type_ids": ids % 2}):
        want = model(**call).last_hidden_state
        assert pyrys.relative_error(opt(**call).last_hidden_state, want) <= TOLERANCE, list(call)


class Embedded(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(50, 16)
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, ids, mask):
        return self.linear(self.embedding(ids)) * mask.unsqueeze(-1)


def test_ids_and_masks_of_another_integer_dtype_run_as_eager_and_floats_stay_refused():
    """Token ids as int32 (eager's embedding takes them as int64) and a mask as bool: a capture of their own
    (a helper's find: an InputError); a float64 image into a float32 conv stays the dtype error, with eager's."""
    model = Embedded().eval()
    ids, mask = torch.randint(0, 50, (2, 7)), torch.randint(0, 2, (2, 7))
    opt = pyrys.optimize(model, (ids, mask))
    for call in [(ids.int(), mask), (ids, mask.bool()), (ids.int(), mask.bool()), (ids[:1, :5].int(), mask[:1, :5])]:
        assert pyrys.relative_error(opt(*call), model(*call)) <= TOLERANCE, [t.dtype for t in call]
    assert len(opt._structures) == 3
    assert any("input 0 is int32, the example's int64" in note for note in opt.notes), opt.notes
    with pytest.raises(pyrys.InputError, match=r"must have dtype torch.float32 like the example input .*, got "
                                               r"torch.float64, which the model's capture for it refuses, as eager's "
                                               r"ops do .*\(Input type \(double\) and bias type \(float\)"):
        pyrys.optimize(OptionalInputs().eval(), (inputs()[0],))(inputs()[0].double())


class CastsAndScales(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, scale):
        return self.linear(x.float()) * scale


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_floats_of_another_dtype_run_as_eager_where_the_model_takes_them(dtype):
    """A ``forward`` that casts its input (``x.float()``, as HuggingFace's vision embeddings do) takes a
    float64 image, and a number's 0-dim float64 tensor does not promote a float32 product: eager runs both,
    pyrys refused both (a helper's find).  A capture of their own now, as for integer ids."""
    model = CastsAndScales().eval()
    x, scale = torch.randn(2, 4), torch.tensor(2.0)
    opt = pyrys.optimize(model, (x, scale))
    for call in [(x.to(dtype), scale), (x, scale.double()), (x[:1].to(dtype), scale.to(dtype))]:
        with torch.no_grad():
            expected = model(*call)
        got = opt(*call)
        assert got.dtype == expected.dtype
        assert pyrys.relative_error(got, expected) <= TOLERANCE, [t.dtype for t in call]
    assert any(f"input 0 is {str(dtype)[6:]}, the example's float32" in note for note in opt.notes), opt.notes
    int8 = pyrys.optimize(model, (x, scale), precision="int8", calibration=[(x, scale)])
    with pytest.raises(pyrys.InputError, match="input 0 must have dtype torch.float32 like the example input"):
        int8(x.to(dtype), scale)


def test_none_and_a_tensor_for_one_input_are_told_apart_at_every_shape():
    """``opt(x, mask=None)`` and ``opt(x, mask=m)`` hold their inputs alike to torch's pytree (None is a leaf):
    the second at a new shape went to the first's module, which ignores the mask."""
    model = OptionalInputs().eval()
    x, m, _ = inputs()
    opt = pyrys.optimize(model, (x,), {"mask": m})
    assert pyrys.relative_error(opt(x, mask=None), model(x)) <= TOLERANCE
    x, m, _ = inputs(3)
    assert pyrys.relative_error(opt(x, mask=m), model(x, mask=m)) <= TOLERANCE
    assert pyrys.relative_error(opt(x, mask=None), model(x)) <= TOLERANCE
    (passed_none,) = opt._structures.values()
    assert not passed_none._structures  # (the mask's call came to it, which captured it once more)
    left_out = pyrys.optimize(model, (x,), {"mask": None})  # the example passed None: leaving it out is its call
    assert pyrys.relative_error(left_out(x), model(x)) <= TOLERANCE and not left_out._structures


def test_a_refused_way_is_refused_for_those_inputs_alone():
    """A call eager refuses too (a mask of 3 rows for 2) made every later call of that way raise its error."""
    model = OptionalInputs().eval()
    x, m, b = inputs()
    opt = pyrys.optimize(model, (x,))
    with pytest.raises(pyrys.CaptureError):
        opt(x, m[:1].expand(3, -1, -1, -1).contiguous())
    assert pyrys.relative_error(opt(x, m), model(x, m)) <= TOLERANCE


def test_a_number_equal_to_its_default_is_the_example_s_call():
    model = OptionalInputs().eval()
    x, m, _ = inputs()
    opt = pyrys.optimize(model, (x,), {"mask": m})
    assert pyrys.relative_error(opt(x, m, scale=float("1.0")), model(x, m)) <= TOLERANCE
    assert not opt._structures, opt.notes
    assert pyrys.relative_error(opt(x, m, scale=-0.0), model(x, m, scale=-0.0)) <= TOLERANCE  # not 1.0: a way


def test_the_least_recently_called_way_is_let_go(monkeypatch):
    monkeypatch.setattr(importlib.import_module("pyrys.optimized_module"), "MAX_STRUCTURES", 2)
    model = OptionalInputs().eval()
    x, m, b = inputs()
    opt = pyrys.optimize(model, (x,), {"mask": m})
    for call in [((x,), {}), ((x,), {"bias": b}), ((x,), {}), ((x, m), {"bias": b}), ((x,), {})]:
        assert pyrys.relative_error(opt(*call[0], **call[1]), model(*call[0], **call[1])) <= TOLERANCE
    assert [key[:-1] for key in opt._structures] == [(("x", False), ("mask", False), ("bias", False)), (("x", False),)]
    opt(x, bias=b)
    assert "built again after more ways than 2 took turns" in opt.notes[-1], opt.notes


@pytest.mark.parametrize("backend", ["dnnl", "reference"])
def test_a_bf16_way_measures_its_accuracy_on_its_own_inputs(backend, monkeypatch):
    """The calibration samples are the example's way: a way adding an input measured nothing ("could not
    measure"), or the mask samples as the bias."""
    if backend == "dnnl" and not native_bf16():
        pytest.skip("the CPU has no native bf16 (avx512_bf16, amx_bf16): bf16 runs float32, measuring nothing")
    monkeypatch.setattr(precision_notes, "native_bf16", lambda: True)  # (the reference backend: bf16 on any CPU)
    model = OptionalInputs().eval()
    x, m, b = inputs()
    samples = [inputs(2)[:2] for _ in range(2)]
    opt = pyrys.optimize(model, (x, m), precision="bf16", calibration=samples, backend=backend)
    assert pyrys.relative_error(opt(x, m, b), model(x, m, b)) <= 3e-2
    said = [note for note in opt.notes if note.startswith("inputs (") and "bf16" in note]
    assert said and not any("could not measure" in note for note in opt.notes), opt.notes


class CastsItsInput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, mask=None):
        y = self.linear(x.float())
        return y if mask is None else y * mask


def test_a_way_s_first_call_does_not_fix_its_dtypes_for_the_next():
    """A review's find: ``opt(x64, m)`` then ``opt(x32, m)`` was refused ("must have dtype torch.float64 like the
    example input"), and the other order the reverse: each way's tensors' dtypes and ranks are its own."""
    model = CastsItsInput().eval()
    x, m = torch.rand(2, 4), torch.rand(2, 4)
    for order in ([x.double(), x], [x, x.double()]):
        opt = pyrys.optimize(model, (x,))
        for value in order:
            assert pyrys.relative_error(opt(value, m), model(value, m)) <= TOLERANCE
        assert pyrys.relative_error(opt(x[None], m), model(x[None], m)) <= TOLERANCE  # another rank
        assert len(opt._structures) == 3 and not any(module._structures for module in opt._structures.values())


class ClampsItsMask(torch.nn.Module):
    def forward(self, x, mask=None):
        if mask is None:
            return x * 2
        return x * mask.clamp_(0, 1)


def test_a_way_that_writes_its_input_warns_as_optimize_does():
    """A review's find: the write is dropped (the caller's mask stays as it was) without the warning optimize
    gives where the example's way writes."""
    x = torch.rand(2, 4)
    opt = pyrys.optimize(ClampsItsMask().eval(), (x,))
    with pytest.warns(UserWarning, match=r"pyrys: inputs \(Float\(2, 4\), Float\(2, 4\)\): input writes dropped"):
        opt(x, torch.full((2, 4), 3.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_another_float_dtype_into_a_linear_is_the_dtype_error(dtype):
    """A helper's find: a linear's capture takes a float64 or float16 input and its first run refuses it (torch's
    "mat1 and mat2 must have the same dtype", raised from the compile's check); it is the dtype error, as a
    conv's, with torch's reason."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(4, 16)
    opt = pyrys.optimize(model, (x,))
    with pytest.raises(pyrys.InputError, match=rf"must have dtype torch.float32 like the example input .*, got {dtype}, "
                                               r"which the model's capture for it refuses.*same dtype"):
        opt(x.to(dtype))
    assert torch.equal(opt(x), opt(x))  # the module still runs the example's dtype


class _PartsOfParameters(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, a, pair, *, extra=None):
        return self.linear(a) + pair[0] + extra["b"]


def test_input_names_leave_out_a_tensor_inside_a_tuple_or_dict_of_one():
    """A helper's find: a tuple or dict parameter holding one tensor named it for the parameter (``pair``,
    ``extra``), which pyrys.ray's column check took for the whole parameter."""
    a = torch.randn(2, 8)
    opt = pyrys.optimize(_PartsOfParameters().eval(), (a, (torch.randn(2, 8),)), {"extra": {"b": torch.randn(2, 8)}})
    assert opt.input_names == ["a", None, None]
