"""NaN and infinities through the dnnl backend: where eager keeps a NaN, pyrys keeps it.

oneDNN's relu, clip and hardsigmoid kernels use x86 max/min, which return the bound for a NaN
input; pyrys builds relu from steps that keep it (``backends/dnnl/post_ops.py``), which turn -inf into
NaN.  A program with a step unlike eager on a value that is not finite (max-pooling, clip, hardsigmoid,
relu, softmax) runs calls whose inputs are not all finite on the reference backend; max-pooling and clip
run in torch where a NaN may be made inside the graph from finite inputs (``ir/finite.py``).  What stays
different is pinned here: -inf made inside a network from finite inputs (an overflow) gives NaN through
relu (eager: 0).
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrys
from pyrys.backends.dnnl import binding
from pyrys.backends.dnnl.post_ops import ELTWISE

available, reason = binding.is_available()
pytestmark = pytest.mark.skipif(not available, reason=f"oneDNN unavailable: {reason}")

SPECIAL = [math.nan, -math.inf, math.inf, 0.0, -0.0, -1.0, 1.0, -0.5, 0.5, 2.5, 7.0, -100.0, 100.0, 1e-30, -1e-30]

ACTIVATIONS = {  # name -> eager activation; every unary post-op pyrys fuses
    "relu": F.relu,
    "relu6": F.relu6,
    "hardtanh": lambda y: F.hardtanh(y, -1.0, 1.0),
    "clamp_0_3": lambda y: y.clamp(0.0, 3.0),
    "clamp_-2_5": lambda y: y.clamp(-2.0, 5.0),
    "leaky_relu": lambda y: F.leaky_relu(y, 0.1),
    "leaky_relu_0": lambda y: F.leaky_relu(y, 0.0),
    "elu": F.elu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "mish": F.mish,
}


def special_input(shape) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    flat = x.view(-1)
    flat[: len(SPECIAL)] = torch.tensor(SPECIAL)
    flat[-len(SPECIAL):] = torch.tensor(SPECIAL)
    return x


class Activation(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x * 1.0)  # a computed tensor, so the activation runs as a dnnl step


class ConvActivation(nn.Module):
    def __init__(self, fn):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fn = nn.Conv2d(16, 16, 1, groups=16, bias=False), fn
        nn.init.ones_(self.conv.weight)  # y = x exactly: the special values reach the post-ops

    def forward(self, x):
        return self.fn(self.conv(x))


def assert_like_eager(got: torch.Tensor, want: torch.Tensor, nan_also_at: torch.Tensor | None = None) -> None:
    """NaN exactly where eager has one (and at ``nan_also_at``), the same infinities, close numbers."""
    if nan_also_at is not None:
        want = torch.where(nan_also_at, math.nan, want)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), (
        f"NaN at {torch.isnan(got).sum().item()} places, eager at {torch.isnan(want).sum().item()}")
    numbers = ~torch.isnan(want)
    assert torch.equal(torch.isinf(got[numbers]), torch.isinf(want[numbers]))
    finite = torch.isfinite(want)
    # within one rounding of a clamp bound (a shifted clamp), or of oneDNN's exp-based approximations
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-6)


def test_every_post_op_has_a_nan_case():
    assert set(ELTWISE) <= {"relu", "leaky_relu", "clamp", "elu", "gelu_erf", "gelu_tanh", "silu", "hardswish",
                            "hardsigmoid", "sigmoid", "tanh", "mish",
                            "scale", "shift"}  # these two: tests/backends/dnnl/test_matmul.py (a conv folds them)


@pytest.mark.parametrize("layout", ["nhwc", "blocked16"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_fused_activation_keeps_nan_and_infinities(name, layout):
    model = ConvActivation(ACTIVATIONS[name]).eval()
    x = special_input((1, 16, 4, 8))
    opt = pyrys.optimize(model, (x,), backend="dnnl", layout=layout)
    assert "dnnl::conv2d_" in opt.program_text()  # the activation ran inside the conv
    assert_like_eager(opt(x), model(x))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_standalone_activation_keeps_nan_and_infinities(name):
    model = Activation(ACTIVATIONS[name]).eval()
    x = special_input((2, 3, 5, 7))
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert "fallback" not in opt.program_text()
    assert_like_eager(opt(x), model(x))


def test_relu_gives_positive_zero_for_negative_inputs():
    model = ConvActivation(F.relu).eval()
    x = special_input((1, 16, 4, 8))
    y = pyrys.optimize(model, (x,), backend="dnnl")(x)
    assert not torch.signbit(y[~torch.isnan(y)]).any()  # elu(0) gives -0; the abs step makes it +0


class ConvPool(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)), 2)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_input_reaches_the_output_through_max_pooling_as_in_eager(value):
    model = ConvPool().eval()
    x = torch.randn(1, 3, 16, 16)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert "dnnl::pooling_max" in opt.program_text()
    x[0, 1, 5, 5] = value
    got, want = opt(x), model(x)
    assert not torch.isfinite(want).all()
    assert_like_eager(got, want)
    clean = torch.randn(1, 3, 16, 16)
    assert pyrys.relative_error(opt(clean), model(clean)) <= pyrys.FP32_TOLERANCE


class LogPool(nn.Module):
    """log of a negative number makes NaN inside the network, from finite inputs."""

    def forward(self, x):
        return F.max_pool2d(torch.log(x * 1.0), 2)


def test_nan_made_inside_the_network_reaches_the_output_through_max_pooling():
    """oneDNN's max-pooling takes the largest number in a window, as if a NaN were -inf: where a NaN may be made
    inside the graph (here by a log), the pooling runs in torch and says why."""
    model = LogPool().eval()
    x = torch.rand(1, 4, 8, 8) + 0.5
    x[0, 0, 0, 0] = -1.0  # log(-1) = NaN in the first pooling window only
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert "torch::max_pool2d" in opt.program_text() and "a NaN may come from %log" in opt.program_text()
    assert_like_eager(opt(x), model(x))


@pytest.mark.parametrize("name", ["relu6", "hardsigmoid", "clamp_0_3"])
def test_nan_made_inside_the_network_reaches_the_output_through_clip(name):
    """oneDNN's clip gives a bound for NaN: after an op that may make one from finite inputs, torch clamps."""
    model = Activation(lambda y: ACTIVATIONS[name](torch.log(y))).eval()
    x = torch.rand(1, 4, 8, 8) + 0.5
    x[0, 0, 0, 0] = -1.0  # log(-1) = NaN, made inside from a finite input
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert "turns NaN into a number, and a NaN may come from %log" in opt.program_text(), opt.program_text()
    assert_like_eager(opt(x), model(x))


