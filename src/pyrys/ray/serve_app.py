"""The Ray Serve application behind ``pyrys serve``: replicas that each load a saved program once.

    POST /   body (.npy / .npz / JSON, :mod:`pyrys.ray.codec`)
      -> decode (a bad body: 400 with the pyrys.InputError text, before any batching; beyond
         ``max_request_bytes``, or decompressing beyond it: 413)
      -> serve.batch: up to ``max_batch`` requests, or what arrived within ``batch_wait_s``
      -> Batcher.run on a worker thread (the replica's event loop keeps taking requests)
      -> the request's rows, encoded like its body (an input the module refuses: 400; a failure: 500),
         with the rows of the call that ran it in the ``x-pyrys-batch-rows`` header

Ray Serve's own proxy answers ``GET /-/healthz`` (200 once the application is running) and
``GET /-/routes``.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from pyrys.ray.batching import Batcher
from pyrys.ray.codec import MAX_REQUEST_BYTES, RequestTooLarge, check_size, decode, encode
from pyrys.signature import InputError, is_tensor_leaf

APP_NAME = "pyrys"
BATCH_ROWS_HEADER = "x-pyrys-batch-rows"  # the rows of the call that answered: the request's own, or its batch's


@serve.deployment
class PyrysReplica:
    """One replica: the module ``load()`` returns, called in dynamic batches."""

    def __init__(self, load: Callable[[], Any], max_batch: int, batch_wait_s: float, max_request_bytes: int):
        self.module = load()
        self.max_request_bytes = max_request_bytes
        self.batcher = Batcher(self.module)
        self.input_dtypes = [t[1] if is_tensor_leaf(t) else None for t in getattr(self.module, "input_types", [])]
        self.run_batch.set_max_batch_size(max_batch)
        self.run_batch.set_batch_wait_timeout_s(batch_wait_s)

    async def __call__(self, request: Request) -> Response:
        root = request.scope.get("root_path", "")  # the route prefix the application is mounted at
        if request.url.path.removeprefix(root).rstrip("/"):  # Serve routes every path under the prefix here
            return _text(404, f"pyrys serve: no {request.url.path}; POST a .npy, .npz or JSON body to /")
        if request.method != "POST":
            return _text(405, "pyrys serve: POST a .npy, .npz or JSON body to /; GET /-/healthz says whether it is up")
        try:
            decoded = decode(await _body(request, self.max_request_bytes), self.input_dtypes, self.max_request_bytes)
        except RequestTooLarge as error:
            return _text(413, str(error))
        except InputError as error:
            return _text(400, str(error))
        outcome, rows = await self.run_batch(decoded.inputs)
        if isinstance(outcome, InputError):
            return _text(400, str(outcome))
        if isinstance(outcome, Exception):
            return _text(500, f"pyrys serve: the model failed: {type(outcome).__name__}: {outcome}")
        try:
            body, content_type = encode(outcome, decoded.form)
        except Exception as error:  # noqa: BLE001 - answered, and the replica stays up
            return _text(500, f"pyrys serve: the model's output cannot be answered as {decoded.form} "
                              f"({type(error).__name__}: {error}); ask for JSON, or return tensors")
        return Response(body, media_type=content_type, headers={BATCH_ROWS_HEADER: str(rows)})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def run_batch(self, requests: list[tuple]) -> list[Any]:
        return await asyncio.to_thread(self.batcher.run, requests)


def application(load: Callable[[], Any], *, replicas: int, cpus_per_replica: float, max_batch: int,
                batch_wait_s: float, access_log: bool = False,
                max_request_bytes: int = MAX_REQUEST_BYTES) -> serve.Application:
    """The application: ``replicas`` copies of :class:`PyrysReplica`, each reserving ``cpus_per_replica``.

    Ray Serve's access log (a line per request, in the replica's log file and on the driver's
    terminal) is off unless ``access_log``: it is work per request on the CPUs the model runs on."""
    return PyrysReplica.options(
        num_replicas=replicas, max_ongoing_requests=max(16, 2 * max_batch),
        ray_actor_options={"num_cpus": cpus_per_replica},
        logging_config={"enable_access_log": access_log, "log_level": "INFO" if access_log else "WARNING"},
    ).bind(load, max_batch, batch_wait_s, max_request_bytes)


async def _body(request: Request, max_bytes: int) -> bytes:
    """The request's body, refused (:class:`RequestTooLarge`) as soon as it is declared or read beyond
    ``max_bytes``: a chunked body has no length to check first."""
    declared = request.headers.get("content-length", "")
    chunks, size = [], 0
    try:
        if declared.isdigit():
            check_size(int(declared), max_bytes, "the body")
        async for chunk in request.stream():
            size += len(chunk)
            check_size(size, max_bytes, "the body")
            chunks.append(chunk)
    except RequestTooLarge:
        await _drain(request, size)
        raise
    return b"".join(chunks)


DRAIN_BYTES = 2**30  # of a refused body, read and dropped before the 413 (beyond: the connection closes)


async def _drain(request: Request, read: int) -> None:
    """Read and drop the rest of a refused body, up to :data:`DRAIN_BYTES`: a client still sending it then
    reads the 413, where an answer before its last byte closed the connection under it (``BrokenPipeError``
    for a 3 MiB ``.npy`` over a 1 MiB limit, now and then)."""
    try:
        async for chunk in request.stream():
            read += len(chunk)
            if read > DRAIN_BYTES:
                return
    except Exception:  # the client hung up, or the stream was consumed: nothing left to drain
        return


def _text(status: int, message: str) -> Response:
    return Response(message + "\n", status_code=status, media_type="text/plain")
