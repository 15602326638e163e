"""An int8 linear runs in float32 on its int8 numbers where oneDNN's int8 kernel is measured slower (CPUs
without VNNI: AMD EPYC Zen 1): the same answer, the choice kept in the tuning cache and in a save."""
from __future__ import annotations

import json
import re

import pytest
import torch

import pyrys
from pyrys.backends.dnnl import int8_or_float, measured
from pyrys.backends.threads import with_threads
from pyrys.ir.released import is_released
from tests.backends.dnnl.no_measuring import refuse_to_measure
from tests.models import Fn

IN_FLOAT32 = int8_or_float.IN_FLOAT32.strip(", ")
MEASURED = int8_or_float.float32_instead  # (the suite's conftest pins int8 for every other test)


@pytest.fixture
def no_vnni(monkeypatch, tmp_path):
    if "dnnl" not in pyrys.available_backends():
        pytest.skip("the dnnl backend is not available")
    monkeypatch.setattr(int8_or_float, "float32_instead", MEASURED)
    monkeypatch.setattr(int8_or_float, "vnni", lambda: False)
    monkeypatch.setattr(measured, "_DECIDED", {})  # this test's decisions only
    monkeypatch.setenv("PYRYS_CACHE_DIR", str(tmp_path))


def timed(monkeypatch, int8: float, float32: float) -> list:
    """Make the measurement say ``int8`` seconds for the int8 kernel, ``float32`` for float32's."""
    calls = []

    def seconds(builder, rows, out_features, in_features, src, has_bias):
        calls.append((rows, out_features, in_features, src))
        return [int8, float32]

    monkeypatch.setattr(int8_or_float, "_seconds", seconds)
    return calls


def model_and_data():
    torch.manual_seed(0)
    model = Fn(lambda m, x: m.b(torch.nn.functional.gelu(m.a(x))) + x,
               a=torch.nn.Linear(48, 96), b=torch.nn.Linear(96, 48)).eval()
    return model, torch.randn(2, 20, 48), [(torch.randn(2, 20, 48),) for _ in range(4)]


def int8(model, x, calibration, **options):
    return pyrys.optimize(model, (x,), backend="dnnl", precision="int8", calibration=calibration, **options)


def linear_lines(opt) -> list[str]:
    return [line for line in opt.program_text().splitlines() if "dnnl::linear" in line]


def test_a_linear_measured_slower_in_int8_runs_in_float32_with_the_same_answer(no_vnni, monkeypatch):
    model, x, calibration = model_and_data()
    timed(monkeypatch, 1.0, 2.0)
    in_int8 = int8(model, x, calibration)
    assert all("int8=[src=" in line for line in linear_lines(in_int8)) and len(linear_lines(in_int8)) == 2
    assert not any(IN_FLOAT32 in note for note in in_int8.notes)
    monkeypatch.setattr(measured, "_DECIDED", {})
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")
    calls = timed(monkeypatch, 2.0, 1.0)
    in_float32 = int8(model, x, calibration)
    lines = linear_lines(in_float32)
    assert len(lines) == 2 and all(f"{IN_FLOAT32} measured slower in int8 here (40 rows: int8 2000.000 ms, "
                                   "float32 1000.000 ms)]" in line and "src_scale" not in line for line in lines), lines
    assert sorted(call[:3] for call in calls) == [(40, 48, 96), (40, 96, 48)]  # rows, out, in
    assert any("2 of the 2 int8 linears run in float32" in note for note in in_float32.notes), in_float32.notes
    # the same numbers as the int8 kernel's (its sums are exact), rounded in float32: far within int8's error
    assert pyrys.relative_error(in_float32(x), in_int8(x)) <= 1e-5
    assert 1e-4 < pyrys.relative_error(in_float32(x), model(x)) <= 5e-2  # (int8's error, not float32's)


