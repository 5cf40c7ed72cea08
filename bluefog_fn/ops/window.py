"""One-sided windows: ``bf.Window(tree, topology)`` with ``put``, ``accumulate``, ``get``, ``update``.

A window is BlueFog's ``win_create`` / ``win_put`` / ``win_accumulate`` / ``win_get`` /
``win_update`` / ``win_free`` as one object.  On every rank it holds, in one block of one-sided
memory (MPI-3 RMA through the backend's :class:`~bluefog_fn.backend.transport.WindowHandle`):

* the rank's **own value** ``x_i`` (exposed: what neighbours read with :meth:`Window.get`);
* one **slot** per in-neighbour ``j`` (any rank that sends to ``i`` in some graph of the
  topology's period), where ``j``'s ``put``/``accumulate`` land and ``i``'s ``get`` stores.

Every piece has the fused layout of the tree (``plan.build_layout``: one buffer per dtype;
float16/bfloat16 are stored as float32 so that ``accumulate`` can be an atomic MPI sum).

Each method validates its arguments (naming them) before any one-sided operation and is
**synchronous**: when it returns the data is at the target.  ``put``/``accumulate``/``get``
lock the target shared, ``update`` locks the own memory exclusively while it reads and (with
``reset``) zeroes the slots, so a concurrent ``accumulate`` lands entirely before or entirely
after: no mass is lost or counted twice.  Inside ``bf.simulate(n)`` the same methods act on all
agents at once, synchronously and deterministically (leaves carry the agent dimension).

Differences from BlueFog: slots start at **zero** (BlueFog copies the creator's value unless
``zero_init=True``); ``put``/``accumulate`` never modify their input (BlueFog's ``self_weight``
scales the tensor in place); the window is an object, not a name in a global registry; a
dynamic topology is allowed (slots for the union of its graphs; the methods' ``step`` picks
the default neighbours and weights); ``reset`` zeroes only the slots that were combined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..agreement import agree
from ..backend.buffers import host_array
from ..backend.transport import WindowHandle
from ..plan import (
    CommPlan,
    Layout,
    build_layout,
    canonical_dst_weights,
    canonical_self_weight,
    canonical_src_weights,
    digest,
)
from ..tracing import AnyTopology, check_step, graph_at
from ..tree import Flat, flatten
from ..world import World, current
from .neighbor import _check_floating

SrcWeights = Mapping[int, float]
DstWeights = Mapping[int, float] | Sequence[int]

_HALF = (torch.float16, torch.bfloat16)
_ALIGN = 8


def _storage(dtype: torch.dtype) -> torch.dtype:
    """Half types are kept as float32 in the window (MPI has no half-precision sum)."""
    return torch.float32 if dtype in _HALF else dtype


def _describe(flat: Flat) -> tuple[Any, ...]:
    return (flat.spec, tuple((m.path, m.shape, m.dtype) for m in flat.metas))


def _agent_flat(world: World, flat: Flat, fn: str) -> Flat:
    if not world.simulated:
        return flat
    from ..sim import in_vmap, strip_agent_dim

    if in_vmap():
        raise RuntimeError(f"{fn}: windows are not available inside bf.sim.vmap; use stacked trees in bf.simulate")
    return strip_agent_dim(flat, world.size, fn)


class _Neighbours:
    """Who may write into whose slots: the union of the period's graphs, per rank."""

    def __init__(self, topology: AnyTopology) -> None:
        graphs = [topology.at(k) for k in range(topology.period)]
        n = topology.size
        self.ins = tuple(tuple(sorted({j for g in graphs for j in g.in_neighbors(r)})) for r in range(n))
        self.outs = tuple(tuple(sorted({j for g in graphs for j in g.out_neighbors(r)})) for r in range(n))
        self.slot = [{j: k + 1 for k, j in enumerate(ins)} for ins in self.ins]  # region 0 is the own value


