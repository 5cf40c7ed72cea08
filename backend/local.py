"""The transport of a world of one process: every collective is the identity."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .errors import MismatchError


class _Done:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def completed(self) -> Iterator[int]:
        return iter(())


class LocalTransport:
    """Transport for ``size == 1``; there are no peers, so nothing ever waits."""

    rank = 0
    size = 1
    timeout = 0.0

    def exchange(
        self,
        sends: Sequence[tuple[int, np.ndarray]],
        recvs: Sequence[tuple[int, np.ndarray]],
        tag: int,
    ) -> _Done:
        # A plan in a world of one has no peers; anything else is a planner bug worth surfacing.
        if sends or recvs:
            raise MismatchError("exchange: a world of one rank has no peers to talk to")
        return _Done()

    def allreduce_sum(self, buf: np.ndarray) -> _Done:
        return _Done()

    def bcast(self, buf: np.ndarray, root: int) -> _Done:
        return _Done()

    def allgatherv(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int]) -> _Done:
        recv[: send.size] = send
        return _Done()

    def barrier(self) -> _Done:
        return _Done()

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]
