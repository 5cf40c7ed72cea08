"""Timelines: where the time of every rank goes, as one Chrome trace (Perfetto, chrome://tracing).

Enable with ``bfrun --timeline out.json`` (or ``BLUEFOG_FN_TIMELINE=out.json``).  Every rank then
appends its events, one line per finished op or activity, to ``out.json.rank<r>.jsonl`` as it
goes, so a job that crashes still leaves everything recorded up to the crash; when the job ends
(also when it failed) ``bfrun`` merges those files into one trace ``out.json`` with one process
track per rank (see :mod:`bluefog_fn.timeline_merge`).

What a trace holds, per rank:

* every op (``neighbor_mean``, ``global_mean``, ``Window.put``...) as a span from its call to the
  end of its ``wait()``, with ``bytes`` and ``peers`` as arguments, and inside it its phases:
  ``trace`` (plan lookup), ``agree`` (cross-rank check), ``pack``, ``send`` (posting),
  ``wait``, ``combine`` (the weighted sum; segments combined while others are still in flight
  nest inside ``wait``) and ``unpack``.  Async ops whose spans overlap go on separate lanes;
* user activities: ``with bf.timeline.activity("forward"): ...`` or ``@bf.timeline.activity("step")``.

When no timeline is enabled an op pays one attribute check; activities cost one function call.

Example:
    >>> import bluefog_fn as bf
    >>> with bf.timeline.activity("forward"):
    ...     pass
    >>> @bf.timeline.activity("step")
    ... def step() -> int:
    ...     return 1
    >>> step()
    1
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

ENV = "BLUEFOG_FN_TIMELINE"
PHASES = ("trace", "agree", "pack", "send", "wait", "combine", "unpack")

# Track ids inside a rank's process: op lanes count up from 0, threads' activity tracks from here.
_ACTIVITY_TID = 1000


def part_path(path: str, rank: int) -> str:
    """The file rank ``rank`` appends its events to while a job runs."""
    return f"{path}.rank{rank}.jsonl"


class Span:
    """One op being recorded: its phases are marked as they end (see :meth:`Timeline.begin`).

    ``phase(name)`` closes the phase that began at the previous mark; ``skip()`` moves the mark
    without recording (e.g. the caller's own work between an async op's start and its wait);
    ``add(name, start, end)`` records a phase with explicit bounds; ``end(**args)`` writes the op.
    """

    __slots__ = ("args", "lane", "last", "name", "phases", "start", "timeline")

    def __init__(self, timeline: Timeline, name: str, lane: int, args: dict[str, Any]) -> None:
        self.timeline = timeline
        self.name = name
        self.lane = lane
        self.args = args
        self.start = self.last = time.perf_counter()
        self.phases: list[tuple[str, float, float]] = []

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def phase(self, name: str) -> None:
        now = time.perf_counter()
        self.phases.append((name, self.last, now))
        self.last = now

    def skip(self) -> None:
        self.last = time.perf_counter()

    def add(self, name: str, start: float, end: float) -> None:
        self.phases.append((name, start, end))
        self.last = max(self.last, end)

    def end(self, **args: Any) -> None:
        self.args.update(args)
        self.timeline._finish(self, time.perf_counter())


class Timeline:
    """The events of one rank, appended to ``part_path(path, rank)`` one line per finished event.

    Each line is a JSON list of Chrome trace events (``ts`` in µs since this timeline started;
    the first line is a header with the wall-clock origin, used to align ranks when merging).
    A line is written with a single ``write`` on an append-only file, so every op that finished
    before the process died is on disk, and at most a last partial line can be lost.
    """

    def __init__(self, path: str, rank: int, size: int = 1, *, merge_on_close: bool = False) -> None:
        self.path = path
        self.merge_on_close = merge_on_close  # a world of one has no bfrun to merge its file
        self.part = part_path(path, rank)
        self.rank = rank
        directory = os.path.dirname(self.part)
        if directory:
            os.makedirs(directory, exist_ok=True)
        self._fd: int | None = os.open(self.part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self._origin = time.perf_counter()
        self._lock = threading.Lock()
        self._lanes: list[float] = []  # per op lane: when its last span ends (inf while in flight)
        self._threads: dict[int, int] = {}
        self._named_lanes: set[int] = set()
        header = {
            "bluefog_fn_timeline": 1, "rank": rank, "size": size, "pid": os.getpid(),
            "host": socket.gethostname(), "origin_us": time.time_ns() / 1e3,
        }
        self._write([header])
        atexit.register(self.close)

    # ----------------------------------------------------------------- recording

    def now(self) -> float:
        """The clock of every event (``time.perf_counter`` seconds)."""
        return time.perf_counter()

    def begin(self, name: str, **args: Any) -> Span:
        """Start recording op ``name`` now, on the lowest lane free of overlapping op spans."""
        with self._lock:
            lane = self._free_lane(time.perf_counter())
            self._lanes[lane] = float("inf")
        return Span(self, name, lane, args)

    def record(self, name: str, start: float, end: float, args: dict[str, Any] | None = None) -> None:
        """An op span with no phases from ``start`` to ``end`` (``now()`` values)."""
        with self._lock:
            lane = self._free_lane(start)
            self._lanes[lane] = start
        span = Span(self, name, lane, dict(args or {}))
        span.start = start
        self._finish(span, end)

    def activity(self, name: str, start: float, end: float, args: dict[str, Any] | None = None) -> None:
        """A user activity of the calling thread from ``start`` to ``end``."""
        tid, meta = self._thread_track()
        event = {"name": name, "cat": "activity", "ph": "X", "ts": self._us(start), "dur": (end - start) * 1e6,
                 "pid": self.rank, "tid": tid, "args": args or {}}
        self._write([*meta, event])

    def close(self) -> None:
        """Stop recording (idempotent); everything recorded is already on disk."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            if self.merge_on_close:
                from .timeline_merge import merge

                merge(self.path)

    # ----------------------------------------------------------------- internals

    def _us(self, t: float) -> float:
        return round((t - self._origin) * 1e6, 3)

    def _free_lane(self, start: float) -> int:
        for i, busy_until in enumerate(self._lanes):
            if busy_until <= start:
                return i
        self._lanes.append(0.0)
        return len(self._lanes) - 1

    def _thread_track(self) -> tuple[int, list[dict[str, Any]]]:
        ident = threading.get_ident()
        tid = self._threads.get(ident)
        if tid is not None:
            return tid, []
        with self._lock:
            tid = self._threads.setdefault(ident, _ACTIVITY_TID + len(self._threads))
        thread = threading.current_thread()
        label = "activities" if thread is threading.main_thread() else f"activities ({thread.name})"
        return tid, [_thread_name(self.rank, tid, label)]

    def _finish(self, span: Span, end: float) -> None:
        lane = span.lane
        with self._lock:
            if lane < len(self._lanes):
                self._lanes[lane] = end
        pid = self.rank
        # Formatted by hand: json.dumps of eight small dicts cost more than the op it records.
        origin = self._origin
        parts = []
        if self._lane_named(lane):
            parts.append(json.dumps(_thread_name(pid, lane, "ops" if lane == 0 else f"ops (overlapping, {lane + 1})")))
        parts.append(
            f'{{"name":{json.dumps(span.name)},"cat":"op","ph":"X","ts":{(span.start - origin) * 1e6:.3f},'
            f'"dur":{(end - span.start) * 1e6:.3f},"pid":{pid},"tid":{lane},'
            f'"args":{json.dumps(span.args, separators=(",", ":"), default=str)}}}'
        )
        for name, start, stop in span.phases:
            quoted = f'"{name}"' if name in PHASES else json.dumps(name)
            parts.append(
                f'{{"name":{quoted},"cat":"phase","ph":"X","ts":{(start - origin) * 1e6:.3f},'
                f'"dur":{(stop - start) * 1e6:.3f},"pid":{pid},"tid":{lane}}}'
            )
        self._write_line("[" + ",".join(parts) + "]\n")

    def _lane_named(self, lane: int) -> bool:
        """True the first time ``lane`` is used (its name is written once)."""
        with self._lock:
            if lane in self._named_lanes:
                return False
            self._named_lanes.add(lane)
            return True

    def _write(self, events: list[dict[str, Any]]) -> None:
        self._write_line(json.dumps(events, separators=(",", ":"), default=str) + "\n")

    def _write_line(self, line: str) -> None:
        fd = self._fd
        if fd is None:
            return
        with contextlib.suppress(OSError):  # a full disk must not break training
            os.write(fd, line.encode())


