import pytest
import torch
import torch.nn.functional as F

from tests.conftest import TOLERANCE
from tests.models import conv_bn_relu, image

FUSED = """\
graph(%x : Float(1, 3, 6, 6)):
  %conv_weight : Float(4, 3, 3, 3) = prim::Constant[value=<Tensor>]()
  %conv_bias : Float(4) = prim::Constant[value=<Tensor>]()
  %conv2d_1 : Float(1, 4, 4, 4) = pyrys::conv2d_relu(%x, %conv_weight, %conv_bias, [1, 1], [0, 0], [1, 1], 1)
  return (%conv2d_1)"""


class ConvAct(torch.nn.Module):
    def __init__(self, *activations):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.activations = activations

    def forward(self, x):
        y = self.conv(x)
        for act in self.activations:
            y = act(y)
        return y


def test_conv_relu_becomes_one_fused_op(run_passes):
    result = run_passes(ConvAct(torch.relu).eval(), (image(),), "freeze_params", "fuse_post_ops",
                        "dead_code_elimination")
    assert result.after == FUSED
    assert result.fired("fuse_post_ops") == {"conv_activation": 1}
    assert result.error() <= TOLERANCE


ACTIVATIONS = {
    "relu6": (F.relu6, "pyrys::conv2d_clamp[post_ops=['clamp:0.0,6.0']]"),
    "leaky_relu": (lambda y: F.leaky_relu(y, 0.2), "pyrys::conv2d_leaky_relu[post_ops=['leaky_relu:0.2']]"),
    "gelu": (F.gelu, "pyrys::conv2d_gelu_erf("),
    "gelu_tanh": (lambda y: F.gelu(y, approximate="tanh"), "pyrys::conv2d_gelu_tanh("),
    "silu": (F.silu, "pyrys::conv2d_silu("),
    "hardswish": (F.hardswish, "pyrys::conv2d_hardswish("),
    "hardsigmoid": (F.hardsigmoid, "pyrys::conv2d_hardsigmoid("),
    "sigmoid": (torch.sigmoid, "pyrys::conv2d_sigmoid("),
    "tanh": (torch.tanh, "pyrys::conv2d_tanh("),
    "elu": (F.elu, "pyrys::conv2d_elu[post_ops=['elu:1.0']]"),
    "mish": (F.mish, "pyrys::conv2d_mish("),
    # one bound (a helper's find: not fused, "an open bound"): the other is infinite; min=0 alone is a relu
    "clamp_min_0": (lambda y: torch.clamp(y, min=0), "pyrys::conv2d_relu("),
    "clamp_min": (lambda y: torch.clamp(y, min=-0.5), "pyrys::conv2d_clamp[post_ops=['clamp:-0.5,inf']]"),
    "clamp_max": (lambda y: torch.clamp(y, max=0.25), "pyrys::conv2d_clamp[post_ops=['clamp:-inf,0.25']]"),
}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation_fuses(run_passes, name):
    act, expected = ACTIVATIONS[name]
    result = run_passes(ConvAct(act).eval(), (image(),), "freeze_params", "fuse_post_ops")
    assert expected in result.after
    assert result.fired("fuse_post_ops") == {"conv_activation": 1}
    assert result.error() <= TOLERANCE


def test_activation_chain_fuses_in_order(run_passes):
    result = run_passes(ConvAct(torch.relu, torch.sigmoid, torch.tanh).eval(), (image(),), "fuse_post_ops")
    assert "pyrys::conv2d_relu_sigmoid_tanh(" in result.after
    assert result.fired("fuse_post_ops") == {"conv_activation": 3}
    assert result.error() <= TOLERANCE


class LinearGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 5)

    def forward(self, x):
        return F.gelu(self.linear(x))


def test_linear_activation_fuses(run_passes):
    result = run_passes(LinearGelu().eval(), (torch.rand(2, 8),), "freeze_params", "fuse_post_ops")
    assert "pyrys::linear_gelu_erf(%x, %linear_weight, %linear_bias)" in result.after
    assert result.error() <= TOLERANCE


