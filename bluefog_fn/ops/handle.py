"""Handles returned by the ``_async`` forms of every op."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from ..plan import CommPlan
    from ..timeline import Span

T = TypeVar("T")


class Handle(Generic[T]):
    """An op in flight.  ``wait()`` returns its result (computed once); ``done()`` never blocks.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> h = bf.global_mean_async(torch.ones(2))
        >>> h.wait().tolist()
        [1.0, 1.0]
    """

    __slots__ = ("_done", "_error", "_finish", "_result", "_test")

    def __init__(self, finish: Callable[[], T], test: Callable[[], bool] | None = None) -> None:
        self._finish: Callable[[], T] | None = finish
        self._test = test
        self._result: Any = None
        self._error: Exception | None = None
        self._done = False

    def done(self) -> bool:
        """True when ``wait()`` would return without blocking on communication."""
        return self._done or self._test is None or self._test()

    def wait(self) -> T:
        """Block until the op completed and return its result (the same object on every call;
        an op that failed raises the same error on every call)."""
        if not self._done:
            if self._error is not None:
                raise self._error
            finish, self._finish = self._finish, None
            assert finish is not None  # internal invariant: set until the first wait
            try:
                self._result = finish()
            except Exception as exc:
                self._error = exc
                raise
            self._done = True
        return self._result  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"Handle(done={self.done()})"


def plan_args(plan: CommPlan) -> dict[str, Any]:
    """The arguments an op's timeline event shows: bytes moved and peers."""
    args: dict[str, Any] = {"bytes_sent": plan.bytes_sent, "bytes_received": plan.bytes_received}
    if plan.op.startswith("neighbor") or plan.sends or plan.recvs:
        args["send_to"] = [d for d, _ in plan.sends]
        args["recv_from"] = [s for s, _ in plan.recvs]
    if plan.root is not None:
        args["root"] = plan.root
    if plan.step is not None:
        args["step"] = plan.step
    return args


def tracked(
    world: Any,
    name: str,
    finish: Callable[[], T],
    test: Callable[[], bool] | None = None,
    span: Span | None = None,
    args: Callable[[], dict[str, Any]] | None = None,
) -> Handle[T]:
    """A :class:`Handle` whose call-to-wait span is recorded on the world's timeline, if any.

    ``span`` is the op's span when the caller already began one (to mark its phases); else one
    begins here.  The span ends after ``finish``; ``args()`` then gives its arguments (bytes,
    peers), computed only when a timeline records them.
    """
    timeline = world.timeline
    if timeline is None:
        return Handle(finish, test)
    if span is None:
        span = timeline.begin(name)
    recording = span

    def finish_and_record() -> T:
        recording.skip()  # the caller's own work between the op's start and its wait
        result = finish()
        recording.end(**(args() if args is not None else {}))
        return result

    return Handle(finish_and_record, test)
