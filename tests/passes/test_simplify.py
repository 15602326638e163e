import torch

import pyrys
from tests.conftest import TOLERANCE


class NoOps(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x).contiguous().to(torch.float32).detach().clone().type_as(x)
        return torch.ops.aten.alias(y).expand(2, 3) * 2


NO_OPS_AFTER = """\
graph(%x : Float(2, 3)):
  %relu : Float(2, 3) = aten::relu(%x)
  %mul : Float(2, 3) = aten::mul(%relu, 2)
  return (%mul)"""


def test_no_op_copies_and_aliases_are_removed(run_passes):
    result = run_passes(NoOps().eval(), (torch.randn(2, 3),), "simplify", "dead_code_elimination")
    assert "aten::clone" in result.before and "aten::_assert_tensor_metadata" in result.before
    assert result.after == NO_OPS_AFTER
    assert result.fired("simplify") == {"detach": 1, "clone": 1, "alias": 1, "expand": 1, "assert_metadata": 1,
                                        "type_as": 1}
    assert result.error() <= TOLERANCE


class CopyOfPermute(torch.nn.Module):
    def forward(self, x):
        return x.transpose(1, 2).contiguous().view(2, -1)


def test_a_copy_that_changes_the_layout_stays(run_passes):
    result = run_passes(CopyOfPermute().eval(), (torch.randn(2, 3, 4),), "simplify")
    assert result.after == result.before and "aten::clone" in result.after
    assert result.fired("simplify") == {}
    assert result.error() <= TOLERANCE


class ReturnsClone(torch.nn.Module):
    def forward(self, x):
        return x.clone()


def test_a_clone_of_an_input_returned_as_output_stays_with_a_reason(run_passes):
    result = run_passes(ReturnsClone().eval(), (torch.randn(3),), "simplify")
    assert "aten::clone(%x)" in result.after
    assert [m.reason for m in result.misses] == [
        "%clone is a graph output: without it the output would be the input %x itself"]


class Views(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x)
        return y.flatten(1).flatten(0).view(4, 6).reshape(4, 6).unsqueeze(0).squeeze(0) + 1


VIEWS_AFTER = """\
graph(%x : Float(2, 3, 4)):
  %relu : Float(2, 3, 4) = aten::relu(%x)
  %view_5 : Float(4, 6) = aten::view(%relu, [4, 6])
  %add : Float(4, 6) = aten::add(%view_5, 1)
  return (%add)"""


def test_view_chains_collapse_into_one_view(run_passes):
    result = run_passes(Views().eval(), (torch.randn(2, 3, 4),), "simplify", "dead_code_elimination")
    assert sum(result.before.count(f"aten::{op}(") for op in ("view", "flatten", "reshape", "unsqueeze")) >= 4
    assert result.after == VIEWS_AFTER
    assert result.fired("simplify")["view_chain"] >= 1
    assert result.error() <= TOLERANCE


class Permutes(torch.nn.Module):
    def forward(self, x):
        y = torch.relu(x)
        cancelled = y.transpose(1, 2).transpose(1, 2)
        composed = y.permute(0, 2, 1).permute(2, 0, 1)
        return cancelled + composed.sum(0).unsqueeze(1)


PERMUTES_AFTER = """\
graph(%x : Float(2, 3, 4)):
  %relu : Float(2, 3, 4) = aten::relu(%x)
  %permute_2 : Float(3, 2, 4) = aten::permute(%relu, [1, 0, 2])
  %sum_1 : Float(2, 4) = aten::sum(%permute_2, [0])
  %unsqueeze : Float(2, 1, 4) = aten::unsqueeze(%sum_1, 1)
  %add : Float(2, 3, 4) = aten::add(%relu, %unsqueeze)
  return (%add)"""


def test_transposes_that_cancel_are_removed_and_permutes_compose(run_passes):
    result = run_passes(Permutes().eval(), (torch.randn(2, 3, 4),), "simplify", "dead_code_elimination")
    assert result.after == PERMUTES_AFTER
    assert result.fired("simplify") == {"permute_chain": 2}
    assert result.error() <= TOLERANCE


class Conv1D(torch.nn.Module):
    """HF transformers' GPT-2 ``Conv1D``: ``addmm(b, x, W)`` with ``W`` (in, out); then a matmul without bias."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.randn(6, 8)), torch.nn.Parameter(torch.randn(8))
        self.proj = torch.nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        h = torch.addmm(self.bias, x.view(-1, 6), self.weight).view(x.shape[0], x.shape[1], 8)
        return torch.relu(h).view(-1, 8) @ self.proj


CONV1D_AFTER = """\
graph(%x : Float(2, 3, 6)):
  %bias : Float(8) = prim::Constant[value=<Tensor>]()
  %weight_t : Float(8, 6) = prim::Constant[value=<Tensor>]()
  %linear_1 : Float(2, 3, 8) = aten::linear(%x, %weight_t, %bias)
  %relu : Float(2, 3, 8) = aten::relu(%linear_1)
  %view_2 : Float(6, 8) = aten::view(%relu, [-1, 8])
  %proj_t : Float(4, 8) = prim::Constant[value=<Tensor>]()
  %linear_2 : Float(6, 4) = aten::linear(%view_2, %proj_t)
  return (%linear_2)"""


def test_a_matmul_with_a_constant_weight_becomes_a_linear_of_the_unflattened_input(run_passes):
    result = run_passes(Conv1D().eval(), (torch.randn(2, 3, 6),), "freeze_params", "simplify", "dead_code_elimination")
    assert "aten::addmm" in result.before and "aten::matmul" in result.before
    assert result.after == CONV1D_AFTER
    assert result.fired("simplify") == {"linear_from_matmul": 2, "linear_of_flattened": 1}
    assert result.error() <= TOLERANCE


class MergedHeadsProjection(torch.nn.Module):
    """GPT-2's attention output: the heads ``(B, T, H, D)`` flattened to rows of ``H * D`` for ``Conv1D``'s
    addmm, then viewed back to ``(B, T, N)`` and added to the residual stream."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.randn(8, 5)), torch.nn.Parameter(torch.randn(5))

    def forward(self, heads, residual):
        b, t = heads.shape[:2]
        return torch.addmm(self.bias, heads.reshape(-1, 8), self.weight).view(b, t, 5) + residual


