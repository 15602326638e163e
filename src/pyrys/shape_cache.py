"""A bounded cache of compiled input signatures: the least recently called one goes first.

    cache = ShapeCache(8, first_signature, {first_signature: compiled})
    cache.get(signature)              # the entry, marked as just used (no lock: a dict read and write)
    evicted = cache.put(signature, compiled)   # callers serialize their puts (the compile lock)
    cache.came_back(signature)        # whether it was evicted before: more shapes take turns than the limit

Readers never lock: ``entries`` is replaced, never changed, and a use is one dict store.  An
entry evicted while a call runs on it finishes that call; the call holds its own reference.
"""
from __future__ import annotations

import itertools
from typing import Any, Hashable

DEFAULT_MAX_SHAPES = 8
DROPPED_REMEMBERED = 64  # how many evicted keys ``came_back`` remembers (the most recent)


class ShapeCache:
    """At most ``limit`` entries besides those ``kept`` (``pinned`` among the ``limit`` where not kept);
    ``pinned`` (the signature ``opt.graph`` describes) and the ``kept`` ones (a loaded module's saved signatures:
    it cannot compile them again) are never evicted."""

    def __init__(self, limit: int, pinned: Hashable, entries: dict[Hashable, Any], kept: set[Hashable] = frozenset()):
        held = frozenset(kept)  # (a loaded module held one entry fewer besides its saved ones: a helper's find)
        self.kept = held - {pinned}  # never evicted either: entries that could not be compiled again
        self.limit, self.pinned = len(held) + max(limit, len(entries) - len(held)), pinned
        self.entries: dict[Hashable, Any] = dict(entries)
        self._clock = itertools.count()
        self._used: dict[Hashable, int] = {key: next(self._clock) for key in entries}
        self._dropped: dict[Hashable, None] = {}  # evicted keys, oldest first (at most DROPPED_REMEMBERED)

    def get(self, key: Hashable) -> Any:
        value = self.entries.get(key)
        if value is not None:
            self.touch(key)
        return value

    def touch(self, key: Hashable) -> None:
        """Mark ``key`` as just used."""
        self._used[key] = next(self._clock)

    def put(self, key: Hashable, value: Any) -> list[Hashable]:
        """Add ``key``; returns the keys evicted to stay within ``limit`` (least recently used first).

        With nothing else to evict (``limit`` 1 and the pinned entry held) ``key`` itself is not kept."""
        entries = {**self.entries, key: value}
        self.touch(key)
        evicted = []
        while len(entries) > self.limit:
            candidates = [k for k in entries if k not in (key, self.pinned) and k not in self.kept] or [key]
            victim = min(candidates, key=lambda k: self._used.get(k, -1))
            del entries[victim]
            evicted.append(victim)
        self.entries = entries
        for victim in evicted:
            self._used.pop(victim, None)
            self._dropped[victim] = None
        while len(self._dropped) > DROPPED_REMEMBERED:
            del self._dropped[next(iter(self._dropped))]
        return evicted

    def keep(self, key: Hashable, value: Any) -> None:
        """Hold ``key`` (``value`` where it is not held yet) among the entries never evicted (besides ``limit``):
        one a save needs and its load could not compile again (a size-1 program captured before saving)."""
        if key not in self.kept and key != self.pinned:
            self.kept, self.limit = self.kept | {key}, self.limit + 1
        if key not in self.entries:  # (one held already stays: the pinned one is what opt.graph describes)
            self.entries = {**self.entries, key: value}
        self.touch(key)

    def came_back(self, key: Hashable) -> bool:
        """Whether ``key`` was evicted before (among the last :data:`DROPPED_REMEMBERED` evicted): more keys
        take turns than ``limit`` holds, and each comes back to be built again."""
        return key in self._dropped
