"""One-sided windows: ``bf.Window(tree, topology)`` with ``put``, ``accumulate``, ``get``, ``update``.

A window is BlueFog's ``win_create`` / ``win_put`` / ``win_accumulate`` / ``win_get`` /
``win_update`` / ``win_free`` as one object.  On every rank it holds, in one block of one-sided
memory (MPI-3 RMA through the backend's :class:`~bluefog_fn.backend.transport.WindowHandle`):

* the rank's **own value** ``x_i`` (exposed: what neighbours read with :meth:`Window.get`);
* one **slot** per in-neighbour ``j`` (any rank that sends to ``i`` in some graph of the
  topology's period), where ``j``'s ``put``/``accumulate`` land and ``i``'s ``get`` stores.

Every piece has the fused layout of the tree (``plan.build_layout``: one buffer per dtype;
float16/bfloat16 are stored as float32 so that ``accumulate`` can be an atomic MPI sum).

Each method validates its arguments (naming them) before any one-sided operation.  ``put``,
``accumulate`` and ``get`` are **synchronous** (the data is at the target when they return);
their ``_async`` forms return a :class:`~bluefog_fn.ops.handle.Handle` (``wait()`` /
``done()``, BlueFog's ``win_*_nonblocking`` with ``win_wait`` / ``win_poll``).  ``update``,
``collect``, ``get`` and ``free`` first complete this rank's async operations on the window.
Every access is atomic per element (MPI accumulate-family operations), so an ``accumulate``
concurrent with the target's ``update(reset=True)`` lands entirely before or entirely after
it, element by element: no mass is lost or counted twice.  ``win.mutex(ranks)`` is a
user-level lock (BlueFog's ``win_mutex``) for critical sections spanning several calls.  A
window is a context manager that frees it on exit.  Leaves may be floating point or integer
(with integer leaves every weight must be a whole number, and arithmetic is exact in int64).
Inside ``bf.simulate(n)`` the same methods act on all agents at once, synchronously and
deterministically (leaves carry the agent dimension; async handles are complete at once).

Differences from BlueFog: slots start at **zero** (BlueFog copies the creator's value unless
``zero_init=True``); ``put``/``accumulate`` never modify their input (BlueFog's ``self_weight``
scales the tensor in place); the window is an object, not a name in a global registry; a
dynamic topology is allowed (slots for the union of its graphs; the methods' ``step`` picks
the default neighbours and weights); ``reset`` zeroes only the slots that were combined;
atomicity is per element, not per message (BlueFog's ``require_mutex`` is ``win.mutex``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from ..backend.buffers import host_array
from ..backend.kernels import combine_rows, uses_numba
from ..log import get_logger
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
from .handle import Handle

if TYPE_CHECKING:
    from ..executors.base import WindowEngine

SrcWeights = Mapping[int, float]
DstWeights = Mapping[int, float] | Sequence[int]

_HALF = (torch.float16, torch.bfloat16)
_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_ALIGN = 8

logger = get_logger("window")


class _EverySlot:
    """``src_weights`` of :meth:`Window.collect`: weight 1 on every slot, for every agent."""

    def __repr__(self) -> str:
        return "EVERY_SLOT"


EVERY_SLOT: Any = _EverySlot()


def _storage(dtype: torch.dtype) -> torch.dtype:
    """Half types are kept as float32 in the window (MPI has no half-precision sum)."""
    return torch.float32 if dtype in _HALF else dtype


def _check_dtypes(fn: str, flat: Flat) -> None:
    for i, t in enumerate(flat.tensors):
        if t.dtype not in _FLOATING + _INTEGER:
            raise TypeError(
                f"{fn}: tree leaf {flat.path(i)} has dtype {t.dtype}; a window holds floating-point or "
                "integer leaves"
            )


def _scaled(buf: torch.Tensor, w: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``w · buf`` (into ``out`` when given); integer buffers are scaled by the (whole-number)
    weight exactly."""
    if w == 1.0:
        return buf
    return torch.mul(buf, w if buf.is_floating_point() else int(w), out=out)


@contextlib.contextmanager
def _timed(world: World, name: str) -> Iterator[None]:
    """Record the body as one event on the world's timeline, if it has one."""
    timeline = world.timeline
    if timeline is None:
        yield
        return
    start = timeline.now()
    yield
    timeline.record(name, start, timeline.now())


