"""MPI transport: the only module of the project that imports mpi4py.

Buffers move zero-copy through the buffer protocol.  Library traffic runs on a duplicate of the
world communicator so it can never match a user's own messages.  Waits poll with a deadline, so a
dead or diverging peer becomes a :class:`CommTimeoutError` naming who is missing.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import mpi4py
import numpy as np

# mpi4py asks for MPI_THREAD_MULTIPLE by default; MPICH then guards every call with a global
# lock and yields inside polls, which made a polled 1-element exchange 500x slower (1.2 ms vs
# 2 us measured).  The library calls MPI from one thread at a time, so SERIALIZED is enough.
# (Only effective when this module is the first to import mpi4py.MPI.)
if "mpi4py.MPI" not in sys.modules:
    mpi4py.rc.thread_level = os.environ.get("MPI4PY_RC_THREAD_LEVEL", "serialized")

from mpi4py import MPI

from .errors import CommTimeoutError, MismatchError

# Waits poll MPI: busy for the first _SPIN_SECONDS (latency), then yielding the core between polls
# (oversubscribed runs would otherwise starve the very peer they wait for), then, for long waits,
# sleeping briefly so an idle rank does not burn a core.
_SPIN_SECONDS = 1e-3
_YIELD_SECONDS = 5e-2


class _Backoff:
    """Paces a polling loop and enforces the deadline."""

    __slots__ = ("start", "timeout", "what")

    def __init__(self, timeout: float, what: str) -> None:
        self.start = time.perf_counter()
        self.timeout = timeout
        self.what = what

    def idle(self, pending: list[MPI.Request], peers: Sequence[int]) -> None:
        """Called when a poll found nothing new; raises once the deadline passed."""
        waited = time.perf_counter() - self.start
        if waited > self.timeout:
            missing = sorted({p for p, r in zip(peers, pending, strict=True) if r != MPI.REQUEST_NULL})
            for r in pending:
                if r != MPI.REQUEST_NULL:
                    with contextlib.suppress(MPI.Exception):  # cancel is best effort
                        r.Cancel()
            raise CommTimeoutError(
                f"{self.what}: no answer from rank(s) {missing} after {self.timeout:g} s; a peer "
                "died or the ranks are calling different ops (BLUEFOG_FN_TIMEOUT sets the limit)"
            )
        if waited > _YIELD_SECONDS:
            time.sleep(1e-4)
        elif waited > _SPIN_SECONDS:
            os.sched_yield()


def _wait_all(requests: list[MPI.Request], timeout: float, what: str, peers: Sequence[int]) -> None:
    if not requests:
        return
    backoff = _Backoff(timeout, what)
    while not MPI.Request.Testall(requests):
        backoff.idle(requests, peers)


class _Exchange:
    """Receives (first) and sends of one neighbour exchange, in flight."""

    def __init__(
        self,
        recv_reqs: list[MPI.Request],
        sources: list[int],
        recv_bufs: list[np.ndarray],
        send_reqs: list[MPI.Request],
        dests: list[int],
        tag: int,
        timeout: float,
    ) -> None:
        self._recv_reqs = recv_reqs
        self._sources = sources
        self._recv_bufs = recv_bufs
        self._send_reqs = send_reqs
        self._dests = dests
        self._tag = tag
        self._timeout = timeout
        self._finished = False

    def done(self) -> bool:
        if self._finished:
            return True
        return bool(MPI.Request.Testall(self._recv_reqs + self._send_reqs))

    def completed(self) -> Iterator[int]:
        """Yield the index of each receive as it lands (checked), then finish the sends."""
        if self._finished:
            return
        backoff: _Backoff | None = None
        remaining = len(self._recv_reqs)
        statuses = [MPI.Status() for _ in self._recv_reqs]
        while remaining:
            try:
                indices = MPI.Request.Testsome(self._recv_reqs, statuses)
            except MPI.Exception as exc:
                raise MismatchError(
                    f"neighbor exchange: a peer sent more data than expected ({exc.Get_error_string()}); "
                    "ranks are calling with different tree shapes or dtypes"
                ) from exc
            if not indices:
                if backoff is None:  # started lazily: most small exchanges complete at once
                    backoff = _Backoff(self._timeout, "neighbor exchange")
                backoff.idle(self._recv_reqs, self._sources)
                continue
            for k, i in enumerate(indices):
                self._check(i, statuses[k])
                remaining -= 1
                yield i
        _wait_all(self._send_reqs, self._timeout, "neighbor exchange", self._dests)
        self._finished = True

    def wait(self) -> None:
        for _ in self.completed():
            pass

    def _check(self, i: int, status: MPI.Status) -> None:
        peer, buf = self._sources[i], self._recv_bufs[i]
        if status.Get_tag() != self._tag:
            raise MismatchError(
                f"neighbor exchange: rank {peer} sent a message for a different call "
                f"(tag {status.Get_tag()}, expected {self._tag}); ranks are calling different "
                "ops, trees, steps or topologies"
            )
        got = status.Get_count(MPI.BYTE)
        if got != buf.nbytes:
            raise MismatchError(
                f"neighbor exchange: rank {peer} sent {got} bytes where {buf.nbytes} were "
                "expected; ranks are calling with different tree shapes or dtypes"
            )


class _Collective:
    """One non-blocking collective in flight."""

    def __init__(self, request: MPI.Request, what: str, timeout: float) -> None:
        self._request = request
        self._what = what
        self._timeout = timeout
        self._finished = False

    def done(self) -> bool:
        return self._finished or bool(self._request.Test())

    def wait(self) -> None:
        if self._finished:
            return
        _wait_all([self._request], self._timeout, self._what, [-1])
        self._finished = True


class MpiTransport:
    """Transport over an MPI communicator (a private duplicate of ``comm``)."""

    def __init__(self, comm: MPI.Comm, timeout: float) -> None:
        self.comm = comm.Dup()
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.timeout = timeout

    def free(self) -> None:
        """Release the private communicator."""
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()

    def exchange(
        self,
        sends: Sequence[tuple[int, np.ndarray]],
        recvs: Sequence[tuple[int, np.ndarray]],
        tag: int,
    ) -> _Exchange:
        # Receives first, so eager sends from fast peers land directly in their final buffer.
        # ANY_TAG: a message meant for another call is received and reported, not left to hang.
        recv_reqs = [self.comm.Irecv([buf, MPI.BYTE], source=src, tag=MPI.ANY_TAG) for src, buf in recvs]
        send_reqs = [self.comm.Isend([buf, MPI.BYTE], dest=dst, tag=tag) for dst, buf in sends]
        return _Exchange(
            recv_reqs, [s for s, _ in recvs], [b for _, b in recvs], send_reqs, [d for d, _ in sends], tag, self.timeout
        )

    def allreduce_sum(self, buf: np.ndarray) -> _Collective:
        req = self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return _Collective(req, "global reduction", self.timeout)

    def bcast(self, buf: np.ndarray, root: int) -> _Collective:
        # Broadcast moves bytes, so any dtype (half types included) travels unchanged.
        req = self.comm.Ibcast([buf, MPI.BYTE], root=root)
        return _Collective(req, "broadcast", self.timeout)

    def allgatherv(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int]) -> _Collective:
        itemsize = send.dtype.itemsize
        byte_counts = [int(c) * itemsize for c in counts]
        displs = np.concatenate([[0], np.cumsum(byte_counts)[:-1]]).astype(int).tolist()
        req = self.comm.Iallgatherv(
            [send.view(np.uint8), MPI.BYTE], [recv.view(np.uint8), (byte_counts, displs), MPI.BYTE]
        )
        return _Collective(req, "allgather", self.timeout)

    def barrier(self) -> _Collective:
        return _Collective(self.comm.Ibarrier(), "barrier", self.timeout)

    def allgather_object(self, obj: Any) -> list[Any]:
        # Small pickled payloads only (agreement digests); bounded by the same deadline as data.
        payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        mine = np.array([payload.size], dtype=np.int64)
        _Collective(self.comm.Iallgather(mine, sizes), "agreement", self.timeout).wait()
        recv = np.empty(int(sizes.sum()), dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        _Collective(
            self.comm.Iallgatherv([payload, MPI.BYTE], [recv, (sizes.tolist(), displs), MPI.BYTE]),
            "agreement",
            self.timeout,
        ).wait()
        out = []
        for r in range(self.size):
            start = displs[r]
            out.append(pickle.loads(recv[start : start + int(sizes[r])].tobytes()))
        return out

    def window_create(self, nbytes: int) -> MpiWindow:
        # Collective; the front end enters it on every rank after the same agreement check.
        return MpiWindow(self.comm, nbytes, self.timeout)


class MpiWindow:
    """MPI-3 one-sided memory (``MPI_Win_allocate``, bytes) with passive-target synchronisation.

    ``put``/``get``/``accumulate`` lock the target *shared*, post one request-based operation
    per piece (``Rput``/``Rget``/``Raccumulate`` with ``MPI_SUM``, typed by the piece's dtype),
    poll them with the transport's deadline, then unlock, which completes them at the target:
    each call is synchronous.  ``lock_self`` locks this rank's own window *exclusive* (and
    ``Sync``s the public and private copies), so local reads and writes exclude every remote
    operation on this rank's memory.
    """

    def __init__(self, comm: MPI.Comm, nbytes: int, timeout: float) -> None:
        self.timeout = timeout
        self.rank = comm.Get_rank()
        self.win: MPI.Win | None = MPI.Win.Allocate(nbytes, disp_unit=1, comm=cast(MPI.Intracomm, comm))
        self.memory: np.ndarray = (
            np.frombuffer(cast(Any, self.win.tomemory()), dtype=np.uint8, count=nbytes) if nbytes else np.zeros(0, np.uint8)
        )
        with self.lock_self() as mem:
            mem[:] = 0

    def _open(self, what: str) -> MPI.Win:
        if self.win is None:
            raise RuntimeError(f"window {what}: the window memory was freed")
        return self.win

    def _run(self, what: str, target: int, pieces: Sequence[tuple[int, np.ndarray]]) -> None:
        win = self._open(what)
        win.Lock(target, MPI.LOCK_SHARED)
        try:
            requests = []
            for offset, arr in pieces:
                spec = (offset, arr.size, MPI._typedict[arr.dtype.char])
                if what == "put":
                    requests.append(win.Rput(arr, target, spec))
                elif what == "accumulate":
                    requests.append(win.Raccumulate(arr, target, spec, op=MPI.SUM))
                else:
                    requests.append(win.Rget(arr, target, spec))
            _wait_all(requests, self.timeout, f"window {what}", [target] * len(requests))
        finally:
            win.Unlock(target)

    def put(self, target: int, pieces: Sequence[tuple[int, np.ndarray]]) -> None:
        self._run("put", target, pieces)

    def accumulate(self, target: int, pieces: Sequence[tuple[int, np.ndarray]]) -> None:
        self._run("accumulate", target, pieces)

    def get(self, target: int, pieces: Sequence[tuple[int, np.ndarray]]) -> None:
        self._run("get", target, pieces)

    @contextlib.contextmanager
    def lock_self(self) -> Iterator[np.ndarray]:
        win = self._open("update")
        win.Lock(self.rank, MPI.LOCK_EXCLUSIVE)
        try:
            win.Sync()
            yield self.memory
            win.Sync()
        finally:
            win.Unlock(self.rank)

    def free(self) -> None:
        if self.win is not None:
            win, self.win = self.win, None
            self.memory = np.zeros(0, np.uint8)
            win.Free()


def world_comm() -> MPI.Comm:
    """The MPI world communicator (initializes MPI on first use)."""
    return MPI.COMM_WORLD


def node_layout(comm: MPI.Comm) -> tuple[int, int, int, int]:
    """``(local_rank, local_size, machine_rank, machine_size)`` from MPI's shared-memory split."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        local_rank, local_size = local.Get_rank(), local.Get_size()
        # A machine is named by its lowest world rank (its local rank 0); numbered in that order.
        leader = local.bcast(comm.Get_rank() if local_rank == 0 else None, root=0)
    finally:
        local.Free()
    leaders = sorted({int(r) for r in comm.allgather(leader)})
    return local_rank, local_size, leaders.index(leader), len(leaders)