class ProductThenClip(nn.Module):
    """``clamp(addmm(c, a, b, beta=nan))``: the NaN comes from a number, into a fused matrix product's operand."""

    def forward(self, c, a, b):
        return torch.clamp(torch.addmm(c, a.relu(), b.relu(), beta=math.nan, alpha=3.0), -1.0, 1.0)


def test_nan_made_inside_a_fused_chain_reaches_the_output():
    args = (torch.randn(1, 4), torch.randn(16, 4), torch.randn(4, 4))
    model = ProductThenClip().eval()
    opt = pyrys.optimize(model, args, backend="dnnl")
    assert "the number nan" in opt.program_text(), opt.program_text()
    assert model(*args).isnan().all() and opt(*args).isnan().all()


def test_clip_after_ops_that_keep_values_finite_stays_in_onednn():
    model = Activation(lambda y: F.relu6(torch.tanh(y * y + 1.0) / 2.0 - 1.0)).eval()  # a division by a number
    opt = pyrys.optimize(model, (torch.randn(1, 4, 8, 8),), backend="dnnl")
    assert "dnnl::clamp" in opt.program_text() or "_clamp" in opt.program_text(), opt.program_text()


@pytest.mark.parametrize("name", ["relu6", "hardsigmoid", "clamp_0_3", "relu", "leaky_relu_0"])
def test_programs_with_an_activation_unlike_eager_on_nonfinite_values_check_their_inputs(name):
    model = ConvActivation(ACTIVATIONS[name]).eval()
    x = special_input((1, 16, 4, 8))
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert opt._first.program.float_inputs == [0]