def test_a_program_whose_calls_run_on_torch_ops_notes_no_float32_linears(no_vnni, monkeypatch):
    """Where the self-check found the program wrong, torch's ops run every call: no int8 linear runs in
    float32 (nor in int8), and the notes say only that."""
    from pyrys.backends.dnnl.program import DnnlProgram

    model, x, calibration = model_and_data()
    timed(monkeypatch, 2.0, 1.0)
    call = DnnlProgram.__call__
    monkeypatch.setattr(DnnlProgram, "__call__", lambda self, inputs: [y * 1.5 for y in call(self, inputs)])
    with pytest.warns(RuntimeWarning, match="torch ops"):
        opt = int8(model, x, calibration)
    assert any("runs on torch ops" in note for note in opt.notes), opt.notes
    assert not any("int8 linears run in float32" in note for note in opt.notes), opt.notes


@pytest.mark.parametrize("int8_s, float32_s", [(1.0, 0.97), (1.0, 1.5)])
def test_a_tie_or_a_faster_int8_kernel_stays_int8(no_vnni, monkeypatch, int8_s, float32_s):
    model, x, calibration = model_and_data()
    timed(monkeypatch, int8_s, float32_s)
    opt = int8(model, x, calibration)
    assert all("int8=[src=" in line for line in linear_lines(opt)), linear_lines(opt)


def test_the_choice_is_measured_once_and_kept_in_the_tuning_cache(no_vnni, monkeypatch, tmp_path):
    model, x, calibration = model_and_data()
    calls = timed(monkeypatch, 2.0, 1.0)
    int8(model, x, calibration)
    assert len(calls) == 2
    records = [json.loads(p.read_text()) for p in (tmp_path / "int8_linear").glob("*.json")]
    assert len(records) == 2 and all(r["value"]["float32"] for r in records)
    monkeypatch.setattr(measured, "_DECIDED", {})  # another process: the tuning cache has it
    again = int8(model, x, calibration)
    assert len(calls) == 2 and all(IN_FLOAT32 in line for line in linear_lines(again))


def test_cpus_with_vnni_are_not_measured(no_vnni, monkeypatch):
    monkeypatch.setattr(int8_or_float, "vnni", lambda: True)
    calls = timed(monkeypatch, 2.0, 1.0)
    model, x, calibration = model_and_data()
    opt = int8(model, x, calibration)
    assert calls == [] and not any(IN_FLOAT32 in line for line in linear_lines(opt))


@pytest.mark.parametrize("first", ["int8", "float32"])
def test_a_weight_keeps_its_form_across_shapes_and_thread_counts(no_vnni, monkeypatch, first):
    """The first build decides for each weight; a later shape or thread count that would measure the other
    way reads the same copy (one copy of each weight)."""
    model, x, calibration = model_and_data()
    timed(monkeypatch, *((1.0, 2.0) if first == "int8" else (2.0, 1.0)))
    opt = int8(model, x, calibration)
    packed = opt.memory()["packed_weights"]
    calls = timed(monkeypatch, *((2.0, 1.0) if first == "int8" else (1.0, 2.0)))
    for y in (torch.randn(1, 3, 48), torch.randn(5, 30, 48)):
        assert pyrys.relative_error(opt(y), model(y)) <= 5e-2
    with_threads(1, opt, x)
    assert calls == [] and opt.memory()["packed_weights"] == packed
    texts = [compiled.program.describe() for compiled in opt._programs.values()]
    assert len(texts) == 3 and all((IN_FLOAT32 in text) == (first == "float32") for text in texts), texts