class ConvReluShared(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(y) + y


def test_shared_conv_output_is_a_miss(run_passes):
    result = run_passes(ConvReluShared().eval(), (image(),), "fuse_post_ops")
    assert result.fired("fuse_post_ops") == {}
    assert result.misses[0].reason.endswith("has 2 users, so relu cannot run inside it")
    assert result.error() <= TOLERANCE


def test_after_bn_folding_conv_bn_relu_is_one_op(run_passes):
    result = run_passes(conv_bn_relu(), (image(),), "freeze_params", "freeze_flags", "fold_conv_bn",
                        "fuse_post_ops", "constant_propagation", "dead_code_elimination")
    assert "pyrys::conv2d_relu(" in result.after and "batch_norm" not in result.after
    assert result.error() <= TOLERANCE


class DeconvAct(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.deconv = torch.nn.ConvTranspose2d(3, 4, 3, stride=2)

    def forward(self, x):
        return torch.sigmoid(F.hardtanh(self.deconv(x), -1.0, 2.0))


DECONV_FUSED = """\
graph(%x : Float(1, 3, 6, 6)):
  %deconv_weight : Float(3, 4, 3, 3) = prim::Constant[value=<Tensor>]()
  %deconv_bias : Float(4) = prim::Constant[value=<Tensor>]()
  %conv_transpose2d_1 : Float(1, 4, 13, 13) = pyrys::conv_transpose2d_clamp_sigmoid[post_ops=['clamp:-1.0,2.0', 'sigmoid']](%x, %deconv_weight, %deconv_bias, [2, 2], [0, 0], [0, 0], 1, [1, 1])
  return (%conv_transpose2d_1)"""


def test_transposed_conv_takes_an_activation_chain(run_passes):
    result = run_passes(DeconvAct().eval(), (image(),), "freeze_params", "fuse_post_ops", "dead_code_elimination")
    assert result.after == DECONV_FUSED
    assert result.fired("fuse_post_ops") == {"conv_activation": 2}
    assert result.error() <= TOLERANCE


class Residual(torch.nn.Module):
    """``relu(conv_a(x) + conv_b(x))`` or ``relu(r + conv_a(x))`` with ``r`` computed after the conv."""

    def __init__(self, second_conv: bool, swap: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.b = torch.nn.Conv2d(3, 4, 1) if second_conv else None
        self.swap = swap

    def forward(self, x):
        y = self.a(x)
        r = self.b(x) if self.b is not None else torch.tanh(x).repeat(1, 2, 1, 1)[:, :4]
        return torch.relu(r + y if self.swap else y + r)


RESIDUAL_FUSED = """\
graph(%x : Float(1, 3, 6, 6)):
  %a_weight : Float(4, 3, 3, 3) = prim::Constant[value=<Tensor>]()
  %a_bias : Float(4) = prim::Constant[value=<Tensor>]()
  %b_weight : Float(4, 3, 1, 1) = prim::Constant[value=<Tensor>]()
  %b_bias : Float(4) = prim::Constant[value=<Tensor>]()
  %conv2d : Float(1, 4, 6, 6) = aten::conv2d(%x, %a_weight, %a_bias, [1, 1], [1, 1])
  %conv2d_2 : Float(1, 4, 6, 6) = pyrys::conv2d_add_relu(%x, %b_weight, %b_bias, [1, 1], [0, 0], [1, 1], 1, %conv2d)
  return (%conv2d_2)"""


def test_residual_add_and_relu_fuse_into_the_later_conv(run_passes):
    result = run_passes(Residual(second_conv=True).eval(), (image(),), "freeze_params", "fuse_post_ops",
                        "dead_code_elimination")
    assert result.after == RESIDUAL_FUSED
    assert result.fired("fuse_post_ops") == {"binary_add": 1, "conv_activation": 1}
    assert result.error() <= TOLERANCE


@pytest.mark.parametrize("swap", [False, True])
def test_residual_computed_after_the_conv_moves_the_fused_node_down(run_passes, swap):
    result = run_passes(Residual(second_conv=False, swap=swap).eval(), (image(),), "freeze_params", "fuse_post_ops")
    assert "pyrys::conv2d_add_relu(" in result.after
    assert result.fired("fuse_post_ops") == {"binary_add": 1, "conv_activation": 1}
    assert result.misses == []
    assert result.error() <= TOLERANCE


class SqueezeExcite(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x):
        scale = torch.sigmoid(self.fc(F.adaptive_avg_pool2d(x, 1)))
        return self.conv(x) * scale


def test_squeeze_excitation_scale_fuses_as_mul_and_the_broadcast_is_a_miss(run_passes):
    result = run_passes(SqueezeExcite().eval(), (image(),), "freeze_params", "fuse_post_ops")
    assert "pyrys::conv2d_mul(" in result.after and "pyrys::conv2d_sigmoid(" in result.after
    assert result.fired("fuse_post_ops") == {"binary_mul": 1, "conv_activation": 1}
    assert result.misses == []  # the feature map's conv took the mul: the broadcast side is not needed
    assert result.error() <= TOLERANCE

    class ScaleOfTheFeatureMap(torch.nn.Module):  # EfficientNet's: the feature map also feeds the pooling
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return y * torch.sigmoid(self.fc(F.adaptive_avg_pool2d(y, 1)))

    result = run_passes(ScaleOfTheFeatureMap().eval(), (image(),), "freeze_params", "fuse_post_ops")
    assert "aten::mul(%conv2d, %conv2d_2)" in result.after
    assert result.fired("fuse_post_ops") == {"conv_activation": 1}
    assert [(m.rule, m.reason) for m in result.misses] == [(
        "binary_mul", "the other operand of mul, %conv2d (1, 4, 4, 4), broadcasts the output of %conv2d_2 "
        "(1, 4, 1, 1) to a larger shape; the output of %conv2d has 2 users, so mul cannot run inside it")]
    assert result.error() <= TOLERANCE


class LinearResidual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, x, bias_like):
        return F.gelu(x + self.linear(x)) + bias_like * 0.5


def test_linear_takes_a_residual_add_and_a_bias_like_add(run_passes):
    result = run_passes(LinearResidual().eval(), (torch.rand(2, 5, 8), torch.rand(8)), "freeze_params",
                        "fuse_post_ops")
    assert "pyrys::linear_add_gelu_erf_add(%x, %linear_weight, %linear_bias, %x, %mul)" in result.after
    assert result.fired("fuse_post_ops") == {"binary_add": 2, "conv_activation": 1}
    assert result.error() <= TOLERANCE


class LargerOther(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)

    def forward(self, x, y):
        return self.conv(F.adaptive_avg_pool2d(x, 1)) + y


def test_an_operand_that_broadcasts_the_output_larger_is_a_miss(run_passes):
    result = run_passes(LargerOther().eval(), (image(), torch.rand(1, 4, 5, 5)), "fuse_post_ops")
    assert result.fired("fuse_post_ops") == {}
    assert [m.reason for m in result.misses] == [
        "the other operand of add, %y (1, 4, 5, 5), broadcasts the output of %conv2d (1, 4, 1, 1) to a larger shape"]


class _ScaledAndShifted(torch.nn.Module):
    """``relu(linear(a)) * 0.1 + 0.3`` beside ``(a @ b) / sqrt(8) - 0.7``: numbers no float32 holds."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 8)

    def forward(self, a, b):
        return torch.relu(self.linear(a)) * 0.1 + 0.3, (a @ b) / 8 ** 0.5 - 0.7


def test_a_float64_model_is_scaled_and_shifted_by_its_numbers_as_eager_reads_them(backend):
    """A float64 ``y * c`` fused as a post-op scales by ``c`` itself, not ``c`` rounded to float32 (a
    helper's find: 0.1 became 0.10000000149, errors of 1e-10 to 3e-8 where eager's own are 1e-16)."""
    import pyrys

    model = _ScaledAndShifted().double().eval()
    a, b = torch.randn(4, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    opt = pyrys.optimize(model, (a, b), backend=backend)
    assert "scale:0.1]" in str(opt.graph) or "scale:0.1'" in str(opt.graph)
    with torch.no_grad():
        for got, want in zip(opt(a, b), model(a, b)):
            torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
