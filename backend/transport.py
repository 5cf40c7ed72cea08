"""The transport protocol: what a communicator must offer the front end.

Buffers are host numpy arrays (contiguous, any dtype numpy knows; bfloat16 travels as int16 since
only the bytes matter).  Every operation is non-blocking and returns a :class:`Pending`; the
synchronous forms are ``op(...).wait()``.  Waits are bounded by the transport's timeout so that a
dead or diverging peer turns into :class:`~bluefog_fn.backend.CommTimeoutError` instead of a hang.
Every operation takes ``what``, the caller's description of the call (``"neighbor_mean (step 3)"``),
which errors name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, Protocol

import numpy as np


class Pending(Protocol):
    """An operation in flight."""

    def done(self) -> bool:
        """True once the operation completed (never blocks)."""
        ...

    def wait(self) -> None:
        """Block until completion; raises ``CommError`` on failure or timeout."""
        ...


class ExchangePending(Pending, Protocol):
    """A neighbour exchange in flight; receives can be consumed as they land."""

    def completed(self) -> Iterator[int]:
        """Yield the index (into ``recvs``) of each receive as it completes, checked; then
        finish the sends.  Lets the caller combine data while it is still in cache."""
        ...


class WindowHandle(Protocol):
    """One-sided memory: ``nbytes`` bytes on every rank (sizes may differ between ranks).

    Offsets are in bytes; each piece is a typed, contiguous numpy array that must stay alive
    and unmodified until its operation completed.  Every access, the owner's own included,
    goes through these operations; each is non-blocking and returns a :class:`Pending` that
    completes when the data is at the target (writes) or in the arrays (reads).  Operations are
    atomic per element: a concurrent ``accumulate`` lands entirely before or entirely after a
    ``swap`` of the same element, so a read-and-reset never loses or double-counts mass.
    No operation waits for a lock, so a busy peer never delays posting one.

    Every wait is bounded by the transport's timeout: an out-of-step or dead peer becomes
    :class:`~bluefog_fn.backend.CommTimeoutError` naming ``what`` and the peer(s).  ``what``
    describes the caller's operation for those messages.
    """

    def put(
        self, target: int, pieces: Sequence[tuple[int, np.ndarray]], what: str = "window put"
    ) -> Pending:
        """Overwrite ``target``'s memory at each ``offset`` with the piece's array."""
        ...

    def accumulate(
        self, target: int, pieces: Sequence[tuple[int, np.ndarray]], what: str = "window accumulate"
    ) -> Pending:
        """Add each array element-wise into ``target``'s memory at its offset."""
        ...

    def get(
        self, target: int, pieces: Sequence[tuple[int, np.ndarray]], what: str = "window get"
    ) -> Pending:
        """Fill each array with ``target``'s memory at its offset."""
        ...

    def swap(
        self,
        target: int,
        pieces: Sequence[tuple[int, np.ndarray]],
        olds: Sequence[np.ndarray],
        what: str = "window swap",
    ) -> Pending:
        """Per element at once: ``olds[k]`` ← ``target``'s memory, which ← ``pieces[k]``'s array."""
        ...

    def barrier(self, what: str) -> None:
        """Return once every rank of the window called ``barrier`` (the same number of times).

        Bounded: after the timeout it raises ``CommTimeoutError`` naming the ranks that did
        not arrive.  Never matched by barriers of other windows or of the transport.
        """
        ...

    def mutex_acquire(self, ranks: Sequence[int], what: str = "window mutex") -> None:
        """Take the user-level mutex of each rank in ``ranks`` (sorted, distinct), in order.

        One mutex lives at every rank; at most one process holds it.  Spins with backoff and
        raises ``CommTimeoutError`` naming the rank whose mutex stayed taken; nothing is held
        after a failure.
        """
        ...

    def mutex_release(self, ranks: Sequence[int], what: str = "window mutex") -> None:
        """Release mutexes taken by :meth:`mutex_acquire`."""
        ...

    def free(self, what: str = "window free") -> None:
        """Release the memory (collective: every rank calls it, after its operations completed).

        Every rank first meets in :meth:`barrier`; if that times out the memory is abandoned
        (never entering the collective release a peer will not join) and the error raised.
        """
        ...


