"""MPI transport: the only module of the project that imports mpi4py.

Buffers move zero-copy through the buffer protocol.  Library traffic runs on a duplicate of the
world communicator so it can never match a user's own messages.  Waits poll with a deadline, so a
dead or diverging peer becomes a :class:`CommTimeoutError` naming who is missing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from mpi4py import MPI

from .errors import CommError, CommTimeoutError, MismatchError

# After this long of busy polling a wait starts yielding the core; oversubscribed runs
# (more ranks than cores) would otherwise starve the very peer they wait for.
_SPIN_SECONDS = 2e-4


def _wait_all(requests: list[MPI.Request], timeout: float, what: str, peers: Sequence[int]) -> list[MPI.Status]:
    statuses = [MPI.Status() for _ in requests]
    if not requests:
        return statuses
    start = time.perf_counter()
    spins = 0
    while not MPI.Request.Testall(requests, statuses):
        now = time.perf_counter()
        if now - start > timeout:
            missing = sorted({p for p, r in zip(peers, requests, strict=True) if r != MPI.REQUEST_NULL})
            for r in requests:
                if r != MPI.REQUEST_NULL:
                    try:
                        r.Cancel()
                    except MPI.Exception:  # pragma: no cover - cancel is best effort
                        pass
            raise CommTimeoutError(
                f"{what}: no answer from rank(s) {missing} after {timeout:g} s; a peer died or the "
                "ranks are calling different ops (set BLUEFOG_FN_TIMEOUT to change the limit)"
            )
        spins += 1
        if now - start > _SPIN_SECONDS:
            time.sleep(0 if spins % 64 else 1e-4)
    return statuses


class _Exchange:
    def __init__(
        self,
        requests: list[MPI.Request],
        peers: list[int],
        recv_bufs: list[np.ndarray],
        n_recv: int,
        tag: int,
        timeout: float,
    ) -> None:
        self._requests = requests
        self._peers = peers
        self._recv_bufs = recv_bufs
        self._n_recv = n_recv
        self._tag = tag
        self._timeout = timeout
        self._finished = False

    def done(self) -> bool:
        if self._finished:
            return True
        return bool(MPI.Request.Testall([r for r in self._requests if r != MPI.REQUEST_NULL] or []))

    def wait(self) -> None:
        if self._finished:
            return
        try:
            statuses = _wait_all(self._requests, self._timeout, "neighbor exchange", self._peers)
        except MPI.Exception as exc:
            raise MismatchError(
                f"neighbor exchange: a peer sent more data than expected ({exc}); ranks are "
                "calling with different tree shapes or dtypes"
            ) from exc
        for peer, buf, status in zip(self._peers[: self._n_recv], self._recv_bufs, statuses, strict=False):
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
        self._finished = True


class _Collective:
    def __init__(self, request: MPI.Request, what: str, timeout: float, size: int, post: Any = None) -> None:
        self._request = request
        self._what = what
        self._timeout = timeout
        self._size = size
        self._post = post
        self._finished = False

    def done(self) -> bool:
        return self._finished or bool(self._request.Test())

    def wait(self) -> None:
        if self._finished:
            return
        _wait_all([self._request], self._timeout, self._what, [-1])
        if self._post is not None:
            self._post()
        self._finished = True


def _mpi_view(buf: np.ndarray) -> Any:
    # MPI has no half types; reductions never see them (the front end upcasts), and point-to-point
    # traffic only needs the bytes.
    if buf.dtype == np.float16:
        return buf.view(np.int16)
    return buf


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
        requests: list[MPI.Request] = []
        peers: list[int] = []
        recv_bufs: list[np.ndarray] = []
        # Receives first, so eager sends from fast peers land directly in their final buffer.
        for src, buf in recvs:
            requests.append(self.comm.Irecv([buf, MPI.BYTE], source=src, tag=MPI.ANY_TAG))
            peers.append(src)
            recv_bufs.append(buf)
        for dst, buf in sends:
            requests.append(self.comm.Isend([buf, MPI.BYTE], dest=dst, tag=tag))
            peers.append(dst)
        return _Exchange(requests, peers, recv_bufs, len(recvs), tag, self.timeout)

    def allreduce_sum(self, buf: np.ndarray) -> _Collective:
        req = self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return _Collective(req, "global reduction", self.timeout, self.size)

    def bcast(self, buf: np.ndarray, root: int) -> _Collective:
        req = self.comm.Ibcast([_mpi_view(buf), MPI.BYTE] if buf.dtype == np.float16 else buf, root=root)
        return _Collective(req, "broadcast", self.timeout, self.size)

    def allgatherv(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int]) -> _Collective:
        itemsize = send.dtype.itemsize
        byte_counts = [int(c) * itemsize for c in counts]
        displs = np.concatenate([[0], np.cumsum(byte_counts)[:-1]]).astype(int).tolist()
        req = self.comm.Iallgatherv(
            [send.view(np.uint8), MPI.BYTE], [recv.view(np.uint8), (byte_counts, displs), MPI.BYTE]
        )
        return _Collective(req, "allgather", self.timeout, self.size)

    def barrier(self) -> _Collective:
        return _Collective(self.comm.Ibarrier(), "barrier", self.timeout, self.size)

    def allgather_object(self, obj: Any) -> list[Any]:
        # Small pickled payloads only (agreement digests); bounded by the same deadline as data.
        import pickle

        payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
        sizes = np.zeros(self.size, dtype=np.int64)
        mine = np.array([payload.size], dtype=np.int64)
        _Collective(self.comm.Iallgather(mine, sizes), "agreement", self.timeout, self.size).wait()
        recv = np.empty(int(sizes.sum()), dtype=np.uint8)
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
        _Collective(
            self.comm.Iallgatherv([payload, MPI.BYTE], [recv, (sizes.tolist(), displs), MPI.BYTE]),
            "agreement",
            self.timeout,
            self.size,
        ).wait()
        out = []
        for r in range(self.size):
            start = displs[r]
            out.append(pickle.loads(recv[start : start + int(sizes[r])].tobytes()))
        return out


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
