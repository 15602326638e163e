"""The Python source torch.fx generates for each graph, forgotten once no graph runs it.

torch.fx compiles a GraphModule's ``forward`` from source each time the graph is recompiled, and keeps
that source for ever: in ``torch.fx.graph_module._loader.eval_cache`` and as a ``linecache`` entry that
holds the module's globals (a copy of the dict).  A pass recompiles its graph, so one ResNet-18
``optimize`` left about 25 entries (0.38 MB), a shape rebuilt past ``max_shapes`` about 36 KB, and a
server whose shapes take turns grew without bound.  :func:`forget_dead_sources` drops the entries whose
code no live GraphModule class held at two sweeps in a row (each GraphModule has a class of its own, whose ``forward`` is the
compiled function); :func:`forgetting_dead_sources` does so after a compile.  A class dies with its
module once the cycle collector has run: until then its source stays, and a later sweep drops it.
"""
from __future__ import annotations

import functools
import linecache
import threading

import torch.fx as fx

PREFIX = "<eval_with_key>"  # the keys (file names) torch.fx gives the source it generates


def _loader_cache() -> dict | None:
    """torch.fx's cache of generated source (None where this torch has none by that name)."""
    loader = getattr(fx.graph_module, "_loader", None)
    cache = getattr(loader, "eval_cache", None)
    return cache if isinstance(cache, dict) else None


def live_source_keys() -> set[str]:
    """The file names of the code every live GraphModule class runs."""
    keys: set[str] = set()
    seen: set[int] = set()
    pending = [fx.GraphModule]
    while pending:
        for cls in pending.pop().__subclasses__():
            if id(cls) in seen:
                continue
            seen.add(id(cls))
            pending.append(cls)
            for attribute in list(vars(cls).values()):
                code = getattr(attribute, "__code__", None)
                if code is not None:
                    keys.add(code.co_filename)
    return keys


_UNUSED_BEFORE: set[str] = set()  # the keys no live class ran at the sweep before
_SWEEPING = threading.Lock()


def forget_dead_sources() -> int:
    """Drop torch.fx's generated source (and its ``linecache`` entry) that no live GraphModule ran at this sweep
    nor at the one before, how many: torch.fx caches a graph's source before its class holds the code, so a
    key unused once may be another thread's graph being built (a reviewer's race: 4 of 2109 lost their source)."""
    cache = _loader_cache()
    if not cache:
        return 0
    with _SWEEPING:
        generated = [key for key in list(cache) if isinstance(key, str) and key.startswith(PREFIX)]
        try:
            live = live_source_keys()
        except RuntimeError:  # a class changed while it was read (another thread recompiling): next time
            return 0
        unused = {key for key in generated if key not in live}
        dead = unused & _UNUSED_BEFORE
        for key in dead:
            cache.pop(key, None)
            linecache.cache.pop(key, None)
        _UNUSED_BEFORE.clear()
        _UNUSED_BEFORE.update(unused - dead)
    return len(dead)


def forgetting_dead_sources(function):
    """``function`` (a compile), then :func:`forget_dead_sources`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            try:
                forget_dead_sources()
            except Exception:  # noqa: BLE001 -- housekeeping: never the compile's error, nor one of its own
                pass

    return wrapper
