"""End-to-end test of ``pyrys bench --quick`` on a tiny conv net; no timing assertions."""

from __future__ import annotations

import csv
import json
import sys
import types

import pytest
import torch
from torch import nn

import pyrys
from pyrys.bench import cli
from pyrys.bench.measure import TimingPlan, benchmark_model, error_vs_eager, rotated
from pyrys.bench.peers import Eager, InductorInt8, OnnxRuntimeInt8, Peer, default_peers, select_peers
from pyrys.bench.report import build_table
from pyrys.numerics import INT8_TOLERANCE

SYSTEMS = ["eager", "pyrys-dnnl", "pyrys-reference", "torchscript", "onnxruntime"]


class SmallConvNet(nn.Module):
    """conv-BN-ReLU, depthwise conv, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor]:
        return (torch.randn(batch_size, 3, 16, 16),)


class MissingPeer(Peer):
    name = "missing-peer"

    def available(self) -> tuple[bool, str]:
        return False, "missing-peer is not installed"


class BrokenPeer(Peer):
    name = "broken-peer"

    def prepare(self, model, inputs):
        raise RuntimeError("cannot compile this model")


@pytest.fixture
def small_model_module(monkeypatch):
    """A module ``bench_test_models`` so the test model is reachable as ``module:attr``."""
    module = types.ModuleType("bench_test_models")
    module.small_convnet = lambda: SmallConvNet()
    monkeypatch.setitem(sys.modules, "bench_test_models", module)
    return "bench_test_models:small_convnet"


@pytest.fixture
def bench_output(tmp_path, monkeypatch, small_model_module):
    """Run ``pyrys bench --quick`` with an unavailable and a broken peer added."""
    monkeypatch.setattr(cli, "default_peers", lambda threads: [*default_peers(threads), MissingPeer(threads),
                                                                BrokenPeer(threads)])
    systems = [*SYSTEMS, "missing-peer", "broken-peer"]
    argv = ["--quick", "--models", small_model_module, "--systems", *systems, "--threads", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    return tmp_path, systems


def test_writes_csv_json_and_png(bench_output):
    out, systems = bench_output
    assert (out / "bench.png").stat().st_size > 0
    with open(out / "bench.csv") as handle:
        assert [row["system"] for row in csv.DictReader(handle)] == systems
    data = json.loads((out / "bench.json").read_text())
    assert data["machine"]["threads"] == 1 and data["machine"]["cpu"]
    assert [row["system"] for row in data["rows"]] == systems


def test_writes_markdown_with_one_row_per_system_and_the_command(bench_output):
    out, systems = bench_output
    text = (out / "bench.md").read_text()
    command = text.splitlines()[0]  # the arguments main was given, not this process's (pytest's) own
    assert command.startswith("Command: `pyrys bench --quick --models ") and command.endswith(f"--out {out}`"), command
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in systems]
    assert [line.split("|")[1].strip() for line in table_rows] == systems
    assert "vs onnxruntime" in text or "onnxruntime" not in systems


def test_table_has_one_row_per_system(bench_output):
    out, systems = bench_output
    data = json.loads((out / "bench.json").read_text())
    assert build_table(data["rows"], data["machine"]).row_count == len(systems)


def test_systems_that_ran_agree_with_eager(bench_output):
    out, _ = bench_output
    rows = {row["system"]: row for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert rows["eager"]["status"] == "ok" and rows["eager"]["vs_eager"] == pytest.approx(1.0)
    ran = [row for row in rows.values() if row["status"] == "ok"]
    assert all(row["max_rel_error"] < pyrys.FP32_TOLERANCE and row["median_ms"] > 0 for row in ran)


def test_pyrys_runs_on_every_backend_that_loads(bench_output):
    out, _ = bench_output
    rows = {row["system"]: row for row in json.loads((out / "bench.json").read_text())["rows"]}
    for backend in ("dnnl", "reference"):
        row = rows[f"pyrys-{backend}"]
        if backend in pyrys.available_backends():
            assert row["status"] == "ok" and row["iterations"] > 0, row["note"]
        else:
            assert row["status"] == "skipped" and "not available" in row["note"]


def test_missing_and_broken_peers_leave_notes(bench_output):
    out, _ = bench_output
    rows = {row["system"]: row for row in json.loads((out / "bench.json").read_text())["rows"]}
    assert rows["missing-peer"]["status"] == "skipped"
    assert "not installed" in rows["missing-peer"]["note"]
    assert rows["broken-peer"]["status"] == "error"
    assert "cannot compile this model" in rows["broken-peer"]["note"]


def test_benchmark_model_times_every_available_system():
    model = SmallConvNet().eval()
    plan = TimingPlan(rounds=2, warmup_s=0.0, block_s=0.0, min_iters=2)
    results = benchmark_model([Eager(1), MissingPeer(1)], model, model.example_inputs(1), plan)
    assert [len(r.samples_s) for r in results] == [4, 0]
    assert all(r.runner is None for r in results)


def test_select_peers_keeps_eager_and_rejects_unknown_names():
    peers = default_peers(1)
    assert [p.name for p in select_peers(peers, ["onnxruntime"])] == ["eager", "onnxruntime"]
    # the unguarded systems (accuracy_budget=None) run when named, or with "all"
    assert not any("unguarded" in p.name for p in select_peers(peers, []))
    assert [p.name for p in select_peers(peers, ["all"]) if "unguarded" in p.name] == [
        "pyrys-dnnl-bf16-unguarded", "pyrys-dnnl-int8-unguarded"]
    assert [p.name for p in select_peers(peers, ["pyrys-dnnl-int8-unguarded"])] == ["eager", "pyrys-dnnl-int8-unguarded"]
    with pytest.raises(ValueError, match="unknown systems"):
        select_peers(peers, ["no-such-system"])


def test_error_vs_eager_is_pyrys_relative_error_on_any_output_form():
    reference = torch.tensor([100.0, -200.0])
    assert error_vs_eager((reference + 2.0).numpy(), reference) == pytest.approx(0.01)
    assert error_vs_eager([reference + 0.5], reference) == pytest.approx(0.5 / 200)
    small = torch.tensor([0.25, -0.5])  # below 1 too: divided by max|y_eager| itself, as pyrys.relative_error does
    assert error_vs_eager({"logits": (small + 2 ** -7).numpy()}, small) == 2 ** -6
    assert error_vs_eager(small + 2 ** -7, small) == pyrys.relative_error(small + 2 ** -7, small)


def test_rotated():
    assert rotated([1, 2, 3], 4) == [2, 3, 1]
    assert rotated([], 1) == []


@pytest.mark.parametrize("peer_class", [OnnxRuntimeInt8, InductorInt8])
def test_int8_peers_run_quantized_on_the_shared_samples(peer_class):
    peer = peer_class(1)
    ok, reason = peer.available()
    if not ok:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = SmallConvNet().eval()
    x = model.example_inputs(2)
    with torch.no_grad():
        error = error_vs_eager(peer.prepare(model, x)(*x), model(*x))
    assert 1e-5 < error <= INT8_TOLERANCE  # really rounded (quantized ops ran), and close


def test_the_torch_int8_peer_takes_a_module_called_twice():
    """torchao's quantizer refused ResNet's blocks, which call one ReLU twice (one partition, two outputs)."""
    peer = InductorInt8(1)
    ok, reason = peer.available()
    if not ok:
        pytest.skip(reason)

    class SharedRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

        def forward(self, x):
            return self.relu(self.conv2(self.relu(self.conv1(x))) + x)

    torch.manual_seed(0)
    model, x = SharedRelu().eval(), (torch.randn(2, 4, 8, 8),)
    with torch.no_grad():
        assert error_vs_eager(peer.prepare(model, x)(*x), model(*x)) <= INT8_TOLERANCE


def test_an_unknown_model_name_is_refused_before_anything_runs(tmp_path, capsys):
    """``--models nope`` ran, and wrote an empty bench.csv/json/md/png."""
    assert cli.main(["--models", "nope", "--systems", "pyrys-reference", "--out", str(tmp_path / "out")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec, says", [("no_such_module_here:net", "cannot import 'no_such_module_here'"),
                                        ("torch.nn:NoSuchNet", "'torch.nn' has no attribute 'NoSuchNet'"),
                                        ("torch:float32", "neither an nn.Module nor something that builds one")])
def test_a_module_attr_that_names_no_model_is_refused_before_anything_runs(spec, says, tmp_path, capsys):
    """A helper's find: each row printed Python's error, then an empty table was written."""
    assert cli.main(["--models", spec, "--systems", "pyrys-reference", "--out", str(tmp_path / "out")]) == 2
    assert says in capsys.readouterr().out and not (tmp_path / "out").exists()


def test_a_module_in_the_working_folder_is_found_and_one_tensor_is_one_input(tmp_path, monkeypatch):
    """Two helpers' finds: ``pyrys explain`` found a module in the working folder and ``pyrys bench`` did not;
    a model's ``example_inputs`` giving one tensor was read as its rows (batch 1: one input of shape (64,))."""
    from pyrys.bench.models import build_model, example_inputs

    (tmp_path / "bench_here.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Sequential):\n"
        "    def example_inputs(self, batch):\n"
        "        return torch.ones(batch, 64)\n"
        "def build():\n"
        "    return Net(torch.nn.Linear(64, 8))\n"
        "class Two(torch.nn.Module):\n"
        "    def forward(self, x, pair):\n"
        "        return x * pair[0] + pair[1]\n"
        "    def example_inputs(self, batch):\n"
        "        return [torch.ones(batch, 3), (2, torch.ones(3))]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model = build_model("bench_here:build")
    for batch in (1, 4):
        (x,) = example_inputs("bench_here:build", batch, model)
        assert x.shape == (batch, 64)
    x, (two, y) = example_inputs("bench_here:Two", 2, build_model("bench_here:Two"))  # as the model takes them
    assert x.shape == (2, 3) and two == 2 and y.shape == (3,)


@pytest.mark.parametrize("option", [["--threads", "0"], ["--rounds", "0"], ["--batch-sizes", "0"],
                                    ["--block-seconds", "-1"], ["--warmup-seconds", "inf"]])
def test_numbers_out_of_range_are_refused_by_name(option, capsys):
    """A helper's fuzz: ``--threads 0`` raised torch's traceback, ``--rounds 0`` ran the default rounds."""
    with pytest.raises(SystemExit):
        cli.main([*option, "--models", "nope"])
    assert option[0] in capsys.readouterr().err


def test_an_out_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    assert cli.main(["--quick", "--systems", "pyrys-reference", "--out", str(tmp_path / "taken")]) == 2
    assert "cannot write --out" in (out := capsys.readouterr().out) and "it is a file, not a folder" in out
    for out in (tmp_path / "taken" / "sub", "/proc/pyrys_out"):  # ran the whole benchmark, then a traceback
        assert cli.main(["--quick", "--systems", "pyrys-reference", "--out", str(out)]) == 2
        assert "cannot write --out" in capsys.readouterr().out, out


@pytest.mark.skipif("dnnl" not in pyrys.available_backends(), reason="the dnnl backend is not available here")
def test_a_program_the_self_check_sent_to_torch_ops_says_so_in_the_table(monkeypatch):
    """EfficientNet-B0 (random batch norms, the bench's image) on an AVX2 EPYC: the self-check found it
    amplifies rounding and ran its calls on torch ops, 66.6 ms against 26.4 for ONNX Runtime, and the
    table's note said nothing."""
    from pyrys.backends.dnnl import self_check
    from pyrys.backends.dnnl.program import DnnlProgram
    from pyrys.bench.measure import prepare_system
    from pyrys.bench.peers import PyrysPeer

    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), torch.randn(2, 8)
    assert prepare_system(PyrysPeer(1, "dnnl"), model, (x,), model(x)).note == ""
    monkeypatch.setitem(self_check.ALLOWED, "fp32", -1.0)  # every program disagrees; so does rounding the inputs
    call = DnnlProgram.__call__  # and the program further than rounding moves it (else it runs on oneDNN)
    monkeypatch.setattr(DnnlProgram, "__call__", lambda self, inputs: [y * 1.5 for y in call(self, inputs)])
    with pytest.warns(RuntimeWarning, match="amplifies rounding"):
        result = prepare_system(PyrysPeer(1, "dnnl"), model, (x,), model(x))
    assert result.note == ("calls run on torch ops: its program disagreed more than the model's rounding explains "
                           "(the self-check; opt.notes)")


def test_a_note_with_brackets_is_printed_as_written():
    """A helper's find: a peer's error ``[enforce fail at alloc_cpu.cpp:127]`` lost its brackets' text in the
    table (rich read it as markup)."""
    from rich.console import Console

    row = dict.fromkeys(("model", "system", "median_ms", "p10_ms", "p90_ms", "vs_eager", "gflop_s", "pct_fp32_peak",
                         "compile_s", "peak_rss_mib", "max_rel_error"))
    row.update(model="m", batch=1, system="s", note="[enforce fail at alloc_cpu.cpp:127] out of memory")
    console = Console(width=300, record=True)
    machine = {"versions": {}, "cpu": "cpu", "isa": [], "cores": 2, "threads": 2, "date": "today"}
    console.print(build_table([row], machine))
    assert "[enforce fail at alloc_cpu.cpp:127]" in console.export_text()