def test_programs_with_a_softmax_check_their_inputs():
    """oneDNN's softmax of a row holding NaN or inf gives numbers beside it; eager's row is all NaN."""
    model, x = Activation(lambda y: y.softmax(-1)).eval(), torch.randn(2, 4)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert "dnnl::softmax" in opt.program_text() and opt._first.program.float_inputs == [0]
    x[0, 1], x[1, 2] = math.nan, math.inf
    assert_like_eager(opt(x), model(x))


class NegativeExp(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = ConvActivation(lambda y: y).conv

    def forward(self, x):
        return F.relu(self.conv(torch.exp(x)) * -1.0)  # -inf where exp overflows


def test_minus_infinity_made_inside_the_network_gives_nan_through_relu_as_documented():
    model, x = NegativeExp().eval(), torch.randn(1, 16, 4, 8)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert "dnnl::conv2d_relu" in opt.program_text()
    x[0, 0, 0, 0] = 200.0  # finite; exp(200) is inf in float32
    assert_like_eager(opt(x), model(x), nan_also_at=torch.isinf(torch.exp(x)))


class LogThenRelu(nn.Module):
    def __init__(self, fused: bool):
        super().__init__()
        torch.manual_seed(0)
        self.fused, self.conv = fused, nn.Conv2d(1, 4, 1)
        with torch.no_grad():
            self.conv.weight.abs_()  # (log(0) -> -inf stays -inf through it)

    def forward(self, x):
        return F.relu(self.conv(torch.log(x)) if self.fused else torch.log(x))


@pytest.mark.parametrize("fused", [False, True], ids=["standalone", "fused"])
def test_minus_infinity_from_a_logarithm_gives_zero_through_relu(fused):
    """A helper's find: ``log(x).relu()`` at ``x = 0`` gave NaN (the relu's mask: -inf * 0), eager 0."""
    model, x = LogThenRelu(fused).eval(), torch.rand(1, 1, 4, 8) + 0.5
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert ("dnnl::conv2d_relu" if fused else "dnnl::relu") in opt.program_text()
    x[0, 0, 0, :3] = torch.tensor([0.0, 0.1, 2.0])
    got, want = opt(x), model(x)
    assert not got.isnan().any() and torch.equal(got == 0, want == 0) and pyrys.relative_error(got, want) <= 1e-6


NAN_MAKERS = {  # a NaN made from finite inputs, then a clip
    "x * 1e39": lambda x: x.relu() * 1e39,  # inf in float32: 0 * inf
    "x / 1e-50": lambda x: x.relu() / 1e-50,  # a divisor of 0 in float32: 0 / 0
    "x ** -1": lambda x: (x.relu() ** -1) * 0.5 - x.relu() ** -1,  # inf - inf
    "var over one element": lambda x: x.var(dim=0, keepdim=True) + x,
}


@pytest.mark.filterwarnings("ignore:var\\(\\)")
@pytest.mark.parametrize("maker", NAN_MAKERS)
def test_nan_made_by_numbers_as_float32_reads_them_reaches_the_output(maker):
    model = Activation(lambda y: torch.clamp(NAN_MAKERS[maker](y), -1.0, 1.0)).eval()
    x = torch.randn(1, 4)
    x[0, 0] = -1.0
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert model(x).isnan().any()
    assert_like_eager(opt(x), model(x))


class RmsNormThenClip(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 8)

    def forward(self, x):
        return torch.clamp(self.linear(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)), -1.0, 1.0)


def test_a_clip_after_an_rms_norm_stays_in_onednn():
    """rsqrt of a mean of squares plus eps is known positive: no NaN comes from it."""
    model, x = RmsNormThenClip().eval(), torch.randn(2, 3, 8)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert "dnnl::linear_clamp" in opt.program_text() and "torch::" not in opt.program_text(), opt.program_text()
    assert pyrys.relative_error(opt(x), model(x)) <= pyrys.FP32_TOLERANCE
