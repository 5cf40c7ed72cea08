"""The transport of a world of one process: every collective is the identity."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from .errors import MismatchError

if TYPE_CHECKING:
    from .transport import HeldCall


class _Done:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None

    def completed(self) -> Iterator[int]:
        return iter(())


class LocalWindow:
    """One-sided memory of a world of one: rank 0 is the only target; operations complete at once."""

    def __init__(self, nbytes: int) -> None:
        self.memory: np.ndarray | None = np.zeros(nbytes, dtype=np.uint8)

    def _mem(self, what: str, target: int, offset: int, arr: np.ndarray) -> np.ndarray:
        if self.memory is None:
            raise RuntimeError(f"{what}: the window memory was freed")
        if target != 0 or offset < 0 or offset + arr.nbytes > self.memory.size:
            raise ValueError(
                f"{what}: target {target} bytes [{offset}, {offset + arr.nbytes}) out of range"
            )
        return self.memory[offset : offset + arr.nbytes].view(arr.dtype)

    def put(
        self, target: int, pieces: Sequence[tuple[int, np.ndarray]], what: str = "window put"
    ) -> _Done:
        for offset, arr in pieces:
            self._mem(what, target, offset, arr)[:] = arr
        return _Done()

    def accumulate(
        self, target: int, pieces: Sequence[tuple[int, np.ndarray]], what: str = "window accumulate"
    ) -> _Done:
        for offset, arr in pieces:
            self._mem(what, target, offset, arr)[:] += arr
        return _Done()

    def get(
        self, target: int, pieces: Sequence[tuple[int, np.ndarray]], what: str = "window get"
    ) -> _Done:
        for offset, arr in pieces:
            arr[:] = self._mem(what, target, offset, arr)
        return _Done()

    def swap(
        self,
        target: int,
        pieces: Sequence[tuple[int, np.ndarray]],
        olds: Sequence[np.ndarray],
        what: str = "window swap",
    ) -> _Done:
        for (offset, arr), old in zip(pieces, olds, strict=True):
            mem = self._mem(what, target, offset, arr)
            old[:] = mem
            mem[:] = arr
        return _Done()

    def barrier(self, what: str) -> None:
        return None

    def mutex_acquire(self, ranks: Sequence[int], what: str = "window mutex") -> None:
        if list(ranks) not in ([], [0]):
            raise ValueError(f"{what}: a world of one has only rank 0, got ranks {list(ranks)}")

    def mutex_release(self, ranks: Sequence[int], what: str = "window mutex") -> None:
        return None

    def free(self, what: str = "window free") -> None:
        self.memory = None


class LocalTransport:
    """Transport for ``size == 1``; there are no peers, so nothing ever waits."""

    rank = 0
    size = 1
    timeout = 0.0

    def begin_call(self, call: int, floor: int, messages: bool = True) -> None:
        return None

    def exchange(
        self,
        sends: Sequence[tuple[int, np.ndarray]],
        recvs: Sequence[tuple[int, np.ndarray]],
        tag: int,
        *,
        call: int | None = None,
        what: str = "neighbor exchange",
    ) -> _Done:
        # A plan in a world of one has no peers; anything else is a planner bug worth surfacing.
        if sends or recvs:
            raise MismatchError(f"{what}: a world of one rank has no peers to talk to")
        return _Done()

    def allreduce_sum(self, buf: np.ndarray, what: str = "global reduction") -> _Done:
        return _Done()

    def allreduce_max(self, buf: np.ndarray, what: str = "call check") -> _Done:
        return _Done()

    def hold(self, call: HeldCall) -> None:
        call.settle()  # no peers to order against

    def settle(self) -> None:
        return None

    def bcast(self, buf: np.ndarray, root: int, what: str = "broadcast") -> _Done:
        return _Done()

    def allgatherv(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int], what: str = "allgather") -> _Done:
        recv[: send.size] = send
        return _Done()

    def barrier(self, what: str = "barrier") -> _Done:
        return _Done()

    def allgather_object(self, obj: Any, what: str = "agreement") -> list[Any]:
        return [obj]

    def close(self) -> None:
        return None

    def abort(self, code: int) -> NoReturn:
        # No peers to take down: ending this process ends the job.
        os._exit(code)

    def window_create(self, nbytes: int) -> LocalWindow:
        return LocalWindow(nbytes)
