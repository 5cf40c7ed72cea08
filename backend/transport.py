"""The transport protocol: what a communicator must offer the front end.

Buffers are host numpy arrays (contiguous, any dtype numpy knows; bfloat16 travels as int16 since
only the bytes matter).  Every operation is non-blocking and returns a :class:`Pending`; the
synchronous forms are ``op(...).wait()``.  Waits are bounded by the transport's timeout so that a
dead or diverging peer turns into :class:`~bluefog_fn.backend.CommTimeoutError` instead of a hang.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

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

    Offsets are in bytes; each piece is a typed, contiguous numpy array.  Every operation is
    synchronous (complete at the target when it returns) and is one passive-target epoch:
    ``put``/``get``/``accumulate`` hold a *shared* lock on the target for all their pieces,
    :meth:`lock_self` an *exclusive* lock on this rank's own memory, so a read-and-reset under
    :meth:`lock_self` happens entirely before or entirely after each remote operation on this
    rank's memory.  ``accumulate`` is an atomic element-wise sum (concurrent accumulates to the
    same elements all land).
    """

    def put(self, target: int, pieces: Sequence[tuple[int, np.ndarray]]) -> None:
        """Overwrite ``target``'s bytes at each ``offset`` with the piece's array."""
        ...

    def accumulate(self, target: int, pieces: Sequence[tuple[int, np.ndarray]]) -> None:
        """Add each array element-wise into ``target``'s memory at its offset (atomic)."""
        ...

    def get(self, target: int, pieces: Sequence[tuple[int, np.ndarray]]) -> None:
        """Fill each array with ``target``'s memory at its offset."""
        ...

    def lock_self(self) -> AbstractContextManager[np.ndarray]:
        """Exclusive access to this rank's own memory, yielded as a 1-D uint8 array."""
        ...

    def free(self) -> None:
        """Release the memory (collective: every rank calls it)."""
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
    ) -> ExchangePending:
        """Post every receive, then every send; ``recvs`` are filled in place.

        Each received message must carry ``tag`` and fill its buffer exactly, otherwise ``wait``
        raises ``MismatchError`` naming the peer.
        """
        ...

    def allreduce_sum(self, buf: np.ndarray) -> Pending:
        """Sum ``buf`` over all ranks, in place."""
        ...

    def bcast(self, buf: np.ndarray, root: int) -> Pending:
        """Overwrite ``buf`` on every rank with root's ``buf``."""
        ...

    def allgatherv(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int]) -> Pending:
        """Concatenate every rank's ``send`` (``counts[r]`` elements from rank r) into ``recv``."""
        ...

    def barrier(self) -> Pending:
        """Complete once every rank entered the barrier."""
        ...

    def allgather_object(self, obj: Any) -> list[Any]:
        """Gather one small picklable object from every rank (used for agreement checks)."""
        ...

    def window_create(self, nbytes: int) -> WindowHandle:
        """Allocate ``nbytes`` zeroed bytes of one-sided memory on this rank (collective)."""
        ...
