import pytest
import torch

import pyrys

from tests.conftest import TOLERANCE
from tests.models import image

PASSES = ("freeze_params", "fold_constant_affine", "constant_propagation", "dead_code_elimination")


class ConvAffine(torch.nn.Module):
    """``conv(x) * scale + shift`` with scalar or per-channel constants (buffers, so they freeze)."""

    def __init__(self, scale, shift, transposed: bool = False, bias: bool = True):
        super().__init__()
        torch.manual_seed(0)
        conv = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
        self.conv = conv(4, 6, 3, groups=2, bias=bias)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x):
        return (self.conv(x) - self.shift) / self.scale


AFFINE_FOLDED = """\
graph(%x : Float(1, 4, 6, 6)):
  %conv2d_weight_scaled_1 : Float(6, 2, 3, 3) = prim::Constant[value=<Tensor>]()
  %conv2d_bias_scaled_1 : Float(6) = prim::Constant[value=<Tensor>]()
  %conv2d : Float(1, 6, 4, 4) = aten::conv2d(%x, %conv2d_weight_scaled_1, %conv2d_bias_scaled_1, [1, 1], [0, 0], [1, 1], 2)
  return (%conv2d)"""


def test_sub_and_div_by_per_channel_constants_fold_into_the_conv(run_passes):
    model = ConvAffine(torch.rand(6, 1, 1) + 0.5, torch.randn(1, 6, 1, 1)).eval()
    result = run_passes(model, (image(channels=4),), *PASSES)
    assert "aten::sub" in result.before and "aten::div" in result.before
    assert result.after == AFFINE_FOLDED
    assert result.fired("fold_constant_affine") == {"affine_into_weights": 2}
    assert result.error() <= TOLERANCE


def test_fold_nodes_stay_visible_without_constant_propagation(run_passes):
    model = ConvAffine(torch.rand(6, 1, 1) + 0.5, torch.randn(6, 1, 1)).eval()
    result = run_passes(model, (image(channels=4),), "freeze_params", "fold_constant_affine")
    assert "pyrys::fold_affine_bias(%conv_bias, None, %neg, 6)" in result.after
    assert "pyrys::fold_scale(%conv_weight, %reciprocal)" in result.after
    assert result.error() <= TOLERANCE


@pytest.mark.parametrize("transposed", [False, True])
def test_scalar_constants_fold_into_conv_and_transposed_conv_without_bias(run_passes, transposed):
    model = ConvAffine(torch.tensor(2.5), torch.tensor(0.3), transposed=transposed, bias=False).eval()
    result = run_passes(model, (image(channels=4),), *PASSES)
    assert "aten::div" not in result.after and "aten::sub" not in result.after
    assert result.fired("fold_constant_affine") == {"affine_into_weights": 2}
    assert result.error() <= TOLERANCE


class LinearAffine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(8, 5)
        self.register_buffer("scale", torch.rand(5) + 0.5)

    def forward(self, x):
        return self.linear(x) * self.scale + 1.5


def test_constants_fold_into_linear(run_passes):
    result = run_passes(LinearAffine().eval(), (torch.rand(2, 3, 8),), *PASSES)
    assert result.fired("fold_constant_affine") == {"affine_into_weights": 2}
    assert "aten::mul" not in result.after and "aten::add" not in result.after
    assert result.error() <= TOLERANCE


class SpatialConstant(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.register_buffer("mask", torch.rand(1, 1, 4, 4))

    def forward(self, x):
        return self.conv(x) * self.mask


def test_a_constant_that_varies_over_space_is_a_miss(run_passes):
    result = run_passes(SpatialConstant().eval(), (image(),), *PASSES)
    assert result.fired("fold_constant_affine") == {}
    assert [m.reason for m in result.misses] == [
        "the constant %mask of shape (1, 1, 4, 4) varies along more than the output channels of %conv2d, "
        "so it cannot fold into its weights"]
    assert result.error() <= TOLERANCE


class Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.rand(3) + 0.5)
        self.register_buffer("b", torch.rand(3))

    def forward(self, x):
        y = torch.relu(x)
        return ((y * self.a) / 2.0 * self.a - self.b) + 0.25 + 1


