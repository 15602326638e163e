"""bf16 and int8 linears with many rows run as oneDNN matmuls (``linear_primitive.as_matmul``): the same
numbers as the inner product within bf16/int8 tolerance, one packed copy of each weight whatever the shapes
that follow, and a saved program that rebuilds the same kernels."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn

import pyrys
from pyrys.backends.dnnl import binding, linear_primitive
from pyrys.machine import native_bf16
from pyrys.numerics import BF16_TOLERANCE, relative_error
from pyrys.quantization import vnni

available, reason = binding.is_available()
pytestmark = pytest.mark.skipif(not available, reason=f"oneDNN unavailable: {reason}")
needs_native_bf16 = pytest.mark.skipif(not native_bf16(), reason="the CPU has no native bf16 (avx512_bf16, amx_bf16)")
needs_vnni = pytest.mark.skipif(not vnni(), reason="the CPU has no VNNI or AMX int8 (int8 linears stay inner products)")
WIDTH, HIDDEN = 64, 256


class Block(nn.Module):
    """A transformer's MLP: linear, GELU, linear, the residual, layer norm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down, self.norm = nn.Linear(WIDTH, HIDDEN), nn.Linear(HIDDEN, WIDTH), nn.LayerNorm(WIDTH)
        self.eval()

    def forward(self, x):
        return self.norm(x + self.down(torch.nn.functional.gelu(self.up(x))))


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, length, WIDTH, generator=torch.Generator().manual_seed(seed))


def linear_lines(opt) -> list[str]:
    return [line for line in opt.program_text().splitlines() if "dnnl::linear" in line]


@needs_native_bf16
def test_a_bf16_linear_with_many_rows_runs_as_a_matmul_on_one_packed_copy():
    model, x = Block(), tokens(2, 50)  # 100 rows
    opt = pyrys.optimize(model, (x,), precision="bf16")
    lines = linear_lines(opt)
    assert len(lines) == 2 and all("as=matmul" in line for line in lines), "\n".join(lines)
    assert relative_error(opt(x), model(x)) <= BF16_TOLERANCE
    memory = opt.memory()
    assert memory["packed_weights"] == 2 * WIDTH * HIDDEN * 2  # both weights, in bfloat16, once
    assert memory["weights"] < WIDTH * HIDDEN  # their plain copies released (biases and norm stay)
    few = tokens(1, 3, seed=2)  # 3 rows: an inner product's case, but the weights are packed for matmul already
    assert relative_error(opt(few), model(few)) <= BF16_TOLERANCE
    assert opt.memory()["packed_weights"] == memory["packed_weights"]


@needs_native_bf16
def test_a_bf16_linear_with_few_rows_stays_an_inner_product():
    opt = pyrys.optimize(Block(), (tokens(1, linear_primitive.MATMUL_MIN_ROWS - 1),), precision="bf16")
    assert linear_lines(opt) and not any("as=matmul" in line for line in linear_lines(opt))


def test_float32_linears_stay_inner_products():
    opt = pyrys.optimize(Block(), (tokens(2, 50),))
    assert linear_lines(opt) and not any("as=matmul" in line for line in linear_lines(opt))


@needs_native_bf16
def test_a_saved_bf16_matmul_linear_loads_to_the_same_kernels_and_bits(tmp_path):
    model, x = Block(), tokens(2, 50)
    opt = pyrys.optimize(model, (x,), precision="bf16")
    pyrys.save(opt, tmp_path / "block")
    loaded = pyrys.load(tmp_path / "block")
    assert linear_lines(loaded) == linear_lines(opt)
    assert torch.equal(loaded(x), opt(x))


@needs_vnni
def test_an_int8_linear_with_many_rows_runs_as_a_matmul_and_loads_bitwise(tmp_path):
    model, x = Block(), tokens(2, 50)
    calibration = [(tokens(2, 50, seed=s),) for s in range(2, 8)]
    opt = pyrys.optimize(model, (x,), precision="int8", calibration=calibration)
    int8_lines = [line for line in linear_lines(opt) if "int8=" in line]
    assert int8_lines and all("as=matmul" in line for line in int8_lines), opt.program_text()
    assert relative_error(opt(x), model(x)) <= 5e-2
    assert opt.memory()["weights"] < WIDTH * HIDDEN  # the s8 weights' plain copies released
    pyrys.save(opt, tmp_path / "int8")
    loaded = pyrys.load(tmp_path / "int8")
    assert linear_lines(loaded) == linear_lines(opt) and torch.equal(loaded(x), opt(x))


@needs_native_bf16
def test_a_linear_whose_matmul_has_no_fast_kernel_is_an_inner_product(monkeypatch):
    lower_conv = importlib.import_module("pyrys.backends.dnnl.lower_conv")
    monkeypatch.setattr(lower_conv, "_matmul_linear_pd", lambda *args: None)
    model, x = Block(), tokens(2, 50)
    opt = pyrys.optimize(model, (x,), precision="bf16")
    assert linear_lines(opt) and not any("as=matmul" in line for line in linear_lines(opt))
    assert relative_error(opt(x), model(x)) <= BF16_TOLERANCE


def test_the_rule_follows_the_weight_s_packed_copy(monkeypatch):
    """A weight already packed for one primitive keeps it, whatever the rows; float32 never runs as matmul."""
    class Packed:
        def __init__(self, transposed: bool, plain: bool):
            self.transposed, self.plain = transposed, plain

        def layouts_of(self, tensor, plain=False):
            return ["md"] if (self.transposed if tensor.stride(0) == 1 else self.plain) else []

    monkeypatch.setattr(linear_primitive, "native_bf16", lambda: True)
    weight = torch.zeros(8, 4, dtype=torch.bfloat16)
    assert linear_primitive.as_matmul(64, weight, Packed(False, False))
    assert not linear_primitive.as_matmul(63, weight, Packed(False, False))
    assert linear_primitive.as_matmul(1, weight, Packed(True, False))
    assert not linear_primitive.as_matmul(1000, weight, Packed(False, True))
    assert not linear_primitive.as_matmul(1000, weight.float(), Packed(False, False))
    monkeypatch.setattr(linear_primitive, "native_bf16", lambda: False)
    assert not linear_primitive.as_matmul(1000, weight, Packed(False, False))


class OneByOne(nn.Module):
    """A ``1 -> 1`` linear over a transposed view: its weight is its own transpose, bytes and strides alike."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(1, 1)
        self.eval()

    def forward(self, x):
        return self.linear(torch.relu(x).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("dynamic", [None, True, False])
def test_a_one_by_one_weight_packed_for_an_inner_product_stays_one_at_a_new_shape(dynamic):
    """The first shape packs the ``1 x 1`` weight for its inner product; a new shape must not take that copy
    as packed for a matmul (``W^T`` has the same key), which oneDNN refused at run time."""
    model = OneByOne()
    opt = pyrys.optimize(model, (torch.randn(3, 1, 2, 2),), backend="dnnl", dynamic=dynamic)
    for batch in (3, 5, 40):
        x = torch.randn(batch, 1, 2, 2)
        assert relative_error(opt(x), model(x)) <= 1e-6
    assert all("as=matmul" not in line for compiled in opt._programs.values()
               for line in compiled.program.describe().splitlines() if "dnnl::linear" in line)
