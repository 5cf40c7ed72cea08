"""A bounded, inspectable LRU cache of communication plans."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

DEFAULT_MAXSIZE = 512


class CacheInfo(NamedTuple):
    """What ``bf.plan_cache_info()`` returns."""

    hits: int
    misses: int
    size: int
    maxsize: int


class PlanCache:
    """LRU map from a call's signature to its plan, plus whether the ranks agreed on it.

    The agreement flag lives with the entry so that an evicted plan is re-agreed when it comes
    back; every rank runs the same sequence of calls, so every rank evicts the same entries.
    """

    def __init__(self, maxsize: int = DEFAULT_MAXSIZE) -> None:
        if maxsize < 1:
            raise ValueError(f"PlanCache: maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._entries: OrderedDict[Any, list[Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def lookup(self, key: Any, build: Callable[[], Any]) -> list[Any]:
        """Return the entry ``[plan, agreed]`` for ``key``, building the plan on a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        self.misses += 1
        entry = [build(), False]
        self._entries[key] = entry
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        return entry

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, len(self._entries), self.maxsize)

    def clear(self) -> None:
        self._entries.clear()
        self.hits = 0
        self.misses = 0
