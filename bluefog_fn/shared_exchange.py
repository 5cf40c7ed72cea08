"""A plan's exchange when some peers share this machine: their buffers are read in place.

Peers on this machine (members of the world's :class:`~bluefog_fn.backend.shared_memory.SharedChannel`)
exchange through shared memory; the others keep the MPI path (:class:`~bluefog_fn.execute.Exchange`
over the remaining edges) in the same call.  This rank writes its fused tree once into its
shared buffer (one dtype group after another, each cache-line aligned); every reader combines
from it directly.  The combine is the MPI path's arithmetic, term for term in ``plan.recvs``
order (``w_self·x + Σ w_j·x_j``, float64 accumulation, one rounding), and a sender-side scale
(``dst_weights``) is applied by the reader with the very torch expression the MPI sender uses,
so both paths give the same bits.

A synchronous call fuses the write and the combine: the buffer is written in chunks of
``CHUNK_BYTES``, each announced as soon as it is written, and chunk ``k`` is combined as soon as
every source announced it — while this rank's chunk and the peers' are still in cache.  An
async call (and a staged one) writes everything when it is posted, so peers can proceed while
the caller computes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from .backend.buffers import _NUMPY_OF, host_array
from .backend.errors import CallMismatchError
from .backend.kernels import combine_rows, combine_tensor_rows, uses_numba
from .backend.shared_memory import Publication, SharedChannel, Subscription, Waiter, aligned
from .backend.transport import Transport
from .call_order import CallOrder, explain
from .execute import (
    Exchange,
    Resources,
    _leaf_views,
    _to_device,
    deliver,
    describe,
    output_groups,
    placed_groups,
)
from .plan import CommPlan, Layout

if TYPE_CHECKING:
    from .timeline import Span

T = TypeVar("T")

CHUNK_BYTES = 1 << 20
"""Bytes written (and combined) per step of a synchronous call; a chunk stays in cache."""
_AHEAD = 2  # chunks written ahead of the combine


def group_offsets(layout: Layout) -> list[int]:
    """Byte offset of each dtype group in a layout's shared buffer, then the buffer's size
    (each group starts on a cache line)."""
    offsets = [0]
    for g in layout.groups:
        offsets.append(offsets[-1] + aligned(g.numel * g.dtype.itemsize))
    return offsets


def buffer_bytes(layout: Layout) -> int:
    """Bytes of a layout's shared buffer (each dtype group cache-line aligned)."""
    return group_offsets(layout)[-1]


def local_edges(plan: CommPlan, channel: SharedChannel) -> bool:
    """Whether the plan sends to or receives from a peer on this machine."""
    index = channel.index
    return any(index(r) is not None for r, _ in plan.recvs) or any(index(r) is not None for r, _ in plan.sends)


