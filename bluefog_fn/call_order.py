"""Call numbers: every rank numbers its communicating calls the same way.

A correct program makes the same sequence of communicating calls on every rank, so the n-th call
of one rank is the n-th call of every other.  Each message carries its call's number (in the MPI
tag), and a receiver compares it with its own: a rank that skipped a call, ran another step of a
dynamic topology, or sent along a per-call graph its peer does not share is caught by that peer
within one call — without any collective (see ``backend/mpi.py`` for the wire format).
"""

from __future__ import annotations

from collections import deque

from .backend.errors import CallMismatchError

_CAUSES = (
    " — a rank skipped or added a call, ran another step of a dynamic topology, or the ranks' "
    "per-call graphs (dst_weights/src_weights) disagree"
)


class CallOrder:
    """This rank's call counter, a short history for error messages, and deferred calls.

    ``begin`` numbers a call (1, 2, 3, ...).  A call whose messages are posted later than it was
    numbered (an async op under a ``torch.func`` transform posts in ``wait()``) is ``defer``-red
    until it posts, so messages addressed to it are not mistaken for stale ones.

    Example:
        >>> calls = CallOrder()
        >>> calls.begin("neighbor_mean", step=0), calls.begin("global_mean")
        (1, 2)
        >>> calls.describe(1)
        'neighbor_mean(step=0)'
        >>> calls.floor()
        2
    """

    __slots__ = ("_deferred", "_history", "count")

    HISTORY = 64

    def __init__(self) -> None:
        self.count = 0
        self._history: deque[tuple[int, str, int | None, object]] = deque(maxlen=self.HISTORY)
        self._deferred: set[int] = set()

    def begin(self, op: str, step: int | None = None, graph: object = None) -> int:
        """Number the next call: ``op`` at ``step``, with a per-call ``graph`` if any (they name
        it in error messages; formatted only then, so numbering costs no string work)."""
        self.count += 1
        self._history.append((self.count, op, step, graph))
        return self.count

    def defer(self, call: int) -> None:
        self._deferred.add(call)

    def posted(self, call: int) -> None:
        self._deferred.discard(call)

    def floor(self) -> int:
        """Every call below this one has posted all its receives: a peer's message for one of
        them that is still queued can never be received."""
        return min(self._deferred) if self._deferred else self.count

    def describe(self, call: int) -> str | None:
        """What call number ``call`` was on this rank, if it is recent enough to be remembered."""
        for number, op, step, graph in self._history:
            if number == call:
                args = [] if step is None else [f"step={step}"]
                if graph is not None:
                    args.append(f"dst_weights={graph!r}")
                return f"{op}({', '.join(args)})"
        return None


def explain(calls: CallOrder, rank: int, fn: str, exc: CallMismatchError) -> CallMismatchError:
    """``exc`` (raised by the transport) with the op and this rank's record of the calls it
    names, so the error says what each side was doing."""
    text = f"{fn}: {exc}"
    if exc.call is not None and (here := calls.describe(exc.call)):
        text += f"; rank {rank}'s call #{exc.call} is {here}"
    if exc.peer_call is not None and exc.peer_call != exc.call and (there := calls.describe(exc.peer_call)):
        text += f", its call #{exc.peer_call} was {there}"
    return CallMismatchError(text + _CAUSES, peer=exc.peer, peer_call=exc.peer_call, call=exc.call)
