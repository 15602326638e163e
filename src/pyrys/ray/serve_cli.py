"""``pyrys serve PATH``: a saved program on Ray Serve, until SIGINT or SIGTERM.

Starts a local Ray runtime (or joins the cluster ``RAY_ADDRESS`` names), then Ray Serve's HTTP
proxy on ``--host``/``--port`` and ``--replicas`` replicas of :mod:`pyrys.ray.serve_app`, each
loading ``PATH`` with ``pyrys.load`` and running ``--threads`` threads per call (default: this
machine's CPUs / replicas).  Each replica reserves ``--threads`` CPUs from Ray; a local runtime is
given at least replicas x threads CPUs so that what was asked for is scheduled (with a note when
that is more than there are).  Stopping shuts a local runtime down; on a cluster it deletes only
the ``pyrys`` application it started.
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from pyrys.cli_arguments import at_least_one, finite_non_negative
from pyrys.config import MAX_THREADS
from pyrys.ray.codec import MAX_REQUEST_BYTES
from pyrys.ray.source import load_program


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="a directory pyrys.save wrote")
    parser.add_argument("--replicas", type=at_least_one, default=1, help="replicas, each with its own copy (default 1)")
    parser.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--max-batch", type=at_least_one, default=8,
                        help="requests run as one batch at most (default 8; 1 turns batching off)")
    parser.add_argument("--max-request-mb", type=at_least_one, default=MAX_REQUEST_BYTES // 2**20,
                        help=f"the largest request body, and what an .npz body may decompress to, in MiB (default "
                             f"{MAX_REQUEST_BYTES // 2**20}; beyond: 413)")
    parser.add_argument("--batch-wait-ms", type=finite_non_negative, default=5.0,
                        help="how long a batch waits to fill, in ms (default 5)")
    parser.add_argument("--threads", type=_threads, default=None,
                        help="threads per replica's call (default: CPUs / replicas)")
    parser.add_argument("--access-log", action="store_true", help="log every request (Ray Serve's access log)")
    parser.add_argument("--ship", action="store_true",
                        help="send the saved program to the replicas through Ray's object store (for cluster "
                             "nodes that cannot read PATH) instead of each replica reading PATH")


def run_serve(args: argparse.Namespace) -> int:
    try:
        import ray
        from ray import serve
    except ImportError:
        print("pyrys serve runs on Ray Serve, which is not installed here: pip install 'pyrys[ray]' "
              "(or pip install 'ray[serve]')", file=sys.stderr)
        return 2
    from pyrys.machine import available_cpus
    from pyrys.ray.serve_app import APP_NAME, application
    from pyrys.saving import load, read_files

    path = Path(args.path).resolve()
    address = os.environ.get("RAY_ADDRESS")
    try:
        module = load(path)  # a path that is not a whole save fails here, before Ray starts
        if not address:  # a cluster's Serve may already listen there, and keeps its own HTTP options
            _check_port_free(args.host, args.port)
    except (ValueError, OSError) as error:
        print(f"pyrys serve: {error}", file=sys.stderr)
        return 2
    cpus = available_cpus()
    threads = args.threads or max(1, cpus // args.replicas)
    for note in _notes(module, args, threads, cpus, cluster=bool(address)):
        print(f"pyrys serve: note: {note}", file=sys.stderr)
    described = _describe(module)
    del module
    ray.init(address=address or "local", include_dashboard=False, logging_level="WARNING",
             **({} if address else {"num_cpus": max(cpus, args.replicas * threads)}))
    stop = _stop_on_signals()  # after ray.init, which sets its own SIGTERM handler
    deployed = False
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        if address and APP_NAME in serve.status().applications:
            print(f"pyrys serve: this Ray cluster already runs a Serve application named {APP_NAME!r}; "
                  "stop it first (serve.delete), pyrys serve does not replace it", file=sys.stderr)
            return 2
        source = ray.put(read_files(path)) if args.ship else str(path)  # the driver holds the object until it stops
        app = application(functools.partial(load_program, source, threads), replicas=args.replicas,
                          cpus_per_replica=threads, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                          max_request_bytes=args.max_request_mb * 2**20,
                          access_log=args.access_log)
        deployed = True
        error = _deploy(serve, app, APP_NAME, stop)
        if error is not None:
            print(f"pyrys serve: the replicas did not start: {error}", file=sys.stderr)
            return 1
        if stop.is_set():
            return 0
        print(f"pyrys serve: {path.name} ({described}) on http://{args.host}:{args.port}/ -- {args.replicas} "
              f"replica(s) x {threads} thread(s), batches of up to {args.max_batch} within {args.batch_wait_ms:g} ms; "
              "Ctrl-C stops", flush=True)
        while not stop.wait(timeout=0.5):
            pass
    finally:
        print("pyrys serve: stopping", flush=True)
        if not address:
            serve.shutdown()
        elif deployed:
            serve.delete(APP_NAME)  # on a shared cluster, only what pyrys serve started
        ray.shutdown()
    return 0


def _deploy(serve, app, name: str, stop: threading.Event) -> BaseException | None:
    """``serve.run`` (it returns once every replica is up) on a thread, so that a signal stops the wait;
    the error it raised, if any."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=name, route_prefix="/")
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failed.append(error)

    deploying = threading.Thread(target=run, name="pyrys-serve-deploy", daemon=True)
    deploying.start()
    while deploying.is_alive() and not stop.wait(timeout=0.5):
        pass
    return failed[0] if failed else None


def _notes(module, args: argparse.Namespace, threads: int, cpus: int, cluster: bool) -> list[str]:
    """What the user should know before it starts: CPUs shared, batching that cannot happen."""
    notes = []
    if not cluster and args.replicas * threads > cpus:
        notes.append(f"{args.replicas} replica(s) x {threads} thread(s) is more than the {cpus} CPUs here: "
                     "they will take turns on them")
    if args.max_batch > 1 and not module.batches_rows:
        why = getattr(module, "why_rows_do_not_batch", lambda: "")()
        notes.append("requests will run one by one: this program cannot join them along dim 0" + (f" ({why})" if why else ""))
    return notes


def _describe(module) -> str:
    from pyrys.signature import Signature

    return "inputs " + Signature(None, tuple(module.input_types)).describe()


def _stop_on_signals() -> threading.Event:
    """An event the first SIGINT or SIGTERM sets (the default SIGINT would interrupt Ray mid-shutdown);
    a second one interrupts whatever is running, the shutdown included."""
    stop = threading.Event()

    def handle(number, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, handle)
    return stop


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except socket.gaierror as error:  # a name that resolves to no address here
            raise OSError(f"cannot listen on {host}:{port}: {host!r} is no address of this machine "
                          f"({error.strerror}); pass --host an address or name of it (0.0.0.0: every one)") from None
        except OSError as error:
            raise OSError(f"cannot listen on {host}:{port} ({error.strerror}); pass --port another port" +
                          (" or --host an address of this machine" if error.errno == errno.EADDRNOTAVAIL else "")) from None


def _threads(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_THREADS} (pyrys.optimize's threads=), got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:  # (0, any free port: Ray Serve would not say which it took)
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {value}")
    return value

