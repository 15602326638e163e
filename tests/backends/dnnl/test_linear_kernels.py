"""The inner-product kernel a float32 linear gets on CPUs without AVX-512: the faster of oneDNN's two,
measured once per shape and kept in the tuning cache."""
from __future__ import annotations

import json
import re
import time

import pytest
import torch

import pyrys
from pyrys.backends.dnnl import linear_kernels, measured
from pyrys.backends.threads import with_threads
from tests.conftest import TOLERANCE
from tests.models import Fn


@pytest.fixture
def avx2_cpu(monkeypatch, tmp_path):
    if "dnnl" not in pyrys.available_backends():
        pytest.skip("the dnnl backend is not available")
    monkeypatch.setattr(linear_kernels, "kernel_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(measured, "_DECIDED", {})  # this test's decisions only
    monkeypatch.setenv("PYRYS_CACHE_DIR", str(tmp_path))


def timed(monkeypatch, brgemm: float, gemm: float) -> list:
    """Make the measurement say ``brgemm`` seconds for oneDNN's choice, ``gemm`` for plain weights."""
    calls = []

    def seconds(engine, x_md, w_mds, dst_md, bias_md):
        calls.extend(md.format_summary() for md in w_mds)
        return [brgemm if "any" in md.format_summary() else gemm for md in w_mds]

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
    monkeypatch.setattr(linear_kernels, "kernel_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    pyrys.optimize(torch.nn.Linear(64, 96).eval(), (torch.randn(64, 64),), backend="dnnl")
    assert calls == []


def test_both_kernels_really_run_and_agree(avx2_cpu, tmp_path):
    """Measured for real (both times recorded in the tuning cache); whichever wins, the answer is eager's."""
    model, x = torch.nn.Linear(256, 512).eval(), torch.randn(128, 256)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE
    (record,) = (tmp_path / "linear_kernel").glob("*.json")
    measured = re.findall(r"([\d.]+) ms", json.loads(record.read_text())["value"]["measured"])
    assert len(measured) == 2 and all(float(ms) > 0 for ms in measured)


@pytest.mark.parametrize("brgemm, gemm", [(2.0, 1.0), (1.0, 2.0)])
def test_a_weight_is_packed_once_across_shapes_and_thread_counts(avx2_cpu, monkeypatch, brgemm, gemm):
    timed(monkeypatch, brgemm, gemm)
    model, x = torch.nn.Linear(64, 96).eval(), torch.randn(40, 64)
    opt = pyrys.optimize(model, (x,), backend="dnnl")
    packed = opt.memory()["packed_weights"]
    timed(monkeypatch, gemm, brgemm)  # another shape or thread count would measure the other way
    for y in (torch.randn(2, 64), torch.randn(60, 64)):  # fewer rows than measured; more rows
        assert pyrys.relative_error(opt(y), model(y)) <= TOLERANCE
    with_threads(1, opt, x)
    assert opt.memory()["packed_weights"] == packed


def test_post_ops_and_no_bias_on_both_kernels(avx2_cpu, monkeypatch):
    model = Fn(lambda m, x: torch.relu(m.a(x) + x) * torch.sigmoid(m.b(x)),
               a=torch.nn.Linear(32, 32, bias=False), b=torch.nn.Linear(32, 32)).eval()
    x = torch.randn(3, 20, 32)
    for brgemm, gemm in ((2.0, 1.0), (1.0, 2.0)):
        monkeypatch.setattr(measured, "_DECIDED", {})
        monkeypatch.setenv("PYRYS_CACHE_DIR", "")
        timed(monkeypatch, brgemm, gemm)
        opt = pyrys.optimize(model, (x,), backend="dnnl")
        assert pyrys.relative_error(opt(x), model(x)) <= TOLERANCE


def test_int8_and_bf16_linears_are_not_measured(avx2_cpu, monkeypatch):
    calls = timed(monkeypatch, 2.0, 1.0)
    model, x = torch.nn.Linear(64, 96).eval(), torch.randn(40, 64)
    pyrys.optimize(model.to(torch.bfloat16), (x.to(torch.bfloat16),), backend="dnnl")
    pyrys.optimize(torch.nn.Linear(64, 96).eval(), (x,), backend="dnnl", precision="int8", calibration=[x])
    assert calls == []


def test_long_calls_are_timed_in_fewer_rounds(monkeypatch):
    """Candidates that take long at the warm-up get :data:`measured.MIN_RUNS` rounds, short ones all ``runs``."""
    monkeypatch.setattr(measured, "MEASURE_SECONDS", 0.05)
    counts = {"long": 0, "short": 0}

    def call(kind: str, seconds: float):
        def run() -> None:
            counts[kind] += 1
            time.sleep(seconds)
        return run

    best = measured.best_seconds([call("long", 0.04), call("long", 0.0)], 5)
    assert counts["long"] == 2 * (1 + measured.MIN_RUNS) and best[0] >= 0.04 > best[1]
    monkeypatch.setattr(measured, "MEASURE_SECONDS", 60.0)  # however busy the machine, these are short
    measured.best_seconds([call("short", 0.0), call("short", 0.0)], 5)
    assert counts["short"] == 2 * (1 + 5)
