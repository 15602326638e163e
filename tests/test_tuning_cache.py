"""The tuning cache: a layout measured once per graph, CPU and thread count; the next compile builds only the winner."""
from __future__ import annotations

import json
import threading

import pytest
import torch

import pyrys
from pyrys import tuning_cache
from tests.conftest import TOLERANCE
from tests.models import conv_bn_relu, image

runtime = pytest.importorskip("pyrys.backends.dnnl.runtime", reason="the dnnl backend's modules do not import")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    if "dnnl" not in pyrys.available_backends():
        pytest.skip("the dnnl backend does not load here: there is no layout to measure")
    monkeypatch.setenv(tuning_cache.ENV_VAR, str(tmp_path))
    return tmp_path


@pytest.fixture
def measured(monkeypatch) -> list:
    """One entry per time the candidates were measured."""
    calls = []
    original = runtime._time_policies

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(runtime, "_time_policies", spy)
    return calls


def test_the_second_compile_takes_the_layout_from_the_cache(cache, measured):
    model = conv_bn_relu()
    first = pyrys.optimize(model, (image(),), backend="dnnl", threads=2)
    assert len(measured) == 1 and "(measured:" in first._first.program.policy
    second = pyrys.optimize(model, (image(),), backend="dnnl", threads=2)
    assert len(measured) == 1  # not measured again
    assert second._first.program.layout == first._first.program.layout
    assert "(tuning cache:" in second.program_text()
    assert torch.equal(second(image()), first(image()))
    pyrys.optimize(model, (image(2),), backend="dnnl", threads=2)  # another shape: another graph
    pyrys.optimize(model, (image(),), backend="dnnl", threads=1)  # another thread count
    assert len(measured) == 3


def test_an_unreadable_or_foreign_record_is_measured_again(cache, measured):
    model = conv_bn_relu()
    pyrys.optimize(model, (image(),), backend="dnnl")
    (record,) = (cache / "layout").glob("*.json")
    for text in ("{ not json", "[" * 100_000 + "]" * 100_000):  # (nested too deep: a RecursionError)
        record.write_text(text)
        opt = pyrys.optimize(model, (image(),), backend="dnnl")
        assert pyrys.relative_error(opt(image()), model(image())) <= TOLERANCE
    assert len(measured) == 3
    data = json.loads(record.read_text())
    data["key"]["threads"] = 99  # a record whose key is not this compile's
    record.write_text(json.dumps(data))
    pyrys.optimize(model, (image(),), backend="dnnl")
    assert len(measured) == 4


def test_an_unwritable_or_disabled_cache_only_means_measuring(tmp_path, monkeypatch, measured):
    if "dnnl" not in pyrys.available_backends():
        pytest.skip("the dnnl backend does not load here")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv(tuning_cache.ENV_VAR, str(tmp_path / "file" / "cache"))
    for _ in range(2):
        pyrys.optimize(conv_bn_relu(), (image(),), backend="dnnl")
    monkeypatch.setenv(tuning_cache.ENV_VAR, "")
    assert tuning_cache.cache_dir() is None
    for _ in range(2):
        pyrys.optimize(conv_bn_relu(), (image(),), backend="dnnl")
    assert len(measured) == 4


def test_stores_at_once_leave_a_whole_record(tmp_path, monkeypatch):
    monkeypatch.setenv(tuning_cache.ENV_VAR, str(tmp_path))
    key = {"graph": "g", "threads": 2}
    writers = [threading.Thread(target=tuning_cache.store, args=("layout", key, {"policy": f"p{i}" * 2000}))
               for i in range(16)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    value = tuning_cache.lookup("layout", key)
    assert value["policy"] in {f"p{i}" * 2000 for i in range(16)}
    assert [p.name for p in (tmp_path / "layout").iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_the_default_place_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv(tuning_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning_cache.cache_dir() == tmp_path / "pyrys"
