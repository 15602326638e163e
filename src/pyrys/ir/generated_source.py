"""The Python source torch.fx generates for each graph, forgotten once no graph runs it.

torch.fx compiles a GraphModule's ``forward`` from source each time the graph is recompiled, and keeps
that source for ever: in ``torch.fx.graph_module._loader.eval_cache`` and as a ``linecache`` entry that
holds the module's globals (a copy of the dict).  A pass recompiles its graph, so one ResNet-18
``optimize`` left about 25 entries (0.38 MB), a shape rebuilt past ``max_shapes`` about 36 KB, and a
server whose shapes take turns grew without bound.  :func:`forget_dead_sources` drops the entries whose
code no live GraphModule class holds (each GraphModule has a class of its own, whose ``forward`` is the
compiled function); :func:`forgetting_dead_sources` does so after a compile.  A class dies with its
module once the cycle collector has run: until then its source stays, and a later sweep drops it.
"""
from __future__ import annotations

import functools
import linecache

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
            for attribute in vars(cls).values():
                code = getattr(attribute, "__code__", None)
                if code is not None:
                    keys.add(code.co_filename)
    return keys


def forget_dead_sources() -> int:
    """Drop torch.fx's generated source (and its ``linecache`` entry) that no live GraphModule runs; how many."""
    cache = _loader_cache()
    if not cache:
        return 0
    generated = [key for key in list(cache) if isinstance(key, str) and key.startswith(PREFIX)]
    live = live_source_keys()
    dead = [key for key in generated if key not in live]
    for key in dead:
        cache.pop(key, None)
        linecache.cache.pop(key, None)
    return len(dead)


def forgetting_dead_sources(function):
    """``function`` (a compile), then :func:`forget_dead_sources`."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            forget_dead_sources()

    return wrapper
