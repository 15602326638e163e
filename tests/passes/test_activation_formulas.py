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
    ops = [line.split(" = ", 1)[1] for line in result.after.splitlines() if " = " in line]
    assert ops == ["aten::relu(%x)", "aten::sub(%relu, 0.5)", op]  # nothing of the formula left
    assert result.error() <= TOLERANCE


class FrozenHalf(torch.nn.Module):
    """The 0.5 of an erf GELU as a buffer: a constant number after freezing."""

    def __init__(self):
        super().__init__()
        self.register_buffer("one_half", torch.tensor(0.5))

    def forward(self, x):
        x = torch.relu(x) - 0.5
        return x * self.one_half * (1.0 + torch.erf(x / math.sqrt(2.0)))


def test_a_number_held_as_a_constant_tensor_counts_as_a_number(run_passes):
    result = run_passes(FrozenHalf().eval(), (torch.randn(2, 8, 16),), "freeze_params", "simplify")
    assert result.fired("simplify") == {"activation_from_formula": 1} and "aten::gelu(%sub)" in result.after
    assert result.error() <= TOLERANCE


def test_a_bfloat16_formula_becomes_a_bfloat16_op(run_passes):
    result = run_passes(Formula(GELU_NEW).eval(), (torch.randn(2, 8, 16, dtype=torch.bfloat16),), "simplify")
    assert result.fired("simplify") == {"activation_from_formula": 1}
    assert "BFloat16(2, 8, 16) = aten::gelu(%sub, approximate='tanh')" in result.after
    assert result.error() <= 2e-2


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


NOT_FORMULAS = {  # each: (formula, what must stay of it)
    "another constant": (lambda x: 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.0447 * torch.pow(x, 3.0)))),
                         "aten::tanh"),
    "two tensors": (lambda x: x * torch.sigmoid(x.flip(-1)), "aten::sigmoid"),
    "no curve": (lambda x: 0.5 * x * (x + 1), "aten::mul"),
    "a broadcast constant": (lambda x: x * torch.sigmoid(x * torch.ones(16)), "aten::sigmoid"),
    # a SiLU inside each of these is one (and is rewritten); the whole is not
    "a rank-changing constant": (lambda x: x * torch.sigmoid(x) * torch.ones(1, 1, 1, 1), "aten::mul(%silu"),
    "a bump between probe points": (lambda x: x * torch.sigmoid(x) + torch.exp(-20 * (x - 15) ** 2), "aten::exp"),
    "NaN at 0": (lambda x: x * torch.sigmoid(x) * x / x, "aten::div"),
    "float32 cancellation": (lambda x: (x + 1e8) - 1e8 - x + x * torch.sigmoid(x), "aten::add(%sub, 100000000.0)"),
}


@pytest.mark.parametrize("name", NOT_FORMULAS)
def test_what_is_not_exactly_an_activation_stays(run_passes, name):
    formula, kept = NOT_FORMULAS[name]
    result = run_passes(Formula(formula).eval(), (torch.randn(2, 8, 16),), "freeze_params", "simplify")
    assert kept in result.after
    assert result.error() <= TOLERANCE


def test_a_formula_read_elsewhere_too_keeps_what_is_read(run_passes):
    def formula(x):
        inner = torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0)))
        return 0.5 * x * (1.0 + inner) + inner

    result = run_passes(Formula(formula).eval(), (torch.randn(2, 8, 16),), "simplify")
    assert result.fired("simplify") == {"activation_from_formula": 1}
    assert "aten::gelu(%sub, approximate='tanh')" in result.after and "aten::tanh" in result.after
    assert result.error() <= TOLERANCE
