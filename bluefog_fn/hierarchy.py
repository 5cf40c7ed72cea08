"""Planning on machines: the layout check and the staged plans of the hierarchical ops.

A machine is a block of ``local_size`` consecutive ranks; its *leader* is its local rank 0.
``bf.local_mean`` and ``bf.hierarchical_neighbor_mean`` are pipelines of point-to-point stages,
each one an ordinary :class:`~bluefog_fn.plan.CommPlan` run by the exchange machinery:

1. ``local_reduce`` — every local rank sends its tree to the leader, which combines
   ``(1/L) Σ_l x_l`` (the machine mean, in the leader's fused output buffer);
2. ``machine_exchange`` — leaders only: a neighbour mix of the machine means over the machine
   graph, ``Σ_m' W_M[m, m'] · mean_m'`` (one message per machine pair, leader to leader);
3. ``local_broadcast`` — the leader sends its result to the machine's other ranks.

So one model's worth of bytes per machine edge crosses machines, sent by leaders only, and
each non-leader sends one model (to its leader) and receives one.  The adjoint of the pipeline
(its gradient) is the reversed stages in reverse order: a local sum to the leader, the reversed
machine exchange (``W_Mᵀ``), a broadcast scaled by ``1/L`` — see :meth:`StagedPlan.reversed`.

Nothing here imports MPI; plans read only signatures, never values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from .plan import (
    CommPlan,
    _check_weight,
    build_layout,
    canonical_self_weight,
    digest,
    make_tag,
)
from .topology import DynamicTopology, Topology
from .tracing import _shared_key, check_step, graph_weights
from .tree import Flat
from .world import World

MachineWeights = Mapping[int, float]
MachineDsts = Mapping[int, float] | Sequence[int]

STAGE_OPS = ("local_reduce", "machine_exchange", "local_broadcast")
# A broadcast's adjoint gathers to the leader (a reduction); a reduction's adjoint broadcasts.
_ADJOINT_STAGE = {"local_reduce": "local_broadcast", "local_broadcast": "local_reduce", "machine_exchange": "machine_exchange"}


def homogeneity_problem(layouts: Sequence[tuple[int, int, int]]) -> str | None:
    """Why machines are not homogeneous blocks of consecutive ranks, or ``None`` if they are.

    ``layouts[r]`` is rank r's ``(local_rank, local_size, machine_rank)``.  Homogeneous (BlueFog's
    ``is_homogeneous``) means every machine has the same number of ranks ``L`` and rank r is local
    rank ``r mod L`` of machine ``r // L``, which the hierarchical ops rely on.

    Example:
        >>> homogeneity_problem([(0, 2, 0), (1, 2, 0), (0, 2, 1), (1, 2, 1)]) is None
        True
        >>> homogeneity_problem([(0, 2, 0), (0, 2, 1), (1, 2, 0), (1, 2, 1)])
        'rank 1 is local rank 0 of machine 1, but with 2 ranks per machine it must be local rank 1 of machine 0 (machines must hold consecutive ranks)'
    """
    sizes = sorted({size for _, size, _ in layouts})
    if len(sizes) > 1:
        per = {s: [r for r, (_, size, _) in enumerate(layouts) if size == s] for s in sizes}
        detail = "; ".join(f"{s} on rank(s) {rs[:8]}{'...' if len(rs) > 8 else ''}" for s, rs in per.items())
        return f"machines have different numbers of ranks ({detail}); every machine must run the same number"
    local = sizes[0] if sizes else 1
    for r, (lr, _, mr) in enumerate(layouts):
        if (lr, mr) != (r % local, r // local):
            return (
                f"rank {r} is local rank {lr} of machine {mr}, but with {local} ranks per machine it "
                f"must be local rank {r % local} of machine {r // local} (machines must hold "
                "consecutive ranks)"
            )
    return None


@dataclass(frozen=True)
class StagedPlan:
    """What one hierarchical call does on one rank: point-to-point stages run in order.

    ``stages`` are ``local_reduce``, optionally ``machine_exchange``, then ``local_broadcast``
    (see the module docstring).  The leader combines at every stage; other ranks only send in
    the first, do nothing in the second and take the leader's value in the last.
    """

    op: str
    rank: int
    local_size: int
    stages: tuple[CommPlan, ...]

    @property
    def leader(self) -> int:
        """The world rank of this rank's machine leader (its local rank 0)."""
        return self.rank - self.rank % self.local_size

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sends per call, over all stages."""
        return sum(p.bytes_sent for p in self.stages)

    @property
    def bytes_across_machines(self) -> int:
        """Bytes this rank sends to ranks of other machines per call."""
        machine = self.rank // self.local_size
        return sum(
            p.layout.nbytes for p in self.stages for d, _ in p.sends if d // self.local_size != machine
        )

    def reversed(self) -> StagedPlan:
        """The adjoint pipeline: each stage reversed (edges reversed, weights kept), in reverse
        order.  A broadcast reversed is a sum to the leader; a reduction reversed is a broadcast
        scaled at the leader by the reduction's weights."""
        stages = tuple(replace(p.reversed(), op=_ADJOINT_STAGE[p.op]) for p in reversed(self.stages))
        op = self.op.removesuffix("_backward") if self.op.endswith("_backward") else self.op + "_backward"
        return replace(self, op=op, stages=stages)

    def __str__(self) -> str:
        head = (
            f"StagedPlan {self.op} rank {self.rank} ({'leader' if self.is_leader else f'leader {self.leader}'}"
            f", {self.local_size} ranks per machine): {len(self.stages)} stages, bytes sent "
            f"{self.bytes_sent}, across machines {self.bytes_across_machines}"
        )
        return "\n".join([head, *("  " + line for p in self.stages for line in str(p).splitlines())])


