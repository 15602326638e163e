"""torch.export's training IR taken as it is, its in-place ops made functional, where that is what the
second trace (``run_decompositions``) would give; anything else takes the second trace."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import pyrys
from pyrys.capture.export import export_module
from tests.conftest import TOLERANCE
from tests.models import Fn, conv_bn_relu, image

aten = torch.ops.aten


@pytest.fixture
def second_traces(monkeypatch) -> list:
    """Every ``run_decompositions`` call during the test."""
    calls = []
    original = torch.export.ExportedProgram.run_decompositions

    def spy(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "run_decompositions", spy)
    return calls


def _targets(ep) -> set:
    return {n.target for n in ep.graph.nodes if n.op == "call_function"}


def _relu_then_read(m, x):
    y = m.conv(x)
    before = y * 2  # reads y before it is written
    y.relu_()
    return before + y, y  # and after


def _writes_a_viewed_value(m, x):
    y = m.conv(x)
    flat = y.view(-1)
    y.add_(1)  # flat sees the write
    return flat


def _contiguous_to_unflatten(m, x):
    y = m.conv(x).transpose(1, 3).contiguous().to(torch.float32)
    y = nn.functional.dropout(y, 0.5, training=False, inplace=True)
    return y.flatten(1).unflatten(1, (y.shape[1], -1)).to(torch.float64)


@pytest.mark.parametrize("forward", [_relu_then_read, _contiguous_to_unflatten])
def test_an_inference_graph_is_taken_without_a_second_trace(forward, second_traces, backend):
    model = Fn(forward, conv=nn.Conv2d(3, 4, 3)).eval()
    ep = export_module(model, (image(),))
    assert not second_traces
    written = {aten.relu_.default, aten.add_.Tensor, aten.dropout_.default, aten.contiguous.default,
               aten.to.dtype, aten.unflatten.int}
    assert not _targets(ep) & written
    opt = pyrys.optimize(model, (image(),), backend=backend, verify=True)
    with torch.no_grad():
        assert pyrys.relative_error(opt(image(batch=2)), model(image(batch=2))) <= TOLERANCE


def test_batch_norm_in_the_training_ir_reads_its_flag(second_traces):
    opt = pyrys.optimize(conv_bn_relu(), (image(),), freeze_flags=(), backend="reference")
    assert not second_traces
    assert "training" in opt.graph and "batch_norm" in opt.graph  # not frozen: the flag is a state read
    assert pyrys.relative_error(opt(image()), conv_bn_relu()(image())) <= TOLERANCE


class FunctionalBatchNorm(nn.Module):
    """``F.batch_norm`` with its own ``training=``: batch statistics or running ones, whatever the module's mode."""

    def __init__(self, batch_statistics: bool):
        super().__init__()
        torch.manual_seed(0)
        self.batch_statistics = batch_statistics
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)

    def forward(self, x):
        return nn.functional.batch_norm(x, self.mean.clone(), self.var.clone(), None, None, self.batch_statistics,
                                        0.1, 1e-3)


