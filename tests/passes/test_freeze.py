
from tests.conftest import TOLERANCE
from tests.models import conv_bn_relu, image

CAPTURED = """\
graph(%self : ClassType<ConvBnRelu>,
      %x : Float(1, 3, 6, 6)):
  %p_conv_weight : Float(4, 3, 3, 3) = prim::GetAttr[name="conv.weight"](%self)
  %p_conv_bias : Float(4) = prim::GetAttr[name="conv.bias"](%self)
  %p_bn_weight : Float(4) = prim::GetAttr[name="bn.weight"](%self)
  %p_bn_bias : Float(4) = prim::GetAttr[name="bn.bias"](%self)
  %b_bn_running_mean : Float(4) = prim::GetAttr[name="bn.running_mean"](%self)
  %b_bn_running_var : Float(4) = prim::GetAttr[name="bn.running_var"](%self)
  %b_bn_num_batches_tracked : Long() = prim::GetAttr[name="bn.num_batches_tracked"](%self)
  %bn_training : bool = prim::GetAttr[name="bn.training"](%self)
  %conv2d : Float(1, 4, 4, 4) = aten::conv2d(%x, %p_conv_weight, %p_conv_bias)
  %batch_norm : Float(1, 4, 4, 4) = aten::batch_norm(%conv2d, %p_bn_weight, %p_bn_bias, %b_bn_running_mean, %b_bn_running_var, %bn_training, 0.1, 1e-05, False)
  %relu : Float(1, 4, 4, 4) = aten::relu(%batch_norm)
  return (%relu)"""


def test_freeze_params_selected_by_attribute_name(run_passes):
    result = run_passes(conv_bn_relu(), (image(),), "freeze_params", freeze_params=("weight", "running_var"))
    assert result.before == CAPTURED
    assert result.fired("freeze_params") == {"weight": 2, "running_var": 1}
    assert '%conv_weight : Float(4, 3, 3, 3) = prim::Constant[value=<Tensor>]()' in result.after
    assert 'prim::GetAttr[name="conv.bias"]' in result.after
    assert 'prim::GetAttr[name="conv.weight"]' not in result.after
    assert result.error() <= TOLERANCE


def test_freeze_params_default_freezes_every_parameter_and_buffer(run_passes):
    result = run_passes(conv_bn_relu(), (image(),), "freeze_params")
    assert result.fired("freeze_params") == {
        "weight": 2, "bias": 2, "running_mean": 1, "running_var": 1, "num_batches_tracked": 1}
    assert result.after.count("prim::GetAttr") == 1  # only the training flag is left
    assert result.error() <= TOLERANCE


def test_freeze_flags_turns_training_into_a_literal(run_passes):
    result = run_passes(conv_bn_relu(), (image(),), "freeze_flags")
    assert result.fired("freeze_flags") == {"training=False": 1}
    assert "%bn_training" not in result.after
    assert "%b_bn_running_var, False, 0.1, 1e-05, False)" in result.after
    assert result.error() <= TOLERANCE


def test_freeze_flags_keeps_train_mode_as_true(run_passes):
    model = conv_bn_relu().train()
    result = run_passes(model, (image(batch=2),), "freeze_flags")
    assert result.fired("freeze_flags") == {"training=True": 1}
    assert "%b_bn_running_var, True, 0.1, 1e-05, False)" in result.after
    assert result.error() <= TOLERANCE


def test_freeze_flags_excluded_leaves_the_flag_read(run_passes):
    result = run_passes(conv_bn_relu(), (image(),), "freeze_flags", freeze_flags=())
    assert result.fired("freeze_flags") == {}
    assert result.after == CAPTURED
