"""Choices timed on a busy CPU serve the process that timed them and are not kept in the tuning cache."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import pyrys
from pyrys import tuning_cache
from pyrys.backends import cpu_share
from pyrys.backends.cpu_share import CpuShare
from tests.conftest import TOLERANCE
from tests.models import conv_bn_relu, image

measured = pytest.importorskip("pyrys.backends.dnnl.measured", reason="the dnnl backend's modules do not import")
runtime = pytest.importorskip("pyrys.backends.dnnl.runtime", reason="the dnnl backend's modules do not import")

KEY = {"shape": [3, 4], "threads": 1}
THRESHOLD = cpu_share.QUIET  # (read at import: the suite's fixture ``quiet_cpu`` sets it to 0 in each test)


@pytest.fixture
def busy_told_apart(monkeypatch):
    monkeypatch.setattr(cpu_share, "QUIET", THRESHOLD)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_VAR, str(tmp_path))
    monkeypatch.setattr(measured, "_DECIDED", {})  # this test's choices only
    return tmp_path


def sleeping_choice(timings: list):
    """A measurement whose timed calls sleep: its threads get next to no CPU, as on a busy machine."""
    def measure() -> dict:
        timings.append(1)
        seconds = measured.best_seconds([lambda: time.sleep(0.002)] * 2, 2)
        return {"pick": "first", "measured": f"{seconds[0] * 1e3:.1f} ms"}
    return measure


def test_the_share_is_cpu_seconds_over_wall_seconds_per_thread(monkeypatch, busy_told_apart):
    with CpuShare(1) as load:
        time.sleep(0.02)  # no CPU at all
    assert load.share < THRESHOLD
    clock = {"cpu": 0.0, "wall": 0.0}
    monkeypatch.setattr(cpu_share, "time", SimpleNamespace(process_time=lambda: clock["cpu"],
                                                           perf_counter=lambda: clock["wall"]))
    with CpuShare(2) as load:
        clock.update(cpu=1.0, wall=1.0)  # two threads, one core's worth of CPU between them
    assert load.share == 0.5 and not load.quiet and "busy CPU (0.50 of a core per thread)" in load.said
    with CpuShare(2) as load:
        clock.update(cpu=2.9, wall=2.0)
    assert load.share == pytest.approx(0.95) and load.quiet and load.said == ""


def test_a_busy_timing_serves_this_process_and_is_timed_again_by_the_next(cache, busy_told_apart):
    timings = []
    memo, choice = measured.decide("test_kind", KEY, sleeping_choice(timings), {"pick": str})
    assert choice["pick"] == "first" and choice["cpu_share"] < THRESHOLD
    assert "timed on a busy CPU" in choice["measured"] and "not kept in the tuning cache" in choice["measured"]
    assert tuning_cache.lookup("test_kind", KEY) is None
    assert measured.decide("test_kind", KEY, sleeping_choice(timings), {"pick": str}) == (memo, choice)
    assert len(timings) == 1  # this process remembers it
    measured._DECIDED.clear()  # another process
    measured.decide("test_kind", KEY, sleeping_choice(timings), {"pick": str})
    assert len(timings) == 2


def test_a_quiet_timing_is_kept_and_an_older_record_without_its_share_is_timed_again(cache):
    timings = []
    memo, choice = measured.decide("test_kind", KEY, sleeping_choice(timings), {"pick": str})
    assert "busy" not in choice["measured"] and tuning_cache.lookup("test_kind", KEY) == choice
    measured._DECIDED.clear()
    assert measured.decide("test_kind", KEY, sleeping_choice(timings), {"pick": str}) == (memo, choice)
    assert len(timings) == 1  # from the tuning cache
    (record,) = (cache / "test_kind").glob("*.json")
    older = json.loads(record.read_text())
    del older["value"]["cpu_share"]  # what pyrys before this wrote: timed quietly or not, nobody knows
    record.write_text(json.dumps(older))
    measured._DECIDED.clear()
    measured.decide("test_kind", KEY, sleeping_choice(timings), {"pick": str})
    assert len(timings) == 2 and isinstance(tuning_cache.lookup("test_kind", KEY)["cpu_share"], float)


def test_a_choice_that_timed_nothing_is_kept(cache, busy_told_apart):
    """A measurement that reads no timing of its own (faked in tests, or one that could not time) is quiet."""
    memo, choice = measured.decide("test_kind", KEY, lambda: {"pick": "second", "measured": "-"}, {"pick": str})
    assert choice["cpu_share"] == 1.0 and tuning_cache.lookup("test_kind", KEY) == choice


def test_a_layout_timed_on_a_busy_cpu_is_not_kept(cache, monkeypatch):
    if "dnnl" not in pyrys.available_backends():
        pytest.skip("the dnnl backend does not load here: there is no layout to measure")
    monkeypatch.setattr(cpu_share, "QUIET", float("inf"))  # every timing busy
    timed = []
    original = runtime._time_policies
    monkeypatch.setattr(runtime, "_time_policies", lambda *args: timed.append(1) or original(*args))
    model = conv_bn_relu()
    for _ in range(2):
        opt = pyrys.optimize(model, (image(),), backend="dnnl", threads=2)
        assert "timed on a busy CPU" in opt.program_text()
        assert pyrys.relative_error(opt(image()), model(image())) <= TOLERANCE
    assert len(timed) == 2 and not list(cache.glob("layout/*.json"))
    monkeypatch.setattr(cpu_share, "QUIET", 0.0)  # quiet again: timed, kept, read by the next compile
    pyrys.optimize(model, (image(),), backend="dnnl", threads=2)
    again = pyrys.optimize(model, (image(),), backend="dnnl", threads=2)
    assert len(timed) == 3 and "(tuning cache:" in again.program_text()
    (record,) = cache.glob("layout/*.json")
    older = json.loads(record.read_text())
    older["value"].pop("cpu_share")
    record.write_text(json.dumps(older))
    pyrys.optimize(model, (image(),), backend="dnnl", threads=2)
    assert len(timed) == 4



def test_this_process_keeps_the_choices_last_asked_for(cache, monkeypatch):
    """A helper's find: ``_DECIDED`` grew by two choices for every new sequence length through torch.compile,
    for ever; past ``MAX_DECIDED`` the choice asked for least recently goes (the tuning cache keeps it)."""
    monkeypatch.setattr(measured, "MAX_DECIDED", 3)
    for i in (0, 1, 2, 3, 4, 2, 9):
        measured.decide("kind", {**KEY, "i": i}, lambda: {"pick": "first"})
    assert [json.loads(memo)["i"] for memo in measured._DECIDED] == [4, 2, 9]
