"""The lean path of a cached ``neighbor_mean``: a prepared executor per call pattern.

A call whose tree is a plain nest (:mod:`bluefog_fn.quick_tree`), whose topology object, step (in
the topology's period), leaf shapes and dtypes were seen before, with no weight overrides, no
gradient to record, no ``torch.func`` transform, CPU leaves and no timeline, is served by a
:class:`PreparedMix` built at the first such call: it holds the plan, the receive buffers (and
their numpy views, one per peer and segment), the packed-send buffers and the weights, so a call
is: number it, post the messages, wait, combine with the Numba kernel into fresh output buffers,
rebuild the tree.  Every other call takes the regular path (trace → agree → ``Exchange``), which
also builds the prepared executor for the next time.

The prepared executor reuses its receive buffers, so it serves only synchronous calls (the
regular path serves ``_async``).  It is used only while its pattern is in the world's agreed set,
so every rank still agrees exactly when the regular path would (the sets evolve identically on
every rank), and it counts a plan-cache hit, so ``bf.plan_cache_info`` reads as before.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..agreement import agreement_key
from ..backend.errors import CallMismatchError
from ..backend.kernels import combine_arrays, uses_numba
from ..backend.transport import Transport
from ..call_order import explain
from ..plan import CommPlan
from ..quick_tree import quick_rebuild

if TYPE_CHECKING:
    from ..world import World

# Larger trees gain nothing measurable from the lean path (the copy dominates) and keep the
# regular path's combine-as-segments-land overlap.
LEAN_MAX_BYTES = 1 << 20

_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


class PreparedMix:
    """One rank's cached ``neighbor_mean`` of one pattern, ready to run (see the module doc)."""

    __slots__ = (
        "_groups", "_recvs", "_sends_from", "_weights", "agreed", "plan", "self_weight", "structure",
        "topology",
    )

    def __init__(self, plan: CommPlan, structure: Hashable, topology: object, shapes: Sequence[tuple[int, ...]]) -> None:
        self.plan = plan
        self.structure = structure
        self.topology = topology  # held: the cache is keyed by its id
        self.agreed = agreement_key(plan, False)
        self.self_weight = plan.self_weight
        self._weights = [w for _, w in plan.recvs]
        n_in = len(plan.recvs)
        # Per group: (dtype, numel, slots as (leaf, offset, numel, shape), segments, recv rows).
        groups = []
        recvs: list[tuple[int, np.ndarray]] = []
        sends_from: list[tuple[int, int, int, np.ndarray | None]] = []  # (group, segment, leaf, packed buffer)
        for gi, g in enumerate(plan.layout.groups):
            rows = np.empty((n_in, g.numel), dtype=torch.empty((), dtype=g.dtype).numpy().dtype)
            segs = []
            for si, seg in enumerate(g.segments):
                packed = None
                leaf = -1
                if seg.packed:
                    packed = np.empty(seg.stop - seg.start, dtype=rows.dtype)
                else:
                    leaf = g.slots[seg.slots[0]].leaf
                sends_from.append((gi, si, leaf, packed))
                segs.append((seg.start, seg.stop, tuple(
                    (g.slots[k].leaf, g.slots[k].offset - seg.start, g.slots[k].numel) for k in seg.slots
                )))
            slots = tuple((s.leaf, s.offset, s.numel, tuple(shapes[s.leaf])) for s in g.slots)
            groups.append((g.dtype, g.numel, slots, tuple(segs), rows))
        # Receives in the order the regular path posts them: per source, per (group, segment).
        for j, (src, _) in enumerate(plan.recvs):
            for group in groups:
                for start, stop, _ in group[3]:
                    recvs.append((src, group[4][j, start:stop]))
        self._groups = tuple(groups)
        self._recvs = recvs
        self._sends_from = tuple(sends_from)

    @staticmethod
    def eligible(plan: CommPlan, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether calls of this plan may take the lean path."""
        return (
            plan.layout.nbytes <= LEAN_MAX_BYTES
            and all(s == 1.0 for _, s in plan.sends)
            and all(uses_numba(g.dtype) for g in plan.layout.groups)
            and all(t.is_cpu for t in tensors)
        )

    def run(self, world: World, transport: Transport, leaves: Sequence[torch.Tensor], step: int) -> Any:
        """The call's result tree (the caller checked that the pattern applies)."""
        plan = self.plan
        call = None
        if world.size > 1:
            calls = world.calls
            call = calls.begin(plan.op, step)
            try:
                transport.begin_call(call, calls.floor())
            except CallMismatchError as exc:
                raise explain(calls, world.rank, plan.op, exc) from None
        # This rank's segments, straight from the caller's memory (or packed once).
        x_segs: list[list[np.ndarray]] = [[] for _ in self._groups]
        for gi, si, leaf, packed in self._sends_from:
            if packed is None:
                x_segs[gi].append(leaves[leaf].detach().reshape(-1).contiguous().numpy())
            else:
                for lf, off, numel in self._groups[gi][3][si][2]:
                    packed[off : off + numel] = leaves[lf].detach().reshape(-1).numpy()
                x_segs[gi].append(packed)
        if plan.sends or plan.recvs:
            sends = [(dst, a) for dst, _ in plan.sends for segs in x_segs for a in segs]
            what = f"{plan.op} (step {step})"
            pending = transport.exchange(sends, self._recvs, plan.tag, call=call, what=what)
            try:
                pending.wait()
            except CallMismatchError as exc:
                raise explain(world.calls, plan.rank, plan.op, exc) from None
        outs: list[torch.Tensor] = [None] * plan.layout.n_tensors  # type: ignore[list-item]
        weights, sw = self._weights, self.self_weight
        for (dtype, numel, slots, segs, rows), xs in zip(self._groups, x_segs, strict=True):
            if len(slots) == 1:
                leaf, _, _, shape = slots[0]
                out = torch.empty(shape, dtype=dtype)
                outs[leaf] = out
            else:
                out = torch.empty(numel, dtype=dtype)
                for leaf, offset, n, shape in slots:
                    outs[leaf] = out[offset : offset + n].view(shape)
            out_np = out.numpy().reshape(-1)
            for (start, stop, _), x in zip(segs, xs, strict=True):
                combine_arrays(x, rows[:, start:stop], weights, sw, out_np[start:stop])
        return quick_rebuild(self.structure, iter(outs))


class PreparedCache:
    """Bounded LRU of :class:`PreparedMix` by (structure, leaf shapes/dtypes, topology id, step)."""

    def __init__(self, maxsize: int = 256) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, PreparedMix] = OrderedDict()

    def get(self, key: Hashable) -> PreparedMix | None:
        return self._entries.get(key)

    def put(self, key: Hashable, entry: PreparedMix) -> None:
        self._entries[key] = entry
        if len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def lean_key(structure: Hashable, leaves: Sequence[torch.Tensor], topology: Any, step: int) -> Hashable | None:
    """The cache key of a call, or ``None`` when it must take the regular path."""
    if torch.is_grad_enabled():
        for t in leaves:
            if t.requires_grad:
                return None
    for t in leaves:
        if not t.is_cpu or _is_wrapped(t):
            return None
    period = getattr(topology, "period", None)
    if period is None:
        return None
    return (structure, tuple((t.shape, t.dtype) for t in leaves), id(topology), step % period if period > 1 else 0)