@pytest.mark.parametrize("batch_statistics, mode", [(True, "eval"), (False, "train")])
def test_a_functional_batch_norm_keeps_the_training_argument_it_was_given(batch_statistics, mode, backend):
    """The argument was replaced by the module's flag and frozen: running statistics (0.87 off) or batch ones."""
    model, x = getattr(FunctionalBatchNorm(batch_statistics), mode)(), torch.randn(2, 4, 5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training mode
        opt = pyrys.optimize(model, (x,), backend=backend, verify=True)
    with torch.no_grad():
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def _compared_in_place(m, x):
    y = x + 0.5
    y.gt_(1.0)  # gt gives bool; gt_ keeps y's float dtype
    return y


def _half_add_in_place(m, x):
    y = x.half() * 2
    y.add_(x)  # add of half and float32 gives float32; add_ keeps half
    return y.float()


def _pow_in_place(m, x):
    y = x * 2
    y.pow_(2)  # pow_.Scalar(Tensor, Scalar); pow.Scalar is (Scalar, Tensor)
    return y


def _channels_last(m, x):
    return (x * 2).to(memory_format=torch.channels_last) + 1


@pytest.mark.parametrize("forward", [_compared_in_place, _half_add_in_place, _pow_in_place, _channels_last])
def test_an_op_whose_functional_form_differs_takes_the_second_trace(forward, second_traces):
    model = Fn(forward)
    export_module(model, (image(),))
    assert len(second_traces) == 1
    out, expected = pyrys.optimize(model, (image(),))(image()), model(image())
    assert out.dtype == expected.dtype and pyrys.relative_error(out, expected) <= TOLERANCE


@pytest.mark.parametrize("model", [
    Fn(_writes_a_viewed_value, conv=nn.Conv2d(3, 4, 3)).eval(),  # a write a view sees
    conv_bn_relu().train(),  # batch_norm in training writes its statistics
    Fn(lambda m, x: x.mul_(2) + 1),  # a write to an input
])
def test_a_graph_the_second_trace_would_change_takes_it(model, second_traces, recwarn):
    export_module(model, (image(),))
    assert len(second_traces) == 1
    with torch.no_grad():
        expected = model(image())
    assert pyrys.relative_error(pyrys.optimize(model, (image(),))(image()), expected) <= TOLERANCE


def test_the_program_returned_stays_runnable_and_named(second_traces):
    model = Fn(_relu_then_read, conv=nn.Conv2d(3, 4, 3)).eval()
    ep = export_module(model, (image(),))
    assert not second_traces and "relu_" not in ep.graph_module.code
    outputs = [n.name for n in ep.graph.find_nodes(op="output")[0].args[0]]
    assert [spec.arg.name for spec in ep.graph_signature.output_specs] == outputs
    with torch.no_grad():
        assert pyrys.relative_error(ep.module()(image()), model(image())) <= TOLERANCE


def _mask_of(m, x):
    mask = (x > 0.5).to(torch.float32)  # HF's extended attention mask: to(dtype), contiguous, with symbolic sizes
    return (m.linear(x) * mask).transpose(0, 1).contiguous()


def test_to_and_contiguous_are_rewritten_with_symbolic_sizes_too(second_traces):
    model = Fn(_mask_of, linear=nn.Linear(8, 8)).eval()
    x = torch.rand(3, 8)
    ep = export_module(model, (x,), dynamic=True)
    assert not second_traces and not _targets(ep) & {aten.to.dtype, aten.contiguous.default}
    opt = pyrys.optimize(model, (x,), dynamic=True)
    for rows in (3, 5):
        y = torch.rand(rows, 8)
        assert pyrys.relative_error(opt(y), model(y)) <= TOLERANCE


class Attending(nn.Module):
    """nn.MultiheadAttention, whose packed projection is ``unflatten(-1, (3, E))`` of a tensor with symbolic
    batch and length."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


def test_unflatten_is_rewritten_with_symbolic_sizes_too(second_traces):
    """A symbolic capture of a model with nn.MultiheadAttention took the second trace (5-8 s of a tiny
    nn.Transformer's, each of its captures before a save; a helper's find)."""
    model = Attending().eval()
    x = torch.rand(2, 5, 16)
    ep = export_module(model, (x,), dynamic=True)
    assert not second_traces and aten.unflatten.int not in _targets(ep)
    assert aten.sym_size.int in _targets(ep)
    opt = pyrys.optimize(model, (x,), dynamic=True, verify=True)
    for shape in ((2, 5, 16), (3, 7, 16), (1, 4, 16), (4, 1, 16)):
        y = torch.rand(shape)
        with torch.no_grad():
            assert pyrys.relative_error(opt(y), model(y)) <= TOLERANCE, shape


class SlicedBlocks(nn.Module):
    """Blocks with BatchNorm called through a slice of their container (``self.features[1:3](x)``: smp's DPN
    encoder, whose blocks share one activation module), a ``ModuleList`` slice (which numbers its parts from 0
    again) and one block in training mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        shared = nn.ReLU()

        def block():
            bn = nn.BatchNorm2d(4)
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            return nn.Sequential(bn, shared, nn.Conv2d(4, 4, 3, padding=1))

        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), block(), block())
        self.blocks = nn.ModuleList([block(), block(), block()])

    def forward(self, x):
        x = self.features[1:3](self.features[0](x))
        for b in self.blocks[1:]:
            x = b(x)
        return x


@pytest.mark.parametrize("training", [None, "features.2.0", "blocks.2.0", "blocks.1.0"])
def test_batch_norms_called_through_a_slice_of_their_container_follow_their_own_mode(training, backend):
    """A helper's find: ``self.features[1:3](x)`` made the module stack name ``features.slice(1, 3, None).1.bn``,
    which ``get_submodule`` refused: a raw AttributeError from ``pyrys.optimize``."""
    model, x = SlicedBlocks().eval(), image(batch=2)
    if training is not None:
        model.get_submodule(training).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training mode
        opt = pyrys.optimize(model, (x,), backend=backend)
    with torch.no_grad():
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