def _thread_name(pid: int, tid: int, name: str) -> dict[str, Any]:
    return {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}}


def from_env(rank: int, size: int = 1, *, merge_on_close: bool = False) -> Timeline | None:
    """The timeline requested by ``BLUEFOG_FN_TIMELINE``, if any."""
    path = os.environ.get(ENV)
    return Timeline(os.path.abspath(path), rank, size, merge_on_close=merge_on_close) if path else None


def _current() -> Timeline | None:
    from . import world

    process = world._process_world()
    if process is None:
        if ENV not in os.environ:
            return None
        world.init()  # the first library call of a traced job may be an activity
        process = world._process_world()
    return None if process is None else process.timeline


def enabled() -> bool:
    """True when this process records a timeline.

    Example:
        >>> import bluefog_fn as bf
        >>> isinstance(bf.timeline.enabled(), bool)
        True
    """
    return _current() is not None


class activity(contextlib.ContextDecorator):  # lower case: it reads like a function, activity("x")
    """Mark a span of user work on this rank's timeline: a context manager and a decorator.

    Activities nest and appear on the calling thread's track of the rank, around the ops they
    contain.  Without a timeline they cost one function call and record nothing.

    Args:
        name: the label shown in the trace viewer.
        **args: extra values shown with the event (numbers or strings).

    Example:
        >>> import bluefog_fn as bf
        >>> with bf.timeline.activity("forward", batch=3):
        ...     x = 1 + 1
        >>> @bf.timeline.activity("optimizer step")
        ... def step(x: int) -> int:
        ...     return x + 1
        >>> step(1)
        2
    """

    def __init__(self, name: str, **args: Any) -> None:
        if not isinstance(name, str):
            raise TypeError(f"timeline.activity: name must be a str, got {type(name).__name__} {name!r}")
        self.name = name
        self.args = args
        self._starts: list[tuple[Timeline, float]] = []  # a stack: the decorator may recurse

    def __enter__(self) -> activity:
        timeline = _current()
        if timeline is not None:
            self._starts.append((timeline, time.perf_counter()))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._starts:
            timeline, start = self._starts.pop()
            timeline.activity(self.name, start, time.perf_counter(), self.args)


@contextlib.contextmanager
def op(name: str, **args: Any) -> Iterator[Span | None]:
    """Record the enclosed block as op ``name`` (for ops outside the core paths, e.g. windows).

    Yields the :class:`Span` (mark phases with ``span.phase("send")``...), or ``None`` when no
    timeline is enabled.

    Example:
        >>> import bluefog_fn as bf
        >>> with bf.timeline.op("my_exchange", peers=[1]) as span:
        ...     if span is not None:
        ...         span.phase("send")
    """
    timeline = _current()
    if timeline is None:
        yield None
        return
    span = timeline.begin(name, **args)
    try:
        yield span
    finally:
        span.end()


def traced(name: str) -> Callable[[F], F]:
    """Decorate a method so each call is recorded as op ``name`` (one attribute check when off)."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*a: Any, **kw: Any) -> Any:
            timeline = _current()
            if timeline is None:
                return fn(*a, **kw)
            span = timeline.begin(name)
            try:
                return fn(*a, **kw)
            finally:
                span.end()

        return inner  # type: ignore[return-value]

    return wrap