CHAIN_MERGED = """\
graph(%x : Float(2, 3)):
  %relu : Float(2, 3) = aten::relu(%x)
  %mul_1_merged_1 : Float(3) = prim::Constant[value=<Tensor>]()
  %mul_2 : Float(2, 3) = aten::mul(%relu, %mul_1_merged_1)
  %add_1_merged_1 : Float(3) = prim::Constant[value=<Tensor>]()
  %add_3 : Float(2, 3) = aten::sub(%mul_2, %add_1_merged_1)
  return (%add_3)"""


def test_consecutive_constant_ops_merge(run_passes):
    result = run_passes(Chain().eval(), (torch.randn(2, 3),), *PASSES)
    assert result.before.count("aten::mul") + result.before.count("aten::div") == 3
    assert result.fired("fold_constant_affine") == {"merge_affine": 4}
    assert result.after == CHAIN_MERGED
    assert result.error() <= TOLERANCE


def test_constant_check_handles_deep_graphs():
    """A recursive walk overflowed the stack on ResNet-152; the check must be iterative."""
    from pyrys.passes.fold_constant_affine import constant_expr

    graph = torch.fx.Graph()
    value = graph.placeholder("x")
    for _ in range(3000):
        value = graph.call_function(torch.ops.aten.relu.default, (value,))
    graph.output(value)
    assert constant_expr(value) is False


class ConvOver(torch.nn.Module):
    """``conv(x) / d`` for a number ``d`` (0 here: eager gives +-inf)."""

    def __init__(self, divisor):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.divisor = torch.nn.Conv2d(3, 4, 1), divisor

    def forward(self, x):
        return self.conv(x) / self.divisor


@pytest.mark.parametrize("model, word", [(ConvOver(0.0), "divisor 0.0"),
                                         (ConvAffine(torch.tensor(float("inf")), torch.tensor(0.0)), "divisor %scale"),
                                         (ConvAffine(torch.tensor([1.0, 0.0, 2.0, 1.0, 1.0, 1.0]).view(6, 1, 1),
                                                     torch.tensor(0.0)), "divisor %scale")])
def test_a_divisor_of_zero_or_inf_does_not_fold_into_the_weights(run_passes, model, word):
    """``W * (1 / 0)`` sums to NaN where eager's ``conv(x) / 0`` is +-inf (and ``W / inf`` to 0 where eager's
    ``inf / inf`` is NaN): such a constant stays an op, a miss saying why."""
    x = image(channels=model.conv.in_channels)
    result = run_passes(model.eval(), (x,), *PASSES)
    assert "aten::div" in result.after
    assert any(m.reason.startswith(f"the {word} is not finite or is 0") for m in result.misses), result.misses
    torch.testing.assert_close(pyrys.optimize(model, (x,))(x), model(x), equal_nan=True)