def _describe(flat: Flat) -> tuple[Any, ...]:
    return (flat.spec, tuple((m.path, m.shape, m.dtype) for m in flat.metas))


class _Neighbours:
    """Who may write into whose slots: the union of the period's graphs, per rank."""

    def __init__(self, topology: AnyTopology) -> None:
        graphs = [topology.at(k) for k in range(topology.period)]
        n = topology.size
        self.ins = tuple(
            tuple(sorted({j for g in graphs for j in g.in_neighbors(r)})) for r in range(n)
        )
        self.outs = tuple(
            tuple(sorted({j for g in graphs for j in g.out_neighbors(r)})) for r in range(n)
        )
        self.slot = [
            {j: k + 1 for k, j in enumerate(ins)} for ins in self.ins
        ]  # region 0 is the own value


class Window:
    """One-sided communication window over ``tree`` (BlueFog's ``win_create``); collective.

    Every rank passes a tree of the same structure, shapes and dtypes (floating point or
    integer; ``None`` leaves pass through) and the same topology; a mismatch raises
    :class:`~bluefog_fn.MismatchError` on every rank.  The window starts with the rank's own
    value ``x_i = tree`` and a zeroed slot ``s_ij`` per in-neighbour ``j`` (all graphs of a
    dynamic topology's period).

    * :meth:`put` ``(tree, dst_weights)``: ``s_di ← w_d · tree`` at each destination ``d``;
    * :meth:`accumulate` ``(tree, dst_weights)``: ``s_di ← s_di + w_d · tree`` (atomic);
    * :meth:`get` ``(src_weights)``: ``s_ij ← w_j · x_j`` for each source ``j``;
    * ``put_async`` / ``accumulate_async`` / ``get_async``: the same, returning a handle;
    * :meth:`update` ``(tree, self_weight, src_weights, reset)``: returns
      ``w_ii · x_i + Σ_j w_ij · s_ij`` and makes it the new own value ``x_i``;
    * :meth:`collect` ``(tree)``: ``update`` with every weight 1 and ``reset=True`` (push-sum);
    * :meth:`mutex` ``(ranks)``: a context manager holding the mutexes of ``ranks``;
    * :meth:`free`: collective release (also on leaving a ``with`` block); later use raises.

    Args:
        tree: this rank's initial value (inside ``bf.simulate(n)``: stacked, leading dim n).
        topology: a static or dynamic ``bf.topology`` graph of ``bf.size()`` ranks.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> with bf.Window({"w": torch.ones(2)}, bf.topology.ring(bf.size())) as win:
        ...     win.accumulate_async({"w": torch.ones(2)}).wait()
        ...     win.update(self_weight=1.0)["w"].tolist() == [1.0 + (bf.size() > 1)] * 2
        True
    """

    def __init__(self, tree: Any, topology: AnyTopology) -> None:
        fn = "Window"
        world = current()
        flat = flatten(tree, fn)
        _check_dtypes(fn, flat)
        agent = world.executor.agent_view(world, flat, fn)
        graph_at(fn, topology, 0, world.size)  # type and size checks
        self._world = world
        self._topology = topology
        self._nb = _Neighbours(topology)
        self._desc = _describe(agent)
        self._layout: Layout = build_layout(agent.metas)
        self._integer = any(g.dtype in _INTEGER for g in self._layout.groups)
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
        self._held: set[tuple[int, int]] = set()  # (agent, rank) of the mutexes held
        self._template = flat  # rebuilds results of update() called without a tree
        self._engine: WindowEngine | None = None
        self._engine = world.executor.open_window(world, self, flat)

    # ----------------------------------------------------------------------------- helpers

    def __repr__(self) -> str:
        state = "freed" if self._freed else f"{self._layout.nbytes} bytes per region"
        return f"Window({self._topology!r}, {state})"

    def __enter__(self) -> Window:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._freed:
            return
        if exc is None:
            self.free()
            return
        # Free on the way out of a failure too; if the peers are not freeing (they did not fail
        # the same way), free fails within the timeout and the original error stays the one raised.
        try:
            self.free()
        except Exception as err:  # any failure of free must not mask the original error
            note = f"Window: freeing the window while handling this error also failed: {err}"
            logger.warning(note)
            if hasattr(exc, "add_note"):
                exc.add_note(note)

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
            raise RuntimeError(
                f"{fn}: the window belongs to another world (created in a {self._world.backend} world)"
            )
        return world

    def _flat(self, fn: str, tree: Any) -> Flat:
        flat = flatten(tree, fn)
        agent = self._world.executor.agent_view(self._world, flat, fn)
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
        out = self._empty()
        for g, buf in zip(self._layout.groups, out, strict=True):
            for s in g.slots:
                buf[s.offset : s.offset + s.numel].copy_(tensors[s.leaf].detach().reshape(-1))
        return out

    def _empty(self) -> list[torch.Tensor]:
        """One uninitialized buffer per dtype group, from the world's pool: a window step
        handles several model-sized buffers, and fresh ones would page-fault on first write."""
        return [self._take(_storage(g.dtype), g.numel) for g in self._layout.groups]

    def _take(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return self._world.resources.pool.take(dtype, numel)

    def _pieces(self, region: int, bufs: Sequence[torch.Tensor]) -> list[tuple[int, np.ndarray]]:
        """``(byte offset, array)`` of each group's buffer in ``region`` of a rank's memory."""
        return [
            (region * self._stride + self._offsets[gi], host_array(b)) for gi, b in enumerate(bufs)
        ]

    def _unflatten(
        self, flat: Flat | None, buffers: Sequence[torch.Tensor], device: torch.device
    ) -> Any:
        from ..execute import unpack

        leaves = unpack(self._plan, buffers, device)
        return (self._template if flat is None else flat).unflatten(leaves)

    # ----------------------------------------------------------------- argument resolution

    def _integral(self, fn: str, arg: str, pairs: Sequence[tuple[Any, float]]) -> None:
        """Integer windows combine exactly in int64, so every weight must be a whole number."""
        if not self._integer:
            return
        bad = [(k, w) for k, w in pairs if not float(w).is_integer()]
        if bad:
            raise ValueError(
                f"{fn}: the window has integer leaves, so {arg} must be whole numbers; got "
                + ", ".join(f"{arg}[{k!r}] = {w!r}" for k, w in bad)
            )

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
        self._integral(fn, "dst_weights", dst)
        return dst

    def _src(
        self, fn: str, src_weights: Any, step: int, me: int
    ) -> tuple[tuple[int, float], ...] | None:
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
        self._integral(fn, "src_weights", src)
        return src

    def _get_src(
        self, fn: str, src_weights: Any, step: int, me: int
    ) -> tuple[tuple[int, float], ...]:
        src = self._src(fn, src_weights, step, me)
        return (
            src
            if src is not None
            else tuple((j, 1.0) for j in self._topology.at(step).in_neighbors(me))
        )

    def _update_weights(
        self, fn: str, self_weight: Any, src_weights: Any, step: int, me: int
    ) -> tuple[float, tuple[tuple[int, float], ...]]:
        sw = canonical_self_weight(fn, self_weight)
        if src_weights is EVERY_SLOT:
            src: tuple[tuple[int, float], ...] | None = tuple((j, 1.0) for j in self._nb.ins[me])
        else:
            src = self._src(fn, src_weights, step, me)
        graph = self._topology.at(step)
        if src is None:
            src = tuple(sorted(graph.recv_weights(me).items()))
            self._integral(fn, "src_weights (the topology's weights)", src)
        elif sw is None:
            raise ValueError(
                f"{fn}: self_weight is required when src_weights is given (got self_weight=None)"
            )
        resolved = graph.self_weight(me) if sw is None else sw
        self._integral(fn, "self_weight", [("self", resolved)])
        return resolved, src

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
        self._push("Window.put", tree, dst_weights, step, accumulate=False).wait()

    def put_async(
        self, tree: Any, dst_weights: DstWeights | None = None, *, step: int = 0
    ) -> Handle[None]:
        """:meth:`put` without waiting (``win_put_nonblocking``); ``wait()`` / ``done()`` on the handle.

        ``tree`` is copied before the call returns, so the caller may change it at once.  The
        data is at every destination once the handle completed (``wait()`` returned or
        ``done()`` is true), at the latest when this rank next calls ``update``, ``collect``,
        ``get`` or ``free`` on the window.

        Example:
            >>> import torch, bluefog_fn as bf
            >>> with bf.Window(torch.zeros(2), bf.topology.ring(bf.size())) as win:
            ...     handle = win.put_async(torch.ones(2))
            ...     handle.wait()
            ...     handle.done()
            True
        """
        return self._push("Window.put_async", tree, dst_weights, step, accumulate=False)

    def accumulate(
        self, tree: Any, dst_weights: DstWeights | None = None, *, step: int = 0
    ) -> None:
        """Add ``w_d · tree`` into this rank's slot at each destination ``d`` (``win_accumulate``).

        Atomic per element with respect to concurrent accumulates and to the target's
        :meth:`update` (``MPI_Accumulate`` with ``MPI_SUM``).  Arguments as :meth:`put`.
        """
        self._push("Window.accumulate", tree, dst_weights, step, accumulate=True).wait()

    def accumulate_async(
        self, tree: Any, dst_weights: DstWeights | None = None, *, step: int = 0
    ) -> Handle[None]:
        """:meth:`accumulate` without waiting (``win_accumulate_nonblocking``); see :meth:`put_async`.

        Mass is never lost: until the handle completes the shares are in flight (counted by
        nobody's own value yet); afterwards they are in the destinations' slots, which the
        destination's next ``collect`` reads and zeroes atomically.
        """
        return self._push("Window.accumulate_async", tree, dst_weights, step, accumulate=True)

    def _push(
        self, fn: str, tree: Any, dst_weights: Any, step: int, *, accumulate: bool
    ) -> Handle[None]:
        self._check_open(fn)
        step = check_step(fn, step)
        flat = self._flat(fn, tree)
        return self._open_engine(fn).push(fn, flat, dst_weights, step, accumulate)

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
        self._get("Window.get", src_weights, step).wait()

    def get_async(self, src_weights: SrcWeights | None = None, *, step: int = 0) -> Handle[None]:
        """:meth:`get` without waiting (``win_get_nonblocking``).

        The values are fetched in the background; the slots here are written when the handle
        is waited (``wait()``, or this rank's next ``update``, ``collect``, ``get`` or ``free``).
        """
        return self._get("Window.get_async", src_weights, step)

    def _get(self, fn: str, src_weights: Any, step: int) -> Handle[None]:
        self._check_open(fn)
        step = check_step(fn, step)
        return self._open_engine(fn).get(fn, src_weights, step)

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

        First completes this rank's async operations on the window.  Reads (and with
        ``reset`` zeroes in the same atomic operation) the slots, so each element of a
        concurrent remote operation lands entirely before or entirely after.  Computed in
        float64 (int64 for integer leaves), one rounding to the storage dtype, then to the
        tree's dtypes.

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
        self._check_open(fn)
        step = check_step(fn, step)
        if not isinstance(reset, bool):
            raise TypeError(f"{fn}: reset must be a bool, got {type(reset).__name__} {reset!r}")
        flat = None if tree is None else self._flat(fn, tree)
        return self._open_engine(fn).update(fn, flat, self_weight, src_weights, reset, step)

    def collect(self, tree: Any = None, *, step: int = 0) -> Any:
        """Push-sum's receive: ``x_i + Σ_j s_ij`` over every slot, zeroing them (atomically).

        ``update(tree, self_weight=1, src_weights={j: 1 for every slot j}, reset=True)``, i.e.
        BlueFog's ``win_update_then_collect``.
        """
        fn = "Window.collect"
        self._check_open(fn)
        step = check_step(fn, step)
        if tree is not None:
            self._flat(fn, tree)  # errors name collect, not the update it delegates to
        return self.update(tree, self_weight=1.0, src_weights=EVERY_SLOT, reset=True, step=step)

    def uniform_share(self, step: int = 0) -> torch.Tensor:
        """``1 / (out-degree + 1)`` of this rank in ``topology.at(step)``: push-sum's share.

        A float64 0-d tensor (inside ``bf.simulate(n)``: one per agent, shape ``(n,)``).
        """
        fn = "Window.uniform_share"
        world = self._check_open(fn)
        step = check_step(fn, step)
        graph = self._topology.at(step)
        ex = world.executor
        shares = torch.tensor(
            [1.0 / (len(graph.out_neighbors(r)) + 1) for r in ex.agents(world)], dtype=torch.float64
        )
        return shares.reshape(ex.agent_shape(world))

    def _mutex_ranks(self, fn: str, ranks: Any) -> list[tuple[int, tuple[int, ...]]]:
        """``(agent, sorted distinct ranks)`` for every agent this process acts for."""
        world = self._world
        agents = world.executor.agents(world)
        if ranks is None:
            return [(a, self._nb.outs[a]) for a in agents]
        items = [ranks] if isinstance(ranks, int) and not isinstance(ranks, bool) else ranks
        if not isinstance(items, (list, tuple)):
            raise TypeError(
                f"Window.mutex: ranks must be a rank, a list of ranks or None, got {type(ranks).__name__}"
            )
        checked = []
        for r in items:
            if isinstance(r, bool) or not isinstance(r, int):
                raise TypeError(f"{fn}: ranks must be int ranks, got {type(r).__name__} {r!r}")
            if not 0 <= r < world.size:
                raise ValueError(f"{fn}: ranks has rank {r} but the world has {world.size} ranks")
            checked.append(r)
        if len(set(checked)) != len(checked):
            raise ValueError(f"{fn}: ranks must not repeat a rank, got {list(items)}")
        return [(a, tuple(sorted(checked))) for a in agents]

    @contextlib.contextmanager
    def mutex(self, ranks: int | Sequence[int] | None = None) -> Iterator[None]:
        """Hold the user-level mutex of each rank in ``ranks`` for the ``with`` body (``win_mutex``).

        Every rank owns one mutex; at most one process holds it at a time, so the bodies of
        ``with win.mutex([r])`` on different ranks never overlap.  Mutexes are taken in rank
        order (so two callers never deadlock) and are not re-entrant: taking one this rank
        already holds raises ``RuntimeError``.  Window operations do not take them: they are
        for critical sections spanning several calls (e.g. a read-modify-write of a slot).
        Waiting longer than the timeout raises :class:`~bluefog_fn.CommTimeoutError` naming
        the rank whose mutex stayed held.  In the simulator (no concurrency) it only checks.

        Args:
            ranks: a rank or a list of ranks (this rank's own included, for its own memory);
                default: this rank's out-neighbours in the window's topology (BlueFog's default).

        Example:
            >>> import torch, bluefog_fn as bf
            >>> with bf.Window(torch.zeros(1), bf.topology.ring(bf.size())) as win:
            ...     with win.mutex([0]):
            ...         win.update().tolist()
            [0.0]
        """
        fn = "Window.mutex"
        world = self._check_open(fn)
        resolved = self._mutex_ranks(fn, ranks)
        wanted = {(a, r) for a, rs in resolved for r in rs}
        again = sorted({r for _, r in wanted & self._held})
        if again:
            raise RuntimeError(
                f"{fn}: this rank already holds the mutex of rank(s) {again}; mutexes are not re-entrant"
            )
        mine = resolved[0][1]
        engine = self._open_engine(fn)
        with _timed(world, "Window.mutex_acquire"):
            engine.mutex_acquire(mine, f"{fn} (ranks {list(mine)})")
        self._held |= wanted
        try:
            yield
        finally:
            self._held -= wanted
            if not self._freed:
                engine.mutex_release(mine, f"{fn} (ranks {list(mine)})")

    def snapshot(self) -> WindowSnapshot:
        """The window's numbers: own value and every slot, in-flight mass included (collective).

        Every rank calls it at the same point.  Each rank first completes its own async
        operations and meets the others at a barrier, so every operation a rank started
        before the call has landed; then it reads its memory; then a second barrier keeps a
        fast rank from writing into a slot whose owner has not read it yet.
        :func:`bluefog_fn.checkpoint.save` calls it for every window in the saved tree.

        Returns:
            A :class:`WindowSnapshot` of plain tensors, for :meth:`restore`.
        """
        fn = "Window.snapshot"
        self._check_open(fn)
        return self._open_engine(fn).snapshot(fn, self._signature())

    def restore(self, snapshot: WindowSnapshot) -> None:
        """Overwrite the own value and every slot with a :meth:`snapshot`'s (collective).

        The window must be over the same tree layout and in-neighbour slots, in a world of the
        same size (and, on MPI, on the rank that took the snapshot).  A barrier at the end keeps
        every rank from writing into a neighbour before that neighbour restored, so no mass is
        overwritten.  :func:`bluefog_fn.checkpoint.load` with ``like=`` calls it.
        """
        fn = "Window.restore"
        world = self._check_open(fn)
        if not isinstance(snapshot, WindowSnapshot):
            raise TypeError(
                f"{fn}: snapshot must be a WindowSnapshot from Window.snapshot(), got {type(snapshot).__name__}"
            )
        if snapshot.size != world.size or snapshot.rank != world.rank:
            raise ValueError(
                f"{fn}: snapshot was taken by rank {snapshot.rank} of a world of {snapshot.size}; "
                f"this is rank {world.rank} of {world.size}"
            )
        if snapshot.signature != self._signature():
            raise ValueError(
                f"{fn}: snapshot is of a window over another tree layout, topology slots or backend "
                f"(signature {snapshot.signature}, this window {self._signature()})"
            )
        self._open_engine(fn).restore(fn, snapshot)

    def _signature(self) -> str:
        """Identifies the memory layout: tree, slots, world kind (equal across processes)."""
        return digest(
            "WindowSnapshot", self._desc, self._nb.ins, bool(self._world.executor.agent_shape(self._world)), self._world.size
        )

    def free(self) -> None:
        """Release the window (collective: every rank calls it); later use raises ``RuntimeError``.

        Completes this rank's async operations first.  If the other ranks do not free it too
        within the timeout (they are out of step), raises
        :class:`~bluefog_fn.CommTimeoutError` naming them and abandons the memory, rather
        than entering MPI's collective release alone.
        """
        fn = "Window.free"
        self._check_open(fn)
        if self._held:
            raise RuntimeError(
                f"{fn}: called while holding the mutex of rank(s) {sorted({r for _, r in self._held})}; "
                "leave the win.mutex block first"
            )
        self._freed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.free(fn)

    def _open_engine(self, fn: str) -> WindowEngine:
        engine = self._engine
        if engine is None:
            raise RuntimeError(f"{fn}: the window was freed")
        return engine