def test_the_float32_weight_is_the_one_copy(no_vnni, monkeypatch, tmp_path):
    """The float32 weight made from the int8 one is freed once packed in oneDNN's layout, and so is the
    int8 weight (stand-ins keep their shapes; the int8 values come back from the packed float32 copy,
    exactly: a save and a call on NaN, which runs the graph on torch ops, read them)."""
    from pyrys.backends.dnnl import linear_kernels
    from pyrys.ir.graph import named_constants
    from pyrys.ir.released import values_of

    monkeypatch.setattr(linear_kernels, "kernel_flags", lambda: frozenset({"avx512f"}))  # oneDNN's layout
    model, x, calibration = model_and_data()
    timed(monkeypatch, 1.0, 2.0)
    in_int8 = int8(model, x, calibration)
    monkeypatch.setattr(measured, "_DECIDED", {})
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")
    timed(monkeypatch, 2.0, 1.0)
    opt = int8(model, x, calibration)
    forms = list(opt._first.program.packed.int8_forms.values())
    assert len(forms) == 2 and all(is_released(form.float_copy) and is_released(form.weight) for form in forms)
    int8_weights = {name: t for name, t in named_constants(in_int8._first.captured.gm) if t.dtype == torch.int8}
    released = {name: t for name, t in named_constants(opt._first.captured.gm) if t.dtype == torch.int8}
    assert len(int8_weights) == 2 and released.keys() == int8_weights.keys()
    for name, stand_in in released.items():
        assert is_released(stand_in) and torch.equal(values_of(stand_in), values_of(int8_weights[name]))
    int8_bytes = sum(t.numel() for t in int8_weights.values())
    assert opt.memory()["weights"] == in_int8.memory()["weights"] < int8_bytes  # (biases and scales: the
    float_bytes = sum(form.float_copy.numel() * 4 for form in forms)  # int8 program's weights are packed)
    assert opt.memory()["packed_weights"] >= float_bytes
    assert pyrys.relative_error(opt(x), in_int8(x)) <= 1e-5
    pyrys.save(opt, tmp_path / "saved")
    assert torch.equal(pyrys.load(tmp_path / "saved")(x), opt(x))
    nan = x.clone()
    nan[0, 0, 0] = float("nan")
    assert torch.equal(opt(nan).isnan(), in_int8(nan).isnan())
    assert pyrys.relative_error(opt(nan)[1:], in_int8(nan)[1:]) <= 1e-5


def assert_loaded_as_saved(opt, x, path, monkeypatch) -> None:
    """``opt`` saved at ``path`` and loaded in what stands for a new process (no choice in memory, no tuning
    cache), measuring nothing: the same linears' program lines, the same outputs bitwise."""
    expected, lines = opt(x), linear_lines(opt)
    pyrys.save(opt, path)
    monkeypatch.setattr(measured, "_DECIDED", {})
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")
    refuse_to_measure(monkeypatch)
    loaded = pyrys.load(path)
    assert linear_lines(loaded) == lines
    assert torch.equal(loaded(x), expected)


def conv_and_linears():
    """A model with a convolution: its program is chosen among layout candidates, each built (a helper's
    find: the candidates after the first followed the first's choice without noting it, so a save of the
    second kept no choice and its load measured again, and could run the other kernel)."""
    torch.manual_seed(0)
    model = Fn(lambda m, x: m.fc2(torch.relu(m.fc(torch.relu(m.conv(x)).flatten(1)))),
               conv=torch.nn.Conv2d(3, 16, 3, padding=1), fc=torch.nn.Linear(16 * 8 * 8, 32),
               fc2=torch.nn.Linear(32, 10)).eval()
    return model, torch.randn(2, 3, 8, 8), [(torch.randn(2, 3, 8, 8),) for _ in range(4)]


@pytest.mark.parametrize("saved_in", ["float32", "int8"])
@pytest.mark.parametrize("make", [model_and_data, conv_and_linears])
def test_a_save_runs_what_it_was_saved_with(no_vnni, monkeypatch, tmp_path, make, saved_in):
    model, x, calibration = make()
    timed(monkeypatch, *((2.0, 1.0) if saved_in == "float32" else (1.0, 2.0)))
    opt = int8(model, x, calibration)
    saved_lines = linear_lines(opt)
    assert len(saved_lines) == 2 and all((IN_FLOAT32 in line) == (saved_in == "float32") for line in saved_lines)
    assert all(" rows: int8 " in line for line in saved_lines if IN_FLOAT32 in line), saved_lines  # its times
    assert_loaded_as_saved(opt, x, tmp_path / "saved", monkeypatch)


