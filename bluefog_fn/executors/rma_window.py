"""A window's memory on a process world: one block of MPI-3 one-sided memory per rank.

Each rank's block holds its own value (region 0) and one slot per in-neighbour (region
``window._nb.slot[me][j]``), every region in the window's fused layout.  The front end
(:class:`~bluefog_fn.ops.window.Window`) resolves and checks arguments; this engine turns them
into puts, gets, accumulates and swaps through the backend's
:class:`~bluefog_fn.backend.transport.WindowHandle`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..agreement import agree
from ..backend.transport import Transport, WindowHandle
from ..ops.handle import Handle, tracked
from ..ops.window import WindowSnapshot, _never_freed, _scaled, _storage, _timed, combine_update
from ..plan import CommPlan, digest
from ..tree import Flat
from .base import WindowEngine

if TYPE_CHECKING:
    from ..ops.window import Window


def _pooled_scaled(window: Window, buf: torch.Tensor, weight: float) -> torch.Tensor:
    """``weight · buf`` in a pooled buffer (``buf`` itself for weight 1)."""
    return buf if weight == 1.0 else _scaled(buf, weight, window._take(buf.dtype, buf.numel()))


class RmaWindow(WindowEngine):
    """Created collectively (every rank agrees on the layout, then allocates and meets)."""

    def __init__(self, window: Window, transport: Transport, flat: Flat) -> None:
        fn = "Window"
        self.w = window
        world = window._world
        me = world.rank
        self.me = me
        self._pending: list[Handle[None]] = []  # this rank's async operations not yet waited
        plan = CommPlan(
            op="Window",
            rank=me,
            size=world.size,
            layout=window._layout,
            recvs=tuple((j, 1.0) for j in window._nb.ins[me]),
            sends=tuple((d, 1.0) for d in window._nb.outs[me]),
            topology=digest(window._topology.fingerprint),
            signature=digest("Window", window._desc),
        )
        agree(world, transport, fn, plan, per_call_graph=True)
        with _timed(world, "Window.create"):
            handle = transport.window_create(window._stride * (1 + len(window._nb.ins[me])))
            self.handle: WindowHandle = handle
            own = window._pack(flat.tensors)
            handle.put(me, window._pieces(0, own), fn).wait()
            handle.barrier(f"{fn} (creation)")  # nobody touches a window before every rank made it
        self._unfreed = weakref.finalize(window, _never_freed, window._layout.nbytes)

    # ------------------------------------------------------------------ async bookkeeping

    def _settle(self) -> None:
        """Complete this rank's async operations, oldest first (their errors surface here)."""
        while self._pending:
            self._pending[0].wait()

    def _async(self, name: str, pendings: Sequence[Any], finish: Any = None) -> Handle[None]:
        """A tracked handle over backend operations in flight; ``finish`` runs after they complete."""

        def complete() -> None:
            try:
                for p in pendings:
                    p.wait()
                if finish is not None:
                    finish()
            finally:
                self._pending.remove(handle)

        handle: Handle[None] = tracked(self.w._world, name, complete, lambda: all(p.done() for p in pendings))
        self._pending.append(handle)
        return handle

    # ------------------------------------------------------------------ operations

    def push(self, fn: str, flat: Flat, dst_weights: Any, step: int, accumulate: bool) -> Handle[None]:
        w, me, handle = self.w, self.me, self.handle
        dst = w._dst(fn, dst_weights, step, me)
        bufs = w._pack(flat.tensors)
        what = f"{fn} (step {step})"
        pendings = []
        for d, wt in dst:
            pieces = w._pieces(w._nb.slot[d][me], [_pooled_scaled(w, b, wt) for b in bufs])
            pendings.append((handle.accumulate if accumulate else handle.put)(d, pieces, what))
        return self._async(fn, pendings)

    def get(self, fn: str, src_weights: Any, step: int) -> Handle[None]:
        w, me, handle = self.w, self.me, self.handle
        src = w._get_src(fn, src_weights, step, me)
        self._settle()  # an older get into the same slot must not land after this one
        what = f"{fn} (step {step})"
        fetched = [(j, wt, w._empty()) for j, wt in src]
        pendings = [handle.get(j, w._pieces(0, bufs), what) for j, _, bufs in fetched]

        def store() -> None:
            writes = [
                handle.put(me, w._pieces(w._nb.slot[me][j], [_pooled_scaled(w, b, wt) for b in bufs]), what)
                for j, wt, bufs in fetched
            ]
            for p in writes:
                p.wait()

        return self._async(fn, pendings, store)

    def update(self, fn: str, flat: Flat | None, self_weight: Any, src_weights: Any, reset: bool, step: int) -> Any:
        w, me, handle = self.w, self.me, self.handle
        sw, src = w._update_weights(fn, self_weight, src_weights, step, me)
        what = f"{fn} (step {step})"
        with _timed(w._world, fn):
            self._settle()
            own = w._empty() if flat is None else w._pack(flat.tensors)
            reads = [] if flat is not None else [handle.get(me, w._pieces(0, own), what)]
            slots = [w._empty() for _ in src]
            for (j, _), bufs in zip(src, slots, strict=True):
                pieces = w._pieces(w._nb.slot[me][j], bufs)
                if reset:
                    zeros = [(off, np.zeros_like(arr)) for off, arr in pieces]
                    reads.append(handle.swap(me, zeros, [arr for _, arr in pieces], what))
                else:
                    reads.append(handle.get(me, pieces, what))
            for p in reads:
                p.wait()
            if not src and sw == 1.0:  # the value itself (pull_get sets its own value this way)
                outs = own
            else:
                outs = [
                    combine_update(own[gi], [bufs[gi] for bufs in slots], [wt for _, wt in src], sw, out=out)
                    for gi, out in enumerate(w._empty())
                ]
            handle.put(me, w._pieces(0, outs), what).wait()
        device = flat.tensors[0].device if flat is not None and flat.tensors else torch.device("cpu")
        return w._unflatten(flat, outs, device)

    def snapshot(self, fn: str, signature: str) -> WindowSnapshot:
        w, me, handle = self.w, self.me, self.handle
        k = len(w._nb.ins[me])
        with _timed(w._world, fn):
            self._settle()
            handle.barrier(f"{fn} (before reading)")
            regions = [w._empty() for _ in range(1 + k)]
            for p in [handle.get(me, w._pieces(r, bufs), fn) for r, bufs in enumerate(regions)]:
                p.wait()
            handle.barrier(f"{fn} (after reading)")
        slots = tuple(
            torch.stack([regions[r][gi] for r in range(1, 1 + k)])
            if k
            else torch.zeros(0, g.numel, dtype=_storage(g.dtype))
            for gi, g in enumerate(w._layout.groups)
        )
        return WindowSnapshot(tuple(regions[0]), slots, me, w._world.size, signature)

    def restore(self, fn: str, snapshot: WindowSnapshot) -> None:
        w, me, handle = self.w, self.me, self.handle
        regions = [[b.contiguous() for b in snapshot.own]]
        regions += [[s[k].contiguous() for s in snapshot.slots] for k in range(len(w._nb.ins[me]))]
        with _timed(w._world, fn):
            self._settle()
            for p in [handle.put(me, w._pieces(r, bufs), fn) for r, bufs in enumerate(regions)]:
                p.wait()
            handle.barrier(f"{fn} (after writing)")

    def mutex_acquire(self, ranks: tuple[int, ...], what: str) -> None:
        self.handle.mutex_acquire(ranks, what)

    def mutex_release(self, ranks: tuple[int, ...], what: str) -> None:
        self.handle.mutex_release(ranks, what)

    def free(self, fn: str) -> None:
        self._unfreed.detach()
        with _timed(self.w._world, fn):
            try:
                self._settle()
            finally:
                self._pending.clear()
                self.handle.free(fn)
