"""What tests/test_concurrency.py and tests/test_callers.py share: pyrys.optimize with a dnnl layout, a small residual net with torch fallbacks, and running a
check in a child process so that a crash or a hang fails one test instead of killing pytest.
"""
from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pyrys
from pyrys.testing import randomize_batchnorm
from tests.conftest import backend  # noqa: F401 -- the fixture, for test files that import it from here


def optimize(model: nn.Module, inputs: tuple, backend: str, layout: str = "auto", **options) -> pyrys.OptimizedModule:
    """``pyrys.optimize`` on ``backend``; ``layout`` is the dnnl activation layout (ignored elsewhere)."""
    if backend == "dnnl":
        options["layout"] = layout
    return pyrys.optimize(model, inputs, backend=backend, **options)


class ResidualNet(nn.Module):
    """conv-bn-relu, a residual block, max-pool, a torch fallback op, and a fallback view as an output.

    ``fallback``: ``"cumsum"`` or ``"flip"`` (no oneDNN lowering); ``view``: how the second output
    is cut from a computed feature map (``"slice"``: ``z[:, :2]``, ``"narrow"``, ``"index"``: ``z[0]``).
    """

    def __init__(self, width: int = 8, fallback: str = "cumsum", view: str = "slice", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fallback, self.view = fallback, view
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)
        self.conv4 = nn.Conv2d(width, 4, 1)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)) + y)
        y = F.max_pool2d(y, 2)
        y = torch.cumsum(y, dim=1) if self.fallback == "cumsum" else torch.flip(y, dims=(3,))
        z = F.relu(self.bn3(self.conv3(y)))
        return self.conv4(z), self._cut(z)

    def _cut(self, z):
        if self.view == "slice":
            return z[:, :2]
        if self.view == "narrow":
            return z.narrow(1, 1, 2)
        return z[0]


def residual_net(**kwargs) -> nn.Module:
    """A :class:`ResidualNet` with randomized BatchNorm, in eval mode."""
    return randomize_batchnorm(ResidualNet(**kwargs), seed=kwargs.get("seed", 0)).eval()


def images(count: int, seed: int, shape: tuple = (1, 3, 32, 32)) -> list[torch.Tensor]:
    """``count`` distinct random inputs (so a result mixed up with another call's is detectable)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for _ in range(count)]


def eager(model: nn.Module, inputs: list[torch.Tensor]) -> list:
    """Eager's outputs, on one thread: on a shared 2-core machine two OpenMP threads can be 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return [model(x) for x in inputs]
    finally:
        torch.set_num_threads(threads)


def run_together(tasks: list[Callable[[], object]]) -> list:
    """Run every task on its own thread, all released at once by a barrier; their results in order."""
    barrier = threading.Barrier(len(tasks))

    def start(task):
        barrier.wait(timeout=60)
        return task()

    with ThreadPoolExecutor(len(tasks)) as pool:
        futures = [pool.submit(start, task) for task in tasks]
        return [future.result() for future in futures]


def caller_task(opt, inputs: list, expected: list, thread: int) -> Callable[[], list[str]]:
    """A task that calls ``opt`` on each input in turn and returns what differed from eager."""

    def task() -> list[str]:
        wrong = []
        for k, (x, want) in enumerate(zip(inputs, expected)):
            try:
                error = pyrys.relative_error(opt(x), want)
            except Exception as exc:  # a failing call is a wrong result too; keep counting
                wrong.append(f"thread {thread} call {k}: {type(exc).__name__}: {exc}")
                continue
            if error > pyrys.FP32_TOLERANCE:
                wrong.append(f"thread {thread} call {k}: relative error {error:.3g}")
        return wrong

    return task


def assert_all_right(wrong_per_thread: list[list[str]], calls: int) -> None:
    wrong = [w for thread in wrong_per_thread for w in thread]
    assert not wrong, f"{len(wrong)} of {calls} concurrent results differ from eager, e.g. {wrong[:3]}"


def _storage_span(tensor: torch.Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def shared_between_calls(held: list[tuple[object, torch.Tensor]]) -> list[tuple]:
    """Pairs of calls whose outputs' storages overlap; ``held``: (call, output tensor) for every output.

    Outputs of one call may share memory with each other (eager's ``y, y[0]`` do)."""
    spans = [(call, *_storage_span(tensor)) for call, tensor in held]
    return [(a, b) for i, (a, start_a, end_a) in enumerate(spans) for b, start_b, end_b in spans[i + 1:]
            if a != b and start_a < end_b and start_b < end_a]


def run_isolated(check: Callable, *args, timeout: float = 150) -> None:
    """Run ``check(*args)`` (a module-level function) in a child process.

    A failed assertion, an exception, a crash (SIGSEGV, SIGABRT) or a hang fails the calling
    test with the child's last lines; the pytest process itself survives.  Children are forked
    from a server that has imported torch and pyrys once (a fresh Python costs 5-10 s on CI).
    """
    _FORKSERVER.set_forkserver_preload(["torch", "torch._dynamo", "pyrys", __name__])  # read when it first starts
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "output.txt"
        child = _FORKSERVER.Process(target=_run_logged, args=(check, args, str(log)), daemon=True)
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            pytest.fail(f"{check.__name__}{args} hung: no result after {timeout:.0f} s", pytrace=False)
        output = log.read_text().strip() if log.exists() else ""
    if child.exitcode != 0:
        pytest.fail(f"{check.__name__}{args} {_how_it_ended(child.exitcode, output)}\n{output[-3000:]}", pytrace=False)


_FORKSERVER = multiprocessing.get_context("forkserver")


def _run_logged(check: Callable, args: tuple, log_path: str) -> None:
    """In the child: stdout, stderr and a crash's stack of every thread go to ``log_path``."""
    log = open(log_path, "w")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    faulthandler.enable(log, all_threads=True)
    check(*args)


def _how_it_ended(exitcode: int, output: str) -> str:
    if exitcode < 0:
        return f"crashed ({signal.Signals(-exitcode).name})"
    last = output.splitlines()[-1] if output else ""
    return f"failed: {last}"
