"""What callers do with an optimized module, and what they must get back, on every backend.

One test per case: fallback views as outputs, inputs it must refuse (meta, wrong dtype, rank,
count), inputs with unusual strides or a lazy negation bit, NaN, deepcopy, pickling, constant
outputs, and the user's model left untouched.  Checks that can crash today's runtime, or that
call from several threads, run in a child process (``run_isolated``).
"""
from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrys
from pyrys.testing import randomize_batchnorm
from tests.caller_helpers import (assert_all_right, caller_task, eager, images, optimize, residual_net, run_isolated,
                                  run_together, shared_between_calls)
from tests.models import Fn, conv_bn_relu, image

TOLERANCE = pyrys.FP32_TOLERANCE


def _leaves(output) -> list[torch.Tensor]:
    return list(output) if isinstance(output, (tuple, list)) else [output]


# --- a graph output that is a view made by a torch fallback -------------------------------------

VIEWS = {
    "index": lambda y: y[0],
    "slice": lambda y: y[:1],
    "narrow": lambda y: y.narrow(1, 1, 2),
    "unbind": lambda y: y.unbind(1),
}


@pytest.mark.parametrize("view", VIEWS)
def test_fallback_view_output_belongs_to_the_caller(backend, view):
    torch.manual_seed(0)
    model = Fn(lambda m, x: VIEWS[view](F.relu(m.conv(x))), conv=nn.Conv2d(3, 4, 3, padding=1)).eval()
    inputs = images(3, seed=1, shape=(2, 3, 8, 8))
    opt = optimize(model, (inputs[0],), backend)
    expected = eager(model, inputs)
    outputs = []
    for call, x in enumerate(inputs):
        outputs.append(opt(x))
        error = pyrys.relative_error(outputs[-1], expected[call])
        assert error <= TOLERANCE, f"relative error {error:.3g} on call {call}"
    changed = [call for call, output in enumerate(outputs) if pyrys.relative_error(output, expected[call]) > TOLERANCE]
    assert not changed, f"the outputs of calls {changed} changed after later calls"
    held = [(call, t) for call, output in enumerate(outputs) for t in _leaves(output)]
    shared = shared_between_calls(held)
    assert not shared, f"outputs of different calls share memory: (call, call) {shared}"


# --- inputs the module must refuse ---------------------------------------------------------------

def meta_input_refused(backend: str) -> None:
    opt = optimize(conv_bn_relu(), (image(),), backend)
    opt(image())
    with pytest.raises(pyrys.InputError) as refused:
        opt(torch.empty(1, 3, 6, 6, device="meta"))
    assert "cpu" in str(refused.value).lower(), f"the message does not name the expected device: {refused.value}"


def test_meta_input_is_refused_naming_cpu(backend):
    run_isolated(meta_input_refused, backend)  # today's dnnl runtime reads address 0 and crashes


def tensors_without_one_memory_refused(backend: str) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    opt = optimize(conv_bn_relu(), (image(),), backend)
    opt(image())  # the fast path holds the example's shape now
    with FakeTensorMode():
        fake = torch.rand(1, 3, 6, 6)
    with pytest.raises(pyrys.InputError, match="input 0 must be a tensor with values, got a FakeTensor"):
        opt(fake)
    for layout in (torch.strided, torch.jagged):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's: nested tensors are a prototype
            nested = torch.nested.nested_tensor([image()[0], image()[0]], layout=layout)
        with pytest.raises(pyrys.InputError, match="input 0 must be a dense .strided. tensor, got a nested tensor"):
            opt(nested)
        with pytest.raises(pyrys.InputError, match="example input 0 must be a dense .strided. tensor, got a nested"):
            pyrys.optimize(conv_bn_relu(), (nested,), backend=backend)  # (torch's "Internal error" at its sizes)
    from torch.testing._internal.two_tensor import TwoTensor  # subclasses that wrap others: no memory of their own
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's: masked tensors are a prototype
        wrappers = [TwoTensor(image(), image()), torch.masked.as_masked_tensor(image(), image() > 0.5)]
    for wrapper in wrappers:
        with pytest.raises(pyrys.InputError, match=f"input 0 must be a plain tensor, got a {type(wrapper).__name__}"):
            opt(wrapper)