class WindowSnapshot(NamedTuple):
    """The numbers in a :class:`Window` at one moment: what a checkpoint stores instead of it.

    Attributes:
        own: the own value, one flat buffer per dtype group of the window's layout (storage
            dtype: half types as float32); in the simulator ``(n, numel)`` per group.
        slots: per dtype group, the in-neighbour slots ``(k, numel)`` in the order of
            :meth:`Window.in_neighbors` (simulator: ``(n, max in-degree, numel)``).  Slots hold
            mass that was sent but not yet collected.
        rank: the rank that took it (0 in the simulator).
        size: the world size.
        signature: a digest of the tree layout, slot structure and world kind.
    """

    own: tuple[torch.Tensor, ...]
    slots: tuple[torch.Tensor, ...]
    rank: int
    size: int
    signature: str


def _never_freed(nbytes: int) -> None:
    logger.warning(
        "a bf.Window of %d bytes per region was never freed: its MPI memory stays allocated until "
        "exit; call win.free() on every rank when done with it", nbytes,
    )


def combine_update(
    x: torch.Tensor,
    slots: Sequence[torch.Tensor],
    weights: Sequence[float],
    self_weight: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``self_weight · x + Σ_k weights[k] · slots[k]`` in float64 (in order), cast back to x's dtype.

    Integer buffers (whose weights are whole numbers) are combined exactly in int64.  ``out``
    (contiguous, x's shape and dtype) receives the result when given.
    """
    if uses_numba(x.dtype) and x.device.type == "cpu":
        # The compiled kernel evaluates the same left-to-right float64 sum with one rounding
        # (the same bits), in one pass and without float64 temporaries of every buffer: the
        # torch form below cost ~250 ms for one 11 M-float slot, the kernel a few ms.
        if out is None:
            out = torch.empty(x.shape, dtype=x.dtype)
        rows = [s.detach().reshape(-1).contiguous().numpy() for s in slots]
        flat_x = x.detach().reshape(-1).contiguous().numpy()
        combine_rows(flat_x, rows, [float(w) for w in weights], float(self_weight), out.view(-1).numpy())
        return out
    if not x.is_floating_point():
        iacc = x.to(torch.int64) * int(self_weight)
        for s, w in zip(slots, weights, strict=True):
            iacc += s.to(torch.int64) * int(w)
        result = iacc.to(x.dtype)
    else:
        acc = x.to(torch.float64) * self_weight
        for s, w in zip(slots, weights, strict=True):
            acc += s.to(torch.float64) * w
        result = acc.to(x.dtype)
    return result if out is None else out.copy_(result)
