"""Legalize: an unbatched (transposed) convolution runs as a batch of one, chained through the squeezes
it makes, its binary post-op operands read as they are; on the dnnl backend the convolutions then run
in oneDNN (before, oneDNN refused their 3-D input and torch ran them)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import pyrys
from pyrys.ir.fused import FUSED_CONV, FUSED_CONV_TRANSPOSE
from pyrys.machine import native_bf16
from pyrys.passes.legalize import legalize
from tests.conftest import TOLERANCE

aten = torch.ops.aten


class Unbatched(nn.Module):
    """conv -> relu -> conv + residual -> transposed conv, on ``[C, H, W]``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.up(self.b(y) + y)


def test_unbatched_convolutions_are_a_chain_of_batches_of_one():
    opt = pyrys.optimize(Unbatched().eval(), (torch.randn(3, 12, 12),), backend="reference", verify=True)
    gm = opt.graph_module
    convs = [n for n in gm.graph.nodes if n.target in (FUSED_CONV, FUSED_CONV_TRANSPOSE)]
    assert [tuple(n.meta["val"].shape) for n in convs] == [(1, 8, 10, 10), (1, 8, 10, 10), (1, 2, 20, 20)]
    first, second, up = convs
    assert first.args[0].target is aten.unsqueeze.default  # the input, batched once
    assert second.args[0] is first and second.args[-1] == [first]  # read batched: no squeeze between
    assert up.args[0] is second
    squeezes = [n for n in gm.graph.nodes if n.target is aten.squeeze.dims]
    assert [s.args[0] for s in squeezes] == [up]  # only what the graph returns is squeezed
    assert legalize(gm).fired == {}  # once batched, nothing more to do


@pytest.mark.parametrize("shape", [(3, 12, 12), (3, 17, 9)])
def test_unbatched_convolutions_run_in_onednn_with_eager_s_outputs(shape):
    if "dnnl" not in pyrys.available_backends():
        pytest.skip("the dnnl backend does not load here")
    model = Unbatched().eval()
    opt = pyrys.optimize(model, (torch.randn(3, 12, 12),), backend="dnnl", verify=True)
    x = torch.randn(*shape)
    assert opt(x).shape == model(x).shape
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    text = opt.program_text()
    assert "dnnl::conv2d_relu" in text and "dnnl::conv2d_add" in text and "dnnl::conv_transpose2d" in text
    assert "torch::conv" not in text


class Residual1d(nn.Module):
    """relu(conv(x) + x + shift): the input and a per-channel parameter as the conv's binary post-ops."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(4, 4, 5, padding=2)
        self.shift = nn.Parameter(torch.randn(4, 1))

    def forward(self, x):
        return torch.relu(self.conv(x) + x + self.shift)


def test_an_unbatched_conv_s_operands_of_its_rank_are_batched_too():
    """``x`` and ``shift`` (``[C, 1]``, the output's rank) are read as ``[1, C, L]`` and ``[1, C, 1]``: oneDNN
    takes an operand of the output's rank (before, such a conv ran through torch)."""
    model, x = Residual1d().eval(), torch.randn(4, 30)
    gm = pyrys.optimize(model, (x,), backend="reference", verify=True).graph_module
    (conv,) = [n for n in gm.graph.nodes if n.target is FUSED_CONV]
    assert conv.args[-2] == ["add", "add", "relu"]
    assert [tuple(o.meta["val"].shape) for o in conv.args[-1]] == [(1, 4, 30), (1, 4, 1)]
    assert conv.args[0] is conv.args[-1][0]  # the input, batched once for both reads
    for backend in ("reference", "dnnl"):
        if backend not in pyrys.available_backends():
            continue
        opt = pyrys.optimize(model, (x,), backend=backend, verify=True)
        for inputs in (x, torch.randn(4, 19)):
            assert pyrys.relative_error(opt(inputs), model(inputs)) <= TOLERANCE
        if backend == "dnnl":
            assert "dnnl::conv1d_add_add_relu" in opt.program_text() and "torch::conv" not in opt.program_text()


def test_the_per_layer_numerics_compare_a_batch_of_one_with_its_unbatched_twin():
    opt = pyrys.optimize(Unbatched().eval(), (torch.randn(3, 12, 12),), numerics=True)
    layers = {layer.node: layer for layer in opt.numerics.layers}
    assert {"conv2d_2", "conv2d_3", "conv_transpose2d"} <= set(layers)
    assert all(layer.error <= TOLERANCE for layer in layers.values()), opt.numerics.layers


UNBATCHED_POOLS = {  # (C, spatial...) inputs: before, the dnnl lowering read them as batched and raised
    "max_pool2d": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, 1)), (3, 14, 14)),
    "avg_pool2d": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2)), (3, 14, 14)),
    "adaptive_avg_pool2d": (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d((2, 3))), (3, 14, 14)),
    "max_pool1d": (nn.Sequential(nn.Conv1d(3, 4, 3), nn.MaxPool1d(2)), (3, 20)),
    "adaptive_avg_pool1d": (nn.Sequential(nn.Conv1d(3, 4, 3), nn.AdaptiveAvgPool1d(2)), (3, 20)),
    "a pool first": (nn.Sequential(nn.MaxPool2d(2), nn.ReLU()), (3, 14, 14)),
}


