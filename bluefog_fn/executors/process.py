"""The executor of a process world: ``"mpi"`` (one rank of a job) or ``"local"`` (a world of one).

Every op traces this rank's plan (cached), agrees on it with the other ranks once per pattern
(:mod:`bluefog_fn.agreement`), and runs it through the world's transport: point-to-point
exchanges for the neighbour and staged ops (:class:`~bluefog_fn.execute.Exchange`), the
transport's collectives for the global ops, one-sided memory for windows.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..agreement import agree
from ..backend.errors import MismatchError
from ..backend.transport import Transport
from ..execute import Exchange, RaggedGather, describe
from ..hierarchy import StagedPlan, machine_weights, trace_staged
from ..ops.handle import Handle, plan_args, tracked
from ..plan import CommPlan, build_layout, make_tag
from ..quick_tree import quick_flatten
from ..shared_exchange import group_offsets
from ..tracing import AnyTopology, trace_mix
from ..tree import Flat, LeafMeta, flatten
from ..world import World
from . import collectives
from .base import MISS, Executor, WindowEngine
from .exchanges import Exchanges
from .prepared import PreparedCache, PreparedMix, lean_key
from .runs import MixRun, RunFunction, StagedRun, is_transformed

if TYPE_CHECKING:
    from ..ops.window import Window
    from ..topology import Topology


class ProcessExecutor(Executor):
    """Runs ops for this process's rank over ``transport`` (MPI, or the world of one's)."""

    def __init__(self, kind: str, transport: Transport, exchanges: Exchanges | None = None) -> None:
        self.kind = kind
        self.transport = transport
        # How a plan's data moves: MPI, and same-host shared memory where it applies.
        self.exchanges = exchanges or Exchanges(transport)
        self.prepared = PreparedCache()  # the lean path's executors (see prepared.py)
        # Leaves of bf.shared_tree trees in shared memory, moved to private memory at close.
        self.shared_leaves: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()

    def __repr__(self) -> str:
        return f"ProcessExecutor({self.kind!r}, rank {self.transport.rank} of {self.transport.size})"

    # ------------------------------------------------------------------ representation

    def agents(self, world: World) -> tuple[int, ...]:
        return (world.rank,)

    def agent_shape(self, world: World) -> tuple[int, ...]:
        return ()

    def agent_view(self, world: World, flat: Flat, fn: str) -> Flat:
        return flat

    def one_agent(self, world: World, tree: Any) -> Any:
        return tree

    # ------------------------------------------------------------------ neighbour ops

    def neighbor_mean_lean(self, world: World, tree: Any, topology: Any, step: Any) -> Any:
        if world.timeline is not None or type(step) is not int or step < 0:
            return MISS
        quick = quick_flatten(tree)
        if quick is None:
            return MISS
        structure, leaves = quick
        key = lean_key(structure, leaves, topology, step)
        if key is None:
            return MISS
        entry = self.prepared.get(key)
        if entry is None or entry.topology is not topology or (world.size > 1 and entry.agreed not in world.agreed):
            return MISS
        world.plans.hits += 1
        return entry.run(world, self.transport, leaves, step)

    def _adjoint_mix(
        self, world: World, flat: Flat, topology: AnyTopology | None, step: int,
        self_weight: Any, src_weights: Any, dst_weights: Any,
    ) -> Handle[Any]:
        """``Wᵀ x``: the call's plan reversed, numbered like the backward of an eager call."""
        fn = "neighbor_mean"
        plan = trace_mix(world, fn, flat, topology, step, world.rank, self_weight, src_weights, dst_weights)
        call = None if world.size == 1 else world.calls.begin(f"{fn} backward", plan.step)
        run = MixRun(world, self.exchanges, plan.reversed(), flat.tensors, defer=False, call=call, step=step, sync=True)
        return Handle(lambda: flat.unflatten(run.forward(flat.tensors)), run.done)

    def _prepare(self, world: World, flat: Flat, plan: CommPlan, topology: Any, step: int) -> None:
        """Build the lean path's executor for this call's pattern (after its regular run)."""
        if not PreparedMix.eligible(plan, flat.tensors) or self.exchanges.uses_shared_memory(plan):
            return
        quick = quick_flatten(flat.tree)
        if quick is None:
            return
        structure, leaves = quick
        key = lean_key(structure, leaves, topology, step)
        if key is not None and self.prepared.get(key) is None:
            self.prepared.put(key, PreparedMix(plan, structure, topology, [tuple(t.shape) for t in leaves]))

    def clear(self) -> None:
        self.prepared.clear()

    def shared_tree(self, world: World, flat: Flat) -> Any:
        channel = self.exchanges.channel
        layout = build_layout(flat.metas)
        *offsets, nbytes = group_offsets(layout)
        shared = False
        if channel is None or not self.exchanges.keeps_tree(nbytes):
            # Private memory, in the same fused layout (so out= can still write into it); the
            # same decision on every rank: sizes agree.
            region = np.empty(max(nbytes, 1), dtype=np.uint8)
        else:
            _, region = channel.allocate_tree(nbytes, "shared_tree")
            shared = True
        # One tensor over the whole region, sliced: every leaf then keeps ``region`` alive (a
        # shared region goes back for reuse when the last leaf is collected).
        memory = torch.from_numpy(region)
        leaves: list[torch.Tensor | None] = [None] * len(flat.tensors)
        for g, offset in zip(layout.groups, offsets, strict=True):
            fused = memory[offset : offset + g.numel * g.dtype.itemsize].view(g.dtype)
            for slot in g.slots:
                leaf = fused[slot.offset : slot.offset + slot.numel].view(slot.shape)
                leaf.copy_(flat.tensors[slot.leaf].detach())
                leaves[slot.leaf] = leaf
                if shared:
                    self.shared_leaves.add(leaf)
        return flat.unflatten(leaves)  # type: ignore[arg-type]  # every slot was filled

    def neighbor_mean(
        self, world: World, flat: Flat, topology: AnyTopology | None, step: int,
        self_weight: Any, src_weights: Any, dst_weights: Any, *, adjoint: bool = False, sync: bool = False,
        out: Sequence[torch.Tensor] | None = None,
    ) -> Handle[Any]:
        fn = "neighbor_mean"
        if adjoint:
            return self._adjoint_mix(world, flat, topology, step, self_weight, src_weights, dst_weights)
        timeline = world.timeline
        span = None if timeline is None else timeline.begin(fn)
        plan = trace_mix(world, fn, flat, topology, step, world.rank, self_weight, src_weights, dst_weights)
        if span is not None:
            span.phase("trace")
        call = agree(world, self.transport, fn, plan, step=step, graph=dst_weights)
        if span is not None:
            span.phase("agree")
        tensors = flat.tensors
        transformed = is_transformed(tensors)
        differentiable = transformed or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        run = MixRun(
            world, self.exchanges, plan, tensors, defer=transformed, call=call, step=step, span=span, sync=sync, into=out,
        )
        if self_weight is None and src_weights is None and dst_weights is None and not differentiable and out is None:
            self._prepare(world, flat, plan, topology, step)

        def finish() -> Any:
            outs = RunFunction.apply(run, *tensors) if differentiable else run.forward(tensors)  # type: ignore[no-untyped-call]
            result = flat.unflatten(list(outs))
            if span is not None:
                span.phase("unpack")
            return result

        return tracked(world, fn, finish, run.done, span, lambda: plan_args(plan))

    def neighbor_gather(
        self, world: World, tree: Any, topology: AnyTopology | None, step: int, src_weights: Any, dst_weights: Any,
    ) -> Handle[Any]:
        fn = "neighbor_gather"
        timeline = world.timeline
        span = None if timeline is None else timeline.begin(fn)
        flat = flatten(tree, fn)
        # Gathering has no self weight; a neutral one keeps the override rules of neighbor_mean.
        self_weight = 1.0 if src_weights is not None else None
        plan = trace_mix(
            world, fn, flat, topology, step, world.rank, self_weight, src_weights, dst_weights, dim0_free=True
        )
        if span is not None:
            span.phase("trace")
        call = agree(world, self.transport, fn, plan, dim0_free=True, step=step, graph=dst_weights)
        dims = _first_dims(flat)
        sources = self._source_dims(world, fn, plan, dims)
        if span is not None:
            span.phase("agree")
        exchange: Exchange | RaggedGather
        if sources is None:  # every source's leaves have this rank's shapes
            exchange = Exchange(
                self.transport, world.resources, plan, flat.tensors, call=call, calls=world.calls,
                what=describe(plan, step), span=span,
            )
        else:
            layouts = [build_layout(_with_first_dims(flat.metas, sources[src])) for src, _ in plan.recvs]
            exchange = RaggedGather(
                self.transport, world.resources, plan, flat.tensors, layouts, call=call, calls=world.calls,
                what=describe(plan, step),
            )

        wanted = None if src_weights is None else set(src_weights)

        def finish() -> dict[int, Any]:
            gathered = exchange.gathered()
            result = {src: flat.unflatten(leaves) for src, leaves in gathered.items() if wanted is None or src in wanted}
            if span is not None:
                span.phase("unpack")
            return result

        return tracked(world, fn, finish, exchange.done, span, lambda: plan_args(plan))

    def _source_dims(self, world: World, fn: str, plan: CommPlan, dims: tuple[int, ...]) -> dict[int, tuple[int, ...]] | None:
        """The first dimensions of every source's leaves, or ``None`` when they are this rank's.

        The first call of a pattern (the plan's dim-0-free signature, graph and step) agrees as
        usual, then allgathers every rank's first dimensions (a per-call graph's pattern has no
        graph in it: it is one pattern per tree).  If all ranks had the same, the pattern is
        *uniform* for those dimensions and later calls cost nothing extra; otherwise it is
        *ragged* and every later call first sends each out-neighbour this rank's first
        dimensions (one tiny message per edge), so they may change from call to call.  Every
        rank keeps the same record, so all ranks take the same branch at every call.
        """
        if world.size == 1:
            return None
        ragged_key = ("neighbor_gather:ragged", plan.signature, plan.topology, plan.step)
        uniform_key = ("neighbor_gather:uniform", plan.signature, plan.topology, plan.step, dims)
        if ragged_key in world.agreed:
            return self._exchange_dims(plan, dims)
        if uniform_key in world.agreed:
            return None
        everyone: list[tuple[int, ...]] = self.transport.allgather_object(dims)
        for leaf, path in enumerate(_plan_paths(plan)):
            zero_d = [r for r, d in enumerate(everyone) if d[leaf] < 0]
            if zero_d and len(zero_d) != len(everyone):
                raise MismatchError(
                    f"{fn}: tree leaf {path} is 0-d on rank(s) {zero_d} but not on the others; only "
                    "first dimensions may differ between ranks"
                )
        if all(d == everyone[0] for d in everyone):
            world.agreed.add(uniform_key)
            return None
        world.agreed.add(ragged_key)
        return {src: everyone[src] for src, _ in plan.recvs}

    def _exchange_dims(self, plan: CommPlan, dims: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
        """Send this rank's first dimensions to its out-neighbours, receive its sources' (blocking)."""
        mine = np.array(dims, dtype=np.int64)
        got = {src: np.empty(len(dims), dtype=np.int64) for src, _ in plan.recvs}
        tag = make_tag(plan.signature, "first dims", plan.topology)
        # Unnumbered: the call's numbered data exchange follows, and numbering this one would mark
        # the call's receives posted before the data receives are.
        self.transport.exchange([(dst, mine) for dst, _ in plan.sends], list(got.items()), tag).wait()
        return {src: tuple(int(v) for v in arr) for src, arr in got.items()}

    # ------------------------------------------------------------------ global ops

    def reduce(self, world: World, fn: str, flat: Flat, mean: bool) -> Handle[Any]:
        return collectives.reduce(world, self.transport, fn, flat, mean)

    def broadcast(self, world: World, flat: Flat, root: int) -> Handle[Any]:
        return collectives.broadcast(world, self.transport, flat, root)

    def allgather(self, world: World, flat: Flat) -> Handle[Any]:
        return collectives.allgather(world, self.transport, flat)

    def barrier(self, world: World) -> Handle[None]:
        return collectives.barrier(world, self.transport)

    def infer(self, world: World, fn: str, arg: str, ranks: Any) -> Any:
        return collectives.infer(world, self.transport, fn, arg, ranks)

    # ------------------------------------------------------------------ staged ops

    def staged(
        self, world: World, fn: str, flat: Flat, *, graph: Topology | None = None,
        topology: AnyTopology | None = None, step: int = 0, self_weight: Any = None,
        src_machine_weights: Any = None, dst_machine_weights: Any = None, adjoint: bool = False,
    ) -> Handle[Any]:
        exchange = fn == "hierarchical_neighbor_mean"
        per_call = dst_machine_weights is not None
        weights = None
        if exchange and (self_weight is not None or src_machine_weights is not None or per_call):
            weights = machine_weights(
                fn, graph, world.machine_rank, world.machine_size, self_weight, src_machine_weights, dst_machine_weights
            )
        plan = trace_staged(
            world, fn, flat, world.rank, exchange=exchange, graph=graph, topology=topology, step=step,
            weights=weights, per_call_graph=per_call,
        )
        if adjoint:
            back = StagedRun(world, self.exchanges, plan.reversed(), flat.tensors, defer=False)
            return Handle(lambda: flat.unflatten(back.forward(flat.tensors)), back.done)
        return self._run_staged(world, fn, flat, plan, per_call)

    def _run_staged(self, world: World, fn: str, flat: Flat, plan: StagedPlan, per_call_graph: bool) -> Handle[Any]:
        for stage in plan.stages:
            agree(world, self.transport, fn, stage, per_call_graph=per_call_graph and stage.op == "machine_exchange")
        tensors = flat.tensors
        transformed = is_transformed(tensors)
        differentiable = transformed or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        run = StagedRun(world, self.exchanges, plan, tensors, defer=transformed)

        def finish() -> Any:
            outs = RunFunction.apply(run, *tensors) if differentiable else run.forward(tensors)  # type: ignore[no-untyped-call]
            return flat.unflatten(list(outs))

        return tracked(world, fn, finish, run.done)

    # ------------------------------------------------------------------ windows

    def open_window(self, world: World, window: Window, flat: Flat) -> WindowEngine:
        from .rma_window import RmaWindow

        return RmaWindow(window, self.transport, flat)

    def close(self) -> None:
        # The shared memory is unmapped with the transport: the shared trees' leaves (not views
        # made of them) get private copies first, so a tree kept past bf.shutdown() stays valid.
        with torch.no_grad():
            for leaf in list(self.shared_leaves):
                leaf.set_(leaf.clone().untyped_storage(), 0, leaf.shape, leaf.stride())
        self.shared_leaves = weakref.WeakSet()
        self.transport.close()  # frees the shared memory too, once every rank has left


def _first_dims(flat: Flat) -> tuple[int, ...]:
    """Each leaf's first dimension (``-1`` for a 0-d leaf)."""
    return tuple(t.shape[0] if t.dim() else -1 for t in flat.tensors)


def _with_first_dims(metas: Sequence[LeafMeta], dims: Sequence[int]) -> list[LeafMeta]:
    return [
        m if d < 0 else LeafMeta(m.path, (d, *m.shape[1:]), m.dtype, m.device)
        for m, d in zip(metas, dims, strict=True)
    ]


def _plan_paths(plan: CommPlan) -> list[str]:
    """Key paths of the plan's tensor leaves, in leaf order."""
    paths = [""] * plan.layout.n_tensors
    for g in plan.layout.groups:
        for s in g.slots:
            paths[s.leaf] = s.path
    return paths
