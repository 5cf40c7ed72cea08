"""Errors raised by the execution engine (re-exported by ``bluefog_fn``)."""

from __future__ import annotations


class CommError(RuntimeError):
    """A communication failed: a peer died, sent something unexpected, or the MPI call failed."""


class CommTimeoutError(CommError):
    """A peer did not answer within the world's timeout (``BLUEFOG_FN_TIMEOUT`` seconds).

    Usually a dead rank, or ranks calling different ops; the message names the pending peers.
    """


class MismatchError(CommError, ValueError):
    """Ranks disagreed about a call (tree structure, shapes, dtypes, step, topology or weights).

    Raised identically on every rank that took part in the agreement, before any data moved.
    """


class CallMismatchError(MismatchError):
    """A peer's message belongs to another call than the one this rank is making.

    ``peer`` sent it during its call number ``peer_call`` (``None`` when the peer only reported
    that it found a mismatch with this rank); this rank is at call ``call``.  Call numbers count
    the communicating calls of each rank from 1 (modulo the tag space; see ``backend/mpi.py``).
    """

    def __init__(self, message: str, *, peer: int, peer_call: int | None, call: int | None) -> None:
        super().__init__(message)
        self.peer = peer
        self.peer_call = peer_call
        self.call = call