MERGED_HEADS_AFTER = """\
graph(%heads : Float(2, 3, 2, 4),
      %residual : Float(2, 3, 5)):
  %bias : Float(5) = prim::Constant[value=<Tensor>]()
  %weight_t : Float(5, 8) = prim::Constant[value=<Tensor>]()
  %flatten : Float(2, 3, 8) = aten::flatten(%heads, 2, 3)
  %linear_1 : Float(2, 3, 5) = aten::linear(%flatten, %weight_t, %bias)
  %add : Float(2, 3, 5) = aten::add(%linear_1, %residual)
  return (%add)"""


def test_a_linear_of_merged_heads_reads_them_flattened_in_place_of_rows(run_passes):
    inputs = (torch.randn(2, 3, 2, 4), torch.randn(2, 3, 5))
    result = run_passes(MergedHeadsProjection().eval(), inputs, "freeze_params", "simplify", "dead_code_elimination")
    assert result.after == MERGED_HEADS_AFTER
    assert result.fired("simplify") == {"linear_from_matmul": 1, "linear_of_flattened": 1}
    assert result.error() <= TOLERANCE


class ProductOfInputs(torch.nn.Module):
    def forward(self, x, y):
        return x @ y


def test_a_matmul_of_two_computed_tensors_stays_and_is_no_miss(run_passes):
    result = run_passes(ProductOfInputs().eval(), (torch.randn(3, 4), torch.randn(4, 5)), "simplify")
    assert "aten::matmul(%x, %y)" in result.after and not result.misses


class ScaledAddmm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(torch.randn(4, 5)), torch.nn.Parameter(torch.randn(5))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight, beta=0.5)


def test_an_addmm_that_scales_is_a_linear_plus_its_scaled_term(run_passes):
    result = run_passes(ScaledAddmm().eval(), (torch.randn(3, 4),), "freeze_params", "simplify")
    assert "aten::addmm" not in result.after and "aten::linear(%x" in result.after, result.after
    assert "aten::mul(%bias, 0.5)" in result.after and "aten::add(%linear, %term_scaled)" in result.after
    assert result.fired("simplify") == {"product_plus_term": 1, "linear_from_matmul": 1}
    assert not result.misses  # the node it would be a miss of is gone
    assert result.error() <= TOLERANCE


class EagerAttention(torch.nn.Module):
    """HF's eager attention: the softmax asked for in float32, then cast back to the queries' dtype."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
        weights = torch.nn.functional.softmax(q @ k.transpose(-1, -2) * 0.125, dim=-1, dtype=torch.float32)
        return weights.to(q.dtype) @ v


def test_a_softmax_asked_for_in_its_own_dtype_is_a_softmax(run_passes):
    result = run_passes(EagerAttention().eval(), (torch.randn(2, 8, 16),), "freeze_params", "simplify")
    assert "torch.float32" in result.before and "torch.float32" not in result.after, result.after
    assert result.fired("simplify")["softmax_own_dtype"] == 1
    assert result.error() <= TOLERANCE
    opt = pyrys.optimize(EagerAttention().eval(), (torch.randn(2, 8, 16),))
    assert "torch::" not in opt.program_text(), opt.program_text()


def test_a_norm_training_for_good_reads_no_running_statistics(run_passes):
    """Its running statistics are only updated in place (an update inference drops): without them a call writes
    no constant.  A BatchNorm whose flag is not frozen keeps them (it may be called in eval mode)."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.InstanceNorm2d(3, track_running_stats=True)).train()
    x = torch.randn(2, 3, 4, 4)
    result = run_passes(model, (x,), "freeze_params", "freeze_flags", "simplify")
    assert result.fired("simplify")["training_norm_stats"] == 2
    norms = [line for line in result.after.splitlines() if "_norm(" in line]
    assert len(norms) == 2 and not any("running" in line for line in norms) and result.error() <= TOLERANCE
    unfrozen = run_passes(model[:1], (x,), "freeze_params", "simplify", freeze_flags=())  # its flag read at call
    assert "training_norm_stats" not in unfrozen.fired("simplify")
    assert all("running_var" in line for line in unfrozen.after.splitlines() if "batch_norm(" in line)


def test_string_conv_padding_is_spelled_out(run_passes):
    """``padding="same"`` or ``"valid"`` ran as a torch fallback on every way in; an even kernel's "same" pads
    one more at the end than the start: a zero pad before the conv, as torch has it (legalize folds it in)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding="same", dilation=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 2, 4, padding="same")).eval()
    x = torch.randn(1, 3, 9, 9)
    result = run_passes(model, (x,), "freeze_params", "simplify")
    assert result.fired("simplify")["explicit_conv_padding"] == 2 and "[2, 2], [2, 2], 1)" in result.after
    assert "aten::constant_pad_nd(%relu, [0, 1, 0, 1])" in result.after and not result.misses
    assert result.error() <= TOLERANCE
    opt = pyrys.optimize(model, (x,))
    assert sum("= dnnl::conv2d" in line for line in opt.program_text().splitlines()) == 2
    assert "torch::" not in opt.program_text()