def test_fake_and_nested_tensors_are_refused(backend):
    """A helper's fuzz: a FakeTensor of the example's shape took the fast path and ran on address 0 (a
    segfault); a strided nested tensor raised torch's internal error; a reviewer's: a TwoTensor or a
    MaskedTensor (no memory of their own) segfaulted too."""
    run_isolated(tensors_without_one_memory_refused, backend)


WRONG_INPUTS = {
    "float64": ((image().double(),), ["Float(1, 3, 6, 6)", "float32"]),
    "rank": ((image()[0],), ["Float(1, 3, 6, 6)", "rank 4"]),
    "count": ((image(), image()), ["Float(1, 3, 6, 6)"]),
}


@pytest.mark.parametrize("case", WRONG_INPUTS)
def test_wrong_input_names_what_was_expected(backend, case):
    args, expected = WRONG_INPUTS[case]
    opt = optimize(conv_bn_relu(), (image(),), backend)
    opt(image())
    with pytest.raises(pyrys.InputError) as refused:
        opt(*args)
    missing = [text for text in expected if text not in str(refused.value)]
    assert not missing, f"the message does not name {missing}: {refused.value}"


# --- inputs with a lazy negation bit, unusual strides or channels-last -----------------------------

UNUSUAL_INPUTS = {
    "neg_view": lambda: torch._neg_view(images(1, seed=2, shape=(1, 3, 8, 8))[0]),
    "transposed": lambda: images(1, seed=3, shape=(1, 3, 8, 8))[0].transpose(2, 3),
    "strided": lambda: images(1, seed=4, shape=(1, 3, 8, 16))[0][..., ::2],
    "channels_last": lambda: images(1, seed=5, shape=(1, 3, 8, 8))[0].contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("kind", UNUSUAL_INPUTS)
def test_unusual_input_gives_eagers_result(backend, kind):
    model, x = conv_bn_relu(), UNUSUAL_INPUTS[kind]()
    assert x.shape == (1, 3, 8, 8)
    for layout in ["auto", "nhwc"] if backend == "dnnl" else ["auto"]:
        opt = optimize(model, (image(size=8),), backend, layout=layout)
        error = pyrys.relative_error(opt(x), model(x))
        assert error <= TOLERANCE, f"relative error {error:.3g} (layout {layout})"
    opt = optimize(model, (x,), backend)  # the example itself unusual: calls like it are read as they are run
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


# --- NaN in the input -----------------------------------------------------------------------------

def _conv() -> nn.Conv2d:
    return nn.Conv2d(3, 8, 3, padding=1)


NAN_MODELS = {
    "conv_relu": (lambda: Fn(lambda m, x: F.relu(m.conv(x)), conv=_conv()), (1, 3, 8, 8)),
    "conv_relu6": (lambda: Fn(lambda m, x: F.relu6(m.conv(x)), conv=_conv()), (1, 3, 8, 8)),
    "conv_hardtanh": (lambda: Fn(lambda m, x: F.hardtanh(m.conv(x), -1.0, 1.0), conv=_conv()), (1, 3, 8, 8)),
    "conv_clamp": (lambda: Fn(lambda m, x: torch.clamp(m.conv(x), 0.0, 3.0), conv=_conv()), (1, 3, 8, 8)),
    "linear_relu": (lambda: Fn(lambda m, x: F.relu(m.linear(x)), linear=nn.Linear(16, 8)), (2, 16)),
    "conv_max_pool": (lambda: Fn(lambda m, x: F.max_pool2d(m.conv(x), 2), conv=_conv()), (1, 3, 8, 8)),
    "conv_bn_relu_pool_conv": (lambda: randomize_batchnorm(Fn(
        lambda m, x: m.conv2(F.max_pool2d(F.relu(m.bn(m.conv(x))), 2)),
        conv=_conv(), bn=nn.BatchNorm2d(8), conv2=nn.Conv2d(8, 4, 3, padding=1))), (1, 3, 8, 8)),
    "relu": (lambda: Fn(lambda m, x: torch.relu(x)), (1, 8, 4, 4)),
    "clamp": (lambda: Fn(lambda m, x: torch.clamp(x, -0.5, 0.5)), (1, 8, 4, 4)),
    "hardsigmoid": (lambda: Fn(lambda m, x: F.hardsigmoid(x)), (1, 8, 4, 4)),
}


@pytest.mark.parametrize("name", NAN_MODELS)
def test_nan_stays_where_eager_puts_it(backend, name):
    build, shape = NAN_MODELS[name]
    torch.manual_seed(0)
    model, x = build().eval(), images(1, seed=6, shape=shape)[0]
    x.view(-1)[[3, 13]] = float("nan")  # for linear_relu both in row 0: row 1 stays finite
    opt = optimize(model, (x,), backend)
    with torch.no_grad():
        got, want = opt(x), model(x)
    nan = torch.isnan(want)
    assert nan.any() and not nan.all(), "the case must have both NaN and finite outputs"
    assert torch.equal(torch.isnan(got), nan), (f"NaN at {int(torch.isnan(got).sum())} places, eager at "
                                                f"{int(nan.sum())} of {nan.numel()}")
    error = pyrys.relative_error(got.masked_fill(nan, 0), want.masked_fill(nan, 0))
    assert error <= TOLERANCE, f"relative error {error:.3g} where eager is finite"


# --- copy.deepcopy -------------------------------------------------------------------------------

def deepcopy_is_independent(backend: str) -> None:
    model = residual_net()
    inputs = images(4, seed=7)
    opt = optimize(model, (inputs[0],), backend, layout="nhwc")
    opt(inputs[0])
    duplicate = copy.deepcopy(opt)
    for x in inputs:
        assert pyrys.relative_error(duplicate(x), opt(x)) <= TOLERANCE, "the copy's output differs from the original's"
    tasks = []
    for thread, module in enumerate([opt, duplicate, opt, duplicate]):
        xs = images(20, seed=700 + thread)
        tasks.append(caller_task(module, xs, eager(model, xs), thread))
    assert_all_right(run_together(tasks), 4 * 20)
    del opt
    gc.collect()
    assert pyrys.relative_error([duplicate(x) for x in inputs], eager(model, inputs)) <= TOLERANCE


def test_deepcopy_works_alongside_and_after_the_original(backend):
    run_isolated(deepcopy_is_independent, backend)


# --- pickle and torch.save -----------------------------------------------------------------------

SAVERS = {
    "pickle": pickle.dumps,
    "torch.save": lambda opt: torch.save(opt, io.BytesIO()),
}


@pytest.mark.parametrize("saver", SAVERS)
def test_saving_is_refused_saying_what_to_do(backend, saver):
    opt = optimize(conv_bn_relu(), (image(),), backend)
    with pytest.raises(Exception) as refused:  # the type is the runtime's choice; the message must be pyrys's
        SAVERS[saver](opt)
    assert "pyrys" in str(refused.value), f"the error does not come from pyrys: {type(refused.value).__name__}: " \
                                          f"{refused.value}"


# --- a constant graph output ---------------------------------------------------------------------

def test_mutating_a_constant_output_does_not_change_the_next_call(backend):
    torch.manual_seed(0)
    model = Fn(lambda m, x: (m.conv(x), m.conv.weight * 2), conv=nn.Conv2d(3, 4, 3)).eval()
    x = image(size=8)
    opt = optimize(model, (x,), backend)
    first = opt(x)
    first[1].add_(1.0)
    first[0].zero_()
    error = pyrys.relative_error(opt(x), model(x))
    assert error <= TOLERANCE, f"relative error {error:.3g} after the caller changed the previous call's outputs"


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class Merged(nn.Module):
    """Outputs the passes make one value (equal linears merged, a clone dropped), and a view (which may or
    may not share its base's memory: either way a write to one output changes no other eager keeps apart)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        a, b = self.linear(x), self.linear(x)
        t = torch.relu(x).t()  # reshaped, a copy in eager (a reviewer's find: counted a view, so not copied)
        return a, b, torch.relu(a), torch.relu(a).clone(), a.view(-1), x.clone(), x.clone(), t.reshape(-1), t.reshape(-1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_outputs_eager_keeps_apart_stay_apart(backend, precision, dynamic, tmp_path):
    """A helper's fuzz: the second of two merged outputs changed when the caller wrote the first."""
    torch.manual_seed(0)
    model, x = Merged().eval(), torch.randn(2, 4)
    opt = pyrys.optimize(model, x, backend=backend, precision=precision, dynamic=dynamic)
    pyrys.save(opt, tmp_path / "saved")
    for module in (opt, pyrys.load(tmp_path / "saved")):
        for batch in (2, 3) if dynamic else (2,):
            x = torch.randn(batch, 4)
            outputs, expected = module(x), model(x)
            for i, j in ((0, 1), (2, 3), (5, 6), (0, 2), (7, 8)):
                assert not _shares_memory(outputs[i], outputs[j]), (i, j)
            for i in (0, 2, 5, 7):
                outputs[i].zero_()
            for i in (1, 3, 6, 8):
                assert pyrys.relative_error(outputs[i], expected[i]) <= 1e-2, i


class OneTensorTwice(nn.Module):
    """One tensor returned at several places, a computed one read by another op too, an input, a buffer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("table", torch.arange(3.0))

    def forward(self, x):
        y = self.linear(x)
        return y, torch.relu(y), y, {"a": y, "x": x, "again": x}, self.table, self.table


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_one_tensor_returned_twice_is_one_object(backend, precision, dynamic, tmp_path):
    """``return y, y`` gives eager one object twice (a write through one shows in the other); the fp32 dnnl
    program gave two copies where ``y`` was read by another op too."""
    torch.manual_seed(0)
    model, x = OneTensorTwice().eval(), torch.randn(2, 4)
    opt = pyrys.optimize(model, x, backend=backend, precision=precision, dynamic=dynamic)
    pyrys.save(opt, tmp_path / "saved")
    for module in (opt, pyrys.load(tmp_path / "saved")):
        for batch in (2, 3) if dynamic else (2,):
            x = torch.randn(batch, 4)
            y, relu, again, named, table, table_again = module(x)
            assert y is again and y is named["a"] and named["x"] is named["again"] and table is table_again
            assert y is not relu
            assert pyrys.relative_error((y, relu), model(x)[:2]) <= 1e-2


class CopiedOrMergedTwice(nn.Module):
    """One tensor at two places that the passes copy (a clone of the input dropped) or merge with another (two
    equal linears): each group one object, apart from the others."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = x.view(-1).clone()
        a, b = self.linear(x), self.linear(x)
        return y, y, a, b, b


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_tensor_twice_is_one_object_where_the_passes_copy_or_merge_it(backend, precision, tmp_path):
    """A reviewer's find: positions copied apart (``output_copies``) were each a copy of their own."""
    torch.manual_seed(0)
    model, x = CopiedOrMergedTwice().eval(), torch.randn(2, 4)
    opt = pyrys.optimize(model, x, backend=backend, precision=precision)
    pyrys.save(opt, tmp_path / "saved")
    for module in (opt, pyrys.load(tmp_path / "saved")):
        y, y_again, a, b, b_again = module(x)
        assert y is y_again and b is b_again and not _shares_memory(a, b) and not _shares_memory(y, x)
        assert pyrys.relative_error((y, a, b), (x.view(-1), *model(x)[2:4])) <= 1e-2


class CopiesOfTheInput(nn.Module):
    """Copies of views of the input (a backend lowers a clone of a value in its layout as a view), and a copy
    of a slice viewed flat (legal on the copy alone)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(32, 32)

    def forward(self, x):
        return x.view(-1).clone(), x[:, 0].clone(), self.linear(x), x.flatten().clone(), x[:, 0].clone().view(-1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("batch", [1, 2])
def test_copies_of_the_input_are_the_callers_own(backend, precision, batch):
    """A helper's fuzz: ``x.view(-1).clone()`` came back as the caller's ``x`` (a write to it wrote ``x``), and
    ``x[:, 0].clone().view(-1)`` raised torch's "Cannot view" (the clone was dropped as changing nothing)."""
    torch.manual_seed(0)
    model, x = CopiesOfTheInput().eval(), torch.randn(batch, 3, 32)
    outputs, expected = pyrys.optimize(model, (x,), backend=backend, precision=precision)(x), model(x)
    assert all(pyrys.relative_error(a, b) <= 3e-2 for a, b in zip(outputs, expected))
    for i in (0, 1, 3, 4):
        assert not _shares_memory(outputs[i], x), i


class Views(nn.Module):
    """Outputs that are views of the input (strided: a copy on the dnnl backend before) or of another output."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        return (y, x.t(), x[:, 1:], torch.chunk(x, 2, dim=1)[1], y.view(-1), y.t()[1:], x.view(x.shape[0], 2, 2),
                x.reshape(-1), y.flatten(), x.contiguous()[1:], x.t().reshape(-1))


@pytest.mark.parametrize("dynamic", [False, True])
def test_views_of_an_input_or_an_output_are_views_as_in_eager(backend, dynamic, tmp_path):
    """A helper's find: the dnnl program gave ``x.t()`` and ``x[:, 1:]`` memory of their own, so a write
    through them missed ``x`` (under torch.compile: the graph after a break writing through a view, lost)."""
    torch.manual_seed(0)
    model = Views().eval()
    opt = pyrys.optimize(model, (torch.randn(3, 4),), backend=backend, dynamic=dynamic)
    pyrys.save(opt, tmp_path / "saved")
    for module in (opt, pyrys.load(tmp_path / "saved")):
        for batch in (3, 5) if dynamic else (3,):
            x = torch.randn(batch, 4)
            outputs, expected = module(x), model(x)
            for output, eager_output in zip(outputs, expected):
                assert (output.shape, output.stride(), output.storage_offset()) == (
                    eager_output.shape, eager_output.stride(), eager_output.storage_offset())
                assert pyrys.relative_error(output, eager_output) <= TOLERANCE
            assert all(_shares_memory(outputs[i], x) for i in (1, 2, 3, 6, 7, 9))
            assert all(_shares_memory(outputs[i], outputs[0]) for i in (4, 5, 8))
            assert not _shares_memory(outputs[10], x)  # a reshape torch cannot view: a copy, as eager's
            outputs[1][1:].mul_(0)  # x's columns 1.. through its transpose: the slice shows it
            assert not x[:, 1:].any() and not outputs[2].any() and x[:, 0].all()
            outputs[4].zero_()
            assert not outputs[0].any() and not outputs[5].any()


@pytest.mark.parametrize("dynamic", [False, True])
def test_views_of_an_input_laid_out_otherwise_than_the_example_are_eagers(backend, dynamic):
    """A reviewer's find: captured on a contiguous input, ``x.contiguous()`` left no op, so a transposed call
    input replayed ``x.contiguous().view(-1)`` as a view (torch raised) and ``x.contiguous()[1:]`` as a view
    of the caller's ``x``: those calls keep the program's own tensors."""
    torch.manual_seed(0)
    model = Fn(lambda m, x: (m.linear(x), x.contiguous().view(-1), x.contiguous()[1:], x.t()),
               linear=nn.Linear(4, 4)).eval()
    opt = pyrys.optimize(model, (torch.randn(3, 4),), backend=backend, dynamic=dynamic)
    for x in (torch.randn(4, 3).t(), torch.randn(3, 8)[:, ::2], torch.randn(3, 4)):
        before = x.clone()
        outputs, expected = opt(x), model(x)
        for output, eager_output in zip(outputs, expected):
            assert output.shape == eager_output.shape and pyrys.relative_error(output, eager_output) <= TOLERANCE
        assert _shares_memory(outputs[1], x) == _shares_memory(expected[1], x)
        assert _shares_memory(outputs[2], x) == _shares_memory(expected[2], x)
        outputs[2].zero_()
        assert torch.equal(x, before) == (not _shares_memory(expected[2], x))


def clamp_after_a_break(m, x):
    y = m.linear(x)
    flat = y.view(-1)
    torch._dynamo.graph_break()
    flat.clamp_(min=0)  # through a view the graph before the break returned
    return y


def double_after_a_break(m, x):
    h = x[:, 1:]
    torch._dynamo.graph_break()
    h.mul_(2)  # the caller's x, through a view
    return m.linear(x)


class Cache(nn.Module):
    """Writes its buffer through a slice the graph before a break returned."""

    def __init__(self, as_slot: bool = True):
        super().__init__()
        self.linear, self.as_slot = nn.Linear(3, 3), as_slot
        self.register_buffer("cache", torch.zeros(4, 3))

    def forward(self, x, position: int):
        h = self.linear(x)
        slot = self.cache[position] if self.as_slot else self.cache.reshape(-1)[3 * position:3 * position + 3]
        torch._dynamo.graph_break()
        slot.copy_(h[0])
        return self.cache.sum(0) + h


@pytest.mark.parametrize("forward", [clamp_after_a_break, double_after_a_break])
def test_writes_through_a_view_after_a_graph_break_reach_what_it_views(backend, forward):
    """Helpers' finds under torch.compile: each write, through a view the graph before a break returned,
    was lost (the output unclamped; the caller's ``x`` not doubled)."""
    torch.manual_seed(0)
    model = Fn(forward, linear=nn.Linear(4, 4)).eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pyrys", options={"backend": backend})
    for _ in range(3):  # (a graph's first calls may run in torch)
        x = torch.randn(3, 4)
        x_eager = x.clone()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output, expected = compiled(x), model(x_eager)
        assert pyrys.relative_error(output, expected) <= TOLERANCE and torch.equal(x, x_eager)
    torch._dynamo.reset()


@pytest.mark.parametrize("as_slot", [True, False])
def test_a_graph_returning_a_view_of_a_buffer_runs_in_torch(backend, caplog, as_slot):
    """A helper's find: a KV-cache-like buffer written through a slice after a break stayed zero (the graph
    before returned a copy of the frozen buffer's slice); a reviewer's: through a slice of its reshape too."""
    torch.manual_seed(0)
    model, twin = Cache(as_slot).eval(), Cache(as_slot).eval()
    twin.load_state_dict(model.state_dict())
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pyrys", options={"backend": backend})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for call in range(8):  # (each position's first call runs in torch; the second compiles)
            x = torch.randn(2, 3)
            assert pyrys.relative_error(compiled(x, call % 4), twin(x, call % 4)) <= TOLERANCE
    assert torch.allclose(model.cache, twin.cache) and model.cache.any()
    assert "returns module state or a view of it" in caplog.text
    torch._dynamo.reset()


# --- the user's model ----------------------------------------------------------------------------

def _bits(state: dict) -> dict:
    return {name: tensor.detach().reshape(-1).clone().view(torch.uint8) for name, tensor in state.items()}


def _assert_same_bits(before: dict, model: nn.Module, when: str) -> None:
    after = _bits(model.state_dict())
    changed = [name for name in before if not torch.equal(before[name], after.get(name, torch.empty(0)))]
    assert after.keys() == before.keys() and not changed, f"{when}, the model's state changed: {changed}"


def model_state_unchanged(backend: str) -> None:
    model = residual_net()
    before = _bits(model.state_dict())
    inputs = images(3, seed=8)
    opt = optimize(model, (inputs[0],), backend)
    _assert_same_bits(before, model, "after optimize")
    opt(inputs[1])
    opt(images(1, seed=9, shape=(2, 3, 32, 32))[0])  # a new shape compiles again
    _assert_same_bits(before, model, "after calls")
    tasks = []
    for thread in range(4):
        xs = images(10, seed=800 + thread)
        tasks.append(caller_task(opt, xs, eager(model, xs), thread))
    run_together(tasks)
    _assert_same_bits(before, model, "after concurrent calls")


def test_the_users_model_state_is_bitwise_unchanged(backend):
    run_isolated(model_state_unchanged, backend)


def _and_its_view(y: torch.Tensor) -> tuple:
    return y, y.view(y.shape[0], -1)  # (eager refuses a channels-last y here)


@pytest.mark.parametrize("dynamic", [None, True])
def test_every_call_gives_what_contiguous_inputs_give_whatever_its_layout(backend, dynamic):
    """Captures read contiguous copies of their inputs.  A shape's program followed its first call's layout: a
    channels-last call at a new batch size, refused (the model views a conv's output), refused that batch size's
    contiguous calls after it; its outputs came back channels-last for contiguous calls; a channels-last example
    gave channels-last outputs, which ``.view`` refuses (helpers' finds)."""
    torch.manual_seed(0)
    model = Fn(lambda m, x: _and_its_view(m.conv(x)), conv=nn.Conv2d(3, 4, 3)).eval()
    channels_last = image(2, size=8).contiguous(memory_format=torch.channels_last)
    opt = optimize(model, (channels_last,), backend, dynamic=dynamic)
    for batch in (2, 3, 5):
        x = image(batch, size=8)
        for call in (x.contiguous(memory_format=torch.channels_last), x):
            y, flat = opt(call)
            assert y.is_contiguous() and flat.is_contiguous() and y.view(batch, -1).shape == flat.shape
            assert all(pyrys.relative_error(a, b) <= TOLERANCE for a, b in zip((y, flat), model(x)))


def test_a_buffer_returned_under_inference_mode_can_be_written_after(backend):
    """Eager returns the buffer itself; pyrys a copy, made under ``torch.inference_mode``: an inference tensor,
    which an in-place write outside it refuses (a helper's find)."""
    model = Fn(lambda m, x: (m.linear(x), m.ones), linear=nn.Linear(4, 2)).eval()
    model.register_buffer("ones", torch.ones(2))
    opt = optimize(model, (torch.randn(3, 4),), backend)
    with torch.inference_mode():
        _, ones = opt(torch.randn(3, 4))
    assert not ones.is_inference() and torch.equal(ones.add_(1), torch.full((2,), 2.0))
    assert torch.equal(opt(torch.randn(3, 4))[1], torch.ones(2))  # the program's own stays
    rows = Fn(lambda m, x: (m.linear(x), m.ones[: x.shape[0]]), linear=nn.Linear(4, 2)).eval()  # a view by size:
    rows.register_buffer("ones", torch.ones(8))  # not folded where the size is symbolic (a reviewer's find)
    opt = optimize(rows, (torch.randn(3, 4),), backend, dynamic=True)
    with torch.inference_mode():
        _, ones = opt(torch.randn(5, 4))
    assert not ones.is_inference() and torch.equal(ones.add_(1), torch.full((5,), 2.0))
