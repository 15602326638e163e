import torch

from tests.conftest import TOLERANCE
from tests.models import conv_bn_relu, image


class Duplicates(torch.nn.Module):
    def forward(self, x):
        a = torch.relu(x) * 2
        b = torch.relu(x) * 2
        return a + b + torch.relu(x) * 2.0


CSE_AFTER = """\
graph(%x : Float(4)):
  %relu : Float(4) = aten::relu(%x)
  %mul : Float(4) = aten::mul(%relu, 2)
  %add : Float(4) = aten::add(%mul, %mul)
  %mul_2 : Float(4) = aten::mul(%relu, 2.0)
  %add_1 : Float(4) = aten::add(%add, %mul_2)
  return (%add_1)"""


def test_cse_merges_identical_pure_nodes_but_not_int_vs_float(run_passes):
    result = run_passes(Duplicates().eval(), (torch.randn(4),), "common_subexpression_elimination")
    assert result.before.count("aten::relu") == 3
    assert result.after == CSE_AFTER
    assert result.fired("common_subexpression_elimination") == {"merged": 3}
    assert result.error() <= TOLERANCE


class Unused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x):
        _ = self.unused(x)
        return x * 2


def test_dce_removes_unused_constants_and_releases_their_tensors(run_passes):
    result = run_passes(Unused().eval(), (torch.randn(4),), "freeze_params", "dead_code_elimination")
    assert 'prim::GetAttr[name="unused.weight"]' in result.before  # the linear itself died at capture
    assert result.after == "graph(%x : Float(4)):\n  %mul : Float(4) = aten::mul(%x, 2)\n  return (%mul)"
    assert result.fired("dead_code_elimination") == {"constants": 2}
    assert list(result.captured.gm.named_buffers()) == []  # the tensors are released too
    assert result.error() <= TOLERANCE


def test_dce_removes_unused_state_reads(run_passes):
    result = run_passes(conv_bn_relu(), (image(),), "dead_code_elimination")
    assert result.fired("dead_code_elimination") == {"state_reads": 1}  # bn.num_batches_tracked
    assert "num_batches_tracked" not in result.after


def test_dce_removes_nodes_left_dead_by_folding(run_passes):
    result = run_passes(conv_bn_relu(), (image(),), "freeze_params", "freeze_flags", "fold_conv_bn",
                        "constant_propagation", "dead_code_elimination")
    assert result.fired("dead_code_elimination") == {"constants": 7}
    assert result.after.count("prim::Constant") == 2
    assert result.error() <= TOLERANCE
