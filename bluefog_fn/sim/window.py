"""A window's memory inside ``bf.simulate(n)``: every agent's own value and slots in one process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..executors.base import WindowEngine
from ..ops.handle import Handle, tracked
from ..ops.window import EVERY_SLOT, WindowSnapshot, _scaled, _storage, _timed, combine_update
from ..tree import Flat
from .ops import _dst_weights, _self_weights, _src_weights

if TYPE_CHECKING:
    from ..ops.window import Window


class SimWindow(WindowEngine):
    """The window of ``bf.simulate(n)``: all agents' memory in one process, synchronous.

    ``own[g]`` is ``(n, numel)`` and ``slots[g]`` is ``(n, max in-degree, numel)`` (padded), in
    the storage dtype; agent ``i``'s slot for ``j`` is row ``slot[i][j] − 1``.
    """

    def __init__(self, window: Window, flat: Flat) -> None:
        self.w = window
        n = window._world.size
        self.n = n
        width = max((len(ins) for ins in window._nb.ins), default=0)
        self.own = []
        self.slots = []
        for g in window._layout.groups:
            buf = torch.empty(n, g.numel, dtype=_storage(g.dtype))
            for s in g.slots:
                buf[:, s.offset : s.offset + s.numel].copy_(
                    flat.tensors[s.leaf].detach().reshape(n, -1)
                )
            self.own.append(buf)
            self.slots.append(torch.zeros(n, width, g.numel, dtype=_storage(g.dtype)))
        self.device = flat.tensors[0].device if flat.tensors else torch.device("cpu")
        self.template = flat

    def snapshot(self, fn: str, signature: str) -> WindowSnapshot:
        own = tuple(o.clone() for o in self.own)
        return WindowSnapshot(own, tuple(s.clone() for s in self.slots), 0, self.n, signature)

    def restore(self, fn: str, snapshot: WindowSnapshot) -> None:
        for mine, theirs in zip(self.own + self.slots, snapshot.own + snapshot.slots, strict=True):
            mine.copy_(theirs)

    def _pack(self, flat: Flat) -> list[torch.Tensor]:
        out = []
        for g in self.w._layout.groups:
            buf = torch.empty(self.n, g.numel, dtype=_storage(g.dtype))
            for s in g.slots:
                buf[:, s.offset : s.offset + s.numel].copy_(
                    flat.tensors[s.leaf].detach().reshape(self.n, -1)
                )
            out.append(buf)
        return out

    def push(self, fn: str, flat: Flat, dst_weights: Any, step: int, accumulate: bool) -> Handle[None]:
        with _timed(self.w._world, fn):
            self._push(fn, flat, dst_weights, step, accumulate)
        return tracked(self.w._world, fn, lambda: None)

    def _push(self, fn: str, flat: Flat, dst_weights: Any, step: int, accumulate: bool) -> None:
        per = _dst_weights(fn, dst_weights, self.n)
        dsts = [self.w._dst(fn, per[i], step, i) for i in range(self.n)]  # validate all first
        bufs = self._pack(flat)
        for i, dst in enumerate(dsts):
            for d, wt in dst:
                row = self.w._nb.slot[d][i] - 1
                for gi, buf in enumerate(bufs):
                    data = _scaled(buf[i], wt)
                    if accumulate:
                        self.slots[gi][d, row] += data
                    else:
                        self.slots[gi][d, row] = data

    def get(self, fn: str, src_weights: Any, step: int) -> Handle[None]:
        with _timed(self.w._world, fn):
            self._get(fn, src_weights, step)
        return tracked(self.w._world, fn, lambda: None)

    def _get(self, fn: str, src_weights: Any, step: int) -> None:
        per = _src_weights(fn, src_weights, self.n)
        srcs = []
        for i in range(self.n):
            src = self.w._src(fn, per[i], step, i)
            srcs.append(
                src
                if src is not None
                else tuple((j, 1.0) for j in self.w._topology.at(step).in_neighbors(i))
            )
        snapshot = [o.clone() for o in self.own]  # every agent reads the values before this call
        for i, src in enumerate(srcs):
            for j, wt in src:
                row = self.w._nb.slot[i][j] - 1
                for gi, own in enumerate(snapshot):
                    self.slots[gi][i, row] = _scaled(own[j], wt)

    def update(
        self, fn: str, flat: Flat | None, self_weight: Any, src_weights: Any, reset: bool, step: int
    ) -> Any:
        with _timed(self.w._world, fn):
            return self._update(fn, flat, self_weight, src_weights, reset, step)

    def _update(
        self, fn: str, flat: Flat | None, self_weight: Any, src_weights: Any, reset: bool, step: int
    ) -> Any:
        sws = _self_weights(fn, self_weight, self.n)
        srcs = [src_weights] * self.n if src_weights is EVERY_SLOT else _src_weights(fn, src_weights, self.n)
        resolved = [self.w._update_weights(fn, sws[i], srcs[i], step, i) for i in range(self.n)]
        if flat is not None:
            for gi, buf in enumerate(self._pack(flat)):
                self.own[gi].copy_(buf)
        outs = []
        for gi, own in enumerate(self.own):
            out = torch.empty_like(own)
            for i, (sw, src) in enumerate(resolved):
                rows = [self.w._nb.slot[i][j] - 1 for j, _ in src]
                slots = [self.slots[gi][i, r] for r in rows]
                out[i] = combine_update(own[i], slots, [w for _, w in src], sw)
                if reset:
                    for r in rows:
                        self.slots[gi][i, r].zero_()
            own.copy_(out)
            outs.append(out)
        template = flat if flat is not None else self.template
        device = template.tensors[0].device if template.tensors else self.device
        leaves: list[torch.Tensor] = [None] * len(template.tensors)  # type: ignore[list-item]
        for gi, g in enumerate(self.w._layout.groups):
            buf = outs[gi].to(g.dtype) if outs[gi].dtype != g.dtype else outs[gi]
            for s in g.slots:
                leaves[s.leaf] = (
                    buf[:, s.offset : s.offset + s.numel].reshape(self.n, *s.shape).to(device)
                )
        return template.unflatten(leaves)

    def mutex_acquire(self, ranks: tuple[int, ...], what: str) -> None:
        pass  # agents run one after another: nothing can hold a mutex concurrently

    def mutex_release(self, ranks: tuple[int, ...], what: str) -> None:
        pass

    def free(self, fn: str) -> None:
        self.own = []
        self.slots = []
