"""MPI transport: the only module of the project that imports mpi4py.

Buffers move zero-copy through the buffer protocol.  Library traffic runs on a duplicate of the
world communicator so it can never match a user's own messages.  Waits poll with a deadline, so a
dead or diverging peer becomes a :class:`CommTimeoutError` naming who is missing.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, cast

import mpi4py
import numpy as np

# mpi4py asks for MPI_THREAD_MULTIPLE by default; MPICH then guards every call with a global
# lock and yields inside polls, which made a polled 1-element exchange 500x slower (1.2 ms vs
# 2 us measured).  The library calls MPI from one thread at a time, so SERIALIZED is enough.
# (Only effective when this module is the first to import mpi4py.MPI.)
if "mpi4py.MPI" not in sys.modules:
    mpi4py.rc.thread_level = os.environ.get("MPI4PY_RC_THREAD_LEVEL", "serialized")

from mpi4py import MPI

from .errors import CallMismatchError, CommError, CommTimeoutError, MismatchError
from .transport import HeldCall
from .watchdog import Watchdog

_THREAD_LEVELS = {
    MPI.THREAD_SINGLE: "single",
    MPI.THREAD_FUNNELED: "funneled",
    MPI.THREAD_SERIALIZED: "serialized",
    MPI.THREAD_MULTIPLE: "multiple",
}

# Waits poll MPI: busy for the first _SPIN_SECONDS (latency), then yielding the core between polls
# (oversubscribed runs would otherwise starve the very peer they wait for), then, for long waits,
# sleeping briefly so an idle rank does not burn a core.
_SPIN_SECONDS = 1e-3
_YIELD_SECONDS = 5e-2
# A rank that has left the job may still have messages in flight on the data communicator (its
# departure notice travels on another one, unordered with them): a wait on it fails only if it
# is still incomplete this long after the notice arrived.
_DEPARTED_GRACE_SECONDS = 2.0
# The departure notice: a zero-byte message on the control communicator.
_TAG_DEPARTED = 1


class _Departures:
    """Which ranks have left the job (interpreter exit or ``bf.shutdown()``).

    A leaving rank sends every other rank a notice on a control communicator of its own; waits
    look for notices while idle, so a wait on a rank that is gone fails within seconds instead
    of at its deadline.
    """

    __slots__ = ("comm", "gone", "seen")

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.gone: set[int] = set()
        self.seen = 0.0  # when the first notice arrived

    def poll(self) -> set[int]:
        """Receive the notices that arrived; the set of ranks known gone."""
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_DEPARTED, status=status):
            src = status.Get_source()
            self.comm.Recv([np.empty(0, np.uint8), MPI.BYTE], source=src, tag=_TAG_DEPARTED)
            if not self.gone:
                self.seen = time.perf_counter()
            self.gone.add(src)
        return self.gone


def _describe(ranks: Sequence[int] | set[int]) -> str:
    return f"rank(s) {sorted(ranks)}"


# While idle, a waiting rank looks for peers' messages that prove a divergence (a stale message,
# a mismatch notice) at most this often.
_PROBE_SECONDS = 1e-3


class _Backoff:
    """Paces a polling loop and enforces the deadline.

    ``peers`` of :meth:`idle` name the peer of each pending request; ``None`` marks a
    collective (every rank of ``size`` takes part, and which one is missing is unknown).
    """

    __slots__ = ("departures", "next_probe", "probe", "size", "start", "timeout", "what")

    def __init__(
        self,
        timeout: float,
        what: str,
        probe: Callable[[], None] | None = None,
        departures: _Departures | None = None,
        size: int = 0,
    ) -> None:
        self.start = time.perf_counter()
        self.timeout = timeout
        self.what = what
        self.probe = probe
        self.next_probe = _SPIN_SECONDS
        self.departures = departures
        self.size = size

    def idle(self, pending: list[MPI.Request], peers: Sequence[int] | None) -> None:
        """Called when a poll found nothing new; raises once the deadline passed."""
        now = time.perf_counter()
        waited = now - self.start
        if waited > self.timeout:
            _cancel(pending)
            if peers is None:
                raise CommTimeoutError(
                    f"{self.what}: not every one of the {self.size} ranks entered it within "
                    f"{self.timeout:g} s; a rank died, stopped calling the library, or is calling a "
                    "different op (BLUEFOG_FN_TIMEOUT sets the limit)"
                )
            raise CommTimeoutError(
                f"{self.what}: no answer from {_describe(_missing(pending, peers))} after {self.timeout:g} s; "
                "a peer died, stopped calling the library, or is calling a different op "
                "(BLUEFOG_FN_TIMEOUT sets the limit)"
            )
        if self.probe is not None and waited > self.next_probe:
            self.next_probe = waited + _PROBE_SECONDS
            self.probe()
        if waited > _YIELD_SECONDS:
            if self.departures is not None:
                self._check_departures(pending, peers, now)
            time.sleep(1e-4)
        elif waited > _SPIN_SECONDS:
            os.sched_yield()

    def _check_departures(self, pending: list[MPI.Request], peers: Sequence[int] | None, now: float) -> None:
        assert self.departures is not None
        gone = self.departures.poll()
        if not gone or now - max(self.departures.seen, self.start) < _DEPARTED_GRACE_SECONDS:
            return
        waiting_on = gone if peers is None else gone.intersection(_missing(pending, peers))
        if waiting_on:
            _cancel(pending)
            raise CommError(
                f"{self.what}: {_describe(waiting_on)} left the job (reached the end of the program, "
                "sys.exit or bf.shutdown()) while this rank still waits for them"
            )


def _missing(pending: list[MPI.Request], peers: Sequence[int]) -> list[int]:
    return sorted({p for p, r in zip(peers, pending, strict=True) if r != MPI.REQUEST_NULL})


def _cancel(pending: list[MPI.Request]) -> None:
    for r in pending:
        if r != MPI.REQUEST_NULL:
            with contextlib.suppress(MPI.Exception):  # cancel is best effort
                r.Cancel()


def _drop_queued(comm: MPI.Comm, timeout: float) -> None:
    """Receive and discard every message waiting for this rank on ``comm``.

    At shutdown every rank has left, so nothing will ever receive them: they are a failed call's
    data (after a ``CallMismatchError`` the peer's message of that call stays queued), and
    ``MPI_Comm_free`` would fail on them at exit although the program handled the error.
    """
    status = MPI.Status()
    while comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
        src = status.Get_source()
        buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
        req = comm.Irecv([buf, MPI.BYTE], source=src, tag=status.Get_tag())
        _wait_all([req], timeout, "shutdown (discarding a failed call's message)", [src])


def _wait_all(
    requests: list[MPI.Request],
    timeout: float,
    what: str,
    peers: Sequence[int] | None,
    probe: Callable[[], None] | None = None,
    departures: _Departures | None = None,
    size: int = 0,
) -> None:
    if not requests:
        return
    backoff = _Backoff(timeout, what, probe, departures, size)
    while not MPI.Request.Testall(requests):
        backoff.idle(requests, peers)


class CallWire:
    """How a point-to-point message's MPI tag names its call, and the checks built on it.

    A data message's tag is ``kind << call_bits | code``: ``kind`` (>= 1) is derived from the
    plan's tag (op, tree signature, graph), ``code`` from the sender's call number (1, 2, ...
    cycling through ``[1, 2**call_bits)``; 0 means "not numbered").  Tags below
    ``2**call_bits`` (kind 0) are *mismatch notices*: zero-byte messages a rank sends to a peer
    whose message it found wrong, with its own call code, so that both sides raise.

    The receiver of a data message compares the whole tag with the one it expects; a notice, a
    message from another call, or a *stale* message (one waiting in the queue from a call older
    than every call this rank can still receive for) raises :class:`CallMismatchError` on this
    rank and sends the peer a notice.  With MPICH's tag bound (2**29 - 1) calls are numbered
    modulo 65535 and kinds modulo 8191; MPI's guaranteed minimum (32767) still leaves 7 bits each.
    """

    def __init__(self, comm: MPI.Comm, tag_ub: int) -> None:
        self.comm = comm
        bits = max(15, int(tag_ub).bit_length())
        self.call_bits = min(16, bits - 8)
        self.calls = (1 << self.call_bits) - 1  # codes 1..calls
        self.kinds = int(tag_ub) >> self.call_bits  # kinds 1..kinds
        self.call: int | None = None  # the call this rank is making
        # The current call is a global op: every rank calls collectives only, so a peer's
        # point-to-point message of this call proves that the ranks diverged.
        self.collective_only = False
        self.floor: int | None = None  # every call below it has posted all its receives
        self.open_code = 0  # ``floor`` as a code, for probes (0: unknown, nothing is stale)
        self._status = MPI.Status()
        self.idle_hooks: list[Callable[[], None]] = []

    def idle(self) -> None:
        """A wait found nothing new for a while: run the idle hooks (see ``MpiTransport.on_idle``)."""
        for hook in self.idle_hooks:
            hook()

    def begin(self, call: int, floor: int, messages: bool = True) -> None:
        """This rank starts call ``call``; calls below ``floor`` have posted all their receives.

        A message queued for this rank from a call below ``floor`` can never be received; so can
        none of call ``call`` when it sends no ``messages`` (a global op).
        """
        self.call, self.floor = call, floor
        self.collective_only = not messages
        self.open_code = self.code(floor)
        self.probe(call)

    def posted(self, call: int | None) -> None:
        """``call`` posted its receives: from now on its own messages cannot be queued either."""
        if call is not None and call == self.call and self.floor == call:
            self.open_code = self.code(call + 1)

    def code(self, call: int | None) -> int:
        return 0 if call is None else (call - 1) % self.calls + 1

    def tag(self, plan_tag: int, call: int | None) -> int:
        return ((plan_tag % self.kinds) + 1) << self.call_bits | self.code(call)

    def split(self, wire: int) -> tuple[int, int]:
        """``(kind, code)`` of a received tag."""
        return wire >> self.call_bits, wire & self.calls

    def offset(self, code: int, reference: int) -> int:
        """How many calls ``code`` is ahead of ``reference`` (negative: behind)."""
        d = (code - reference) % self.calls
        return d - self.calls if d > self.calls // 2 else d

    def notify(self, peer: int, call: int | None) -> None:
        """Tell ``peer`` (best effort, never blocking) that its messages do not match ours."""
        with contextlib.suppress(MPI.Exception):
            req = self.comm.Isend([np.zeros(0, np.uint8), MPI.BYTE], dest=peer, tag=self.code(call))
            if not req.Test():
                req.Free()  # a zero-byte send completes eagerly; never wait on a peer here

    def stray(self, peer: int, call: int) -> CallMismatchError:
        """The error for a point-to-point message of call ``call`` from ``peer`` while this rank
        makes a global op as that call; notifies the peer."""
        self.notify(peer, call)
        me = self.comm.Get_rank()
        return CallMismatchError(
            f"rank {peer} sent rank {me} a point-to-point message of call #{call} (a neighbour op "
            f"or a window), but rank {me}'s call #{call} is a global op: the ranks' programs diverged; "
            "the global op cannot complete (every global op of this world fails from here on)",
            peer=peer, peer_call=call, call=call,
        )

    def mismatch(self, peer: int, wire: int, expected: int | None, call: int | None) -> CallMismatchError:
        """The error for a message from ``peer`` with tag ``wire`` (``expected``: the tag this
        rank was waiting for, None when it was found queued); notifies the peer."""
        kind, code = self.split(wire)
        me = self.comm.Get_rank()
        if kind == 0:
            peer_call = None if call is None or code == 0 else call + self.offset(code, self.code(call))
            return CallMismatchError(
                f"rank {peer} found that rank {me}'s messages do not match its call"
                + (f" #{peer_call}" if peer_call is not None else "")
                + f" (rank {me} is at call #{call}); rank {peer}'s error has the details",
                peer=peer, peer_call=peer_call, call=call,
            )
        self.notify(peer, call)
        peer_call = None if call is None or code == 0 else call + self.offset(code, self.code(call))
        if expected is None:
            return CallMismatchError(
                f"rank {peer} sent rank {me} a message of its call #{peer_call} that rank {me} never "
                f"received in that call (rank {me} is now at call #{call}): the ranks' graphs for "
                "that call disagree",
                peer=peer, peer_call=peer_call, call=call,
            )
        if code != (expected & self.calls):
            return CallMismatchError(
                f"rank {peer} is at its call #{peer_call} but rank {me} is at call #{call}",
                peer=peer, peer_call=peer_call, call=call,
            )
        return CallMismatchError(
            f"rank {peer} sent a message for a different op, tree or graph in the same call "
            f"#{call} (tag kind {kind}, expected {expected >> self.call_bits})",
            peer=peer, peer_call=call, call=call,
        )

    def probe(self, call: int | None = None) -> None:
        """Raise if a notice or a stale message waits for this rank (one ``Iprobe``)."""
        status = self._status
        if not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            return
        wire, peer = status.Get_tag(), status.Get_source()
        kind, code = self.split(wire)
        if kind == 0:
            self.comm.Recv([np.zeros(0, np.uint8), MPI.BYTE], source=peer, tag=wire)
            raise self.mismatch(peer, wire, None, call)
        if self.collective_only and call is not None and call == self.call and code == self.code(call):
            raise self.stray(peer, call)
        if code and self.open_code and self.offset(code, self.open_code) < 0:
            raise self.mismatch(peer, wire, None, call)


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
        wire: CallWire,
        call: int | None,
        what: str = "neighbor exchange",
        departures: _Departures | None = None,
    ) -> None:
        self._recv_reqs = recv_reqs
        self._sources = sources
        self._recv_bufs = recv_bufs
        self._send_reqs = send_reqs
        self._dests = dests
        self._tag = tag
        self._timeout = timeout
        self._wire = wire
        self._call = call
        self._what = what
        self._departures = departures
        self._finished = False
        # Statuses of the receives when :meth:`done` saw everything complete (Testall frees the
        # requests, so :meth:`completed` must not poll them again).
        self._landed: list[MPI.Status] | None = None
        self._statuses: list[MPI.Status] | None = None

    def done(self) -> bool:
        if self._finished or self._landed is not None:
            return True
        statuses = self._statuses
        if statuses is None:  # made once: done() may be polled many times
            statuses = self._statuses = [MPI.Status() for _ in range(len(self._recv_reqs) + len(self._send_reqs))]
        try:
            if not MPI.Request.Testall(self._recv_reqs + self._send_reqs, statuses):
                return False  # nothing was completed or freed
        except MPI.Exception as exc:
            raise self._failed(statuses, exc) from exc
        self._landed = statuses[: len(self._recv_reqs)]
        return True

    def _probe(self) -> None:
        self._wire.probe(self._call)
        self._wire.idle()

    def completed(self) -> Iterator[int]:
        """Yield the index of each receive as it lands (checked), then finish the sends."""
        if self._finished:
            return
        if self._landed is not None:  # done() saw every request complete
            self._finished = True
            for i, status in enumerate(self._landed):
                self._check(i, status)
                yield i
            return
        backoff: _Backoff | None = None
        remaining = len(self._recv_reqs)
        statuses = [MPI.Status() for _ in self._recv_reqs]
        while remaining:
            try:
                indices = MPI.Request.Testsome(self._recv_reqs, statuses)
            except MPI.Exception as exc:
                raise self._failed(statuses, exc) from exc
            if not indices:
                if backoff is None:  # started lazily: most small exchanges complete at once
                    backoff = _Backoff(self._timeout, self._what, self._probe, self._departures)
                backoff.idle(self._recv_reqs, self._sources)
                continue
            for k, i in enumerate(indices):
                self._check(i, statuses[k])
                remaining -= 1
                yield i
        _wait_all(self._send_reqs, self._timeout, self._what, self._dests, self._probe, self._departures)
        self._finished = True

    def wait(self) -> None:
        for _ in self.completed():
            pass

    def _failed(self, statuses: list[MPI.Status], exc: MPI.Exception) -> MismatchError:
        """The error for a receive MPI failed (a message larger than its buffer): a message of
        another call is a divergence (``CallMismatchError``, the peer is told), else a size mismatch."""
        self._cancel()
        who = "a peer"
        for status in statuses:
            if status.Get_source() < 0 or status.Get_error() == MPI.SUCCESS:
                continue  # not filled in, or a request that completed fine
            peer, tag = status.Get_source(), status.Get_tag()
            if tag != self._tag:
                return self._wire.mismatch(peer, tag, self._tag, self._call)
            who = f"rank {peer}"
            break
        return MismatchError(
            f"{self._what}: {who} sent more data than expected ({exc.Get_error_string()}); "
            "ranks are calling with different tree shapes or dtypes"
        )

    def _check(self, i: int, status: MPI.Status) -> None:
        peer, buf = self._sources[i], self._recv_bufs[i]
        if status.Get_tag() != self._tag:
            self._cancel()
            raise self._wire.mismatch(peer, status.Get_tag(), self._tag, self._call)
        got = status.Get_count(MPI.BYTE)
        if got != buf.nbytes:
            raise MismatchError(
                f"{self._what}: rank {peer} sent {got} bytes where {buf.nbytes} were "
                "expected; ranks are calling with different tree shapes or dtypes"
            )

    def _cancel(self) -> None:
        """Give up the receives still pending (the call failed; their data is meaningless)."""
        for r in self._recv_reqs:
            if r != MPI.REQUEST_NULL:
                with contextlib.suppress(MPI.Exception):
                    r.Cancel()


class _Collective:
    """One non-blocking collective in flight."""

    def __init__(
        self,
        request: MPI.Request,
        what: str,
        timeout: float,
        probe: Callable[[], None] | None = None,
        size: int = 0,
        departures: _Departures | None = None,
        abandoned: list[MPI.Request] | None = None,
    ) -> None:
        self._request = request
        self._what = what
        self._timeout = timeout
        self._probe = probe
        self._size = size
        self._departures = departures
        self._abandoned = abandoned
        self._finished = False

    def done(self) -> bool:
        return self._finished or bool(self._request.Test())

    def wait(self) -> None:
        if self._finished:
            return
        try:
            _wait_all([self._request], self._timeout, self._what, None, self._probe, self._departures, self._size)
        except BaseException:
            # A collective cannot be cancelled: MPI may still write into its buffers (which the
            # request object keeps alive) whenever the other ranks take part.
            if self._abandoned is not None:
                self._abandoned.append(self._request)
            raise
        self._finished = True


def _dup(comm: MPI.Comm, timeout: float, what: str) -> MPI.Comm:
    """``comm.Dup()`` with a deadline (``MPI_Comm_idup``, polled)."""
    new, request = comm.Idup()
    _Collective(request, what, timeout, size=comm.Get_size()).wait()
    return new


class MpiTransport:
    """Transport over an MPI communicator (a private duplicate of ``comm``).

    A second duplicate carries control traffic only: the departure notices of :meth:`close`.
    A third carries the call checks only (:meth:`allreduce_max`): they are posted in program
    order while a held call's data may be posted later, and MPI matches the collectives of each
    communicator by their own order, so each sequence is the same on every rank.
    """

    def __init__(self, comm: MPI.Comm, timeout: float, init_timeout: float | None = None) -> None:
        self.timeout = timeout
        what = "init (bf.init or the first op: duplicating the communicator)"
        deadline = timeout if init_timeout is None else init_timeout
        self.comm = _dup(comm, deadline, what)
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self._departures = _Departures(_dup(comm, deadline, what))
        self._checks = _dup(comm, deadline, what)
        tag_ub = self.comm.Get_attr(MPI.TAG_UB)
        self.wire = CallWire(self.comm, int(tag_ub) if tag_ub else 32767)
        # The thread level MPI was initialized with, for the front end to warn about MULTIPLE
        # (set by whoever imported mpi4py.MPI first; see the top of this module).
        self.thread_level: str = _THREAD_LEVELS.get(MPI.Query_thread(), "unknown")
        self._host_memories: list[MpiHostMemory] = []
        # Calls whose check collective is in flight and whose data collectives are not posted
        # yet (see hold); settled before any other collective is posted.
        self._held: collections.deque[HeldCall] = collections.deque()
        self._settling = False
        self.wire.idle_hooks.append(self._settle_ready)
        # Collectives a failed wait gave up on (kept referenced, see _Collective.wait).
        self.abandoned: list[MPI.Request] = []
        self._collective_hooks: list[Callable[[int], None]] = []

    def close(self) -> None:
        """Leave the job: tell every rank, wait (bounded) until every rank left, release both
        communicators.  Raises :class:`CommTimeoutError` naming the ranks that did not leave."""
        if self.comm == MPI.COMM_NULL:
            return
        control = self._departures.comm
        empty = np.empty(0, np.uint8)
        sends = [control.Isend([empty, MPI.BYTE], dest=r, tag=_TAG_DEPARTED) for r in range(self.size) if r != self.rank]
        others = set(range(self.size)) - {self.rank}
        backoff = _Backoff(math.inf, "shutdown")  # paces only; the deadline is checked here
        while not self._departures.poll() >= others:
            if time.perf_counter() - backoff.start > self.timeout:
                _cancel(sends)
                raise CommTimeoutError(
                    f"shutdown: this rank reached the end of its program (or bf.shutdown()), but "
                    f"{_describe(others - self._departures.gone)} did not within {self.timeout:g} s; "
                    "they are stuck, still working, or waiting for something this rank never sends "
                    "(BLUEFOG_FN_TIMEOUT sets the limit)"
                )
            backoff.idle([], [])
        _wait_all(sends, self.timeout, "shutdown", [r for r in range(self.size) if r != self.rank])
        # Every rank is here: freeing cannot wait on an absent one.
        for memory in self._host_memories:
            memory.close()
        self._host_memories = []
        _drop_queued(self.comm, self.timeout)
        self.comm.Free()
        control.Free()
        self._checks.Free()

    def abort(self, code: int) -> NoReturn:
        """End every rank of the job now (``MPI_Abort``)."""
        abort_world(code)

    def exchange(
        self,
        sends: Sequence[tuple[int, np.ndarray]],
        recvs: Sequence[tuple[int, np.ndarray]],
        tag: int,
        *,
        call: int | None = None,
        what: str = "neighbor exchange",
    ) -> _Exchange:
        wire = self.wire
        wire_tag = wire.tag(tag, call)
        # Receives first, so eager sends from fast peers land directly in their final buffer.
        # ANY_TAG: a message meant for another call is received and reported, not left to hang.
        recv_reqs = [self.comm.Irecv([buf, MPI.BYTE], source=src, tag=MPI.ANY_TAG) for src, buf in recvs]
        send_reqs = [self.comm.Isend([buf, MPI.BYTE], dest=dst, tag=wire_tag) for dst, buf in sends]
        wire.posted(call)
        return _Exchange(
            recv_reqs, [s for s, _ in recvs], [b for _, b in recvs], send_reqs, [d for d, _ in sends],
            wire_tag, self.timeout, wire, call, what, self._departures,
        )

    def begin_call(self, call: int, floor: int, messages: bool = True) -> None:
        """Numbered call ``call`` starts; calls below ``floor`` have posted all their receives;
        ``messages=False``: the call is a global op (collectives only).
        Raises ``CallMismatchError`` if a peer already proved that the ranks diverged."""
        # The same-host check (on_collective_wait) runs only in waits: a global op that a peer's
        # neighbour op diverged from cannot complete, so it always waits; its start stays cheap.
        self.wire.begin(call, floor, messages)

    def on_collective_wait(self, hook: Callable[[int], None]) -> None:
        """Run ``hook(call)`` now and then while this rank waits in a global op numbered ``call``
        (e.g. to look for a same-host peer's transfer of that call: it proves a divergence)."""
        self._collective_hooks.append(hook)

    def _check_collective_call(self) -> None:
        call = self.wire.call
        if self.wire.collective_only and call is not None:
            for hook in self._collective_hooks:
                hook(call)

    def _probe(self) -> None:
        self.wire.probe(self.wire.call)
        self._check_collective_call()
        self.wire.idle()

    def _collective(self, request: MPI.Request, what: str) -> _Collective:
        # A collective never marks its call posted.  A message of the current call seen while
        # waiting here is a divergence if the call is a global op (``begin_call(messages=False)``);
        # otherwise the collective may be the agreement of an exchange still to come, and the
        # message is left for that exchange or the next call's probe.
        return _Collective(request, what, self.timeout, self._probe, self.size, self._departures, self.abandoned)

    def hold(self, call: HeldCall) -> None:
        """Keep ``call`` (its check in flight) until it is settled: before this rank posts any
        other collective on the data communicator (so that they follow in call order), by the
        call's own wait, or while this rank waits once the check is complete."""
        self._held.append(call)

    def settle(self) -> None:
        """Settle the held calls, oldest first.  Collectives posted while settling (a held
        call's own agreement and data) do not settle again: they belong to that call."""
        if self._settling or not self._held:
            return
        self._settling = True
        try:
            while self._held:
                self._held.popleft().settle()
        finally:
            self._settling = False

    def _settle_ready(self) -> None:
        # An idle hook: a held call whose check is complete posts its data while this rank
        # waits for something else (a peer may be waiting for that data).  A failure is kept by
        # the call and raised by its wait, not by the unrelated wait running this hook.
        if self._settling:
            return
        self._settling = True
        try:
            while self._held and self._held[0].ready():  # never waits on a check still in flight
                with contextlib.suppress(Exception):
                    self._held.popleft().settle()
        finally:
            self._settling = False

    def allreduce_sum(self, buf: np.ndarray, what: str = "global reduction") -> _Collective:
        self.settle()
        return self._collective(self.comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), what)

    def allreduce_max(self, buf: np.ndarray, what: str = "call check") -> _Collective:
        # On the checks' own communicator, in program order, without settling the held calls:
        # an async op's check never waits for an earlier call's.
        return self._collective(self._checks.Iallreduce(MPI.IN_PLACE, buf, op=MPI.MAX), what)

    def bcast(self, buf: np.ndarray, root: int, what: str = "broadcast") -> _Collective:
        self.settle()
        # Broadcast moves bytes, so any dtype (half types included) travels unchanged.
        return self._collective(self.comm.Ibcast([buf, MPI.BYTE], root=root), what)

    def allgatherv(self, send: np.ndarray, recv: np.ndarray, counts: Sequence[int], what: str = "allgather") -> _Collective:
        self.settle()
        itemsize = send.dtype.itemsize
        byte_counts = [int(c) * itemsize for c in counts]
        displs = np.concatenate([[0], np.cumsum(byte_counts)[:-1]]).astype(int).tolist()
        req = self.comm.Iallgatherv(
            [send.view(np.uint8), MPI.BYTE], [recv.view(np.uint8), (byte_counts, displs), MPI.BYTE]
        )
        return self._collective(req, what)

    def barrier(self, what: str = "barrier") -> _Collective:
        self.settle()
        return self._collective(self.comm.Ibarrier(), what)

    def allgather_object(self, obj: Any, what: str = "agreement") -> list[Any]:
        self.settle()
        # Small pickled payloads only (agreement digests); bounded by the same deadline as data.
        return _allgather_object(self.comm, obj, lambda req: self._collective(req, what))

    def window_create(self, nbytes: int) -> MpiWindow:
        # Collective; the front end enters it on every rank after the same agreement check.
        self.settle()
        return MpiWindow(self.comm, nbytes, self.timeout)

    def host_memory(self, machine: int) -> MpiHostMemory:
        """Collective: the shared memory of the ranks of machine ``machine`` that MPI can map
        into one another (``MPI_COMM_TYPE_SHARED`` within the machine).  Released at
        :meth:`close`, after every rank left the job."""
        self.settle()
        memory = MpiHostMemory(self.comm, machine, self.timeout)
        self._host_memories.append(memory)
        return memory

    def probe_divergence(self) -> None:
        """Raise ``CallMismatchError`` if a mismatch notice or a stale message waits (one Iprobe).

        Called now and then by waits outside MPI (same-host shared memory), so it also settles
        a held call whose check is complete, as MPI waits do."""
        self._settle_ready()
        self.wire.probe(self.wire.call)

    def departed(self) -> set[int]:
        """Ranks known to have left the job at least the grace period ago (waits on them fail)."""
        gone = self._departures.poll()
        if not gone or time.perf_counter() - self._departures.seen < _DEPARTED_GRACE_SECONDS:
            return set()
        return set(gone)

    def on_idle(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` now and then while this rank waits for MPI (e.g. to give back shared
        buffers peers need: a rank blocked here must not hold up a peer that waits for it)."""
        self.wire.idle_hooks.append(hook)

    def notify_mismatch(self, peer: int, call: int | None) -> None:
        """Tell ``peer`` (never blocking) that this rank found its calls diverged from ours."""
        self.wire.notify(peer, call)


def _allgather_object(comm: MPI.Comm, obj: Any, collective: Callable[[MPI.Request], _Collective]) -> list[Any]:
    """Every rank's small picklable ``obj``, in rank order; each step bounded by ``collective``."""
    size = comm.Get_size()
    payload = np.frombuffer(pickle.dumps(obj), dtype=np.uint8)
    sizes = np.zeros(size, dtype=np.int64)
    mine = np.array([payload.size], dtype=np.int64)
    collective(comm.Iallgather(mine, sizes)).wait()
    recv = np.empty(int(sizes.sum()), dtype=np.uint8)
    displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
    collective(comm.Iallgatherv([payload, MPI.BYTE], [recv, (sizes.tolist(), displs), MPI.BYTE])).wait()
    return [pickle.loads(recv[displs[r] : displs[r] + int(sizes[r])].tobytes()) for r in range(size)]


class MpiHostMemory:
    """Memory shared by the ranks of one machine: ``MPI_Win_allocate_shared`` windows on a
    communicator of those ranks (split by machine, then by what MPI can map: a machine of
    ``BLUEFOG_FN_RANKS_PER_MACHINE`` is a group of ranks, which need not share a host).

    The splits and allocations have no non-blocking form: each is entered only after a polled
    barrier showed every member is there, and runs under a :class:`Watchdog`.  Windows are
    freed at :meth:`close` (the transport calls it once every rank has left).
    """

    def __init__(self, comm: MPI.Comm, machine: int, timeout: float) -> None:
        self.timeout = timeout
        self.watchdog = Watchdog()
        what = "init (same-host shared memory: grouping the ranks of each machine)"
        size = comm.Get_size()
        _Collective(comm.Ibarrier(), what, timeout, size=size).wait()
        with self.watchdog.guard(f"{what}: MPI_Comm_split", timeout):
            part = comm.Split(machine, key=comm.Get_rank())
        try:
            _Collective(part.Ibarrier(), what, timeout, size=part.Get_size()).wait()
            with self.watchdog.guard(f"{what}: MPI_Comm_split_type", timeout):
                host = part.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
        finally:
            part.Free()
        self.comm: MPI.Intracomm = cast(MPI.Intracomm, host)
        self.local: int = host.Get_rank()
        ranks = np.empty(host.Get_size(), dtype=np.int64)
        _Collective(host.Iallgather(np.array([comm.Get_rank()], dtype=np.int64), ranks), what, timeout, size=host.Get_size()).wait()
        self.members: tuple[int, ...] = tuple(int(r) for r in ranks)
        self.windows: list[MPI.Win] = []

    def _collective(self, request: MPI.Request, what: str) -> _Collective:
        return _Collective(request, what, self.timeout, size=len(self.members))

    def agree(self, value: Any, what: str) -> list[Any]:
        return _allgather_object(self.comm, value, lambda req: self._collective(req, what))

    def allocate(self, nbytes: int, what: str) -> list[np.ndarray]:
        self._collective(self.comm.Ibarrier(), what).wait()
        with self.watchdog.guard(f"{what}: MPI_Win_allocate_shared", self.timeout):
            win = MPI.Win.Allocate_shared(nbytes, disp_unit=1, comm=self.comm)
        self.windows.append(win)
        regions = []
        for r in range(len(self.members)):
            mem, _ = win.Shared_query(r)
            regions.append(np.frombuffer(cast(Any, mem), dtype=np.uint8, count=nbytes))
        regions[self.local][:] = 0
        self._collective(self.comm.Ibarrier(), what).wait()  # nobody reads a region before it is zeroed
        return regions

    def close(self) -> None:
        if self.comm == MPI.COMM_NULL:
            return
        with self.watchdog.guard("shutdown: MPI_Win_free (same-host shared memory)", self.timeout):
            for win in self.windows:
                win.Free()
            self.comm.Free()
        self.windows = []
        self.comm = cast(MPI.Intracomm, MPI.COMM_NULL)
        self.watchdog.close()


def _poll(timeout: float, deadline: float) -> bool:
    """One pacing step of a window wait (spin, then yield, then sleep); False once past ``deadline``."""
    now = time.perf_counter()
    if now > deadline:
        return False
    waited = timeout - (deadline - now)
    if waited > _YIELD_SECONDS:
        time.sleep(1e-4)
    elif waited > _SPIN_SECONDS:
        os.sched_yield()
    return True


class _WindowOps:
    """Request-based one-sided operations of an :class:`MpiWindow` in flight.

    Complete once every request has (polled with the deadline) and, for writes, once
    ``MPI_Win_flush`` made them complete at the target.
    """

    __slots__ = ("_flush", "_keep", "_requests", "_window", "finished", "target", "what")

    def __init__(
        self,
        window: MpiWindow,
        target: int,
        what: str,
        requests: list[MPI.Request],
        flush: bool,
        keep: Any,
    ) -> None:
        self._window = window
        self.target = target
        self.what = what
        self._requests = requests
        self._flush = flush
        self._keep = keep  # the arrays MPI reads from or writes into stay alive until completion
        self.finished = not requests

    def done(self) -> bool:
        if not self.finished and MPI.Request.Testall(self._requests):
            self._complete()
        return self.finished

    def wait(self) -> None:
        if self.finished:
            return
        timeout = self._window.timeout
        deadline = time.perf_counter() + timeout
        while not MPI.Request.Testall(self._requests):
            if not _poll(timeout, deadline):
                raise CommTimeoutError(
                    f"{self.what}: rank {self.target} did not serve the one-sided operation within "
                    f"{timeout:g} s; it died or stopped making MPI calls (BLUEFOG_FN_TIMEOUT sets the limit)"
                )
        self._complete()

    def _complete(self) -> None:
        if self._flush:
            win = self._window.open_win(self.what)
            with self._window.watchdog.guard(
                f"{self.what}: MPI_Win_flush to rank {self.target}", self._window.timeout
            ):
                win.Flush(self.target)
        self.finished = True
        self._keep = None


_BARRIER_TAG = 0x5EA


class MpiWindow:
    """MPI-3 one-sided memory (``MPI_Win_allocate``, bytes) in one passive-target epoch.

    The window is opened with ``MPI_Win_lock_all(MPI_MODE_NOCHECK)`` at creation and closed at
    free, so no operation ever waits for a lock (with MPICH a lock request waits until the target
    next enters MPI, which would make every "asynchronous" operation wait for a busy peer).
    Every access to window memory, the owner's included, is an accumulate-family operation on
    the piece's basic type (``Raccumulate`` with ``MPI_REPLACE``/``MPI_SUM``, ``Rget_accumulate``
    with ``MPI_NO_OP``/``MPI_REPLACE``), which MPI makes atomic per element: a concurrent sum
    lands entirely before or entirely after the owner's read-and-reset of that element, so no
    mass is lost or counted twice.  Writes complete at the target with ``MPI_Win_flush``.

    Each window has its own communicator (``MPI_Comm_idup``), so its meetings (creation, the
    barriers, free) can never be matched by another window's or the transport's collectives:
    ranks out of step get a bounded error instead of entering a blocking collective alone.
    User-level mutexes live in a second, 8-byte window: a counter per rank, taken with a polled
    ``Rget_accumulate`` (+1; it was free if the old value was 0, otherwise undone).  Calls with
    no non-blocking form (allocate, flush, free) run under a
    :class:`~bluefog_fn.backend.watchdog.Watchdog`.
    """

    def __init__(self, comm: MPI.Comm, nbytes: int, timeout: float) -> None:
        self.timeout = timeout
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.watchdog = Watchdog()
        self._barriers = 0
        dup, request = comm.Idup()
        deadline = time.perf_counter() + timeout
        while not request.Test():
            if not _poll(timeout, deadline):
                raise CommTimeoutError(
                    f"Window: not every rank created the window within {timeout:g} s (creating the window's "
                    "communicator); ranks are calling different ops or a peer died (BLUEFOG_FN_TIMEOUT sets the limit)"
                )
        self.comm: MPI.Intracomm = cast(MPI.Intracomm, dup)
        # Idup completed, so every rank is here and enters the collective allocations now.
        with self.watchdog.guard("Window: MPI_Win_allocate", timeout):
            win = MPI.Win.Allocate(nbytes, disp_unit=1, comm=self.comm)
            mutex_win = MPI.Win.Allocate(8, disp_unit=1, comm=self.comm)
        if nbytes:
            np.frombuffer(cast(Any, win.tomemory()), dtype=np.uint8, count=nbytes)[:] = 0
        np.frombuffer(cast(Any, mutex_win.tomemory()), dtype=np.int64, count=1)[:] = 0
        # NOCHECK: no rank ever takes an exclusive lock, so opening the epochs sends nothing.
        win.Lock_all(MPI.MODE_NOCHECK)
        mutex_win.Lock_all(MPI.MODE_NOCHECK)
        self.win: MPI.Win | None = win
        self.mutex_win: MPI.Win | None = mutex_win

    def open_win(self, what: str) -> MPI.Win:
        if self.win is None:
            raise RuntimeError(f"{what}: the window memory was freed")
        return self.win

    def _post(
        self,
        kind: str,
        target: int,
        pieces: Sequence[tuple[int, np.ndarray]],
        what: str,
        olds: Sequence[np.ndarray] = (),
    ) -> _WindowOps:
        win = self.open_win(what)
        if not 0 <= target < self.size:
            raise ValueError(f"{what}: target rank {target} out of range for {self.size} ranks")
        requests = []
        for k, (offset, arr) in enumerate(pieces):
            if arr.size == 0:
                continue
            spec = (offset, arr.size, MPI._typedict[arr.dtype.char])
            if kind == "put":
                requests.append(win.Raccumulate(arr, target, spec, op=MPI.REPLACE))
            elif kind == "accumulate":
                requests.append(win.Raccumulate(arr, target, spec, op=MPI.SUM))
            elif kind == "get":
                requests.append(win.Rget_accumulate(arr, arr, target, spec, op=MPI.NO_OP))
            else:  # swap
                requests.append(win.Rget_accumulate(arr, olds[k], target, spec, op=MPI.REPLACE))
        flush = kind in ("put", "accumulate")
        return _WindowOps(self, target, what, requests, flush, (pieces, olds))

    def put(
        self, target: int, pieces: Sequence[tuple[int, np.ndarray]], what: str = "window put"
    ) -> _WindowOps:
        return self._post("put", target, pieces, what)

    def accumulate(
        self, target: int, pieces: Sequence[tuple[int, np.ndarray]], what: str = "window accumulate"
    ) -> _WindowOps:
        return self._post("accumulate", target, pieces, what)

    def get(
        self, target: int, pieces: Sequence[tuple[int, np.ndarray]], what: str = "window get"
    ) -> _WindowOps:
        return self._post("get", target, pieces, what)

    def swap(
        self,
        target: int,
        pieces: Sequence[tuple[int, np.ndarray]],
        olds: Sequence[np.ndarray],
        what: str = "window swap",
    ) -> _WindowOps:
        return self._post("swap", target, pieces, what, olds)

    def barrier(self, what: str) -> None:
        self.open_win(what)
        self._meet(what)

    def _meet(self, what: str) -> None:
        """Two rounds of tokens from every rank to every other, each bounded by the timeout.

        Round one says "I am here", round two "I heard everyone".  A rank that returns heard
        every rank's second token, so every rank got past round one and (barring a death in
        between) returns too: a rank that gives up in round one never sends its second token,
        so its peers give up as well instead of entering a collective call alone.
        """
        self._barriers += 1
        peers = [r for r in range(self.size) if r != self.rank]
        for phase, doing in enumerate(("reach", "confirm")):
            # Tags differ per meeting and round, so an out-of-step rank never completes one.
            tag = _BARRIER_TAG + (2 * self._barriers + phase) % 8192
            token = np.zeros(1, np.uint8)
            inbox = np.zeros(max(len(peers), 1), np.uint8)
            recvs = [self.comm.Irecv([inbox[k : k + 1], MPI.BYTE], source=p, tag=tag) for k, p in enumerate(peers)]
            sends = [self.comm.Isend([token, MPI.BYTE], dest=p, tag=tag) for p in peers]
            deadline = time.perf_counter() + self.timeout
            while not MPI.Request.Testall(recvs):
                if not _poll(self.timeout, deadline):
                    missing = [p for p, r in zip(peers, recvs, strict=True) if not r.Test()]
                    for r in recvs:
                        with contextlib.suppress(MPI.Exception):  # cancel is best effort
                            r.Cancel()
                    raise CommTimeoutError(
                        f"{what}: rank(s) {missing} did not {doing} this point of the window's use within "
                        f"{self.timeout:g} s; the ranks are out of step (a rank failed or skipped a window "
                        "call) or a peer died (BLUEFOG_FN_TIMEOUT sets the limit)"
                    )
            # One-byte sends: done once the peers' receives matched (they all have by now).
            while not MPI.Request.Testall(sends):
                if not _poll(self.timeout, deadline):
                    raise CommTimeoutError(
                        f"{what}: token sends to rank(s) {peers} did not complete within {self.timeout:g} s"
                    )

    def _fetch_add(self, rank: int, value: int, what: str) -> int:
        mwin = self.mutex_win
        if mwin is None:
            raise RuntimeError(f"{what}: the window memory was freed")
        origin = np.array([value], np.int64)
        result = np.zeros(1, np.int64)
        request = mwin.Rget_accumulate(origin, result, rank, (0, 1, MPI.INT64_T), op=MPI.SUM)
        deadline = time.perf_counter() + self.timeout
        while not request.Test():
            if not _poll(self.timeout, deadline):
                raise CommTimeoutError(
                    f"{what}: rank {rank} did not serve the mutex operation within {self.timeout:g} s; it "
                    "died or stopped making MPI calls (BLUEFOG_FN_TIMEOUT sets the limit)"
                )
        return int(result[0])

    def mutex_acquire(self, ranks: Sequence[int], what: str = "window mutex") -> None:
        taken: list[int] = []
        try:
            for r in ranks:
                start = time.perf_counter()
                pause = 2e-5
                while self._fetch_add(r, 1, what) != 0:
                    self._fetch_add(r, -1, what)
                    if time.perf_counter() - start > self.timeout:
                        raise CommTimeoutError(
                            f"{what}: the mutex of rank {r} stayed held by another rank for {self.timeout:g} s; "
                            "its holder is stuck or the ranks are out of step (BLUEFOG_FN_TIMEOUT sets the limit)"
                        )
                    # Randomised exponential backoff: contenders that collided retry at different times.
                    time.sleep(pause * (0.5 + np.random.random()))
                    pause = min(pause * 2, 2e-3)
                taken.append(r)
        except BaseException:
            with contextlib.suppress(CommError):
                self.mutex_release(taken, what)
            raise

    def mutex_release(self, ranks: Sequence[int], what: str = "window mutex") -> None:
        for r in ranks:
            old = self._fetch_add(r, -1, what)
            if old < 1:  # internal invariant: the front end releases only what it holds
                raise RuntimeError(
                    f"{what}: released the mutex of rank {r} that was not held (count {old})"
                )

    def free(self, what: str = "window free") -> None:
        if self.win is None:
            return
        win, mwin = self.win, self.mutex_win
        self.win = self.mutex_win = None  # unusable from here on, whatever happens
        try:
            self._meet(what)
        except BaseException:
            # A peer is not freeing: entering MPI_Win_free alone would block forever.  The
            # memory is abandoned, the error goes to the caller.
            self.watchdog.close()
            raise
        assert mwin is not None  # allocated together with win
        with self.watchdog.guard(f"{what}: MPI_Win_free", self.timeout):
            win.Unlock_all()
            mwin.Unlock_all()
            mwin.Free()
            win.Free()
            self.comm.Free()
        self.watchdog.close()


def world_comm() -> MPI.Comm:
    """The MPI world communicator (initializes MPI on first use)."""
    return MPI.COMM_WORLD


def abort_world(code: int) -> NoReturn:
    """End every process of the MPI job now (``MPI_Abort`` on the world communicator)."""
    MPI.COMM_WORLD.Abort(code)
    os._exit(code)  # not reached: MPI_Abort does not return


def node_layout(comm: MPI.Comm, timeout: float) -> tuple[int, int, int, int]:
    """``(local_rank, local_size, machine_rank, machine_size)`` from MPI's shared-memory split.

    Every step is bounded by ``timeout``: the split itself has no non-blocking form, so a polled
    barrier first makes sure every rank is there to take part in it.
    """
    size = comm.Get_size()
    what = "init (bf.init or the first op: finding the machine layout)"
    _Collective(comm.Ibarrier(), what, timeout, size=size).wait()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        local_rank, local_size = local.Get_rank(), local.Get_size()
        # A machine is named by its lowest world rank (its local rank 0); numbered in that order.
        leader = np.array([comm.Get_rank() if local_rank == 0 else -1], dtype=np.int64)
        _Collective(local.Ibcast(leader, root=0), what, timeout, size=local_size).wait()
    finally:
        local.Free()
    everyone = np.empty(size, dtype=np.int64)
    _Collective(comm.Iallgather(leader, everyone), what, timeout, size=size).wait()
    leaders = sorted({int(r) for r in everyone})
    return local_rank, local_size, leaders.index(int(leader[0])), len(leaders)