@pytest.mark.parametrize("form", ["float32", "int8"])
def test_one_int8_tensor_read_with_two_scales(no_vnni, monkeypatch, tmp_path, form):
    """Weights ``W`` and ``2 W`` quantize to the same int8 values with other scales; a save keeps equal bytes
    once, so the loaded graph's two linears read one int8 tensor (a helper's find: the float32 copy was
    the weight's alone, made with the first linear's scales, and the second ran on it: 0.34 off)."""
    torch.manual_seed(0)
    model = Fn(lambda m, x: m.a(x) + m.b(torch.relu(x)), a=torch.nn.Linear(16, 16), b=torch.nn.Linear(16, 16)).eval()
    with torch.no_grad():
        model.b.weight.copy_(model.a.weight * 2)
    x = torch.randn(40, 16)
    timed(monkeypatch, *((2.0, 1.0) if form == "float32" else (1.0, 2.0)))
    opt = int8(model, x, [(torch.randn(40, 16),) for _ in range(4)], dynamic=True)
    pyrys.save(opt, tmp_path / "saved")
    loaded = pyrys.load(tmp_path / "saved")
    assert torch.equal(loaded(x), opt(x))
    y = torch.randn(7, 16)  # a shape of the loaded module's own
    assert pyrys.relative_error(loaded(y), opt(y)) <= 1e-5


def test_both_kernels_really_run(no_vnni, tmp_path):
    """Measured for real (both times in the tuning cache); whichever wins, the answer is int8's."""
    model, x, calibration = model_and_data()
    opt = int8(model, x, calibration, accuracy_budget=None)
    assert pyrys.relative_error(opt(x), model(x)) <= 5e-2
    records = [json.loads(p.read_text()) for p in (tmp_path / "int8_linear").glob("*.json")]
    assert len(records) == 2
    for record in records:
        times = re.findall(r"([\d.]+) ms", record["value"]["measured"])
        assert len(times) == 2 and all(float(ms) > 0 for ms in times)


@pytest.mark.parametrize("saved_in", ["float32", "int8"])
def test_a_load_at_another_thread_count_runs_what_was_saved(no_vnni, monkeypatch, tmp_path, saved_in):
    """A save made with 2 threads, loaded in a process that runs 1: its choices are made at 2, and the load
    takes them rather than measure at 1 (and perhaps run the other kernel)."""
    model, x, calibration = model_and_data()
    timed(monkeypatch, *((2.0, 1.0) if saved_in == "float32" else (1.0, 2.0)))
    opt = with_threads(2, int8, model, x, calibration)
    saved_lines = linear_lines(opt)
    expected = opt(x)
    pyrys.save(opt, tmp_path / "saved")
    monkeypatch.setattr(measured, "_DECIDED", {})
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")
    refuse_to_measure(monkeypatch)
    loaded = with_threads(1, pyrys.load, tmp_path / "saved")
    assert linear_lines(loaded) == saved_lines
    assert pyrys.relative_error(with_threads(1, loaded, x), expected) <= 1e-5


def test_a_save_without_a_choice_loads_in_int8_whatever_this_process_chose(no_vnni, monkeypatch, tmp_path):
    """A save from a pyrys that did not measure int8 linears (none recorded) ran them in int8: its load runs
    them in int8, measuring nothing, though this process chose float32 for the same shapes (kept in its
    memory and the tuning cache)."""
    from tests.test_save_load import _edited_consistently

    model, x, calibration = model_and_data()
    timed(monkeypatch, 1.0, 2.0)
    in_int8 = int8(model, x, calibration)(x)
    monkeypatch.setattr(measured, "_DECIDED", {})
    monkeypatch.setenv("PYRYS_CACHE_DIR", str(tmp_path / "cache"))
    timed(monkeypatch, 2.0, 1.0)
    opt = int8(model, x, calibration)
    assert all(IN_FLOAT32 in line for line in linear_lines(opt))
    pyrys.save(opt, tmp_path / "saved")

    def without_int8_choices(program):
        for record in program["signatures"]:
            record["kernel_choices"] = {memo: choice for memo, choice in record["kernel_choices"].items()
                                        if '"kind": "int8_linear"' not in memo}

    path = _edited_consistently(tmp_path / "saved", without_int8_choices)
    refuse_to_measure(monkeypatch)
    loaded = pyrys.load(path)
    assert not any(IN_FLOAT32 in line for line in linear_lines(loaded))
    assert torch.equal(loaded(x), in_int8)


