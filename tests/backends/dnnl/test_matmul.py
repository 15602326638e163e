"""Matrix products of computed tensors (``mm``, ``bmm``, ``matmul``) run as oneDNN matmuls with their
post-ops fused (``pyrys::matmul``, ``backends/dnnl/lower_matmul.py``), match eager, and fall back to torch
with a reason where oneDNN cannot run them."""
from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrys
from pyrys.backends.dnnl import binding
from pyrys.machine import native_bf16
from pyrys.numerics import BF16_TOLERANCE, relative_error
from tests.conftest import TOLERANCE

available, reason = binding.is_available()
pytestmark = pytest.mark.skipif(not available, reason=f"oneDNN unavailable: {reason}")


def rand(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Product(nn.Module):
    """``fn(a, b)`` of two computed tensors (each a linear of an input, so neither is a graph input)."""

    def __init__(self, fn, a_width=8, b_width=8):
        super().__init__()
        torch.manual_seed(0)
        self.fn, self.a, self.b = fn, nn.Linear(a_width, a_width), nn.Linear(b_width, b_width)
        self.eval()

    def forward(self, a, b):
        return self.fn(self.a(a), self.b(b))


class ConstantStack(nn.Module):
    """``x @ W`` with ``W`` a constant stack of matrices (not a linear's weight)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("stack", torch.randn(3, 8, 5))

    def forward(self, x):
        return torch.matmul(x.relu(), self.stack)


CASES = {
    "mm": (Product(torch.mm), (rand(6, 8), rand(8, 8, seed=2))),
    "bmm": (Product(torch.bmm), (rand(2, 6, 8), rand(2, 8, 8, seed=2))),
    "bmm with a transposed operand": (Product(lambda a, b: torch.bmm(a, b.transpose(1, 2))),
                                      (rand(2, 6, 8), rand(2, 5, 8, seed=2))),
    "matmul 4-D": (Product(torch.matmul), (rand(2, 3, 6, 8), rand(2, 3, 8, 8, seed=2))),
    "matmul, batch dims broadcast": (Product(torch.matmul), (rand(2, 1, 6, 8), rand(1, 3, 8, 8, seed=2))),
    "matmul of a 3-D and a 2-D activation": (Product(torch.matmul), (rand(2, 6, 8), rand(8, 8, seed=2))),
    "matmul of a 2-D and a 4-D activation": (Product(torch.matmul), (rand(6, 8), rand(2, 3, 8, 8, seed=2))),
    "x @ x^T of one tensor": (Product(lambda a, b: a @ a.transpose(-1, -2) + b.sum()),
                              (rand(2, 6, 8), rand(8, seed=2))),
    "matmul of a constant stack": (ConstantStack(), (rand(3, 4, 8),)),
}


def runs_in_onednn(opt) -> bool:
    text = opt.program_text()
    return "dnnl::matmul" in text and not any(f"torch::{op}(" in text for op in ("mm", "bmm", "matmul"))


@pytest.mark.parametrize("name", list(CASES))
def test_a_product_runs_as_a_onednn_matmul_and_matches_eager(name):
    model, args = CASES[name]
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE, name
    assert runs_in_onednn(opt), opt.program_text()


@pytest.mark.parametrize("name", ["bmm", "matmul 4-D", "matmul, batch dims broadcast"])
def test_the_reference_backend_agrees(name):
    model, args = CASES[name]
    reference = pyrys.optimize(model, args, backend="reference")
    assert relative_error(reference(*args), model(*args)) <= TOLERANCE


POST_OPS = {
    "relu": (lambda a, b: torch.bmm(a, b).relu(), "dnnl::matmul_relu"),
    "gelu": (lambda a, b: F.gelu(torch.bmm(a, b)), "dnnl::matmul_gelu_erf"),
    "tanh-gelu then a residual": (lambda a, b: F.gelu(torch.bmm(a, b), approximate="tanh") + a,
                                  "dnnl::matmul_gelu_tanh_add"),
    "a computed mask": (lambda a, b: torch.bmm(a, b) + (a[:, :1, :] > 0).float() * -1e4, "dnnl::matmul_add"),
    "a product": (lambda a, b: torch.bmm(a, b) * b[:, :1, :].sigmoid(), "dnnl::matmul_mul"),
    "a scale, then a mask": (lambda a, b: torch.bmm(a, b) / 8 + (a[:, :1, :] > 0).float() * -1e4,
                             "dnnl::matmul_scale_add"),
    "a shift and a scale": (lambda a, b: (torch.bmm(a, b) - 0.5) * 3, "dnnl::matmul_shift_scale"),
}


@pytest.mark.parametrize("name", list(POST_OPS))
def test_post_ops_fuse_into_the_matmul(name):
    fn, label = POST_OPS[name]
    model, args = Product(fn), (rand(2, 8, 8), rand(2, 8, 8, seed=2))
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE, name
    assert label in opt.program_text(), opt.program_text()


def test_the_fused_form_is_in_the_printed_graph_and_counted(run_passes):
    model, args = Product(lambda a, b: F.gelu(torch.bmm(a, b))), (rand(2, 8, 8), rand(2, 8, 8, seed=2))
    result = run_passes(model, args, "freeze_params", "fuse_post_ops")
    assert "pyrys::matmul_gelu_erf(%linear, %linear_1)" in result.after, result.after
    assert result.fired("fuse_post_ops") == {"conv_activation": 1}
    assert result.error() <= TOLERANCE


@pytest.mark.parametrize("factor", [0.0, float("inf"), 1e-320])
def test_a_factor_of_zero_or_beyond_float_stays_an_op(run_passes, factor):
    model = Product(lambda a, b: 1 / (torch.bmm(a, b) * factor))
    result = run_passes(model, (rand(2, 8, 8), rand(2, 8, 8, seed=2)), "freeze_params", "fuse_post_ops")
    assert "scale" not in result.after and "aten::mul" in result.after, result.after
    assert any("stays an op" in miss.reason for miss in result.misses), result.misses


def test_a_product_with_a_vector_runs_in_torch_and_says_why():
    model, args = Product(torch.matmul), (rand(2, 6, 8), rand(8, seed=2))
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE
    assert "fallback: a product with a vector" in opt.program_text(), opt.program_text()


def test_a_new_shape_gets_its_own_matmul():
    model, args = CASES["bmm with a transposed operand"]
    opt = pyrys.optimize(model, args, dynamic=True)
    for batch, rows in ((1, 3), (4, 7)):
        other = (rand(batch, rows, 8, seed=batch), rand(batch, 5, 8, seed=rows))
        assert relative_error(opt(*other), model(*other)) <= TOLERANCE


def test_many_threads_get_their_own_results():
    model, args = CASES["matmul 4-D"]
    opt = pyrys.optimize(model, args)
    inputs = [(rand(2, 3, 6, 8, seed=i), rand(2, 3, 8, 8, seed=100 + i)) for i in range(8)]
    expected = [model(*x) for x in inputs]
    errors = []

    def call(i):
        for _ in range(20):
            if relative_error(opt(*inputs[i]), expected[i]) > TOLERANCE:
                errors.append(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.skipif(not native_bf16(), reason="the CPU has no native bf16 (avx512_bf16, amx_bf16)")
def test_a_bf16_product_of_bf16_activations():
    model, args = Product(lambda a, b: F.gelu(torch.matmul(a, b.transpose(-1, -2)))), (rand(2, 16, 8), rand(2, 16, 8))
    opt = pyrys.optimize(model, args, precision="bf16")
    assert relative_error(opt(*args), model(*args)) <= BF16_TOLERANCE
    assert "dnnl::matmul_gelu_erf" in opt.program_text(), opt.program_text()


def test_int8_keeps_a_product_of_activations_in_floating_point_and_says_why():
    model, args = Product(torch.bmm), (rand(2, 8, 8), rand(2, 8, 8, seed=2))
    samples = [(rand(2, 8, 8, seed=s), rand(2, 8, 8, seed=s + 50)) for s in range(4)]
    opt = pyrys.optimize(model, args, precision="int8", calibration=samples)
    assert relative_error(opt(*args), model(*args)) <= 0.05
    assert "a product of two activations has no int8 lowering here" in opt.report(), opt.report()


class Baddbmm(nn.Module):
    def __init__(self, beta=1.0, alpha=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.beta, self.alpha, self.a, self.b = beta, alpha, nn.Linear(8, 8), nn.Linear(8, 8)
        self.eval()

    def forward(self, a, b, c):
        return torch.baddbmm(c, self.a(a), self.b(b).transpose(1, 2), beta=self.beta, alpha=self.alpha)


@pytest.mark.parametrize("beta, alpha, label", [(1.0, 1.0, "dnnl::matmul_add"), (0.5, 0.125, "dnnl::matmul_scale_add"),
                                                (0.0, 2.0, "dnnl::matmul_scale[")])
def test_baddbmm_is_a_matmul_with_its_factors_and_term_as_post_ops(beta, alpha, label):
    model, args = Baddbmm(beta, alpha), (rand(2, 6, 8), rand(2, 5, 8, seed=2), rand(2, 6, 5, seed=3))
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE
    text = opt.program_text()
    if "oneDNN runs this matmul only in its reference code" in text:  # AVX2: scale and add on oneDNN 3.2's ref
        assert label.replace("dnnl::", "torch::").rstrip("[") in text, text
    else:
        assert label in text and runs_in_onednn(opt), text


def test_baddbmm_with_beta_zero_does_not_read_its_term():
    model, args = Baddbmm(beta=0.0), (rand(2, 6, 8), rand(2, 5, 8, seed=2), torch.full((2, 6, 5), float("nan")))
    opt = pyrys.optimize(model, args)
    assert not opt(*args).isnan().any() and torch.equal(opt(*args).isnan(), model(*args).isnan())


def test_baddbmm_with_alpha_zero_stays_as_it_is(run_passes):
    model, args = Baddbmm(alpha=0.0), (rand(2, 6, 8), rand(2, 5, 8, seed=2), rand(2, 6, 5, seed=3))
    result = run_passes(model, args, "freeze_params", "simplify")
    assert "aten::baddbmm" in result.after and result.error() <= TOLERANCE


@pytest.mark.parametrize("beta, alpha", [(1e39, 1.0), (1.0, -1e39)])
def test_baddbmm_with_a_factor_beyond_float32_is_refused_as_eager_refuses_it(run_passes, beta, alpha):
    """Eager raises "value cannot be converted to type float without overflow"; a scale post-op would give inf."""
    model, args = Baddbmm(beta, alpha), (rand(2, 6, 8), rand(2, 5, 8, seed=2), rand(2, 6, 5, seed=3))
    result = run_passes(model, args, "freeze_params", "simplify")
    assert "aten::baddbmm" in result.after and "beyond float32" in str(result.misses), result.misses
    with pytest.raises(RuntimeError, match="overflow"):
        model(*args)
    with pytest.raises(RuntimeError, match="overflow"):
        pyrys.optimize(model, args)(*args)


def test_addmm_with_a_computed_bias_is_a_linear_and_an_add():
    class Addmm(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.weight, self.bias = nn.Parameter(torch.randn(8, 4)), nn.Linear(4, 4)

        def forward(self, x, c):
            return torch.addmm(self.bias(c), x, self.weight)

    model, args = Addmm().eval(), (rand(6, 8), rand(6, 4, seed=2))
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE
    assert "dnnl::linear_add" in opt.program_text() and "torch::addmm" not in opt.program_text(), opt.program_text()


def test_a_negative_factor_keeps_the_sign_of_zero():
    """``0 * -2`` is ``-0`` in eager, and ``1 / -0`` is ``-inf``: the factor is one multiply (oneDNN's pow
    with exponent 1), not ``x * c + 0``, which gave ``+0``."""
    model = Product(lambda a, b: 1 / (torch.bmm(a * 0, b) * -2))
    args = (rand(2, 6, 8), rand(2, 8, 8, seed=2))
    opt = pyrys.optimize(model, args)
    assert "dnnl::matmul_scale" in opt.program_text()
    assert torch.equal(opt(*args), model(*args)) and bool((model(*args) == -float("inf")).all())


class PlusOperand(nn.Module):
    """``relu(a @ b + c)`` with ``c`` a graph input of any shape that broadcasts to the product's."""

    def forward(self, a, b, c):
        return torch.relu((a + 0.1) @ (b * 0.5) + c)


@pytest.mark.parametrize("shape", [(9,), (7, 1), (7, 9), (1, 9), (2, 1, 1), (1, 7, 9), (2, 7, 1), (1, 1, 1), (2, 7, 9)])
def test_an_operand_of_any_broadcast_shape_fuses_into_a_onednn_matmul(shape):
    model, args = PlusOperand(), (rand(2, 7, 16), rand(2, 16, 9, seed=2), rand(*shape, seed=3))
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE
    assert "dnnl::matmul_add_relu" in opt.program_text() and runs_in_onednn(opt), opt.program_text()


class LinearPlusOperand(nn.Module):
    """``relu(linear(x) + c)`` on a 3-D ``x``, with ``c`` a graph input of any shape that broadcasts to it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 9)

    def forward(self, x, c):
        return torch.relu(self.linear(x) + c)


@pytest.mark.parametrize("shape", [(2, 1, 9), (1, 7, 9), (7, 9), (1, 7, 1), (2, 1, 1), (1, 1, 9), (9,), (2, 7, 1),
                                   (2, 7, 9)])
def test_an_operand_of_any_broadcast_shape_fuses_into_a_onednn_linear(shape):
    """A linear runs on its input's rows (leading dims flattened); an operand that broadcasts over some of them
    but not all was given to oneDNN as it was: a call at ``(2, 1, 9)`` erred 2.2 silently at a new shape (at
    the first, the compile's self-check fell back to torch).  It is broadcast to every row now."""
    model = LinearPlusOperand().eval()
    args = (rand(2, 7, 16), rand(*shape, seed=3))
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE
    assert "dnnl::linear_add_relu" in opt.program_text() and "torch::" not in opt.program_text(), opt.program_text()
    full = pyrys.optimize(model, (rand(2, 7, 16), rand(*(2, 7, 9)[3 - len(shape):], seed=4)))  # a new shape of it
    assert relative_error(full(*args), model(*args)) <= TOLERANCE


@pytest.mark.parametrize("rank", [3, 4])
def test_a_result_read_transposed_runs_in_onednn(rank):
    batch = (2,) if rank == 3 else (2, 3)
    model = Product(lambda a, b: torch.relu(a @ b.transpose(-1, -2)).transpose(-1, -2) + 1)
    args = (rand(*batch, 7, 8), rand(*batch, 9, 8, seed=2))
    opt = pyrys.optimize(model, args)
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE
    assert runs_in_onednn(opt), opt.program_text()


def test_scale_and_shift_post_ops_keep_nan_infinities_and_signed_zeros():
    class Identity(nn.Module):  # a @ I is a exactly, so the special values reach the post-ops
        def forward(self, a, eye):
            return (torch.bmm(a * 1.0, eye) * -2.5 + 1.5) * 0.5

    values = torch.tensor([math.nan, -math.inf, math.inf, 0.0, -0.0, -1.0, 1e-30, -3e38, 3e38, 0.6])
    a, eye = values.reshape(1, 1, -1).expand(1, 10, 10).contiguous(), torch.eye(10).reshape(1, 10, 10)
    model = Identity()
    opt = pyrys.optimize(model, (a, eye))
    assert "dnnl::matmul_scale_shift_scale" in opt.program_text(), opt.program_text()
    got, want = opt(a, eye), model(a, eye)
    assert torch.equal(got.isnan(), want.isnan())
    same = got[~want.isnan()] == want[~want.isnan()]
    assert bool(same.all()) and torch.equal(torch.signbit(got[~want.isnan()]), torch.signbit(want[~want.isnan()]))


class ReleasedConstantOperands(nn.Module):
    """A constant added after a product and after a linear (a position embedding): both packed as post-op
    operands, the graph's copies released, then expanded again for another batch size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.linear = nn.Linear(8, 8), nn.Linear(8, 8)
        self.register_buffer("scores_bias", torch.randn(1, 5, 5))
        self.register_buffer("positions", torch.randn(5, 8))

    def forward(self, x):
        q = self.q(x)
        return torch.bmm(q, q.transpose(1, 2)) + self.scores_bias, self.linear(x) + self.positions


@pytest.mark.parametrize("dynamic", [True, None])
def test_released_constant_operands_serve_every_new_batch_size(dynamic):
    model = ReleasedConstantOperands().eval()
    opt = pyrys.optimize(model, (rand(1, 5, 8),), dynamic=dynamic)
    for batch in (1, 3, 2):
        x = rand(batch, 5, 8, seed=batch)
        for out, expected in zip(opt(x), model(x)):
            assert relative_error(out, expected) <= TOLERANCE


@pytest.mark.skipif(not native_bf16(), reason="the CPU has no native bf16 (avx512_bf16, amx_bf16)")
def test_a_bf16_residual_does_not_move_a_product_of_float32_activations_to_bf16():
    class Angles(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(16, 16)

        def forward(self, t, f, h):
            bf16_residual = self.linear(h)
            return torch.cos(torch.matmul(t, f) + bf16_residual)  # t: positions up to 1000, as RoPE's angles

    model = Angles().eval()
    args = ((torch.arange(64.0) * 15.7 + 0.3).reshape(1, 64, 1), rand(1, 1, 16, seed=1).abs() + 0.5, rand(1, 64, 16))
    opt = pyrys.optimize(model, args, precision="bf16", accuracy_budget=None)
    assert relative_error(opt(*args), model(*args)) <= BF16_TOLERANCE
    line = next(line for line in opt.program_text().splitlines() if "dnnl::matmul" in line)
    assert "(%t, %f" in line, line  # read as they are, in float32


def test_addmm_with_a_factor_that_is_zero_in_float32_does_not_read_its_term():
    class Addmm(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x, c):
            return torch.addmm(c * float("inf"), self.a(x), self.b(x), beta=1e-50)

    model, args = Addmm().eval(), (rand(8, 8), rand(8, 8, seed=2))
    opt = pyrys.optimize(model, args)
    assert not model(*args).isnan().any() and not opt(*args).isnan().any()
    assert relative_error(opt(*args), model(*args)) <= TOLERANCE


@pytest.mark.parametrize("op", ["x / 1e39", "x - 1e-46", "x + 1e-46", "x * 1e-50"])
def test_a_number_torch_reads_as_inf_or_zero_stays_torch(op):
    """Eager reads a Python number as float32: ``x / 1e39`` divides by inf (NaN for inf, -0 for -x), and
    ``x - 1e-46`` subtracts -0 (oneDNN's primitive cache does not tell a term of -0 from +0)."""
    fn = {"x / 1e39": lambda y: y / 1e39, "x - 1e-46": lambda y: y - 1e-46, "x + 1e-46": lambda y: y + 1e-46,
          "x * 1e-50": lambda y: y * 1e-50}[op]
    model = Product(lambda a, b: fn(torch.bmm(a, b)))
    model.a, model.b = nn.Identity(), nn.Identity()  # a @ 1 is a: the special values reach the op
    special = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e30, -3.0, 1.0, 2.0]).reshape(1, 8, 1)
    args = (special, torch.ones(1, 1, 1))
    opt = pyrys.optimize(model, args)
    got, want = opt(*args), model(*args)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])
    assert torch.equal(torch.signbit(got[~want.isnan()]), torch.signbit(want[~want.isnan()]))
    assert "stays an op" in " ".join(m.reason for m in opt.misses) or "torch computes it" in opt.program_text()
