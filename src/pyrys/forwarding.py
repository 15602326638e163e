"""Read-only properties that hand on an attribute of an attribute.

    class OptimizedModule:
        history = forwarded("_first.run.history", "Every pass's step: graph text, counts, misses.")
    opt.history is opt._first.run.history
"""
from __future__ import annotations

import operator


def forwarded(path: str, doc: str | None = None) -> property:
    """A read-only property whose value is ``self.<path>`` (a dotted path, read at each access)."""
    read = operator.attrgetter(path)
    return property(read, doc=doc or f"``self.{path}``")