def test_a_malformed_tuning_cache_record_is_measured_again(no_vnni, monkeypatch, tmp_path):
    """A record with the right key but no choice in it (edited, or written by something else) is not read
    (a helper's find: KeyError from the build)."""
    model, x, calibration = model_and_data()
    timed(monkeypatch, 2.0, 1.0)
    int8(model, x, calibration)
    paths = list((tmp_path / "int8_linear").glob("*.json"))
    assert len(paths) == 2
    for path in paths:
        record = json.loads(path.read_text())
        path.write_text(json.dumps({"key": record["key"], "value": {"measured": "no choice"}}))
    monkeypatch.setattr(measured, "_DECIDED", {})
    calls = timed(monkeypatch, 2.0, 1.0)
    opt = int8(model, x, calibration)
    assert len(calls) == 2 and all(IN_FLOAT32 in line for line in linear_lines(opt))
    assert all(json.loads(path.read_text())["value"]["float32"] is True for path in paths)  # written again


def test_a_weight_two_linears_read_is_one_int8_tensor_run_one_way(no_vnni, monkeypatch, tmp_path):
    """One linear called at 40 rows and at 4: its int8 weight is one tensor, run as the first build chose,
    before saving and after loading (a helper's find: quantized once per call, the two chose apart; a save
    keeps equal bytes once, so the load ran both the first one's way, and not bitwise)."""
    torch.manual_seed(0)
    model = Fn(lambda m, x: m.a(torch.relu(m.h(x))).sum(1) + m.a(x.mean(1)),
               a=torch.nn.Linear(32, 32), h=torch.nn.Linear(32, 32)).eval()
    x = torch.randn(4, 10, 32)
    monkeypatch.setattr(int8_or_float, "_seconds", lambda builder, rows, *shape: [1.0, 2.0] if rows == 40 else [2.0, 1.0])
    opt = int8(model, x, [(torch.randn(4, 10, 32),) for _ in range(4)])
    saved_lines = linear_lines(opt)
    assert len(saved_lines) == 3 and not any(IN_FLOAT32 in line for line in saved_lines)
    int8_weights = {id(t) for name, t in opt.graph_module.named_buffers() if name.startswith("a_weight_int8")}
    assert len(int8_weights) == 1
    assert_loaded_as_saved(opt, x, tmp_path / "saved", monkeypatch)


def test_a_save_whose_choices_were_made_on_another_cpu_is_measured_here(no_vnni, monkeypatch, tmp_path):
    """Choices of a kind the save holds, made elsewhere only (another CPU with the same ISA flags, another
    pyrys or oneDNN: other memos), are chosen here as a compile chooses, not taken as unmeasured (a review's
    find: int8 linears ran int8 there, untimed)."""
    from tests.test_save_load import _edited_consistently

    model, x, calibration = model_and_data()
    timed(monkeypatch, 2.0, 1.0)
    opt = int8(model, x, calibration)
    pyrys.save(opt, tmp_path / "saved")

    def made_elsewhere(program):
        for record in program["signatures"]:
            record["kernel_choices"] = {memo.replace('"cpu": "', '"cpu": "another '): choice
                                        for memo, choice in record["kernel_choices"].items()}

    path = _edited_consistently(tmp_path / "saved", made_elsewhere)
    monkeypatch.setattr(measured, "_DECIDED", {})
    monkeypatch.setenv("PYRYS_CACHE_DIR", "")
    calls = timed(monkeypatch, 2.0, 1.0)
    loaded = pyrys.load(path)
    assert len(calls) == 2 and all(IN_FLOAT32 in line for line in linear_lines(loaded))
