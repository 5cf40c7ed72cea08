"""Same-host exchange: ranks of one machine read each other's send buffers in place.

Two-sided MPI on one host copies every byte twice (into a shared bounce buffer and out of it).
Here each rank writes its fused send buffer once into memory every rank of the machine maps,
and each reader combines straight from it.  This module knows bytes and flags only; the front
end decides which peers of a call go this way (``bluefog_fn/shared_exchange.py``).

**Memory** (allocated collectively through a :class:`HostMemory`; every member owns one region
of each allocation and maps all of them):

* a *control* region per member: for every reader ``q`` a ring of two *mail entries* (the
  member writes them, ``q`` reads them), for every writer ``w`` two *ack* words, one per
  transfer parity (the member writes them, ``w`` reads them), and a *poison* word (set when the member found that the ranks'
  calls diverged).  Every word a process spins on sits on its own cache line;
* *data segments*: per member two buffers (by parity) of the segment's capacity.

**Protocol.**  A writer numbers its publications (*epochs*) and every (writer, reader) pair
numbers its transfers ``n = 1, 2, ...`` — both sides count them alike because every rank makes
the same calls.  To publish epoch ``e`` the writer

1. waits until every reader of epoch ``e - 2`` acked it (``ack ≥ n``): the buffer of parity
   ``e % 2`` is then no longer read by anyone — epoch ``e - 1`` used the other buffer;
2. for each reader, fills mail entry ``n % 2`` (epoch, segment, byte offset, call number,
   plan tag, byte count, scale, progress 0) and then stores ``SEQ = n`` with release ordering;
3. writes its data, storing ``PROGRESS`` (bytes ready) with release ordering after each chunk.

A reader waits for ``SEQ == n`` (acquire), checks call number, tag and size against its own
call (a difference is a divergence: ``CallMismatchError``, and the poison word tells the
writer), reads bytes only below the ``PROGRESS`` it loaded (acquire), and stores
``ack[n % 2] = n`` (release) when it no longer reads.  Why this is race-free: a buffer is rewritten only at epoch
``e + 2`` after all readers of ``e`` acked, and every reader reads only bytes published by the
epoch it waited for (acquire/release make the data visible before the flag).  By induction all
epochs up to ``e - 2`` are acked when the writer publishes ``e``, so transfer ``n - 2`` to any
reader is acked when entry ``n % 2`` is refilled: the ring of two never overwrites an entry a
reader still needs.

A tree kept in shared memory (``bf.shared_tree``, :meth:`SharedChannel.allocate_tree`) is
announced in place (:meth:`SharedChannel.publish_in_place`): no epoch, no write, progress
complete at once; the writer's call then completes only once every reader acked, because the
tree is the caller's to modify afterwards.  Before refilling ring entry ``n % 2`` the writer
checks that transfer ``n - 2`` was acked (implied for epochs, explicit for in-place transfers).

Every wait is bounded by ``timeout`` (``CommTimeoutError`` naming the peers), looks at the
peers' poison words, and now and then calls ``probe`` (the transport's check for messages that
prove a divergence).  A rank waiting for acks or data also *drains* its own reads that are not
being combined (async calls not waited for yet): it copies their bytes and acks, so readers
holding handles never deadlock writers that need their buffers back.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from . import atomics
from .errors import CallMismatchError, CommError, CommTimeoutError, MismatchError

# Mail entry words (an entry is two cache lines: metadata, then the progress word).
_SEQ, _EPOCH, _SEG, _OFFSET, _CALL, _TAG, _NBYTES, _SCALE = range(8)
_PROGRESS = 8
_ENTRY = 16
_LINE = 8  # int64 words per cache line
ALIGN = 64  # bytes: every dtype group of a buffer starts on a cache line

# Waits spin this long (latency), then yield the core (an oversubscribed host would starve the
# peer being waited for), then sleep briefly; the probe for divergence runs at most this often.
_SPIN_SECONDS = 2e-4
_YIELD_SECONDS = 5e-2
_PROBE_SECONDS = 1e-3
_DRAIN_AFTER_SECONDS = 1e-3


class HostMemory(Protocol):
    """Memory shared by the ranks of one machine (``members``: their world ranks, in local order)."""

    members: tuple[int, ...]
    local: int

    def allocate(self, nbytes: int, what: str) -> list[np.ndarray]:
        """Collective: every member gets ``nbytes`` bytes; returns each member's region (uint8
        views, this member's zeroed).  Returns after every member zeroed its region."""
        ...

    def agree(self, value: Any, what: str) -> list[Any]:
        """Collective: every member's small picklable ``value``, in local order (bounded)."""
        ...

    def close(self) -> None:
        """Release the allocations (collective; every member is done with them)."""
        ...


def aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to a cache line."""
    return -(-nbytes // ALIGN) * ALIGN


def _release_tree(seg: _Segment) -> None:
    seg.in_use = False  # no tensor of this rank views the region: a later tree may reuse it


class _Segment:
    __slots__ = ("capacity", "in_use", "pooled", "regions")

    def __init__(self, capacity: int, regions: list[np.ndarray], pooled: bool = True) -> None:
        self.capacity = capacity
        self.regions = regions
        self.pooled = pooled  # False: a tree kept in shared memory (see :meth:`SharedChannel.allocate_tree`)
        self.in_use = True  # a tree's region: some tensor of this rank still views it


class SharedChannel:
    """The shared-memory exchange of this rank with the other ranks of its machine.

    ``max_bytes`` bounds the data segments this rank allocates (two buffers per segment);
    a call that would need more goes over MPI.
    """

    def __init__(
        self,
        memory: HostMemory,
        timeout: float,
        max_bytes: int,
        *,
        probe: Callable[[], None] | None = None,
        notify: Callable[[int, int | None], None] | None = None,
        departed: Callable[[], set[int]] | None = None,
    ) -> None:
        self.memory = memory
        self.departed = departed
        self.members = memory.members
        self.me = memory.local
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.probe = probe
        self.notify = notify
        n = len(self.members)
        self._index = {rank: q for q, rank in enumerate(self.members)}
        self._mail_words = n * 2 * _ENTRY
        self._ack_base = self._mail_words
        self._poison = self._ack_base + 2 * n * _LINE
        words = self._poison + _LINE
        self.ctrl = [r.view(np.int64) for r in memory.allocate(words * 8, "same-host shared memory: control")]
        self.segments: list[_Segment] = []
        self.declined: set[int] = set()
        self.tree_sizes: set[int] = set()  # buffer sizes some shared tree of this machine has
        self.sent = [0] * n
        self.received = [0] * n
        self.epoch = 0
        self.in_place = 0  # publications of bf.shared_tree regions (no epoch, nothing written)
        # Per buffer parity: the readers (local index, transfer) of the last epoch that used it,
        # and that epoch's publication (this rank's own combine may still read its buffer).
        self.outstanding: list[list[tuple[int, int]]] = [[], []]
        self.owners: list[Publication | None] = [None, None]
        self.live: weakref.WeakSet[Subscription] = weakref.WeakSet()
        atomics.warmup()

    def __repr__(self) -> str:
        caps = [s.capacity for s in self.segments]
        return f"SharedChannel(local rank {self.me} of {self.members}, segments {caps} bytes)"

    # ------------------------------------------------------------------ membership, capacity

    def index(self, rank: int) -> int | None:
        """The local index of world rank ``rank``, or None when it is on another machine."""
        return self._index.get(rank)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of shared memory this rank holds: two buffers per pooled segment, one region per tree."""
        return sum(2 * s.capacity if s.pooled else s.capacity for s in self.segments)

    def lookup(self, nbytes: int) -> int | None:
        """The segment a buffer of ``nbytes`` uses (the smallest that fits), or None."""
        best = None
        for k, seg in enumerate(self.segments):
            if not seg.pooled:
                continue
            if seg.capacity >= nbytes and (best is None or seg.capacity < self.segments[best].capacity):
                best = k
        return best

    def segment_for(self, nbytes: int, what: str) -> int | None:
        """:meth:`lookup`, allocating a segment the first time a buffer this large is needed.

        Every member calls it at the same calls with the same ``nbytes`` (the ranks agreed on
        the call), so the first sighting is collective: the members check that they all ask
        for the same size, that it fits ``max_bytes`` on every member and in ``/dev/shm``, then
        allocate — or all decline, and the size goes over MPI from then on.
        """
        found = self.lookup(nbytes)
        if found is not None or nbytes in self.declined:
            return found
        capacity = -(-nbytes // 4096) * 4096
        if not self._agree_to_allocate(nbytes, 2 * capacity, "buffers", what)[1]:
            self.declined.add(nbytes)
            return None
        regions = self.memory.allocate(2 * capacity, f"{what}: same-host shared memory for {nbytes} bytes")
        self.segments.append(_Segment(capacity, regions))
        return len(self.segments) - 1

    def allocate_tree(self, nbytes: int, what: str) -> tuple[int, np.ndarray]:
        """Collective: a region of ``nbytes`` on every member for a tree kept in shared memory
        (published in place, never copied); returns the segment and this member's region.

        A region comes back for reuse when the last tensor viewing the returned array is
        collected (view it through one tensor made from the array: numpy slices of it do not
        keep it alive).  Since allocating is collective, members reuse only when every one of
        them has a region of this size free, else they all allocate (a writer announces its own
        segment, so the members' choices need not be the same segment).
        """
        free = next((k for k, seg in enumerate(self.segments) if not seg.pooled and not seg.in_use
                     and seg.capacity == nbytes), None)
        everyone_free, fits = self._agree_to_allocate(nbytes, nbytes, "trees", what, free is not None)
        if everyone_free:
            assert free is not None
            k = free
        elif not fits:
            raise MemoryError(
                f"{what}: {nbytes} bytes of shared memory per rank would exceed BLUEFOG_FN_SHM_MAX_MB "
                f"({self.max_bytes >> 20} MiB) or what /dev/shm has free on some rank of this machine"
            )
        else:
            regions = self.memory.allocate(max(nbytes, 1), what)
            self.segments.append(_Segment(nbytes, regions, pooled=False))
            k = len(self.segments) - 1
        seg = self.segments[k]
        seg.in_use = True
        self.tree_sizes.add(nbytes)
        region = seg.regions[self.me].view()
        weakref.finalize(region, _release_tree, seg)
        return k, region

    def _agree_to_allocate(self, nbytes: int, per_rank: int, kind: str, what: str, reusable: bool = False) -> tuple[bool, bool]:
        """Collective: whether every member has a region to reuse (``reusable``) and whether every
        member can allocate ``per_rank`` more bytes (``max_bytes``, ``/dev/shm``); raises
        ``MismatchError`` if members ask for different ``nbytes``."""
        fits = self.allocated_bytes + per_rank <= self.max_bytes and _shm_free() >= per_rank * len(self.members)
        answers = self.memory.agree((nbytes, fits, reusable), f"{what}: same-host shared memory for {nbytes} bytes")
        sizes = sorted({a[0] for a in answers})
        if len(sizes) > 1:
            raise MismatchError(
                f"{what}: the ranks of this machine ({list(self.members)}) asked for shared {kind} of "
                f"different sizes {sizes} at the same call; their calls diverged"
            )
        return all(a[2] for a in answers), all(a[1] for a in answers)

    def owner_of(self, address: int, nbytes: int) -> tuple[int, int] | None:
        """``(segment, offset)`` of this rank's tree region holding ``[address, address + nbytes)``."""
        for k, seg in enumerate(self.segments):
            if seg.pooled:
                continue
            base = seg.regions[self.me].ctypes.data
            if base <= address and address + nbytes <= base + seg.capacity:
                return k, address - base
        return None

    # ------------------------------------------------------------------ control words

    def _mail(self, reader: int, n: int) -> int:
        return (reader * 2 + (n & 1)) * _ENTRY

    def _ack(self, writer: int, n: int) -> int:
        # One word per transfer parity: a reader may finish transfer n + 1 before n (an async
        # call waited for after a later one), and at most two are outstanding per pair.
        return self._ack_base + (writer * 2 + (n & 1)) * _LINE

    # ------------------------------------------------------------------ writer side

    def publish(
        self, seg: int, nbytes: int, readers: Sequence[tuple[int, float]], call: int | None, tag: int, what: str
    ) -> Publication:
        """Start epoch ``e``: wait until the buffer of its parity is free, announce it to
        ``readers`` (local indices, with the scale each applies), return the buffer to fill."""
        self.epoch += 1
        parity = self.epoch & 1
        owner = self.owners[parity]
        if owner is not None and not owner.released:
            # This rank's own call of that epoch (an async call not waited for yet) still reads
            # the buffer: it gets a private copy.
            owner.detach()
        pending = self.outstanding[parity]
        if pending:
            self._wait_acks(pending, what)
        capacity = self.segments[seg].capacity
        ours, entries = self._announce(readers, seg, parity * capacity, nbytes, call, tag, what, 0)
        self.outstanding[parity] = ours
        buf = self.segments[seg].regions[self.me][parity * capacity : parity * capacity + nbytes]
        pub = Publication(self.ctrl[self.me], entries, buf)
        self.owners[parity] = pub
        return pub

    def publish_in_place(
        self, seg: int, offset: int, nbytes: int, readers: Sequence[tuple[int, float]], call: int | None, tag: int,
        what: str,
    ) -> Publication:
        """Announce ``nbytes`` of this rank's tree region (:meth:`allocate_tree`) at ``offset``,
        already written, to ``readers``.  The caller's call must not complete before
        :meth:`Publication.acked` (the tree is the caller's to modify afterwards)."""
        ours, entries = self._announce(readers, seg, offset, nbytes, call, tag, what, nbytes)
        self.in_place += 1
        buf = self.segments[seg].regions[self.me][offset : offset + nbytes]
        pub = Publication(self.ctrl[self.me], entries, buf, channel=self, readers=ours)
        pub.ready = nbytes
        return pub

    def _announce(
        self, readers: Sequence[tuple[int, float]], seg: int, offset: int, nbytes: int, call: int | None, tag: int,
        what: str, progress: int,
    ) -> tuple[list[tuple[int, int]], list[int]]:
        """Fill each reader's next mail entry, then publish it (``SEQ``, release)."""
        ours: list[tuple[int, int]] = []
        ctl = self.ctrl[self.me]
        entries = []
        scale_bits = np.array([0.0])
        for q, _ in readers:
            # The ring's entry n % 2 last carried transfer n - 2: it must have been read (implied
            # for buffer epochs, explicit for trees published in place).
            n = self.sent[q] + 1
            if n > 2 and atomics.load(self.ctrl[q], self._ack(self.me, n)) < n - 2:
                self._wait_acks([(q, n - 2)], what)
        for q, scale in readers:
            n = self.sent[q] + 1
            self.sent[q] = n
            base = self._mail(q, n)
            scale_bits[0] = scale
            ctl[base + _EPOCH] = self.epoch
            ctl[base + _SEG] = seg
            ctl[base + _OFFSET] = offset
            ctl[base + _CALL] = -1 if call is None else call
            ctl[base + _TAG] = tag
            ctl[base + _NBYTES] = nbytes
            ctl[base + _SCALE] = int(scale_bits.view(np.int64)[0])
            ctl[base + _PROGRESS] = progress
            atomics.store(ctl, base + _SEQ, n)
            entries.append(base + _PROGRESS)
            ours.append((q, n))
        return ours, entries

    def acked(self, pending: Sequence[tuple[int, int]]) -> bool:
        """Whether every ``(reader, transfer)`` in ``pending`` was acked."""
        return all(atomics.load(self.ctrl[q], self._ack(self.me, n)) >= n for q, n in pending)

    def _wait_acks(self, pending: list[tuple[int, int]], what: str) -> None:
        def acked() -> bool:
            return all(atomics.load(self.ctrl[q], self._ack(self.me, n)) >= n for q, n in pending)

        if not acked():
            self.wait(acked, f"{what}: waiting until the readers of an earlier call are done with this rank's buffer",
                      lambda: [self.members[q] for q, n in pending if atomics.load(self.ctrl[q], self._ack(self.me, n)) < n])

    # ------------------------------------------------------------------ reader side

    def subscribe(self, writer: int, nbytes: int, call: int | None, tag: int, what: str) -> Subscription:
        """This rank's next transfer from local member ``writer`` (expected: ``call``, ``tag``,
        ``nbytes``); nothing is read until :meth:`Subscription.poll` finds it announced."""
        n = self.received[writer] + 1
        self.received[writer] = n
        sub = Subscription(self, writer, n, nbytes, call, tag, what)
        self.live.add(sub)
        return sub

    def mismatch(self, writer: int, message: str, peer_call: int | None, call: int | None) -> CallMismatchError:
        """Record a divergence with ``writer`` (poison word, MPI notice) and return the error."""
        ctl = self.ctrl[self.me]
        atomics.store(ctl, self._poison, 1 + self.members[writer])
        if self.notify is not None:
            self.notify(self.members[writer], call)
        return CallMismatchError(message, peer=self.members[writer], peer_call=peer_call, call=call)

    def refuse_transfers(self, call: int) -> None:
        """Raise ``CallMismatchError`` if a member announced a transfer of ``call`` to this rank
        (this rank makes a global op as that call, so the ranks' programs diverged)."""
        ctl = self.ctrl
        for q in range(len(self.members)):
            if q == self.me:
                continue
            # The two transfers a writer may have announced ahead of this rank's reads.
            for n in (self.received[q] + 1, self.received[q] + 2):
                base = self._mail(self.me, n)
                if atomics.load(ctl[q], base + _SEQ) == n and int(ctl[q][base + _CALL]) == call:
                    me = self.members[self.me]
                    raise self.mismatch(
                        q,
                        f"rank {self.members[q]} sent rank {me} a same-host transfer of call #{call} (a neighbour "
                        f"op), but rank {me}'s call #{call} is a global op: the ranks' programs diverged; the "
                        "global op cannot complete (every global op of this world fails from here on)",
                        call, call,
                    )

    def poisoned_by(self, q: int) -> bool:
        """Whether member ``q`` found that its calls and this rank's diverged."""
        value = atomics.load(self.ctrl[q], self._poison)
        return value != 0 and value - 1 == self.members[self.me]

    # ------------------------------------------------------------------ waiting

    def wait(self, ready: Callable[[], bool], what: str, missing: Callable[[], list[int]], *,
             watch: Sequence[int] = (), call: int | None = None) -> None:
        """Return once ``ready()``; raises ``CommTimeoutError`` after ``timeout`` naming
        ``missing()``, or ``CallMismatchError`` when a member in ``watch`` reported a divergence."""
        waiter = Waiter(self, what, missing, watch=watch, call=call)
        while not ready():
            waiter.idle()

    def drain(self) -> None:
        """Copy and ack every read of this rank that is not being combined right now."""
        for sub in list(self.live):
            if not sub.active:
                sub.detach()

    def reset(self) -> None:
        """Forget every transfer (collective over the machine; for recovery after an error):
        counters to zero, control words cleared, every member then meets."""
        self.memory.agree(None, "same-host shared memory: reset")
        self.ctrl[self.me][:] = 0
        self.sent = [0] * len(self.members)
        self.received = [0] * len(self.members)
        self.epoch = 0
        self.outstanding = [[], []]
        self.owners = [None, None]
        self.live = weakref.WeakSet()
        self.memory.agree(None, "same-host shared memory: reset")

    def close(self) -> None:
        self.memory.close()


class Waiter:
    """Paces one wait (spin, then yield, then sleep) and enforces its deadline."""

    __slots__ = ("call", "channel", "missing", "next_drain", "next_probe", "start", "watch", "what")

    def __init__(self, channel: SharedChannel, what: str, missing: Callable[[], list[int]], *,
                 watch: Sequence[int] = (), call: int | None = None) -> None:
        self.channel = channel
        self.what = what
        self.missing = missing
        self.watch = watch
        self.call = call
        self.start = time.perf_counter()
        self.next_probe = _PROBE_SECONDS
        self.next_drain = _DRAIN_AFTER_SECONDS

    def reset(self) -> None:
        """Progress was made: the deadline counts from now."""
        self.start = time.perf_counter()

    def idle(self) -> None:
        channel = self.channel
        waited = time.perf_counter() - self.start
        if waited > self.next_probe:
            self.next_probe = waited + _PROBE_SECONDS
            for q in self.watch:
                if channel.poisoned_by(q):
                    peer = channel.members[q]
                    raise CallMismatchError(
                        f"rank {peer} found that rank {channel.members[channel.me]}'s same-host transfers do not "
                        f"match its call (rank {channel.members[channel.me]} is at call #{self.call}); rank "
                        f"{peer}'s error has the details",
                        peer=peer, peer_call=None, call=self.call,
                    )
            if channel.probe is not None:
                channel.probe()
        if waited > _YIELD_SECONDS and channel.departed is not None:
            gone = channel.departed().intersection(self.missing())
            if gone:
                raise CommError(
                    f"{self.what}: rank(s) {sorted(gone)} left the job (reached the end of the program, "
                    "sys.exit or bf.shutdown()) while this rank still waits for them"
                )
        if waited > self.next_drain:
            self.next_drain = waited + 10 * _DRAIN_AFTER_SECONDS
            channel.drain()
        if waited > channel.timeout:
            raise CommTimeoutError(
                f"{self.what}: no answer from rank(s) {sorted(self.missing())} after {channel.timeout:g} s "
                "(same-host shared memory); a peer died, stopped calling the library, or is calling a "
                "different op (BLUEFOG_FN_TIMEOUT sets the limit)"
            )
        if waited > _YIELD_SECONDS:
            time.sleep(1e-4)
        elif waited > _SPIN_SECONDS:
            os.sched_yield()


class Publication:
    """A writer's buffer for one epoch; :meth:`advance` tells the readers how much is ready.

    The writer's own combine reads it too (its ``x``); :meth:`release` says it is done.
    """

    __slots__ = ("buffer", "channel", "ctl", "entries", "readers", "ready", "released")

    def __init__(
        self, ctl: np.ndarray, entries: list[int], buffer: np.ndarray, *, channel: SharedChannel | None = None,
        readers: list[tuple[int, int]] | None = None,
    ) -> None:
        self.ctl = ctl
        self.entries = entries
        self.buffer = buffer  # uint8, the epoch's bytes (a private copy once detached)
        self.ready = 0
        self.released = False
        self.channel = channel  # set for a tree published in place: its readers must ack
        self.readers = readers or []

    @property
    def in_place(self) -> bool:
        return self.channel is not None

    def acked(self) -> bool:
        """Whether every reader is done (always true for a buffer epoch: the channel tracks those)."""
        return self.channel is None or self.channel.acked(self.readers)

    def advance(self, nbytes: int) -> None:
        """The first ``nbytes`` bytes of :attr:`buffer` are written (release to every reader)."""
        self.ready = nbytes
        for i in self.entries:
            atomics.store(self.ctl, i, nbytes)

    def release(self) -> None:
        """This rank's own call no longer reads the buffer."""
        self.released = True

    def detach(self) -> None:
        """Move this rank's own use of the buffer to a private copy (the buffer is complete)."""
        if self.ready < self.buffer.nbytes:  # internal invariant: only finished writes are detached
            raise RuntimeError("same-host shared memory: detaching a publication still being written")
        self.buffer = self.buffer.copy()
        self.released = True


class Subscription:
    """One transfer from a writer of this machine to this rank."""

    __slots__ = ("__weakref__", "_progress", "active", "call", "channel", "entry", "found", "n", "nbytes",
                 "released", "scale", "tag", "view", "what", "writer")

    def __init__(self, channel: SharedChannel, writer: int, n: int, nbytes: int, call: int | None, tag: int, what: str) -> None:
        self.channel = channel
        self.writer = writer
        self.n = n
        self.nbytes = nbytes
        self.call = call
        self.tag = tag
        self.what = what
        self.entry = channel._mail(channel.me, n)
        self.found = False
        self.released = False
        self.active = False  # being combined: never drained
        self.scale = 1.0
        self.view: np.ndarray | None = None
        self._progress = 0

    @property
    def rank(self) -> int:
        return self.channel.members[self.writer]

    def poll(self) -> bool:
        """Whether the writer announced this transfer (checks that it is the call we make)."""
        if self.found:
            return True
        ctl = self.channel.ctrl[self.writer]
        base = self.entry
        if atomics.load(ctl, base + _SEQ) != self.n:
            return False
        peer_call = int(ctl[base + _CALL])
        peer_call_or_none = None if peer_call < 0 else peer_call
        tag, nbytes = int(ctl[base + _TAG]), int(ctl[base + _NBYTES])
        ours = -1 if self.call is None else self.call
        if peer_call != ours or tag != self.tag or nbytes != self.nbytes:
            self.release()
            me = self.channel.members[self.channel.me]
            if peer_call != ours:
                text = f"rank {self.rank} is at its call #{peer_call_or_none} but rank {me} is at call #{self.call}"
            else:
                text = (f"rank {self.rank} sent a message for a different op, tree or graph in the same call "
                        f"#{self.call} (same-host transfer of {nbytes} bytes, tag {tag}; expected {self.nbytes} "
                        f"bytes, tag {self.tag})")
            raise self.channel.mismatch(self.writer, text, peer_call_or_none, self.call)
        seg = self.channel.segments[int(ctl[base + _SEG])]
        start = int(ctl[base + _OFFSET])
        self.view = seg.regions[self.writer][start : start + nbytes]
        self.scale = float(np.array([ctl[base + _SCALE]], dtype=np.int64).view(np.float64)[0])
        self.found = True
        return True

    def ready(self, nbytes: int) -> bool:
        """Whether the first ``nbytes`` bytes are published (after :meth:`poll` returned True)."""
        if self._progress >= nbytes:
            return True
        self._progress = atomics.load(self.channel.ctrl[self.writer], self.entry + _PROGRESS)
        return self._progress >= nbytes

    def complete(self) -> bool:
        """Whether the whole transfer is announced and published (never blocks)."""
        return self.poll() and self.ready(self.nbytes)

    def release(self) -> None:
        """This rank reads no more of the transfer: ack it (the writer may reuse its buffer)."""
        if self.released:
            return
        self.released = True
        channel = self.channel
        atomics.store(channel.ctrl[channel.me], channel._ack(self.writer, self.n), self.n)
        channel.live.discard(self)

    def detach(self) -> None:
        """If the transfer is complete, copy its bytes to private memory and release it."""
        if self.released or not self.complete():
            return
        assert self.view is not None
        self.view = self.view.copy()
        self.release()


def _shm_free() -> int:
    """Free bytes in ``/dev/shm`` (where MPI places shared segments), or a large number if unknown."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize
