"""The inner-product kernel a float32 linear gets on CPUs without AVX-512: the faster of oneDNN's two,
measured once per shape and kept in the tuning cache."""
from __future__ import annotations

import pytest
import torch

import pyrys
from pyrys.backends.dnnl import linear_kernels
from tests.conftest import TOLERANCE


@pytest.fixture
def avx2_cpu(monkeypatch, tmp_path):
    if "dnnl" not in pyrys.available_backends():
        pytest.skip("the dnnl backend is not available")
    monkeypatch.setattr(linear_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setenv("PYRYS_CACHE_DIR", str(tmp_path))


def timed(monkeypatch, brgemm: float, gemm: float) -> list:
    """Make the measurement say ``brgemm`` seconds for oneDNN's choice, ``gemm`` for plain weights."""
    calls = []

    def seconds(engine, x_md, w_md, dst_md, bias_md):
        calls.append(w_md.format_summary())
        return brgemm if "any" in w_md.format_summary() else gemm

    monkeypatch.setattr(linear_kernels, "_seconds", seconds)
    return calls


def linear_line(opt) -> str:
    return next(line for line in opt.program_text().splitlines() if "dnnl::linear" in line)


@pytest.mark.parametrize("brgemm, gemm, plain", [(2.0, 1.0, True), (1.0, 2.0, False), (1.0, 0.97, False)])
def test_the_faster_kernel_is_chosen_and_kept(avx2_cpu, monkeypatch, brgemm, gemm, plain):
    calls = timed(monkeypatch, brgemm, gemm)
    model, x = torch.nn.Linear(64, 96).eval(), torch.randn(2, 40, 64)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert ("weights=ab," in linear_line(opt)) == plain, linear_line(opt)
    assert len(calls) == 2 and pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    again = pyrys.optimize(model, (x,), backend="dnnl")  # the tuning cache: not measured again
    assert len(calls) == 2 and ("weights=ab," in linear_line(again)) == plain


def test_small_row_counts_and_avx512_cpus_are_not_measured(avx2_cpu, monkeypatch):
    calls = timed(monkeypatch, 2.0, 1.0)
    pyrys.optimize(torch.nn.Linear(64, 96).eval(), (torch.randn(4, 64),), backend="dnnl")  # 4 rows
    monkeypatch.setattr(linear_kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    pyrys.optimize(torch.nn.Linear(64, 96).eval(), (torch.randn(64, 64),), backend="dnnl")
    assert calls == []


def test_both_kernels_really_run_and_agree(avx2_cpu):
    """Measured for real: whichever wins, the answer is eager's."""
    model, x = torch.nn.Linear(256, 512).eval(), torch.randn(128, 256)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
