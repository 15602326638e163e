"""Activations written out as arithmetic become the one op they compute (passes/activation_formulas.py)."""
import math

import pytest
import torch

import pyrys
from tests.conftest import TOLERANCE


class Formula(torch.nn.Module):
    def __init__(self, formula):
        super().__init__()
        self.formula = formula

    def forward(self, x):
        return self.formula(torch.relu(x) - 0.5)  # x comes from an op, as after a linear


GELU_NEW = lambda x: 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))  # noqa: E731

FORMULAS = {
    "gelu_new (GPT-2)": (GELU_NEW, "aten::gelu(%sub, approximate='tanh')"),
    "tanh GELU, x*x*x, operands swapped": (
        lambda x: (torch.tanh((x * x * x * 0.044715 + x) * 0.7978845608028654) + 1) * x * 0.5,
        "aten::gelu(%sub, approximate='tanh')"),
    "erf GELU": (lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))), "aten::gelu(%sub)"),
    "erf GELU, divided by 2": (lambda x: x * (1.0 + torch.erf(x * (1 / math.sqrt(2.0)))) / 2, "aten::gelu(%sub)"),
    "SiLU": (lambda x: x * torch.sigmoid(x), "aten::silu(%sub)"),
}


@pytest.mark.parametrize("name", FORMULAS)
def test_a_written_out_activation_is_one_op(run_passes, name):
    formula, op = FORMULAS[name]
    result = run_passes(Formula(formula).eval(), (torch.randn(2, 8, 16),), "simplify")
    assert result.fired("simplify") == {"activation_from_formula": 1}
    lines = result.after.splitlines()
    assert lines[3].endswith(f" = {op}") and lines[4].startswith("  return (")  # nothing of the formula left
    assert len(lines) == 5
    assert result.error() <= TOLERANCE


def test_gpt2_mlp_fuses_its_gelu_into_the_first_linear():
    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.proj = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

        def forward(self, x):
            return self.proj(GELU_NEW(self.fc(x)))

    model, x = MLP().eval(), torch.randn(2, 5, 16)
    opt = pyrys.optimize(model, (x,))
    assert "pyrys::linear_gelu_tanh(%x, %fc_weight, %fc_bias)" in opt.graph
    with torch.no_grad():
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


NOT_FORMULAS = {
    "another constant": lambda x: 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.0447 * torch.pow(x, 3.0)))),
    "two tensors": lambda x: x * torch.sigmoid(x.flip(-1)),
    "no curve": lambda x: 0.5 * x * (x + 1),
    "a broadcast constant": lambda x: x * torch.sigmoid(x * torch.ones(16)),
}


@pytest.mark.parametrize("name", NOT_FORMULAS)
def test_what_is_not_exactly_an_activation_stays(run_passes, name):
    result = run_passes(Formula(NOT_FORMULAS[name]).eval(), (torch.randn(2, 8, 16),), "freeze_params", "simplify")
    assert result.fired("simplify").get("activation_from_formula", 0) == 0
    assert result.error() <= TOLERANCE


def test_a_formula_read_elsewhere_too_keeps_what_is_read(run_passes):
    def formula(x):
        inner = torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))
        return 0.5 * x * (1.0 + inner) + inner

    result = run_passes(Formula(formula).eval(), (torch.randn(2, 8, 16),), "simplify")
    assert result.fired("simplify") == {"activation_from_formula": 1}
    assert "aten::gelu(%sub, approximate='tanh')" in result.after and "aten::tanh" in result.after
    assert result.error() <= TOLERANCE
