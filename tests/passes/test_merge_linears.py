"""simplify's merge_sibling_linears rule: linears reading one input become one linear and a split."""
import pytest
import torch
import torch.nn as nn

from tests.conftest import TOLERANCE


class Projections(nn.Module):
    """Query, key and value projections of one input (widths 6, 6, 4), then attention without its softmax."""

    def __init__(self, bias=True, activation_on_value=False, mixed_bias=False):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k = nn.Linear(8, 6, bias=bias), nn.Linear(8, 6, bias=bias and not mixed_bias)
        self.v = nn.Linear(8, 4, bias=bias)
        self.activation_on_value = activation_on_value

    def forward(self, x):
        v = self.v(x)
        v = torch.relu(v) if self.activation_on_value else v
        return (self.q(x) @ self.k(x).transpose(-1, -2)) @ v


AFTER = """\
graph(%x : Float(2, 3, 8)):
  %merged_weight : Float(16, 8) = prim::Constant[value=<Tensor>]()
  %merged_bias : Float(16) = prim::Constant[value=<Tensor>]()
  %merged_linear : Float(2, 3, 16) = aten::linear(%x, %merged_weight, %merged_bias)
  %split : (Float(2, 3, 4), Float(2, 3, 6), Float(2, 3, 6)) = aten::split_with_sizes(%merged_linear, [4, 6, 6], -1)
  %linear_part : Float(2, 3, 4) = prim::TupleIndex(%split, 0)
  %linear_1_part : Float(2, 3, 6) = prim::TupleIndex(%split, 1)
  %linear_2_part : Float(2, 3, 6) = prim::TupleIndex(%split, 2)"""


def test_linears_of_one_input_become_one_linear_and_a_split(run_passes):
    result = run_passes(Projections().eval(), (torch.randn(2, 3, 8),), "freeze_params", "simplify",
                        "dead_code_elimination")
    assert result.after.startswith(AFTER), result.after
    assert result.fired("simplify")["merge_sibling_linears"] == 1
    assert result.error() <= TOLERANCE


def test_without_biases_they_merge_too(run_passes):
    result = run_passes(Projections(bias=False).eval(), (torch.randn(2, 3, 8),), "freeze_params", "simplify")
    assert result.fired("simplify")["merge_sibling_linears"] == 1 and "merged_bias" not in result.after
    assert result.error() <= TOLERANCE


def test_a_linear_whose_activation_would_fuse_stays_apart(run_passes):
    result = run_passes(Projections(activation_on_value=True).eval(), (torch.randn(2, 3, 8),), "freeze_params",
                        "simplify", "dead_code_elimination")
    assert result.fired("simplify")["merge_sibling_linears"] == 1
    assert "Float(2, 3, 12) = aten::linear" in result.after and "Float(2, 3, 4) = aten::linear" in result.after
    assert result.error() <= TOLERANCE


def test_a_bias_on_some_but_not_all_keeps_them_apart(run_passes):
    result = run_passes(Projections(mixed_bias=True).eval(), (torch.randn(2, 3, 8),), "freeze_params", "simplify")
    assert "merge_sibling_linears" not in result.fired("simplify")
    assert result.error() <= TOLERANCE


class QueryKeyApartFromValue(nn.Module):
    """``nn.MultiheadAttention`` with one tensor for query and key and another for value (RT-DETR's AIFI)."""

    def __init__(self, batch_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.attention = nn.MultiheadAttention(64, 4, batch_first=batch_first)

    def forward(self, src, pos):
        q = k = src + pos
        return self.attention(q, k, value=src)[0]


@pytest.mark.parametrize("batch_first", [False, True])
def test_views_of_a_merged_part_read_it_whatever_its_strides(batch_first, backend):
    """A helper's find: at batch 2 the merged query/key part, a strided row of the merged output, met the view
    the model made of the contiguous linear (``q.view(L, B * H, D)``): torch's "Cannot view" from the pass."""
    import pyrys

    model = QueryKeyApartFromValue(batch_first).eval()
    src, pos = torch.rand(4, 2, 64), torch.rand(4, 2, 64)
    opt = pyrys.optimize(model, (src, pos), backend=backend)
    with torch.no_grad():
        assert pyrys.relative_error(opt(src, pos), model(src, pos)) <= TOLERANCE


class HeadsThroughTransposes(nn.Module):
    """HF Longformer's self-attention: the projections viewed into heads through two transposes, then viewed
    again (valid on a linear's contiguous result, not on a strided part of a merged one)."""

    def __init__(self, heads: int = 2, width: int = 32):
        super().__init__()
        self.heads, self.q, self.k, self.v = heads, nn.Linear(width, width), nn.Linear(width, width), \
            nn.Linear(width, width)

    def forward(self, x):
        h = x.transpose(0, 1)
        length, batch, width = h.shape

        def split(t):
            return t.view(length, batch, self.heads, width // self.heads).transpose(0, 1).transpose(1, 2) \
                .view(batch * self.heads, length, width // self.heads)

        scores = torch.bmm(split(self.q(h)), split(self.k(h)).transpose(1, 2)).softmax(-1)
        return torch.bmm(scores, split(self.v(h)))


def test_views_reached_through_transposes_of_a_merged_part_read_it_too(run_passes):
    """A helper's find: only views of a part itself became reshapes; one after a transpose kept its "Cannot view"
    (Longformer, through ``optimize`` and ``torch.compile`` alike)."""
    torch.manual_seed(0)
    result = run_passes(HeadsThroughTransposes().eval(), (torch.rand(2, 16, 32),), "freeze_params", "simplify",
                        "dead_code_elimination")
    assert result.fired("simplify")["merge_sibling_linears"] == 1
    assert result.error() <= TOLERANCE
