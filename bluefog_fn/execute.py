"""Executes plans in a process world (MPI or a world of one) through the backend.

The path of a tensor through ``neighbor_mean``: each leaf's memory is sent as is (leaves of at
least ``SEGMENT_MIN_BYTES``) or packed with its small neighbours into one message; receives land in
one pooled ``(peers, numel)`` buffer per dtype; the compiled kernel writes
``w_self · x + Σ w_j · recv_j`` into one pooled output buffer per dtype, and the returned leaves
are views into it.  CUDA leaves go through reusable pinned host buffers on the way out and back.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .backend.buffers import BufferPool, PinnedStaging, host_array
from .backend.errors import CallMismatchError
from .backend.kernels import combine, combine_arrays, uses_numba
from .backend.transport import ExchangePending, Transport
from .call_order import CallOrder, explain
from .plan import BufferGroup, CommPlan, Layout

if TYPE_CHECKING:
    from .timeline import Span


@dataclass
class Resources:
    """Per-world reusable memory: pooled host outputs and pinned staging for CUDA tensors."""

    pool: BufferPool = field(default_factory=BufferPool)
    staging: PinnedStaging = field(default_factory=PinnedStaging)


def describe(plan: CommPlan, step: int | None = None) -> str:
    """How errors name a call: its op and its step (the caller's, else the plan's)."""
    step = plan.step if step is None else step
    return plan.op if step is None else f"{plan.op} (step {step})"


def _host_segments(
    group: BufferGroup, tensors: Sequence[torch.Tensor], res: Resources
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """One 1-D host tensor per segment of ``group`` (views of the caller's memory when possible),
    and the pinned staging buffer used for device tensors (to release after the exchange)."""
    device = tensors[group.slots[0].leaf].device if group.slots else torch.device("cpu")
    if device.type != "cpu":
        # One device→host copy of the whole group into a reused pinned buffer.
        staged = res.staging.acquire(group.dtype, group.numel)
        for s in group.slots:
            staged[s.offset : s.offset + s.numel].copy_(tensors[s.leaf].detach().reshape(-1), non_blocking=True)
        torch.cuda.synchronize(device)
        return [staged[seg.start : seg.stop] for seg in group.segments], staged
    out = []
    for seg in group.segments:
        if seg.packed:
            buf = res.pool.take(group.dtype, seg.stop - seg.start)
            for k in seg.slots:
                s = group.slots[k]
                buf[s.offset - seg.start : s.offset - seg.start + s.numel].copy_(tensors[s.leaf].detach().reshape(-1))
            out.append(buf)
        else:
            s = group.slots[seg.slots[0]]
            # Sent straight from the caller's memory, which must be dense (a strided 1-D view
            # stays a view under reshape, and MPI cannot send it).
            out.append(tensors[s.leaf].detach().reshape(-1).contiguous())
    return out, None


def _leaf_views(plan: CommPlan, buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return _layout_views(plan.layout, buffers)


def _layout_views(layout: Layout, buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    outs: list[torch.Tensor | None] = [None] * layout.n_tensors
    for g, buf in zip(layout.groups, buffers, strict=True):
        if len(g.slots) == 1:  # the common single-leaf group: no slice needed
            outs[g.slots[0].leaf] = buf.view(g.slots[0].shape)
            continue
        for s in g.slots:
            outs[s.leaf] = buf[s.offset : s.offset + s.numel].view(s.shape)
    return outs  # type: ignore[return-value]


def placed_groups(layout: Layout, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """One 1-D tensor per dtype group spanning ``tensors``' memory when every leaf is a dense CPU
    view at its slot's place in one buffer per group (the leaves :func:`_layout_views` makes, or
    those of ``bf.shared_tree``); None otherwise.

    A result can then be combined straight into the caller's memory.
    """
    out = []
    for g in layout.groups:
        base = first = None
        itemsize = g.dtype.itemsize
        for slot in g.slots:
            if slot.numel == 0:
                continue
            t = tensors[slot.leaf]
            if t.device.type != "cpu" or t.dtype != g.dtype or not t.is_contiguous():
                return None
            if base is None:
                base, first = t.data_ptr() - slot.offset * itemsize, t
            elif t.data_ptr() != base + slot.offset * itemsize:
                return None
        if first is None:
            out.append(torch.empty(g.numel, dtype=g.dtype))
            continue
        storage = first.untyped_storage()
        start = base - storage.data_ptr()  # type: ignore[operator]
        if start < 0 or start % itemsize or start + g.numel * itemsize > storage.nbytes():
            return None
        out.append(torch.empty(0, dtype=g.dtype).set_(storage, start // itemsize, (g.numel,), (1,)))
    return out


def _span(a: np.ndarray | torch.Tensor) -> tuple[int, int]:
    if isinstance(a, np.ndarray):
        start = int(a.ctypes.data)
        return start, start + a.nbytes
    return a.data_ptr(), a.data_ptr() + a.numel() * a.element_size()


def output_groups(
    res: Resources, layout: Layout, into: Sequence[torch.Tensor] | None, inputs: Sequence[Sequence[np.ndarray | torch.Tensor]],
) -> tuple[list[torch.Tensor], bool]:
    """Where a combine writes: ``into``'s own memory when it is placed (see
    :func:`placed_groups`) and disjoint from every buffer the combine reads (``inputs``: the
    caller's memory it sends or reads in place), else fresh pooled buffers; and whether it
    writes into ``into``.  An ``into`` that overlaps the inputs (``out=tree``: an update in
    place) gets the result copied in once the exchange is complete."""
    if into is not None:
        placed = placed_groups(layout, into)
        if placed is not None:
            reads = sorted(_span(a) for group in inputs for a in group)
            starts = [a for a, _ in reads]
            for target in placed:
                lo, hi = _span(target)
                k = bisect.bisect_left(starts, hi)  # reads starting before the target ends
                if any(b > lo and a < hi for a, b in reads[:k]):
                    break
            else:
                return placed, True
    return [res.pool.take(g.dtype, g.numel) for g in layout.groups], False


def deliver(layout: Layout, buffers: Sequence[torch.Tensor], device: torch.device, into: Sequence[torch.Tensor] | None, placed: bool) -> list[torch.Tensor]:
    """The output leaves of a combine into ``buffers``: views of them, or ``into`` (copied
    there unless the combine already wrote in place)."""
    if into is None:
        return _layout_views(layout, [_to_device(b, device) for b in buffers])
    if not placed:
        for target, value in zip(into, _layout_views(layout, buffers), strict=True):
            target.copy_(value)
    return list(into)


def _to_device(buf: torch.Tensor, device: torch.device) -> torch.Tensor:
    return buf if device.type == "cpu" else buf.to(device, non_blocking=False)


def _with_calls(exc: CallMismatchError, calls: CallOrder | None, plan: CommPlan) -> CallMismatchError:
    """``exc`` with this rank's record of the calls it names, when there is a record."""
    return exc if calls is None else explain(calls, plan.rank, plan.op, exc)


def scaled_sends(
    plan: CommPlan, segments: Sequence[Sequence[torch.Tensor]], segments_np: Sequence[Sequence[np.ndarray]]
) -> tuple[list[tuple[int, np.ndarray]], list[torch.Tensor]]:
    """The messages of ``plan.sends``: to each destination every segment of every group, in
    (group, segment) order (the receiver posts its receives in that order), scaled by the
    destination's weight; also the scaled copies, which must outlive the sends."""
    sends: list[tuple[int, np.ndarray]] = []
    keep: list[torch.Tensor] = []
    for dst, scale in plan.sends:
        for segs, segs_np in zip(segments, segments_np, strict=True):
            if scale == 1.0:  # straight from the caller's memory
                sends.extend((dst, a) for a in segs_np)
                continue
            for seg_x in segs:
                scaled = seg_x * scale
                keep.append(scaled)
                sends.append((dst, host_array(scaled)))
    return sends, keep


class Exchange:
    """The point-to-point part of ``neighbor_mean`` / ``neighbor_gather`` in flight.

    Works on numpy views of every buffer, made once per call: this is the per-call hot path, and
    tensor slicing and conversions cost microseconds each.
    """

    def __init__(
        self,
        transport: Transport,
        res: Resources,
        plan: CommPlan,
        tensors: Sequence[torch.Tensor],
        *,
        call: int | None = None,
        calls: CallOrder | None = None,
        what: str | None = None,
        span: Span | None = None,
    ) -> None:
        self.plan = plan
        self.call = call
        self.calls = calls
        self.res = res
        self.span = span  # the op's timeline span (marks pack, send, wait, combine), or None
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self.x: list[list[torch.Tensor]] = []  # per group, per segment
        self.x_np: list[list[np.ndarray]] = []
        self.recv: list[torch.Tensor] = []  # per group: (peers, numel)
        self.recv_np: list[np.ndarray] = []
        self.staged: list[torch.Tensor] = []
        recvs: list[tuple[int, np.ndarray]] = []
        n_in = len(plan.recvs)
        for g in plan.layout.groups:
            segs, staged = _host_segments(g, tensors, res)
            self.x.append(segs)
            self.x_np.append([host_array(t) for t in segs])
            if staged is not None:
                self.staged.append(staged)
            rbuf, rbuf_np = res.pool.take_pair(g.dtype, n_in * g.numel)
            self.recv.append(rbuf.view(n_in, g.numel))
            self.recv_np.append(rbuf_np.reshape(n_in, g.numel))
        # Messages to/from each peer go out in (group, segment) order on both sides; MPI keeps
        # messages between a pair of ranks in order, so they match one to one.
        self.recv_segment: list[tuple[int, int]] = []  # receive index -> (group, segment)
        for j, (src, _) in enumerate(plan.recvs):
            for gi, g in enumerate(plan.layout.groups):
                rows = self.recv_np[gi]
                for si, seg in enumerate(g.segments):
                    recvs.append((src, rows[j, seg.start : seg.stop]))
                    self.recv_segment.append((gi, si))
        sends, self._keep = scaled_sends(plan, self.x, self.x_np)
        if span is not None:
            span.phase("pack")
        self.pending: ExchangePending = transport.exchange(sends, recvs, plan.tag, call=call, what=what or describe(plan))
        if span is not None:
            span.phase("send")

    def _completed(self) -> Iterator[int]:
        try:
            yield from self.pending.completed()
        except CallMismatchError as exc:
            raise _with_calls(exc, self.calls, self.plan) from None

    def _wait(self) -> None:
        for _ in self._completed():
            pass

    def done(self) -> bool:
        return self.pending.done()

    def mix(self, into: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Combine each segment into fresh fused outputs (or ``into``'s leaves) as soon as all
        its messages landed (while they are still in cache); returns the output leaves."""
        plan = self.plan
        groups = plan.layout.groups
        weights = [w for _, w in plan.recvs]
        self_weight = plan.self_weight
        outs, placed = output_groups(self.res, plan.layout, into, self.x_np)
        outs_np = [host_array(o) if uses_numba(g.dtype) else None for o, g in zip(outs, groups, strict=True)]
        n_in = len(weights)
        span = self.span
        if span is not None:
            # Segments are combined as they land: each combine nests inside the wait, which
            # ends when the last segment's messages are in.
            span.skip()
            wait_start = span.last
            combine_segment = _timed_combine(self._combine_segment_fn(outs, outs_np, weights, self_weight), span)
        else:
            combine_segment = self._combine_segment_fn(outs, outs_np, weights, self_weight)
        if n_in == 0:
            self._wait()
            if span is not None:
                span.add("wait", wait_start, span.now())
            for gi, g in enumerate(groups):
                for si in range(len(g.segments)):
                    combine_segment(gi, si)
        else:
            arrived: dict[tuple[int, int], int] = {}
            for i in self._completed():
                key = self.recv_segment[i]
                count = arrived.get(key, 0) + 1
                arrived[key] = count
                if count == n_in:
                    combine_segment(*key)
            if span is not None:
                span.add("wait", wait_start, span.phases[-1][1] if span.phases[-1][0] == "combine" else span.now())
                span.phases.sort(key=_phase_start)
        self._release()
        return deliver(plan.layout, outs, self.device, into, placed)

    def _combine_segment_fn(
        self, outs: list[torch.Tensor], outs_np: list[np.ndarray | None], weights: list[float], self_weight: float
    ) -> Callable[[int, int], None]:
        groups = self.plan.layout.groups

        def combine_segment(gi: int, si: int) -> None:
            seg = groups[gi].segments[si]
            out_np = outs_np[gi]
            if out_np is not None:
                combine_arrays(
                    self.x_np[gi][si], self.recv_np[gi][:, seg.start : seg.stop], weights, self_weight,
                    out_np[seg.start : seg.stop],
                )
            else:
                combine(self.x[gi][si], self.recv[gi][:, seg.start : seg.stop], weights, self_weight, outs[gi][seg.start : seg.stop])

        return combine_segment

    def _release(self) -> None:
        """The exchange is complete: scaled copies and staging buffers may be reused."""
        self._keep = []
        self.x = []
        self.x_np = []
        for buf in self.staged:
            self.res.staging.release(buf)
        self.staged = []

    def gathered(self) -> dict[int, list[torch.Tensor]]:
        """Wait, then return each source's leaves (views into the receive buffer)."""
        if self.span is not None:
            self.span.skip()
        self._wait()
        if self.span is not None:
            self.span.phase("wait")
        self._release()
        result = {}
        for j, (src, _) in enumerate(self.plan.recvs):
            bufs = [_to_device(r[j], self.device) for r in self.recv]
            result[src] = _leaf_views(self.plan, bufs)
        return result


def _phase_start(phase: tuple[str, float, float]) -> float:
    return phase[1]


def _timed_combine(fn: Callable[[int, int], None], span: Span) -> Callable[[int, int], None]:
    def combine_segment(gi: int, si: int) -> None:
        start = span.now()
        fn(gi, si)
        span.add("combine", start, span.now())

    return combine_segment


def pack(plan: CommPlan, tensors: Sequence[torch.Tensor], res: Resources, *, upcast_half: bool = False) -> list[torch.Tensor]:
    """Copy the leaves into fresh fused host buffers, one per dtype group."""
    out = []
    for g in plan.layout.groups:
        dtype = torch.float32 if upcast_half and g.dtype in (torch.float16, torch.bfloat16) else g.dtype
        buf = res.pool.take(dtype, g.numel)
        for s in g.slots:
            buf[s.offset : s.offset + s.numel].copy_(tensors[s.leaf].detach().reshape(-1))
        out.append(buf)
    return out


def unpack(plan: CommPlan, buffers: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Leaves as views of the fused buffers (moved to ``device``, cast back from upcasts)."""
    moved = [
        _to_device(b if b.dtype == g.dtype else b.to(g.dtype), device)
        for g, b in zip(plan.layout.groups, buffers, strict=True)
    ]
    return _leaf_views(plan, moved)


class RaggedGather:
    """``neighbor_gather`` when sources' leaves differ in dim 0: each source gets receive
    buffers in its own layout (``layouts[j]`` for ``plan.recvs[j]``, built from the first
    dimensions it announced), so every message lands whole in a buffer of its exact size.

    Sends are those of :class:`Exchange` (:func:`scaled_sends`: this rank's layout, scaled by
    ``dst_weights``); a mismatch names the calls as :class:`Exchange`'s do when ``calls`` is given.
    """

    def __init__(
        self,
        transport: Transport,
        res: Resources,
        plan: CommPlan,
        tensors: Sequence[torch.Tensor],
        layouts: Sequence[Layout],
        *,
        call: int | None = None,
        calls: CallOrder | None = None,
        what: str | None = None,
    ) -> None:
        self.plan = plan
        self.calls = calls
        self.res = res
        self.layouts = layouts
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self.staged: list[torch.Tensor] = []
        recvs: list[tuple[int, np.ndarray]] = []
        own: list[list[torch.Tensor]] = []
        for g in plan.layout.groups:
            segs, staged = _host_segments(g, tensors, res)
            own.append(segs)
            if staged is not None:
                self.staged.append(staged)
        sends, self._keep = scaled_sends(plan, own, [[host_array(t) for t in segs] for segs in own])
        self._keep.extend(t for segs in own for t in segs)  # the unscaled sends' memory, likewise
        self.bufs: list[list[torch.Tensor]] = []  # per source, per group
        for (src, _), layout in zip(plan.recvs, layouts, strict=True):
            mine = []
            for g in layout.groups:
                buf, buf_np = res.pool.take_pair(g.dtype, g.numel)
                mine.append(buf)
                recvs.extend((src, buf_np[seg.start : seg.stop]) for seg in g.segments)
            self.bufs.append(mine)
        self.sources = [src for src, _ in plan.recvs]
        self.pending: ExchangePending = transport.exchange(sends, recvs, plan.tag, call=call, what=what or describe(plan))

    def done(self) -> bool:
        return self.pending.done()

    def gathered(self) -> dict[int, list[torch.Tensor]]:
        """Wait, then return each source's leaves (views into its receive buffers)."""
        try:
            self.pending.wait()
        except CallMismatchError as exc:
            raise _with_calls(exc, self.calls, self.plan) from None
        self._keep = []
        for buf in self.staged:
            self.res.staging.release(buf)
        self.staged = []
        return {
            src: _layout_views(layout, [_to_device(b, self.device) for b in bufs])
            for src, layout, bufs in zip(self.sources, self.layouts, self.bufs, strict=True)
        }
