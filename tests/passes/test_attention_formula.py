"""simplify's attention_from_formula rule: attention written out becomes scaled_dot_product_attention."""
import math

import torch

import pyrys
from tests.conftest import TOLERANCE


class Written(torch.nn.Module):
    """BERT's attention as its authors wrote it: q k^T / sqrt(d) + mask, softmax, times v."""

    def __init__(self, scale="div", mask=True, transpose_key=True):
        super().__init__()
        self.scale, self.mask, self.transpose_key = scale, mask, transpose_key

    def forward(self, q, k, v, mask):
        k_t = k.transpose(-1, -2) if self.transpose_key else k
        scores = q @ k_t
        if self.scale == "div":
            scores = scores / math.sqrt(q.shape[-1])
        elif self.scale == "mul":
            scores = 0.5 * scores
        if self.mask:
            scores = mask + scores
        return scores.softmax(-1) @ v


def inputs(key_rows=7):
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 7, 4, generator=g)
    k = torch.randn(2, 3, 7, 8, generator=g) if key_rows == 7 else torch.randn(2, 3, 8, 7, generator=g)
    mask = (torch.rand(2, 1, 1, 7, generator=g) > 0.3).float() * -1e4
    return q, k, v, mask


AFTER = """\
graph(%q : Float(2, 3, 5, 8),
      %k : Float(2, 3, 7, 8),
      %v : Float(2, 3, 7, 4),
      %mask : Float(2, 1, 1, 7)):
  %scaled_dot_product_attention : Float(2, 3, 5, 4) = aten::scaled_dot_product_attention(%q, %k, %v, %mask, scale=0.35355339059327373)
  return (%scaled_dot_product_attention)"""


def test_written_attention_becomes_one_attention_op(run_passes):
    result = run_passes(Written().eval(), inputs(), "simplify", "dead_code_elimination")
    assert result.after == AFTER
    assert result.fired("simplify") == {"attention_from_formula": 1}
    assert result.error() <= TOLERANCE


def test_every_spelling_of_scale_mask_and_key_is_taken(run_passes):
    for model, args in [(Written(scale="mul"), inputs()), (Written(scale=None), inputs()),
                        (Written(mask=False), inputs()), (Written(transpose_key=False), inputs(key_rows=8))]:
        result = run_passes(model.eval(), args, "simplify", "dead_code_elimination")
        assert result.fired("simplify").get("attention_from_formula") == 1, result.after
        assert "aten::softmax" not in result.after and result.error() <= TOLERANCE


class ScoresReadTwice(torch.nn.Module):
    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2) + mask
        return scores.softmax(-1) @ v + scores[..., :1]


class SoftmaxOverQueries(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return (q @ k.transpose(-1, -2)).softmax(-2) @ v


class MaskOfMoreDims(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return (q @ k.transpose(-1, -2) + mask.expand(2, 2, 3, 5, 7)).softmax(-1) @ v


def test_what_is_not_attention_stays(run_passes):
    for model in (ScoresReadTwice(), SoftmaxOverQueries(), MaskOfMoreDims()):
        result = run_passes(model.eval(), inputs(), "simplify")
        assert "attention_from_formula" not in result.fired("simplify") and "aten::softmax" in result.after
        assert result.error() <= TOLERANCE


def test_the_dnnl_program_runs_it_as_one_attention_against_eager():
    model = Written().eval()
    args = inputs()
    opt = pyrys.optimize(model, args)
    assert pyrys.relative_error(opt(*args), model(*args)) <= TOLERANCE
    text = opt.program_text()
    assert "dnnl::softmax" in text and "# fallback" not in text, text