class HeldCall(Protocol):
    """A call whose check collective is in flight and whose next collectives are not posted yet."""

    def ready(self) -> bool:
        """Whether :meth:`settle` would find the check complete (never blocks)."""
        ...

    def settle(self) -> None:
        """Finish the check and post the call's next collectives (blocks; once)."""
        ...


class Transport(Protocol):
    """A communicator over ``size`` ranks, of which this process is ``rank``."""

    rank: int
    size: int
    timeout: float

    def exchange(
        self,
        sends: Sequence[tuple[int, np.ndarray]],
        recvs: Sequence[tuple[int, np.ndarray]],
        tag: int,
        *,
        call: int | None = None,
        what: str = "neighbor exchange",
    ) -> ExchangePending:
        """Post every receive, then every send; ``recvs`` are filled in place.

        Each received message must carry ``tag`` and ``call`` (the caller's number for this
        call, equal on every rank; ``None``: unnumbered) and fill its buffer exactly, otherwise
        ``wait`` raises ``MismatchError`` naming the peer; a timeout names the peers that did
        not answer.
        """
        ...

    def begin_call(self, call: int, floor: int, messages: bool = True) -> None:
        """This rank starts its numbered call ``call`` (every rank numbers its calls alike);
        calls below ``floor`` have posted all their receives, so a peer's message queued for
        one of them proves the ranks diverged: raise ``MismatchError`` naming the peer.
        ``messages=False``: the call is a global op, so a peer's point-to-point message of
        ``call`` itself proves it too (found while this rank waits in the op)."""
        ...

    def allreduce_sum(self, buf: np.ndarray, what: str = "global reduction") -> Pending:
        """Sum ``buf`` over all ranks, in place."""
        ...

    def allreduce_max(self, buf: np.ndarray, what: str = "call check") -> Pending:
        """Element-wise maximum of ``buf`` (int64) over all ranks, in place: the call checks.

        Ordered among themselves only (MPI runs them on a communicator of their own), so it
        settles no held call: an async op's check never waits for an earlier call's."""
        ...

    def hold(self, call: HeldCall) -> None:
        """Keep ``call`` until :meth:`settle`: every other collective operation settles the held
        calls first (so all ranks post their collectives in the same order), and a waiting rank
        settles those whose check is complete, oldest first."""
        ...

    def settle(self) -> None:
        """Settle the held calls, oldest first (raising the first failure)."""
        ...

    def bcast(self, buf: np.ndarray, root: int, what: str = "broadcast") -> Pending:
        """Overwrite ``buf`` on every rank with root's ``buf``."""
        ...

    def allgatherv(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int], what: str = "allgather") -> Pending:
        """Concatenate every rank's ``send`` (``counts[r]`` elements from rank r) into ``recv``."""
        ...

    def barrier(self, what: str = "barrier") -> Pending:
        """Complete once every rank entered the barrier."""
        ...

    def allgather_object(self, obj: Any, what: str = "agreement") -> list[Any]:
        """Gather one small picklable object from every rank (used for agreement checks)."""
        ...

    def close(self) -> None:
        """Leave the job: wait (bounded) until every rank left, then release the communicator.

        Raises ``CommTimeoutError`` naming the ranks that did not leave in time.
        """
        ...

    def abort(self, code: int) -> NoReturn:
        """End every process of the job now (an uncaught error on one rank)."""
        ...

    def window_create(self, nbytes: int) -> WindowHandle:
        """Allocate ``nbytes`` zeroed bytes of one-sided memory on this rank (collective)."""
        ...
