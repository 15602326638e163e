"""The seed walkthrough (../shared/seed/000_f61e0773244b0ca1.txt), step by step, on the TorchScript path."""
from __future__ import annotations

import warnings

import pytest
import torch

import pyrys
from pyrys.demo import ScriptedConv2dBnRelu, foo, tensor_foo
from tests.conftest import TOLERANCE, why_unavailable

warnings.filterwarnings("ignore", message=".*torch.jit.*is deprecated", category=FutureWarning)


TENSOR_FOO_CAPTURED = """\
graph(%x : Float(10)):
  %full : Float(1) = aten::full([1], 1.0)
  %a : Float(1) = aten::add(%full, 2, 1)
  %b : Float(1) = aten::add(%a, 3, 1)
  %c : Float(1) = aten::add(%b, 4, 1)
  %add : Float(10) = aten::add(%x, %c)
  return (%add)"""

TENSOR_FOO_OPTIMIZED = """\
graph(%x : Float(10)):
  %c_1 : Float(1) = prim::Constant[value={10}]()
  %add : Float(10) = aten::add(%x, %c_1)
  return (%add)"""

UNFROZEN = """\
graph(%self : ClassType<ConvBnRelu>,
      %x : Float(1, 3, 8, 8)):
  %p_conv_weight : Float(32, 3, 3, 3) = prim::GetAttr[name="conv.weight"](%self)
  %p_conv_bias : Float(32) = prim::GetAttr[name="conv.bias"](%self)
  %bn_training : bool = prim::GetAttr[name="bn.training"](%self)
  %b_bn_running_mean : Float(32) = prim::GetAttr[name="bn.running_mean"](%self)
  %b_bn_running_var : Float(32) = prim::GetAttr[name="bn.running_var"](%self)
  %p_bn_weight : Float(32) = prim::GetAttr[name="bn.weight"](%self)
  %p_bn_bias : Float(32) = prim::GetAttr[name="bn.bias"](%self)
  %conv2d : Float(1, 32, 6, 6) = aten::conv2d(%x, %p_conv_weight, %p_conv_bias, [1, 1], [0, 0], [1, 1], 1)
  %batch_norm : Float(1, 32, 6, 6) = aten::batch_norm(%conv2d, %p_bn_weight, %p_bn_bias, %b_bn_running_mean, %b_bn_running_var, %bn_training, 0.1, 0.001, True)
  %result : Float(1, 32, 6, 6) = aten::relu(%batch_norm)
  return (%result)"""


def test_step1_torchscript_folds_int_arithmetic_itself():
    jit_foo = torch.jit.script(foo)
    assert "prim::Constant[value=10]" in str(jit_foo.graph)


def test_step1_pyrys_folds_tensor_constant_arithmetic():
    opt = pyrys.optimize(torch.jit.script(tensor_foo), (torch.rand(10),), backend="reference")
    assert opt.history[0].graph == TENSOR_FOO_CAPTURED
    assert opt.graph == TENSOR_FOO_OPTIMIZED
    x = torch.rand(10)
    assert torch.equal(opt(x), tensor_foo(x))


def seed_module() -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    ConvBnRelu = ScriptedConv2dBnRelu(3, 32, kernel_size=3, stride=1)
    pyrys._jit_pass_freeze_params(ConvBnRelu._c, 'forward', 'weight')
    pyrys._jit_pass_freeze_params(ConvBnRelu._c, 'forward', 'bias')
    pyrys._jit_pass_freeze_params(ConvBnRelu._c, 'forward', 'running_mean')
    pyrys._jit_pass_freeze_params(ConvBnRelu._c, 'forward', 'running_var')
    pyrys._jit_pass_freeze_flags(ConvBnRelu._c, 'forward', 'training', False)
    return ConvBnRelu


def test_step2_conv_bn_relu_with_constprop_disabled_shows_the_fold_nodes():
    ConvBnRelu = seed_module()
    x = torch.rand((1, 3, 8, 8))
    with torch.no_grad():
        graph = pyrys.jit.graph_for(ConvBnRelu, x, backend="reference", disable=["constant_propagation"])
    lines = [line.split(" = ", 1)[1].split("(")[0].split("[")[0] for line in graph.splitlines() if " = " in line]
    assert lines == ["prim::Constant"] * 6 + ["pyrys::fold_weight", "pyrys::fold_bias", "pyrys::conv2d_relu"]


def test_step2_conv_bn_relu_with_constprop_enabled():
    ConvBnRelu = seed_module()
    x = torch.rand((1, 3, 8, 8))
    with torch.no_grad():
        graph = pyrys.jit.graph_for(ConvBnRelu, x, backend="reference")
        assert pyrys.relative_error(pyrys.jit.run(ConvBnRelu, x, backend="reference"), ConvBnRelu(x)) <= TOLERANCE
    assert "pyrys::conv2d_relu(%x, %" in graph and "pyrys::fold" not in graph and "batch_norm" not in graph
    assert graph.count("prim::Constant") == 2  # the folded weight and bias


def test_step2_on_the_default_backend_prints_the_program():
    ConvBnRelu = seed_module()
    x = torch.rand((1, 3, 8, 8))
    with torch.no_grad():
        graph = pyrys.jit.graph_for(ConvBnRelu, x)
        assert pyrys.relative_error(pyrys.jit.run(ConvBnRelu, x), ConvBnRelu(x)) <= TOLERANCE
    default = pyrys.available_backends()[0]
    assert pyrys.jit.compile(ConvBnRelu, x).backend == default
    if default != "dnnl":
        pytest.skip(f"the default backend is not dnnl, so there is no dnnl program to print: {why_unavailable('dnnl')}")
    assert "dnnl::conv2d_relu[format_info=" in graph and "batch_norm" not in graph


def test_question1_without_freezing_nothing_folds_and_pyrys_says_why():
    torch.manual_seed(0)
    ConvBnRelu = ScriptedConv2dBnRelu(3, 32, kernel_size=3, stride=1)
    x = torch.rand((1, 3, 8, 8))
    assert pyrys.jit.graph_for(ConvBnRelu, x, backend="reference") == UNFROZEN
    report = pyrys.jit.compile(ConvBnRelu, x, backend="reference").report()
    assert "BatchNorm's training flag (%bn_training) is not a constant" in report
    pyrys.jit.freeze_params(ConvBnRelu, "weight", "bias", "running_mean", "running_var")
    report = pyrys.jit.compile(ConvBnRelu, x, backend="reference").report()
    assert "training flag" in report  # params frozen, flag not: still not folded, for that reason
    with torch.no_grad():
        assert pyrys.relative_error(pyrys.jit.run(ConvBnRelu, x, backend="reference"), ConvBnRelu(x)) <= TOLERANCE