class Window:
    """One-sided communication window over ``tree`` (BlueFog's ``win_create``); collective.

    Every rank passes a tree of the same structure, shapes and floating dtypes (``None``
    leaves pass through) and the same topology; a mismatch raises
    :class:`~bluefog_fn.MismatchError` on every rank.  The window starts with the rank's own
    value ``x_i = tree`` and a zeroed slot ``s_ij`` per in-neighbour ``j`` (all graphs of a
    dynamic topology's period).  All methods are synchronous (complete at return).

    * :meth:`put` ``(tree, dst_weights)``: ``s_di ← w_d · tree`` at each destination ``d``;
    * :meth:`accumulate` ``(tree, dst_weights)``: ``s_di ← s_di + w_d · tree`` (atomic);
    * :meth:`get` ``(src_weights)``: ``s_ij ← w_j · x_j`` for each source ``j``;
    * :meth:`update` ``(tree, self_weight, src_weights, reset)``: returns
      ``w_ii · x_i + Σ_j w_ij · s_ij`` and makes it the new own value ``x_i``;
    * :meth:`collect` ``(tree)``: ``update`` with every weight 1 and ``reset=True`` (push-sum);
    * :meth:`free`: collective release; any later use raises.

    Args:
        tree: this rank's initial value (inside ``bf.simulate(n)``: stacked, leading dim n).
        topology: a static or dynamic ``bf.topology`` graph of ``bf.size()`` ranks.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> win = bf.Window({"w": torch.ones(2)}, bf.topology.ring(bf.size()))
        >>> win.accumulate({"w": torch.ones(2)})
        >>> win.update(self_weight=1.0)["w"].tolist() == [1.0 + (bf.size() > 1)] * 2
        True
        >>> win.free()
    """

    def __init__(self, tree: Any, topology: AnyTopology) -> None:
        fn = "Window"
        world = current()
        flat = flatten(tree, fn)
        _check_floating(fn, flat)
        agent = _agent_flat(world, flat, fn)
        graph_at(fn, topology, 0, world.size)  # type and size checks
        self._world = world
        self._topology = topology
        self._nb = _Neighbours(topology)
        self._desc = _describe(agent)
        self._layout: Layout = build_layout(agent.metas)
        self._plan = CommPlan(op="Window", rank=world.rank, size=world.size, layout=self._layout)
        # Byte offset of each dtype group inside one region; regions are [own, slot 1, ...].
        offsets, stride = [], 0
        for g in self._layout.groups:
            offsets.append(stride)
            nbytes = g.numel * torch.empty((), dtype=_storage(g.dtype)).element_size()
            stride += -(-nbytes // _ALIGN) * _ALIGN
        self._offsets = tuple(offsets)
        self._stride = stride
        self._freed = False
        self._template = flat  # rebuilds results of update() called without a tree
        if world.simulated:
            self._sim: _SimWindow | None = _SimWindow(self, flat)
            self._handle: WindowHandle | None = None
            return
        self._sim = None
        me = world.rank
        plan = CommPlan(
            op="Window",
            rank=me,
            size=world.size,
            layout=self._layout,
            recvs=tuple((j, 1.0) for j in self._nb.ins[me]),
            sends=tuple((d, 1.0) for d in self._nb.outs[me]),
            topology=digest(topology.fingerprint),
            signature=digest("Window", self._desc),
        )
        agree(world, fn, plan, per_call_graph=True)
        assert world.transport is not None
        self._handle = world.transport.window_create(self._stride * (1 + len(self._nb.ins[me])))
        own = self._pack(flat.tensors)
        with self._handle.lock_self() as mem:
            for gi, buf in enumerate(own):
                self._view(mem, 0, gi)[:] = buf
        world.transport.barrier().wait()  # nobody touches a window before every rank made it

    # ----------------------------------------------------------------------------- helpers

    def __repr__(self) -> str:
        state = "freed" if self._freed else f"{self._layout.nbytes} bytes per region"
        return f"Window({self._topology!r}, {state})"

    @property
    def topology(self) -> AnyTopology:
        """The topology the window was created with."""
        return self._topology

    def in_neighbors(self, rank: int) -> tuple[int, ...]:
        """The ranks with a slot at ``rank`` (in-neighbours in any graph of the period)."""
        return self._nb.ins[rank]

    def out_neighbors(self, rank: int) -> tuple[int, ...]:
        """The ranks that have a slot for ``rank``."""
        return self._nb.outs[rank]

    def _check_open(self, fn: str) -> World:
        if self._freed:
            raise RuntimeError(f"{fn}: the window was freed")
        world = current()
        if world is not self._world:
            raise RuntimeError(f"{fn}: the window belongs to another world (created in a {self._world.backend} world)")
        return world

    def _flat(self, fn: str, tree: Any) -> Flat:
        flat = flatten(tree, fn)
        agent = _agent_flat(self._world, flat, fn)
        got = _describe(agent)
        if got != self._desc:
            raise ValueError(
                f"{fn}: tree must match the window's tree (structure, leaf shapes and dtypes); "
                f"expected leaves {[(p, s, str(d)) for p, s, d in self._desc[1]]}, got "
                f"{[(p, s, str(d)) for p, s, d in got[1]]}"
                + ("" if got[0] == self._desc[0] else f" (structure {got[0]} vs {self._desc[0]})")
            )
        return flat

    def _pack(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One contiguous CPU buffer per dtype group, in the storage dtype."""
        out = []
        for g in self._layout.groups:
            buf = torch.empty(g.numel, dtype=_storage(g.dtype))
            for s in g.slots:
                buf[s.offset : s.offset + s.numel].copy_(tensors[s.leaf].detach().reshape(-1))
            out.append(buf)
        return out

    def _view(self, mem: np.ndarray, region: int, gi: int) -> np.ndarray:
        g = self._layout.groups[gi]
        dtype = host_array(torch.empty(0, dtype=_storage(g.dtype))).dtype
        start = region * self._stride + self._offsets[gi]
        return mem[start : start + g.numel * dtype.itemsize].view(dtype)

    def _unflatten(self, flat: Flat | None, buffers: Sequence[torch.Tensor], device: torch.device) -> Any:
        from ..execute import unpack

        leaves = unpack(self._plan, buffers, device)
        return (self._template if flat is None else flat).unflatten(leaves)

    # ----------------------------------------------------------------- argument resolution

    def _dst(self, fn: str, dst_weights: Any, step: int, me: int) -> tuple[tuple[int, float], ...]:
        dst = canonical_dst_weights(fn, dst_weights, self._world.size, me)
        if dst is None:
            return tuple((d, 1.0) for d in self._topology.at(step).out_neighbors(me))
        allowed = self._nb.outs[me]
        bad = [d for d, _ in dst if d not in allowed]
        if bad:
            raise ValueError(
                f"{fn}: dst_weights names rank(s) {bad} that have no slot for rank {me} "
                f"(its out-neighbours in the window's topology: {list(allowed)})"
            )
        return dst

    def _src(self, fn: str, src_weights: Any, step: int, me: int) -> tuple[tuple[int, float], ...] | None:
        src = canonical_src_weights(fn, src_weights, self._world.size, me)
        if src is None:
            return None
        allowed = self._nb.ins[me]
        bad = [j for j, _ in src if j not in allowed]
        if bad:
            raise ValueError(
                f"{fn}: src_weights names rank(s) {bad} that have no slot at rank {me} "
                f"(its in-neighbours in the window's topology: {list(allowed)})"
            )
        return src

    def _update_weights(
        self, fn: str, self_weight: Any, src_weights: Any, step: int, me: int
    ) -> tuple[float, tuple[tuple[int, float], ...]]:
        sw = canonical_self_weight(fn, self_weight)
        src = self._src(fn, src_weights, step, me)
        graph = self._topology.at(step)
        if src is None:
            src = tuple(sorted(graph.recv_weights(me).items()))
        elif sw is None:
            raise ValueError(f"{fn}: self_weight is required when src_weights is given (got self_weight=None)")
        return (graph.self_weight(me) if sw is None else sw), src

    # ------------------------------------------------------------------------ the methods

    def put(self, tree: Any, dst_weights: DstWeights | None = None, *, step: int = 0) -> None:
        """Write ``w_d · tree`` into this rank's slot at each destination ``d`` (``win_put``).

        Args:
            tree: a tree matching the window's (structure, shapes, dtypes); not modified.
            dst_weights: ranks, or ``{rank: weight}``; default: the out-neighbours of
                ``topology.at(step)``, weight 1.  Every rank named must have a slot for this
                rank (be an out-neighbour in some graph of the window's topology).
                In the simulator: one value for all agents or a list of n.
            step: picks the default destinations of a dynamic topology.
        """
        self._push("Window.put", tree, dst_weights, step, accumulate=False)

    def accumulate(self, tree: Any, dst_weights: DstWeights | None = None, *, step: int = 0) -> None:
        """Add ``w_d · tree`` into this rank's slot at each destination ``d`` (``win_accumulate``).

        Atomic with respect to concurrent accumulates and to the target's :meth:`update`
        (``MPI_Accumulate`` with ``MPI_SUM`` under a shared lock).  Arguments as :meth:`put`.
        """
        self._push("Window.accumulate", tree, dst_weights, step, accumulate=True)

    def _push(self, fn: str, tree: Any, dst_weights: Any, step: int, *, accumulate: bool) -> None:
        world = self._check_open(fn)
        step = check_step(fn, step)
        flat = self._flat(fn, tree)
        if self._sim is not None:
            self._sim.push(fn, flat, dst_weights, step, accumulate)
            return
        dst = self._dst(fn, dst_weights, step, world.rank)
        bufs = self._pack(flat.tensors)
        assert self._handle is not None
        for d, w in dst:
            region = self._nb.slot[d][world.rank]
            pieces = []
            for gi, buf in enumerate(bufs):
                data = buf if w == 1.0 else buf * w
                pieces.append((region * self._stride + self._offsets[gi], host_array(data)))
            (self._handle.accumulate if accumulate else self._handle.put)(d, pieces)

    def get(self, src_weights: SrcWeights | None = None, *, step: int = 0) -> None:
        """Fetch each source's own value into its slot here, scaled: ``s_ij ← w_j · x_j`` (``win_get``).

        ``x_j`` is the source's own value at the moment of the read: the creation value or the
        result of its latest :meth:`update` (separate phases with :func:`bluefog_fn.barrier`
        when the result must not depend on timing).

        Args:
            src_weights: ``{rank: weight}``; default: the in-neighbours of ``topology.at(step)``,
                weight 1.  Every rank named must have a slot here.  In the simulator: one dict
                for all agents or a list of n.
            step: picks the default sources of a dynamic topology.
        """
        fn = "Window.get"
        world = self._check_open(fn)
        step = check_step(fn, step)
        if self._sim is not None:
            self._sim.get(fn, src_weights, step)
            return
        me = world.rank
        src = self._src(fn, src_weights, step, me)
        if src is None:
            src = tuple((j, 1.0) for j in self._topology.at(step).in_neighbors(me))
        assert self._handle is not None
        for j, w in src:
            fetched = [torch.empty(g.numel, dtype=_storage(g.dtype)) for g in self._layout.groups]
            self._handle.get(j, [(self._offsets[gi], host_array(b)) for gi, b in enumerate(fetched)])
            with self._handle.lock_self() as mem:
                for gi, b in enumerate(fetched):
                    self._view(mem, self._nb.slot[me][j], gi)[:] = host_array(b * w if w != 1.0 else b)

    def update(
        self,
        tree: Any = None,
        *,
        self_weight: float | None = None,
        src_weights: SrcWeights | None = None,
        reset: bool = False,
        step: int = 0,
    ) -> Any:
        """``w_ii · x_i + Σ_j w_ij · s_ij``, which becomes the new own value (``win_update``).

        Reads (and with ``reset`` zeroes) the slots under an exclusive lock of this rank's
        memory, so each concurrent remote operation lands entirely before or entirely after.
        Computed in float64, one rounding to the storage dtype, then to the tree's dtypes.

        Args:
            tree: if given, replaces the own value ``x_i`` first (e.g. after a local step).
            self_weight: ``w_ii``; default: the self weight of ``topology.at(step)``.
            src_weights: ``{rank: w_ij}`` over ranks with a slot here (requires
                ``self_weight``); default: the in-neighbour weights of ``topology.at(step)``.
                In the simulator both may be given per agent (lists of n).
            reset: zero the slots that were combined (the others keep their content).
            step: picks the default weights of a dynamic topology.

        Returns:
            A new tree (the inputs and earlier results are not modified).
        """
        fn = "Window.update"
        world = self._check_open(fn)
        step = check_step(fn, step)
        if not isinstance(reset, bool):
            raise TypeError(f"{fn}: reset must be a bool, got {type(reset).__name__} {reset!r}")
        flat = None if tree is None else self._flat(fn, tree)
        if self._sim is not None:
            return self._sim.update(fn, flat, self_weight, src_weights, reset, step)
        me = world.rank
        sw, src = self._update_weights(fn, self_weight, src_weights, step, me)
        own = None if flat is None else self._pack(flat.tensors)
        assert self._handle is not None
        outs = []
        with self._handle.lock_self() as mem:
            for gi in range(len(self._layout.groups)):
                x = self._view(mem, 0, gi)
                if own is not None:
                    x[:] = host_array(own[gi])
                slots = [torch.from_numpy(self._view(mem, self._nb.slot[me][j], gi)) for j, _ in src]
                out = combine_update(torch.from_numpy(x), slots, [w for _, w in src], sw)
                x[:] = host_array(out)
                if reset:
                    for s in slots:
                        s.zero_()
                outs.append(out)
        device = flat.tensors[0].device if flat is not None and flat.tensors else torch.device("cpu")
        return self._unflatten(flat, outs, device)

    def collect(self, tree: Any = None, *, step: int = 0) -> Any:
        """Push-sum's receive: ``x_i + Σ_j s_ij`` over every slot, zeroing them (atomically).

        ``update(tree, self_weight=1, src_weights={j: 1 for every slot j}, reset=True)``, i.e.
        BlueFog's ``win_update_then_collect``.
        """
        fn = "Window.collect"
        self._check_open(fn)
        if self._sim is not None:
            n = self._world.size
            src_all: Any = [{j: 1.0 for j in self._nb.ins[r]} for r in range(n)]
        else:
            src_all = {j: 1.0 for j in self._nb.ins[self._world.rank]}
        return self.update(tree, self_weight=1.0, src_weights=src_all, reset=True, step=step)

    def uniform_share(self, step: int = 0) -> torch.Tensor:
        """``1 / (out-degree + 1)`` of this rank in ``topology.at(step)``: push-sum's share.

        A float64 0-d tensor (inside ``bf.simulate(n)``: one per agent, shape ``(n,)``).
        """
        fn = "Window.uniform_share"
        world = self._check_open(fn)
        step = check_step(fn, step)
        graph = self._topology.at(step)
        ranks = range(world.size) if world.simulated else [world.rank]
        shares = torch.tensor([1.0 / (len(graph.out_neighbors(r)) + 1) for r in ranks], dtype=torch.float64)
        return shares if world.simulated else shares[0]

    def free(self) -> None:
        """Release the window (collective: every rank calls it); later use raises ``RuntimeError``."""
        fn = "Window.free"
        world = self._check_open(fn)
        self._freed = True
        if self._handle is not None:
            assert world.transport is not None
            world.transport.barrier().wait()  # bounded: every rank is done with the window
            self._handle.free()
            self._handle = None
        self._sim = None


def combine_update(x: torch.Tensor, slots: Sequence[torch.Tensor], weights: Sequence[float], self_weight: float) -> torch.Tensor:
    """``self_weight · x + Σ_k weights[k] · slots[k]`` in float64 (in order), cast back to x's dtype."""
    acc = x.to(torch.float64) * self_weight
    for s, w in zip(slots, weights, strict=True):
        acc += s.to(torch.float64) * w
    return acc.to(x.dtype)


class _SimWindow:
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
                buf[:, s.offset : s.offset + s.numel].copy_(flat.tensors[s.leaf].detach().reshape(n, -1))
            self.own.append(buf)
            self.slots.append(torch.zeros(n, width, g.numel, dtype=_storage(g.dtype)))
        self.device = flat.tensors[0].device if flat.tensors else torch.device("cpu")
        self.template = flat

    def _pack(self, flat: Flat) -> list[torch.Tensor]:
        out = []
        for g in self.w._layout.groups:
            buf = torch.empty(self.n, g.numel, dtype=_storage(g.dtype))
            for s in g.slots:
                buf[:, s.offset : s.offset + s.numel].copy_(flat.tensors[s.leaf].detach().reshape(self.n, -1))
            out.append(buf)
        return out

    def push(self, fn: str, flat: Flat, dst_weights: Any, step: int, accumulate: bool) -> None:
        from ..sim.ops import _dst_weights

        per = _dst_weights(fn, dst_weights, self.n)
        dsts = [self.w._dst(fn, per[i], step, i) for i in range(self.n)]  # validate all first
        bufs = self._pack(flat)
        for i, dst in enumerate(dsts):
            for d, wt in dst:
                row = self.w._nb.slot[d][i] - 1
                for gi, buf in enumerate(bufs):
                    data = buf[i] if wt == 1.0 else buf[i] * wt
                    if accumulate:
                        self.slots[gi][d, row] += data
                    else:
                        self.slots[gi][d, row] = data

    def get(self, fn: str, src_weights: Any, step: int) -> None:
        from ..sim.ops import _src_weights

        per = _src_weights(fn, src_weights, self.n)
        srcs = []
        for i in range(self.n):
            src = self.w._src(fn, per[i], step, i)
            srcs.append(src if src is not None else tuple((j, 1.0) for j in self.w._topology.at(step).in_neighbors(i)))
        snapshot = [o.clone() for o in self.own]  # every agent reads the values before this call
        for i, src in enumerate(srcs):
            for j, wt in src:
                row = self.w._nb.slot[i][j] - 1
                for gi, own in enumerate(snapshot):
                    self.slots[gi][i, row] = own[j] if wt == 1.0 else own[j] * wt

    def update(self, fn: str, flat: Flat | None, self_weight: Any, src_weights: Any, reset: bool, step: int) -> Any:
        from ..sim.ops import _self_weights, _src_weights

        sws = _self_weights(fn, self_weight, self.n)
        srcs = _src_weights(fn, src_weights, self.n)
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
                leaves[s.leaf] = buf[:, s.offset : s.offset + s.numel].reshape(self.n, *s.shape).to(device)
        return template.unflatten(leaves)