@pytest.mark.parametrize("case", list(UNBATCHED_POOLS))
def test_unbatched_pooling_runs_as_a_batch_of_one(case, backend):
    model, shape = UNBATCHED_POOLS[case]
    model, x = model.eval(), torch.randn(*shape)
    opt = pyrys.optimize(model, (x,), backend=backend, verify=True)
    for inputs in (x, torch.randn(*shape[:-1], shape[-1] + 3)):
        assert opt(inputs).shape == model(inputs).shape
        assert pyrys.relative_error(opt(inputs), model(inputs)) <= TOLERANCE
    if backend == "dnnl":
        assert "dnnl::pooling" in opt.program_text() and "torch::conv" not in opt.program_text()


class ZeroPadded(nn.Module):
    """TF-style "same" padding (a zero pad, then a strided conv), an even kernel's ``padding="same"`` in 2-D and
    1-D, and a pad of four different sides before a padded conv; BatchNorm with random statistics."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.bn = nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 4, padding="same")
        self.c = nn.Conv1d(8, 8, 2, padding="same", dilation=3)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.b(torch.relu(self.bn(self.a(nn.functional.pad(x, (0, 1, 0, 1))))))
        return self.c(y.flatten(2)), self.d(nn.functional.pad(y, (2, 0, 1, 3)))


@pytest.mark.parametrize("options", [{}, {"dynamic": True}, {"precision": "bf16"}, {"precision": "int8"}],
                         ids=["fp32", "dynamic", "bf16", "int8"])
def test_a_zero_pad_before_a_conv_is_its_padding(options, backend):
    """The pads are the convs' padding, begin and end per dim (oneDNN's ``padding_l``/``padding_r``): no torch
    step is left (before, each pad and each even-kernel "same" conv ran in torch, between reorders), through
    bf16's conversions and int8's quantize pairs too; outputs as eager's, at another batch under ``dynamic``."""
    model, x = ZeroPadded().eval(), torch.randn(2, 3, 33, 31)
    if options.get("precision") == "int8":
        options = {**options, "calibration": [(torch.randn(2, 3, 33, 31),) for _ in range(4)]}
    opt = pyrys.optimize(model, (x,), backend=backend, verify=True, **options)
    paddings = [n.args[4] for n in opt.graph_module.graph.nodes if n.target is FUSED_CONV]
    assert sorted(paddings) == sorted([[0, 0, 1, 1], [1, 1, 2, 2], [1, 2], [2, 3, 4, 1]])
    if backend == "dnnl":
        assert "torch::" not in opt.program_text()
    if backend == "dnnl" and options.get("precision") == "bf16" and native_bf16():  # the pads ran in bf16: the
        lines = opt.program_text().splitlines()
        floats = {"%x"} | {line.split(" : ")[0].strip() for line in lines if " : Float(" in line}
        conversions = [line for line in lines if ": BFloat16(" in line and "dnnl::reorder" in line
                       and line.rsplit("(", 1)[1].rstrip(")") in floats]
        assert len(conversions) == 1, opt.program_text()  # input's conversion alone (each conv wrote f32 before)
    tolerance = {"bf16": 3e-2, "int8": 5e-2}.get(options.get("precision"), TOLERANCE)
    for inputs in (x, torch.randn(3, 3, 33, 31)) if options.get("dynamic") else (x,):
        for got, want in zip(opt(inputs), model(inputs)):
            assert pyrys.relative_error(got, want) <= tolerance


