"""``pyrys serve`` for real: a local Ray Serve application on 127.0.0.1, two replicas, dynamic batching,
concurrent requests compared with eager, bad bodies answered 400 while it stays up, SIGTERM stops it all.

Needs the ``ray`` extra (``pip install -e '.[test]'`` installs it); skipped, with the reason, without."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import pyrys
from pyrys.ray import codec
from tests.conftest import TOLERANCE
from tests.ray.models import images, two_heads

pytest.importorskip("ray.serve", reason="pyrys serve runs on Ray Serve: pip install 'pyrys[ray]'")

START_TIMEOUT_S = 240  # a cold Ray on a busy 2-core machine


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: Any, timeout: float = 60) -> tuple[int, bytes, str]:
    return _ask(url, body, timeout)[:3]


def _ask(url: str, body: Any, timeout: float = 60) -> tuple[int, bytes, str, int]:
    """(status, body, content type, rows of the call that answered) of a POST."""
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return (answer.status, answer.read(), answer.headers.get("content-type", ""),
                    int(answer.headers.get("x-pyrys-batch-rows", 0)))
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers.get("content-type", ""), 0


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


class Server:
    """A ``pyrys serve`` child process and its URL; its output goes to a file the failures quote."""

    def __init__(self, path, log_path, *options: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        self.log = open(log_path, "w")
        command = [sys.executable, "-m", "pyrys.cli", "serve", str(path), "--port", str(self.port), *options]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "RAY_ADDRESS": ""}, start_new_session=True)

    def output(self) -> str:
        self.log.flush()
        return open(self.log_path).read()[-4000:]

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"pyrys serve exited with {self.process.returncode}:\n{self.output()}")
            if self.healthy():
                return
            time.sleep(1)
        pytest.fail(f"pyrys serve was not ready after {START_TIMEOUT_S} s:\n{self.output()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "-/healthz", timeout=5) as answer:
                return answer.status == 200 and "Ctrl-C stops" in self.output()
        except (urllib.error.URLError, OSError):
            return False

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def model():
    return two_heads()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    path = pyrys.save(pyrys.optimize(model, (images(2, 0),), dynamic=True), root / "two_heads.pyrys")
    started = Server(path, root / "serve.log", "--replicas", "2", "--threads", "1", "--max-batch", "8",
                     "--batch-wait-ms", "20", "--max-request-mb", "1")
    try:
        started.wait_until_ready()
        yield started
    finally:
        started.kill()


def _expected(model, x: np.ndarray):
    with torch.no_grad():
        logits, rest = model(torch.from_numpy(x))
    return logits, rest["features"]


def test_concurrent_requests_get_their_own_answers(server, model):
    inputs = [images(1 + i % 3, seed=i).numpy() for i in range(48)]

    def ask(x: np.ndarray) -> tuple[float, bool]:
        status, body, content_type, call_rows = _ask(server.url, _npy(x))
        assert status == 200, body.decode(errors="replace")
        assert content_type == "application/x-npz"
        with codec.NPY_READING, np.load(io.BytesIO(body)) as answer:  # CPython 3.11: one parse at a time
            logits, features = torch.from_numpy(answer["0"]), torch.from_numpy(answer["1.features"])
        expected = _expected(model, x)
        error = max(pyrys.relative_error(logits, expected[0]), pyrys.relative_error(features, expected[1]))
        return error, call_rows > len(x)

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(ask, inputs))
    assert max(error for error, _ in answers) <= TOLERANCE, server.output()
    assert any(batched for _, batched in answers), "12 clients at once, and no request was batched with another"


def test_json_in_json_out(server, model):
    x = images(2, seed=99).numpy()
    status, body, content_type = _post(server.url, json.dumps(x.tolist()).encode())
    assert status == 200 and content_type == "application/json", body
    answer = json.loads(body)
    assert sorted(answer) == ["0", "1.features"]
    assert pyrys.relative_error(torch.tensor(answer["0"]), _expected(model, x)[0]) <= TOLERANCE


@pytest.mark.parametrize("body, says", [
    (b"not an array", "expected a body in .npy"),
    (_npy(np.zeros((1, 3, 8, 8), np.float64)), "must have dtype torch.float32"),
    (_npy(np.zeros((1, 3, 8), np.float32)), "must have rank 4"),
    (_npy(np.zeros((1, 5, 8, 8), np.float32)), "dim 1 is 5"),
    (b'{"inputs": "x"}', '{"inputs": [first, second, ...]}'),
])
def test_a_bad_body_is_a_400_with_the_input_error_and_the_server_stays_up(server, model, body, says):
    status, answer, _ = _post(server.url, body)
    assert status == 400 and says in answer.decode(), answer
    x = images(1, seed=5).numpy()
    status, answer, _ = _post(server.url, _npy(x))
    assert status == 200


def test_bad_and_good_requests_at_once_each_get_their_own_answer(server):
    bodies = [_npy(images(1, seed=i).numpy()) if i % 2 else _npy(np.zeros((1, 5, 8, 8), np.float32)) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda body: _post(server.url, body)[0], bodies))
    assert statuses == [400 if i % 2 == 0 else 200 for i in range(16)]


def test_a_body_beyond_the_limit_or_decompressing_beyond_it_is_a_413(server):
    zeros = np.zeros((4096, 3, 8, 8), np.float32)  # 3 MiB
    buffer = io.BytesIO()
    np.savez_compressed(buffer, zeros)
    chunked = iter([_npy(zeros)[i:i + 2**16] for i in range(0, len(_npy(zeros)), 2**16)])  # no length: read in turn
    for body, says in [(_npy(zeros), "the body is"), (buffer.getvalue(), "the .npz body decompressed is"),
                       (chunked, "the body is"), (json.dumps(zeros[:256].tolist()).encode(), "a JSON body decodes to")]:
        status, answer, _ = _post(server.url, body)
        assert status == 413 and says in answer.decode() and "--max-request-mb" in answer.decode(), answer


def test_a_get_is_told_to_post(server):
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(server.url, timeout=30)
    assert error.value.code == 405
    with pytest.raises(urllib.error.HTTPError) as error:  # only / is served
        urllib.request.urlopen(urllib.request.Request(server.url.rstrip("/") + "/other", data=b"[1]"), timeout=30)
    assert error.value.code == 404


def test_sigterm_stops_the_replicas_and_ray(server):
    os.kill(server.process.pid, signal.SIGTERM)
    try:
        assert server.process.wait(timeout=120) == 0, server.output()
    except subprocess.TimeoutExpired:
        pytest.fail(f"pyrys serve did not stop within 120 s of SIGTERM:\n{server.output()}")
    assert "pyrys serve: stopping" in server.output()
    assert not server.healthy()
    deadline = time.monotonic() + 60
    while _session_processes(server.process.pid) and time.monotonic() < deadline:
        time.sleep(1)
    assert _session_processes(server.process.pid) == [], "Ray processes outlived pyrys serve"


def test_a_shipped_program_serves_and_sigint_stops_it(model, tmp_path):
    """``--ship``: the replicas get the program through Ray's object store, not from PATH."""
    path = pyrys.save(pyrys.optimize(model, (images(1, 0),)), tmp_path / "fixed.pyrys")
    server = Server(path, tmp_path / "serve.log", "--ship", "--max-batch", "1")
    try:
        server.wait_until_ready()
        x = images(1, seed=3).numpy()
        status, body, _ = _post(server.url, _npy(x))
        assert status == 200, body
        with np.load(io.BytesIO(body)) as answer:
            assert pyrys.relative_error(torch.from_numpy(answer["0"]), _expected(model, x)[0]) <= TOLERANCE
        status, body, _ = _post(server.url, _npy(images(2, seed=3).numpy()))  # a shape it was not saved for
        assert status == 400 and "loaded from files in memory" in body.decode(), body  # not from PATH
        os.kill(server.process.pid, signal.SIGINT)
        assert server.process.wait(timeout=120) == 0, server.output()
    finally:
        server.kill()


def _session_processes(session: int) -> list[str]:
    """The processes still in the server's session (Ray's raylet, GCS, workers start in it)."""
    listing = subprocess.run(["ps", "-eo", "sid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in listing.splitlines() if line.split(None, 1)[0] == str(session)]
