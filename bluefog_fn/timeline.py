"""Per-rank timelines of ops in the Chrome trace format (open in chrome://tracing or Perfetto).

Enabled by ``bfrun --timeline PATH`` (or ``BLUEFOG_FN_TIMELINE=PATH``): every rank writes
``PATH.rank<r>.json`` at exit, with one complete event per op from its call to the end of its
``wait()``.  Async ops therefore show how long communication overlapped the caller's work.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from typing import Any


class Timeline:
    """Collects op events of one rank and writes them once, at exit or on ``close()``."""

    def __init__(self, path: str, rank: int) -> None:
        self.path = f"{path}.rank{rank}.json"
        self.rank = rank
        self.events: list[dict[str, Any]] = []
        self._origin = time.perf_counter()
        self._closed = False
        atexit.register(self.close)

    def now(self) -> float:
        return time.perf_counter()

    def record(self, name: str, start: float, end: float, args: dict[str, Any] | None = None) -> None:
        """One complete event (``ph: X``) from ``start`` to ``end`` (perf_counter seconds)."""
        self.events.append(
            {
                "name": name,
                "ph": "X",
                "ts": (start - self._origin) * 1e6,
                "dur": (end - start) * 1e6,
                "pid": self.rank,
                "tid": threading.get_ident() % 1_000_000,
                "args": args or {},
            }
        )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(self.path, "w") as f:
            json.dump({"traceEvents": self.events, "displayTimeUnit": "ms"}, f)


def from_env(rank: int) -> Timeline | None:
    """The timeline requested by ``BLUEFOG_FN_TIMELINE``, if any."""
    path = os.environ.get("BLUEFOG_FN_TIMELINE")
    return Timeline(path, rank) if path else None
