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
