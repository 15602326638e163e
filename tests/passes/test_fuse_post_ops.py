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