@pytest.mark.parametrize("pad, channels", [
    (lambda x: nn.functional.pad(x, (1, 1, 1, 1), value=0.5), 4),      # not zeros
    (lambda x: nn.functional.pad(x, (1, 2, 0, 1), mode="reflect"), 4),  # not constant
    (lambda x: nn.functional.pad(x, (-1, 2, 0, 1)), 4),                 # a crop on one side
    (lambda x: nn.functional.pad(x, (1, 1, 1, 1, 1, 0)), 5),            # the channels too
], ids=["value", "reflect", "negative", "channels"])
def test_a_pad_that_is_not_zeros_at_the_edges_stays(pad, channels, backend):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _Lambda(pad), nn.Conv2d(channels, 4, 3)).eval()
    x = torch.randn(1, 3, 9, 9)
    opt = pyrys.optimize(model, (x,), backend=backend, verify=True)
    assert all(len(n.args[4]) == 2 for n in opt.graph_module.graph.nodes if n.target is FUSED_CONV)
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def test_a_pad_read_elsewhere_too_stays_for_its_other_reader(backend):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            padded = nn.functional.pad(x, (0, 1, 1, 0))
            return self.conv(padded), padded * 2

    model, x = Shared().eval(), torch.randn(1, 3, 8, 8)
    opt = pyrys.optimize(model, (x,), backend=backend, verify=True)
    assert [n.args[4] for n in opt.graph_module.graph.nodes if n.target is FUSED_CONV] == [[1, 0, 0, 1]]
    for got, want in zip(opt(x), model(x)):
        assert pyrys.relative_error(got, want) <= TOLERANCE


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class PaddedResidual(nn.Module):
    """The padded tensor is both a conv's input and its residual: ``conv(p) + p``; and a kernel larger than
    the unpadded input (a 2 x 2 map padded to 4 x 4 for a 3 x 3 conv)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.small = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3)

    def forward(self, x):
        p = nn.functional.pad(x, [1, 1, 1, 1])
        return self.conv(p) + p, self.small(nn.functional.pad(x[:, :, :2, :2], [1, 1, 1, 1]))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_a_pad_also_read_as_a_residual_keeps_its_zeros_there(precision, backend):
    """A helper's findings: through bf16's or int8's conversions the fold moved the conversion of a pad that
    a fused add also read, so the residual lost its padding (a crash, or error 1.03 where it broadcast); a
    kernel larger than the unpadded input made the rewrite's shape inference raise."""
    model, x = PaddedResidual().eval(), torch.randn(2, 8, 10, 10)
    options = {"precision": precision} if precision != "fp32" else {}
    if precision == "int8":
        options["calibration"] = [(torch.randn(2, 8, 10, 10),) for _ in range(4)]
    opt = pyrys.optimize(model, (x,), backend=backend, verify=True, **options)
    tolerance = {"bf16": 3e-2, "int8": 5e-2}.get(precision, TOLERANCE)
    for got, want in zip(opt(x), model(x)):
        assert pyrys.relative_error(got, want) <= tolerance


@pytest.mark.parametrize("model", [nn.Conv1d(8, 8, 2, padding="same"), _Lambda(lambda x: nn.functional.pad(x, [2, 1]))],
                         ids=["even kernel same", "F.pad"])
def test_a_symbolic_length_survives_the_pad_s_shape_inference(model, backend):
    """``dynamic=True, verify=True`` on a sequence whose length is symbolic: torch's C++ metas of
    ``constant_pad_nd`` and of a string-padded conv give the example's length, so the verifier saw the
    outputs change type (a helper's finding); their decompositions keep the symbol."""
    model = nn.Sequential(model, nn.Conv1d(8, 8, 3)).eval()
    opt = pyrys.optimize(model, (torch.randn(2, 8, 17),), backend=backend, dynamic=True, verify=True)
    for shape in [(2, 8, 17), (3, 8, 9), (1, 8, 30)]:
        x = torch.randn(*shape)
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.ZeroPad2d((1, 0, 0, 0)), _Lambda(lambda x: nn.functional.pad(x, (0, 2, 1, 1))), nn.Conv2d(4, 4, 3)),
    nn.Sequential(_Lambda(lambda x: nn.functional.pad(x, (3, 0))), nn.Conv1d(4, 4, 2, padding="same")),
], ids=["two pads", "a pad, then an even kernel's same"])
def test_zero_pads_in_a_row_are_one_padding(model, backend):
    """A helper's finding: of two zero pads in a row (a user's, then the one an even kernel's "same" makes)
    only the one next to the conv was folded, the other left a torch step."""
    model = model.eval()
    x = torch.randn(2, 4, 9, 11) if isinstance(model[-1], nn.Conv2d) else torch.randn(2, 4, 23)
    opt = pyrys.optimize(model, (x,), backend=backend, verify=True)
    assert not [n for n in opt.graph_module.graph.nodes if n.target in (aten.pad.default, aten.constant_pad_nd.default)]
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
