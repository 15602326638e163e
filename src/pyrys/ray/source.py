"""Where a replica or an actor gets its saved program: a path every node reads, the save's files in
memory (``pyrys.saving.read_files(path)``), or a Ray object reference to those files."""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping


def load_program(source: Any, threads: int | None = None):
    """``pyrys.load`` of ``source`` (see the module docstring), ``threads`` per call."""
    from pyrys.saving import load

    ray = sys.modules.get("ray")
    if ray is not None and isinstance(source, ray.ObjectRef):
        source = ray.get(source)
    if not isinstance(source, (str, os.PathLike, Mapping)):
        raise TypeError(f"pyrys: a saved program is a path, its files (pyrys.saving.read_files) or an object "
                        f"reference to them, got {type(source).__name__}")
    return load(source, threads=threads)