# ---------------------------------------------------------------------------------------------
# Machine-level weights (BlueFog's hierarchical_neighbor_allreduce arguments)


def _check_machine(fn: str, arg: str, key: object, machines: int, me: int) -> int:
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"{fn}: {arg} keys must be int machine ranks, got {type(key).__name__} {key!r}")
    if not 0 <= key < machines:
        raise ValueError(f"{fn}: {arg} has machine {key} but the world has {machines} machines")
    if key == me:
        raise ValueError(f"{fn}: {arg} names machine {key}, this rank's own machine; use self_weight instead")
    return key


def machine_weights(
    fn: str,
    graph: Topology | None,
    machine: int,
    machines: int,
    self_weight: float | None,
    src_machine_weights: MachineWeights | None,
    dst_machine_weights: MachineDsts | None,
) -> tuple[float, tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
    """``(self_weight, recvs, sends)`` of one machine, in machine ranks.

    The rules of ``neighbor_mean``'s overrides, one level up: ``self_weight`` replaces the graph's
    self weight; ``src_machine_weights`` ``{machine: w}`` (with ``self_weight``) reweights the
    in-neighbour machines; ``dst_machine_weights`` (machines, or ``{machine: scale}``, with both
    others) is the call's own machine graph.
    """
    sw = canonical_self_weight(fn, self_weight)
    src = None
    if src_machine_weights is not None:
        if not isinstance(src_machine_weights, Mapping):
            raise TypeError(
                f"{fn}: src_machine_weights must be a dict {{machine: weight}}, got {type(src_machine_weights).__name__}"
            )
        src = tuple(
            sorted(
                (_check_machine(fn, "src_machine_weights", k, machines, machine), _check_weight(fn, "src_machine_weights", k, v))
                for k, v in src_machine_weights.items()
            )
        )
        if sw is None:
            raise ValueError(f"{fn}: self_weight is required when src_machine_weights is given (got self_weight=None)")
    if dst_machine_weights is not None:
        if isinstance(dst_machine_weights, Mapping):
            dst = [
                (_check_machine(fn, "dst_machine_weights", k, machines, machine), _check_weight(fn, "dst_machine_weights", k, v))
                for k, v in dst_machine_weights.items()
            ]
        elif isinstance(dst_machine_weights, (list, tuple)):
            dst = [(_check_machine(fn, "dst_machine_weights", k, machines, machine), 1.0) for k in dst_machine_weights]
            if len({k for k, _ in dst}) != len(dst):
                raise ValueError(f"{fn}: dst_machine_weights must not repeat a machine, got {list(dst_machine_weights)}")
        else:
            raise TypeError(
                f"{fn}: dst_machine_weights must be a list of machines or a dict {{machine: weight}}, got "
                f"{type(dst_machine_weights).__name__}"
            )
        if src is None or sw is None:
            raise ValueError(
                f"{fn}: dst_machine_weights={dict(dst)} needs src_machine_weights and self_weight: a "
                "per-call machine graph must say what each machine receives"
            )
        return sw, src, tuple(sorted(dst))
    if graph is None:
        raise ValueError(f"{fn}: machine_topology is None; pass one or all of self_weight, src_machine_weights, dst_machine_weights")
    return graph_weights(
        fn, graph, machine, sw, src, node_word="machine", src_arg="src_machine_weights", dst_arg="dst_machine_weights"
    )


# ---------------------------------------------------------------------------------------------
# Tracing


def check_layout(fn: str, world: World) -> tuple[int, int]:
    """``(machines, local_size)`` of ``world``; raises (identically on every rank) when machines
    are not homogeneous blocks of consecutive ranks."""
    if world.homogeneity is not None:
        raise ValueError(f"{fn}: needs homogeneous machines of consecutive ranks, but {world.homogeneity}")
    return world.machine_size, world.local_size


def machine_graph(
    fn: str, world: World, machine_topology: object, step: object, per_call_graph: bool
) -> tuple[int, Topology | None, Topology | DynamicTopology | None]:
    """``(step, graph at step, topology)`` of a hierarchical call, validated (``graph`` and
    ``topology`` are ``None`` when ``dst_machine_weights`` defines the graph and no topology is
    given)."""
    machines, _ = check_layout(fn, world)
    value = check_step(fn, step)
    if machine_topology is None and per_call_graph:
        return value, None, None
    if not isinstance(machine_topology, (Topology, DynamicTopology)):
        raise TypeError(
            f"{fn}: machine_topology must be a bf.topology Topology or DynamicTopology, got "
            f"{type(machine_topology).__name__}"
        )
    if machine_topology.size != machines:
        raise ValueError(
            f"{fn}: machine_topology has size {machine_topology.size} but the world has {machines} machines"
        )
    return value, machine_topology.at(value), machine_topology


def trace_staged_call(
    world: World, fn: str, flat: Flat, rank: int, topology: object, step: object, kwargs: dict[str, object]
) -> StagedPlan:
    """What ``bf.trace`` returns for ``local_mean`` / ``hierarchical_neighbor_mean`` on ``rank``."""
    if fn == "local_mean":
        if topology is not None or kwargs:
            raise TypeError("trace: local_mean takes only a tree (no topology, step or weights)")
        check_layout(fn, world)
        return trace_staged(world, fn, flat, rank)
    unknown = set(kwargs) - {"self_weight", "src_machine_weights", "dst_machine_weights"}
    if unknown:
        raise TypeError(f"trace: {fn} takes no argument(s) {sorted(unknown)}")
    sw, src, dst = (kwargs.get(k) for k in ("self_weight", "src_machine_weights", "dst_machine_weights"))
    value, graph, topo = machine_graph(fn, world, topology, step, dst is not None)
    weights = None
    if sw is not None or src is not None or dst is not None:
        weights = machine_weights(fn, graph, rank // world.local_size, world.machine_size, sw, src, dst)  # type: ignore[arg-type]
    return trace_staged(
        world, fn, flat, rank, exchange=True, graph=graph, topology=topo, step=value, weights=weights,
        per_call_graph=dst is not None,
    )


def trace_staged(
    world: World,
    fn: str,
    flat: Flat,
    rank: int,
    *,
    exchange: bool = False,
    graph: Topology | None = None,
    topology: Topology | DynamicTopology | None = None,
    step: int = 0,
    weights: tuple[float, tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]] | None = None,
    per_call_graph: bool = False,
) -> StagedPlan:
    """The (cached) staged plan of ``fn`` on ``rank``.

    ``exchange``: whether there is a ``machine_exchange`` stage (``hierarchical_neighbor_mean``
    on more than one machine); ``graph`` is then the machine graph at ``step`` and ``weights``
    this rank's machine-level ``(self_weight, recvs, sends)`` when any were given per call
    (``per_call_graph`` when ``dst_machine_weights`` defined the graph).
    """
    machines, local = world.machine_size, world.local_size
    exchange = exchange and machines > 1
    fingerprint = graph.fingerprint if exchange and graph is not None and not per_call_graph else None
    key = ("staged", fn, rank, flat.key, exchange, fingerprint, weights)

    def build() -> StagedPlan:
        layout = build_layout(flat.metas)
        sig = digest(fn, _shared_key(flat))
        machine, leader = rank // local, rank - rank % local
        followers = tuple(range(leader + 1, leader + local))

        def stage(op: str, self_weight: float, recvs: Sequence[tuple[int, float]] = (),
                  sends: Sequence[tuple[int, float]] = (), phase: int | None = None) -> CommPlan:
            return CommPlan(
                op=op, rank=rank, size=world.size, layout=layout, self_weight=self_weight,
                recvs=tuple(recvs), sends=tuple(sends), step=phase,
                topology=fingerprint if op == "machine_exchange" else None,
                tag=make_tag(sig, op, fingerprint), signature=sig,
            )

        if rank == leader:
            stages = [
                stage("local_reduce", 1.0 / local, recvs=[(j, 1.0 / local) for j in followers]),
                stage("local_broadcast", 1.0, sends=[(j, 1.0) for j in followers]),
            ]
        else:
            stages = [
                stage("local_reduce", 0.0, sends=[(leader, 1.0)]),
                stage("local_broadcast", 0.0, recvs=[(leader, 1.0)]),
            ]
        if exchange:
            phase = step % topology.period if topology is not None and topology.period > 1 else None
            if rank == leader:
                sw, recvs, sends = weights or machine_weights(fn, graph, machine, machines, None, None, None)
                mix = stage(
                    "machine_exchange", sw, [(m * local, w) for m, w in recvs], [(m * local, s) for m, s in sends], phase
                )
            else:
                mix = stage("machine_exchange", 1.0, phase=phase)
            stages.insert(1, mix)
        return StagedPlan(op=fn, rank=rank, local_size=local, stages=tuple(stages))

    plan: StagedPlan = world.plans.lookup(key, build)
    return plan