class SharedExchange:
    """:class:`~bluefog_fn.execute.Exchange`'s interface (``mix``, ``gathered``, ``done``) for a
    plan with peers on this machine; ``sync``: the caller combines right away (fused write)."""

    def __init__(
        self,
        transport: Transport,
        channel: SharedChannel,
        res: Resources,
        plan: CommPlan,
        tensors: Sequence[torch.Tensor],
        seg: int,
        *,
        call: int | None = None,
        calls: CallOrder | None = None,
        what: str | None = None,
        span: Span | None = None,
        sync: bool = False,
    ) -> None:
        self.plan = plan
        self.channel = channel
        self.res = res
        self.call = call
        self.calls = calls
        self.what = what or describe(plan)
        self.span = span
        self.device = tensors[0].device if tensors else torch.device("cpu")
        index = channel.index
        remote_recvs = tuple((r, w) for r, w in plan.recvs if index(r) is None)
        remote_sends = tuple((r, s) for r, s in plan.sends if index(r) is None)
        self.remote_done = not remote_recvs and not remote_sends
        self.remote: Exchange | None = None
        if not self.remote_done:
            self.remote = Exchange(
                transport, res, dataclasses.replace(plan, recvs=remote_recvs, sends=remote_sends), tensors,
                call=call, calls=calls, what=self.what,
            )
        # Every shared-memory edge also carries a zero-byte MPI message with the call's tag: the
        # transport's checks (call numbers, stale messages, mismatch notices) then see every
        # edge, so a peer making another op at this call fails fast on both sides, as over MPI.
        empty = np.empty(0, dtype=np.uint8)
        self.tokens = transport.exchange(
            [(r, empty) for r, _ in plan.sends if index(r) is not None],
            [(r, np.empty(0, dtype=np.uint8)) for r, _ in plan.recvs if index(r) is not None],
            plan.tag, call=call, what=self.what,
        )
        self.tokens_done = False
        # Where each received row comes from, in plan order: ("shm", subscription index) or
        # ("mpi", row of the remote exchange).
        self.rows: list[tuple[str, int]] = []
        groups = plan.layout.groups
        *self.offsets, self.nbytes = group_offsets(plan.layout)
        self.subs: list[Subscription] = []
        j = 0
        for src, _ in plan.recvs:
            q = index(src)
            if q is None:
                self.rows.append(("mpi", j))
                j += 1
            else:
                self.rows.append(("shm", len(self.subs)))
                sub = channel.subscribe(q, self.nbytes, call, plan.tag, self.what)
                sub.active = True  # this call's own read: never drained while it is being posted
                self.subs.append(sub)
        readers = [(q, s) for r, s in plan.sends if (q := index(r)) is not None]
        placed = self._placed(tensors)
        if placed is not None:  # a bf.shared_tree: announced in place, nothing to write
            self.pub: Publication = channel.publish_in_place(*placed, self.nbytes, readers, call, plan.tag, self.what)
        else:
            self.pub = channel.publish(seg, self.nbytes, readers, call, plan.tag, self.what)
        self.readers = [r for r, _ in plan.sends if index(r) is not None]
        self._own_of: np.ndarray | None = None
        self._own: list[np.ndarray] = []
        self.sources = [self._source(t) for t in tensors]
        # Chunks in buffer order: (group, first element, end element, bytes of the buffer up to its end).
        self.chunks: list[tuple[int, int, int, int]] = []
        for gi, g in enumerate(groups):
            per = max(1, CHUNK_BYTES // g.dtype.itemsize)
            for s in range(0, g.numel, per):
                t = min(g.numel, s + per)
                self.chunks.append((gi, s, t, self.offsets[gi] + t * g.dtype.itemsize))
        self.written = len(self.chunks) if self.pub.in_place else 0  # chunks written
        self._slot = [0] * len(groups)  # per group: the first slot not entirely written
        if not sync:
            self._write_all()
            for sub in self.subs:
                sub.active = False  # held by a handle: may be drained if a writer needs it
        if span is not None:
            span.phase("send")

    # ------------------------------------------------------------------ views

    def own(self, gi: int) -> np.ndarray:
        """Group ``gi`` of this rank's buffer (typed), which moves if the channel detaches it."""
        buf = self.pub.buffer
        if buf is not self._own_of:
            self._own_of = buf
            self._own = [self._typed(buf, k) for k in range(len(self.plan.layout.groups))]
        return self._own[gi]

    def _typed(self, buf: np.ndarray, gi: int) -> np.ndarray:
        g = self.plan.layout.groups[gi]
        start = self.offsets[gi]
        return buf[start : start + g.numel * g.dtype.itemsize].view(_NUMPY_OF[g.dtype])

    def _placed(self, tensors: Sequence[torch.Tensor]) -> tuple[int, int] | None:
        """``(segment, offset)`` when the leaves are exactly a ``bf.shared_tree`` region of this
        layout (every leaf a dense CPU view at its slot's place), else None."""
        placed = placed_groups(self.plan.layout, tensors)
        if placed is None:
            return None
        base = None
        for g, buf, offset in zip(self.plan.layout.groups, placed, self.offsets, strict=True):
            if g.numel == 0:
                continue
            if base is None:
                base = buf.data_ptr() - offset
            elif buf.data_ptr() != base + offset:  # the groups must also sit at their offsets
                return None
        if base is None:
            return None
        return self.channel.owner_of(base, self.nbytes)

    @staticmethod
    def _source(t: torch.Tensor) -> np.ndarray | torch.Tensor:
        flat = t.detach().reshape(-1)
        if flat.device.type != "cpu":
            return flat
        return host_array(flat.contiguous())

    # ------------------------------------------------------------------ writing

    def _write(self, k: int) -> None:
        """Copy chunk ``k`` of this rank's tree into its shared buffer and announce it."""
        gi, s, t, end = self.chunks[k]
        g = self.plan.layout.groups[gi]
        own = self.own(gi)
        slots = g.slots
        i = self._slot[gi]
        while i < len(slots):
            slot = slots[i]
            a, b = max(s, slot.offset), min(t, slot.offset + slot.numel)
            if a >= b:
                if slot.offset >= t:
                    break
                i += 1
                continue
            src = self.sources[slot.leaf]
            if isinstance(src, np.ndarray):
                np.copyto(own[a:b], src[a - slot.offset : b - slot.offset])
            else:  # a device tensor: copied to host straight into the shared buffer
                torch.from_numpy(own[a:b]).view(g.dtype).copy_(src[a - slot.offset : b - slot.offset])
            if b < slot.offset + slot.numel:
                break
            i += 1
        self._slot[gi] = i
        self.written = k + 1
        # The last chunk completes the buffer (alignment padding included): readers wait for
        # ``nbytes`` to know a transfer is whole.
        self.pub.advance(self.nbytes if self.written == len(self.chunks) else end)

    def _write_all(self) -> None:
        while self.written < len(self.chunks):
            self._write(self.written)

    # ------------------------------------------------------------------ reading

    def _waiter(self, what: str) -> Waiter:
        def missing() -> list[int]:
            out = [sub.rank for sub in self.subs if not sub.complete()]
            if self.remote is not None and not self.remote_done:
                out += [r for r, _ in self.remote.plan.recvs]
            return out

        watch = [s.writer for s in self.subs] + [q for r in self.readers if (q := self.channel.index(r)) is not None]
        return Waiter(self.channel, what, missing, watch=watch, call=self.call)

    def _check_remote(self) -> bool:
        if not self.tokens_done and self.tokens.done():
            self.tokens.wait()  # complete: checks the tags of what arrived
            self.tokens_done = True
        if not self.remote_done and self.remote is not None and self.remote.done():
            self.remote._wait()  # complete: checks tags and sizes of what arrived
            self.remote_done = True
        return self.remote_done and self.tokens_done

    def _ready(self, end: int) -> bool:
        if not self._check_remote():
            return False
        return all(sub.poll() and sub.ready(end) for sub in self.subs)

    def _row(self, gi: int, kind: str, idx: int, s: int, t: int) -> np.ndarray:
        if kind == "mpi":
            assert self.remote is not None
            return self.remote.recv_np[gi][idx, s:t]
        sub = self.subs[idx]
        assert sub.view is not None
        row = self._typed(sub.view, gi)[s:t]
        if sub.scale != 1.0:
            # The MPI sender's expression (``segment * scale`` in torch), evaluated here.
            dtype = self.plan.layout.groups[gi].dtype
            row = host_array(torch.from_numpy(row).view(dtype) * sub.scale)
        return row

    def _combine(self, k: int, outs: list[torch.Tensor], outs_np: list[np.ndarray]) -> None:
        gi, s, t, _ = self.chunks[k]
        plan = self.plan
        g = plan.layout.groups[gi]
        rows = [self._row(gi, kind, idx, s, t) for kind, idx in self.rows]
        weights = [w for _, w in plan.recvs]
        x = self.own(gi)[s:t]
        if uses_numba(g.dtype):
            combine_rows(x, rows, weights, plan.self_weight, outs_np[gi][s:t])
        else:
            combine_tensor_rows(
                torch.from_numpy(x).view(g.dtype), [torch.from_numpy(r).view(g.dtype) for r in rows],
                weights, plan.self_weight, outs[gi][s:t],
            )

    def _finish(self) -> None:
        for sub in self.subs:
            sub.release()
        self.pub.release()
        self.sources = []
        if not self.pub.acked():
            # The tree is the caller's again when the call returns: every reader must be done.
            channel = self.channel
            waiter = Waiter(
                channel, f"{self.what}: waiting until same-host readers are done with this rank's tree",
                lambda: [channel.members[q] for q, n in self.pub.readers if not channel.acked([(q, n)])],
                watch=[q for q, _ in self.pub.readers], call=self.call,
            )
            while not self.pub.acked():
                waiter.idle()

    def done(self) -> bool:
        return (
            self.written == len(self.chunks) and all(s.complete() for s in self.subs) and self._check_remote()
            and self.pub.acked()
        )

    def _explained(self, run: Callable[[], T]) -> T:
        """``run()``, with a divergence error naming both ranks' calls (as ``Exchange`` does)."""
        try:
            return run()
        except CallMismatchError as exc:
            if self.calls is None:
                raise
            raise explain(self.calls, self.plan.rank, self.plan.op, exc) from None

    def mix(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Combine chunk by chunk as the sources announce them; returns the output leaves
        (``into``'s, when given: written in place when they are placed, else copied there)."""
        return self._explained(lambda: self._mix(into))

    def _mix(self, into: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
        outs, placed = output_groups(self.res, self.plan.layout, into, [self.sources])
        outs_np = [host_array(o) for o in outs]
        for sub in self.subs:
            sub.active = True
        waiter = self._waiter(f"{self.what}: waiting for same-host peers' data")
        n = len(self.chunks)
        done = 0
        while done < n:
            if self.written < n and self.written - done < _AHEAD:
                self._write(self.written)
                continue
            if self._ready(self.chunks[done][3]):
                self._combine(done, outs, outs_np)
                done += 1
                waiter.reset()
                continue
            if self.written < n:
                self._write(self.written)
                continue
            waiter.idle()
        self._finish()
        if self.span is not None:
            self.span.phase("combine")
        return deliver(self.plan.layout, outs, self.device, into, placed)

    def gathered(self) -> dict[int, list[torch.Tensor]]:
        """Wait, then return each source's leaves (copied out of the shared buffers)."""
        return self._explained(self._gathered)

    def _gathered(self) -> dict[int, list[torch.Tensor]]:
        self._write_all()
        waiter = self._waiter(f"{self.what}: waiting for same-host peers' data")
        while not (all(sub.complete() for sub in self.subs) and self._check_remote()):
            waiter.idle()
        groups = self.plan.layout.groups
        remote = {} if self.remote is None else self.remote.gathered()
        self.remote_done = True
        result: dict[int, list[torch.Tensor]] = {}
        for (src, _), (kind, idx) in zip(self.plan.recvs, self.rows, strict=True):
            if kind == "mpi":
                result[src] = remote[src]
                continue
            bufs = []
            for gi, g in enumerate(groups):
                row = self._row(gi, kind, idx, 0, g.numel)
                buf, buf_np = self.res.pool.take_pair(g.dtype, g.numel)
                np.copyto(buf_np, row)
                bufs.append(_to_device(buf, self.device))
            result[src] = _leaf_views(self.plan, bufs)
        self._finish()
        return result
