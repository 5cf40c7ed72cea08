"""A bounded, inspectable LRU cache of communication plans."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

from .log import get_logger

DEFAULT_MAXSIZE = 512


class CacheInfo(NamedTuple):
    """What ``bf.plan_cache_info()`` returns."""

    hits: int
    misses: int
    size: int
    maxsize: int


class PlanCache:
    """LRU map from a call's signature to its plan."""

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE) -> None:
        if maxsize < 1:
            raise ValueError(f"PlanCache: maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def lookup(self, key: Any, build: Callable[[], Any]) -> Any:
        """Return the plan for ``key``, building it on a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        entry = build()
        self._entries[key] = entry
        log = get_logger("plans")
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
            log.debug("plan cache full (%d plans): evicted the least recently used", self.maxsize)
        log.debug("traced a plan for %s (miss %d, %d cached)", getattr(entry, "op", "?"), self.misses, len(self._entries))
        return entry

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, len(self._entries), self.maxsize)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = 0
        self.misses = 0


class AgreedSet:
    """Bounded LRU set of call patterns every rank has agreed on.

    A key is built only from what all ranks share when they call correctly (op, tree signature,
    the graph's fingerprint at the step, root), never from a rank's own weights, so every rank
    reaches the same verdict "already agreed" at the same call and runs the agreement
    collective together.
    """

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE) -> None:
        self.maxsize = maxsize
        self._keys: OrderedDict[Any, None] = OrderedDict()

    def __contains__(self, key: Any) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        return False

    def add(self, key: Any) -> None:
        self._keys[key] = None
        if len(self._keys) > self.maxsize:
            self._keys.popitem(last=False)

    def clear(self) -> None:
        self._keys.clear()

    def __len__(self) -> int:
        return len(self._keys)
