"""Decisions measured at compile time, kept on disk so the next compile of the same thing skips measuring.

    decision = lookup("layout", key)          # None: never measured here (or the record is unreadable)
    store("layout", key, {"policy": "nhwc", "measured": "nhwc 0.21 ms, blocked16 0.25 ms"})

``key`` is a dict of everything the decision depends on (the graph's text with its shapes, the
thread count, the CPU's ISA flags, the pyrys and oneDNN versions); a record is found only under
the same key.  Records live in ``$PYRYS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/pyrys``, else
``~/.cache/pyrys``), one JSON file each, written to a temporary file and renamed into place, so
two processes that store at once each leave a whole record.  ``PYRYS_CACHE_DIR=""`` turns the
cache off.  A cache that cannot be read or written is skipped: the decision is measured again.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

ENV_VAR = "PYRYS_CACHE_DIR"


def cache_dir() -> Path | None:
    """Where records live; None when the cache is off."""
    configured = os.environ.get(ENV_VAR)
    if configured is not None:
        return Path(configured) if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyrys"


def _path(kind: str, key: dict) -> Path | None:
    folder = cache_dir()
    if folder is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return folder / kind / f"{digest}.json"


def lookup(kind: str, key: dict) -> dict | None:
    """The record stored for ``key``, or None."""
    path = _path(kind, key)
    try:
        record = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError, RecursionError):  # (JSON nested too deep to parse: a record not ours)
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None  # another key with the same digest, or a record written by something else
    return record.get("value")


def store(kind: str, key: dict, value: dict[str, Any]) -> None:
    """Keep ``value`` for ``key`` (best effort: a cache that cannot be written is skipped)."""
    path = _path(kind, key)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".record-", dir=path.parent)
        with os.fdopen(handle, "w") as file:
            json.dump({"key": key, "value": value}, file)
        os.replace(temporary, path)
    except OSError:
        return
