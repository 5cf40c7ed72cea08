"""Handles returned by the ``_async`` forms of every op."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Handle(Generic[T]):
    """An op in flight.  ``wait()`` returns its result (computed once); ``done()`` never blocks.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> h = bf.global_mean_async(torch.ones(2))
        >>> h.wait().tolist()
        [1.0, 1.0]
    """

    __slots__ = ("_done", "_finish", "_result", "_test")

    def __init__(self, finish: Callable[[], T], test: Callable[[], bool] | None = None) -> None:
        self._finish: Callable[[], T] | None = finish
        self._test = test
        self._result: Any = None
        self._done = False

    def done(self) -> bool:
        """True when ``wait()`` would return without blocking on communication."""
        return self._done or self._test is None or self._test()

    def wait(self) -> T:
        """Block until the op completed and return its result (the same object on every call)."""
        if not self._done:
            finish, self._finish = self._finish, None
            assert finish is not None  # internal invariant: set until the first wait
            self._result = finish()
            self._done = True
        return self._result  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"Handle(done={self.done()})"


def tracked(world: Any, name: str, finish: Callable[[], T], test: Callable[[], bool] | None = None) -> Handle[T]:
    """A :class:`Handle` whose call-to-wait span is recorded on the world's timeline, if any."""
    timeline = world.timeline
    if timeline is None:
        return Handle(finish, test)
    start = timeline.now()

    def finish_and_record() -> T:
        result = finish()
        timeline.record(name, start, timeline.now())
        return result

    return Handle(finish_and_record, test)
