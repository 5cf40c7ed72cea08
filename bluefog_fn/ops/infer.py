"""Graph discovery collectives: ``infer_sources`` and ``infer_destinations``.

Each rank knows one side of its edges (whom it sends to, or whom it receives from); one
allgather of those lists tells every rank the other side. BlueFog's
``InferSourceFromDestinationRanks`` / ``InferDestinationFromSourceRanks``.

In a simulated world there is nothing to exchange: the call takes every agent's list at once
(a list of ``n`` lists) and returns every agent's answer (a list of ``n`` tuples).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, TypeAlias

from ..world import current

__all__ = ["infer_destinations", "infer_sources"]

Inferred: TypeAlias = tuple[int, ...] | list[tuple[int, ...]]
"""One rank's answer, or (in a simulated world) every agent's."""

# Sent ahead of the lists so that a rank calling the other function is reported, not mixed in.
OP_CODE = {"infer_sources": 1, "infer_destinations": 2}


def canonical(fn: str, arg: str, ranks: object, rank: int, size: int) -> tuple[int, ...]:
    """``ranks`` as a sorted tuple of distinct ints in ``[0, size)`` other than ``rank``."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise TypeError(f"{fn}: {arg} must be a list of ranks, got {type(ranks).__name__} {ranks!r}")
    out: list[int] = []
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral):
            raise TypeError(f"{fn}: {arg} must hold int ranks, got {type(r).__name__} {r!r} in {list(ranks)!r}")
        value = int(r)
        if not 0 <= value < size:
            raise ValueError(f"{fn}: {arg} names rank {value}, outside [0, {size}) for a world of {size}")
        if value == rank:
            raise ValueError(f"{fn}: {arg} of rank {rank} names rank {rank} itself; list other ranks only")
        out.append(value)
    if len(set(out)) != len(out):
        dup = sorted({r for r in out if out.count(r) > 1})
        raise ValueError(f"{fn}: {arg} names rank(s) {dup} more than once: {list(ranks)!r}")
    return tuple(sorted(out))


def invert(lists: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """``out[j]`` = the ranks ``i`` (sorted) whose list holds ``j``."""
    out: list[list[int]] = [[] for _ in lists]
    for i, targets in enumerate(lists):
        for j in targets:
            out[j].append(i)
    return [tuple(r) for r in out]


def _infer(fn: str, arg: str, ranks: Any) -> Inferred:
    world = current()
    return world.executor.infer(world, fn, arg, ranks)  # type: ignore[no-any-return]


def simulated_infer(fn: str, arg: str, ranks: Any, n: int) -> Inferred:
    """Every agent's answer at once: ``ranks`` holds the n agents' lists."""
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or len(ranks) != n:
        raise ValueError(
            f"{fn}: inside bf.simulate({n}) {arg} must be a list of {n} lists, one per agent, "
            f"got {ranks!r}"
        )
    per_agent = [canonical(fn, f"{arg}[{i}]", r, i, n) for i, r in enumerate(ranks)]
    return invert(per_agent)


def infer_sources(dst_ranks: Sequence[int] | Sequence[Sequence[int]]) -> Inferred:
    """The ranks that send to this rank, given every rank's destinations (a collective).

    Every rank passes the ranks it sends to; each gets back, sorted, the ranks whose
    ``dst_ranks`` name it — its in-neighbours. Arguments are checked before any message: ints
    in ``[0, size)``, no repeats, not the rank itself (a ``ValueError`` or ``TypeError`` naming
    ``dst_ranks`` and the value). A rank calling :func:`infer_destinations` instead makes every
    rank raise :class:`~bluefog_fn.MismatchError`.

    In ``bf.simulate(n)`` pass every agent's list, ``[dst_ranks_0, …, dst_ranks_{n-1}]``, and get
    every agent's sources back as a list of ``n`` tuples (no communication happens).

    Differences from BlueFog's ``InferSourceFromDestinationRanks``: a tuple instead of a list,
    and no ``construct_adjacency_matrix`` option (build one with ``bf.topology.from_matrix``).

    Args:
        dst_ranks: The ranks this rank sends to.

    Returns:
        The sorted tuple of ranks that send to this rank.

    Example:
        >>> import bluefog_fn as bf
        >>> bf.topology.infer_sources([])
        ()
        >>> with bf.simulate(3):
        ...     bf.topology.infer_sources([[1], [2], [0, 1]])
        [(2,), (0, 2), (1,)]
    """
    return _infer("infer_sources", "dst_ranks", dst_ranks)


def infer_destinations(src_ranks: Sequence[int] | Sequence[Sequence[int]]) -> Inferred:
    """The ranks this rank sends to, given every rank's sources (a collective).

    Every rank passes the ranks it receives from; each gets back, sorted, the ranks whose
    ``src_ranks`` name it — its out-neighbours. Validation, mismatch detection and the
    simulated form are those of :func:`infer_sources`. BlueFog's
    ``InferDestinationFromSourceRanks``.

    Args:
        src_ranks: The ranks this rank receives from.

    Returns:
        The sorted tuple of ranks that receive from this rank.

    Example:
        >>> import bluefog_fn as bf
        >>> bf.topology.infer_destinations([])
        ()
        >>> with bf.simulate(3):
        ...     bf.topology.infer_destinations([[1], [2], [0, 1]])
        [(2,), (0, 2), (1,)]
    """
    return _infer("infer_destinations", "src_ranks", src_ranks)
