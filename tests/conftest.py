"""Shared test helpers: run chosen passes with the verifier after each, and compare with eager;
the ``backend`` parameter of tests that run on every backend."""
from __future__ import annotations

import os
import random
import zlib

import numpy
import pytest
import torch

import pyrys
from pyrys.backends import get_backend
from pyrys.backends.reference import ReferenceProgram
from pyrys.capture.export import capture_module
from pyrys.ir.meta import refresh_meta
from pyrys.ir.printer import format_graph
from pyrys.ir.verify import make_verifier, output_types
from pyrys.numerics import FP32_TOLERANCE, relative_error
from pyrys.passes.pipeline import Instruments, PassOptions, run_pipeline, select_passes


class PassRun:
    """The outcome of running some passes on a model: graphs, counts, and a runnable program."""

    def __init__(self, model, inputs, names, options):
        self.model, self.inputs = model, inputs
        self.captured = capture_module(model, inputs)
        refresh_meta(self.captured.gm)
        self.before = format_graph(self.captured.gm, self.captured.class_name)
        verify = make_verifier(output_types(self.captured.gm))
        instruments = Instruments(verify=verify, class_name=self.captured.class_name)
        self.run = run_pipeline(self.captured.gm, options, (), instruments, select_passes(*names))
        self.after = self.run.history[-1].graph

    def fired(self, pass_name: str) -> dict:
        return next(step.fired for step in reversed(self.run.history) if step.name == pass_name)

    @property
    def misses(self):
        return self.run.misses

    def error(self) -> float:
        program = ReferenceProgram(self.captured.gm)
        with torch.no_grad():
            (actual,) = program(list(self.inputs))
            expected = self.model(*self.inputs)
        return relative_error(actual, expected)


@pytest.fixture(autouse=True, scope="session")
def private_tuning_cache(tmp_path_factory):
    """The suite's tuning cache is its own (none of the user's records, nothing left in their home)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYRYS_CACHE_DIR", str(tmp_path_factory.mktemp("pyrys_cache")))
        yield


SEED_OFFSET = int(os.environ.get("PYRYS_TEST_SEED", "0"))  # another value draws every test's inputs anew


@pytest.fixture(autouse=True)
def seeded(request):
    """Each test draws from random generators seeded by its own name (plus ``PYRYS_TEST_SEED``), so what it
    draws does not depend on which tests ran before it in the same process (``-n 2`` deals them out by load).
    A test that passes only at some seeds is fragile: ``PYRYS_TEST_SEED=1 python -m pytest ...`` finds them."""
    seed = (zlib.crc32(request.node.nodeid.encode()) + SEED_OFFSET) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    numpy.random.seed(seed)


@pytest.fixture(autouse=True)
def quiet_cpu(monkeypatch):
    """Every timing counts as made on a quiet CPU (kept in the tuning cache, as on a quiet machine): what the
    suite's compiles keep and read must not depend on the load beside them (it runs in two processes, which
    keep each other's CPUs busy; ``pyrys.backends.cpu_share``, tested in ``tests/backends/dnnl/test_busy_cpu.py``)."""
    from pyrys.backends import cpu_share

    monkeypatch.setattr(cpu_share, "QUIET", 0.0)


@pytest.fixture(autouse=True)
def int8_linears_in_int8(monkeypatch):
    """Every int8 linear runs on oneDNN's int8 kernel, whatever this CPU measures (on one without VNNI the
    backend may run it in float32: ``int8_or_float.py``, tested in ``tests/backends/dnnl/test_int8_or_float.py``):
    the int8 programs the tests read are the same on every CPU."""
    if "dnnl" in pyrys.available_backends():
        from pyrys.backends.dnnl import int8_or_float

        monkeypatch.setattr(int8_or_float, "float32_instead", lambda *args: "")


@pytest.fixture
def run_passes():
    """``run_passes(model, inputs, "freeze_params", "fold_conv_bn", freeze_flags=...)``."""

    def run(model, inputs, *names, **options):
        return PassRun(model, tuple(inputs), names, PassOptions(**options))

    return run


TOLERANCE = FP32_TOLERANCE

BACKENDS = ["dnnl", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Every backend, shown as skipped (not left out) where it is unavailable."""
    if request.param not in pyrys.available_backends():
        pytest.skip(why_unavailable(request.param))
    return request.param


def why_unavailable(name: str) -> str:
    """Why ``pyrys.optimize(..., backend=name)`` cannot run here (the reason for a skip)."""
    try:
        get_backend(name)
    except RuntimeError as error:
        return str(error)
    return f"pyrys: backend {name!r} is not among pyrys.available_backends() = {pyrys.available_backends()}"


def spy_dynamo_graphs(monkeypatch) -> list:
    """Every :class:`pyrys.compile_backend.DynamoGraph` the pyrys backend makes from now on in the test, in order."""
    from pyrys.compile_backend import DynamoGraph

    made = []
    original = DynamoGraph.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(DynamoGraph, "__init__", spy)
    return made