class ConvTimes(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.scale = torch.nn.Conv2d(3, 4, 1), scale

    def forward(self, x):
        return 1 / (self.conv(x) * self.scale)


@pytest.mark.parametrize("scale", [0.0, -0.0])
def test_a_scale_of_zero_does_not_fold_into_the_weights(run_passes, scale):
    """``1 / (conv(x) * 0.0)`` is +-inf by the sign of conv(x); folded, weights times 0 gave +inf everywhere."""
    model, x = ConvTimes(scale).eval(), image(channels=3)
    result = run_passes(model, (x,), *PASSES)
    assert any(m.reason.startswith(f"the scale {scale} is not finite or is 0") for m in result.misses), result.misses
    assert torch.equal(pyrys.optimize(model, (x,))(x), model(x))


class ScaleChain(torch.nn.Module):
    def forward(self, x):
        return (x.sin() * 1e-39) * 1e39


def test_scales_merge_only_where_float32_holds_them_and_their_product():
    """float32 rounds ``1e39`` to inf, so eager's ``x * 1e-39 * 1e39`` is +-inf, not ``x * 1.0``."""
    x = torch.randn(2, 3)
    opt = pyrys.optimize(ScaleChain().eval(), (x,))
    assert "merge_affine" not in str(opt.report())
    torch.testing.assert_close(opt(x), ScaleChain()(x), equal_nan=True)


def test_division_by_zero_runs_as_in_eager(backend):
    """``relu(x) / 0``: inf where x > 0, NaN where it is 0; the dnnl backend's ``x * (1 / c)`` has no such
    ``1 / c``, so torch divides."""
    model, x = ConvOver(0), image(channels=3)
    opt = pyrys.optimize(model.eval(), (x,), backend=backend)
    torch.testing.assert_close(opt(x), model(x), equal_nan=True)
    relu = torch.nn.Sequential(torch.nn.ReLU())
    relu.forward = lambda x: torch.relu(x) / 0  # noqa: E731 (a module whose forward divides by a literal 0)
    opt = pyrys.optimize(relu.eval(), (x,), backend=backend)
    torch.testing.assert_close(opt(x), torch.relu(x) / 0, equal_nan=True)


class ConvOfHundredsTimes(torch.nn.Module):
    """``conv(x) * s``, the conv's weights 100: ``W * 1e37`` is past float32's largest, ``conv(x) * 1e37`` is not
    for outputs below 34."""

    def __init__(self, scale):
        super().__init__()
        self.conv, self.scale = torch.nn.Conv2d(3, 4, 1, bias=False), scale
        torch.nn.init.constant_(self.conv.weight, 100.0)

    def forward(self, x):
        return self.conv(x) * self.scale


def test_a_scale_that_would_overflow_the_weights_does_not_fold(run_passes):
    model, x = ConvOfHundredsTimes(1e37).eval(), image(channels=3) * 0.01
    result = run_passes(model, (x,), *PASSES)
    assert "aten::mul" in result.after
    assert [m.reason for m in result.misses] == [
        "the scale 1e+37 would scale the weights of %conv2d past the largest torch.float32"]
    torch.testing.assert_close(pyrys.optimize(model, (x,))(x), model(x))


def test_a_scale_far_from_one_does_not_fold(run_passes):
    """``linear(x) * 1e-36``: eager's outputs are ~1e-34; folded, the weights' products underflowed to 0."""
    model, x = ConvOfHundredsTimes(1e-36).eval(), image(channels=3)
    result = run_passes(model, (x,), *PASSES)
    assert "aten::mul" in result.after
    assert [m.reason for m in result.misses] == [
        "the scale 1e-36 is beyond 2^+-64: in the weights of %conv2d their products could leave torch.float32's "
        "range where eager's do not"]
    torch.testing.assert_close(pyrys.optimize(model, (x,))(x), model(x))


CHAINS_EAGER_ROUNDS = {
    "x + 1e8 - 1e8": lambda x: x + 1e8 - 1e8,  # eager rounds x to a multiple of 8 on the way
    "x - 2**24 + 2**24": lambda x: x - 16777216.0 + 16777216.0,
    "x * 1e30 * 1e30 * 1e-30": lambda x: x * 1e30 * 1e30 * 1e-30,  # the second step overflows
    "x * 1e-25 * 1e-25 * 1e25": lambda x: x * 1e-25 * 1e-25 * 1e25,  # the second step underflows
    "x * 1e-45 * 1e30": lambda x: x * 1e-45 * 1e30,  # the first step is a denormal, rounded
}


class Lambda(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(torch.relu(x) - x)


@pytest.mark.parametrize("chain", CHAINS_EAGER_ROUNDS)
def test_constants_whose_steps_round_overflow_or_cancel_do_not_merge(run_passes, chain):
    """Merged, these would be another function than eager's; unmerged, every step rounds as eager's does."""
    model, x = Lambda(CHAINS_EAGER_ROUNDS[chain]).eval(), (torch.randn(4, 8) * 3,)
    result = run_passes(model, x, *PASSES)
    assert "merge_affine" not in result.fired("fold_constant_affine"), result.after
    assert torch.equal(pyrys.optimize(model, x)(*x), model(*x))


def test_small_terms_that_cancel_and_terms_that_add_up_merge(run_passes):
    model = Lambda(lambda x: (x + 0.5 - 0.25) * 4.0 * 0.5 + 1e8 + 1e8).eval()
    result = run_passes(model, (torch.randn(4, 8),), *PASSES)
    assert result.fired("fold_constant_affine") == {"merge_affine": 3}, result.after
    assert result.error() <= TOLERANCE
