"""The ops of a simulated world: what ``bf.neighbor_mean`` & co. run inside ``bf.simulate(n)``.

The public ops validate and flatten, then call these.  Each one traces the same per-agent
:class:`~bluefog_fn.plan.CommPlan` s an MPI rank would (``tracing.trace_mix`` /
``trace_collective`` for every agent ``r``, cached in the world's plan cache), stacks them into
one executor (cached too, keyed by the plans) and runs it on all agents at once.

Two calling modes:

* **stacked** (plain calls inside ``bf.simulate``): every leaf has a leading agent dimension of
  length n; the result is what each MPI rank returns, stacked;
* **per agent** (inside :func:`bluefog_fn.sim.vmap`): leaves are one agent's tensors, batched by
  ``torch.func.vmap``; the ops see all agents at once through a ``vmap`` rule.

Per-call weights (``self_weight``, ``src_weights``, ``dst_weights``) may be given once for all
agents or per agent, as a list of n entries (``self_weight`` also as a 1-D tensor of n values).
"""

from __future__ import annotations

import numbers
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..backend.buffers import BufferPool
from ..backend.errors import MismatchError
from ..hierarchy import machine_weights, trace_staged
from ..ops.handle import Handle
from ..plan import CommPlan
from ..topology import Topology
from ..tracing import AnyTopology, trace_collective, trace_mix
from ..tree import Flat, flatten
from ..world import World
from .api import Ragged
from .stacked import AllgatherOp, BroadcastOp, MixOp, ReduceOp, StagedOp, apply, in_vmap

SrcWeights = Mapping[int, float]
DstWeights = Mapping[int, float] | Sequence[int]

# Stacked executors kept per world, keyed by the identity of the plans they were built from.
_EXEC_CACHE_SIZE = 256


def strip_agent_dim(flat: Flat, n: int, fn: str = "trace") -> Flat:
    """``flat`` as one agent sees it: every leaf's metadata without the leading agent dimension.

    Raises:
        ValueError: naming the leaf's key path when a leaf is 0-d or its first dimension is not n.

    Example:
        >>> import torch
        >>> from bluefog_fn.tree import flatten
        >>> strip_agent_dim(flatten({"w": torch.zeros(4, 3)}, "ex"), 4).metas[0].shape
        (3,)
    """
    for i, t in enumerate(flat.tensors):
        if t.dim() == 0 or t.shape[0] != n:
            raise ValueError(
                f"{fn}: tree leaf {flat.path(i)} has shape {tuple(t.shape)}, but inside "
                f"bf.simulate({n}) every leaf needs a leading agent dimension of length {n}"
            )
    # Agent 0's rows stand for every agent: a plan reads only shapes, dtypes and devices.
    rows = tuple(t[0] for t in flat.tensors)
    return Flat(flat.unflatten(rows), flat.spec, rows, flat.positions, flat.n_leaves)


def _agent_flat(world: World, flat: Flat, fn: str) -> tuple[Flat, bool]:
    per_agent = in_vmap()
    return (flat if per_agent else strip_agent_dim(flat, world.size, fn)), per_agent


# ---------------------------------------------------------------------------------------------
# Per-agent weight arguments


def _self_weights(fn: str, value: object, n: int) -> list[float | None]:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return [None if value is None else float(value)] * n
    if isinstance(value, torch.Tensor):
        if torch._C._functorch.is_functorch_wrapped_tensor(value):
            raise TypeError(
                f"{fn}: self_weight must be a Python value inside bf.sim.vmap (a list of {n} floats "
                "or a tensor created outside it), got a vmapped tensor"
            )
        if value.dim() == 0:
            return [float(value.item())] * n
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(f"{fn}: self_weight tensor must have shape ({n},), one weight per agent, got {tuple(value.shape)}")
        return [float(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{fn}: self_weight has {len(value)} entries but the simulated world has {n} agents")
        return list(value)
    raise TypeError(f"{fn}: self_weight must be a float, a list of {n} floats or a tensor of {n}, got {type(value).__name__}")


def _src_weights(fn: str, value: object, n: int) -> list[Any]:
    if value is None or isinstance(value, Mapping):
        return [value] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{fn}: src_weights has {len(value)} entries but the simulated world has {n} agents")
        for i, v in enumerate(value):
            if v is not None and not isinstance(v, Mapping):
                raise TypeError(f"{fn}: src_weights[{i}] must be a dict {{rank: weight}} or None, got {type(v).__name__}")
        return list(value)
    raise TypeError(f"{fn}: src_weights must be a dict {{rank: weight}} or a list of {n} of them, got {type(value).__name__}")


def _dst_weights(fn: str, value: object, n: int) -> list[Any]:
    if value is None or isinstance(value, Mapping):
        return [value] * n
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            return [value] * n  # one list of ranks for every agent
        if len(value) != n:
            raise ValueError(f"{fn}: dst_weights has {len(value)} entries but the simulated world has {n} agents")
        for i, v in enumerate(value):
            if v is not None and not isinstance(v, (Mapping, list, tuple)):
                raise TypeError(
                    f"{fn}: dst_weights[{i}] must be a dict {{rank: scale}}, a list of ranks or None, "
                    f"got {type(v).__name__}"
                )
        return list(value)
    raise TypeError(f"{fn}: dst_weights must be a dict, a list of ranks, or a list of {n} of those, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# Plans and executors


def _trace_agents(
    world: World,
    fn: str,
    flat: Flat,
    topology: AnyTopology | None,
    step: int,
    self_weights: list[float | None],
    src_weights: list[Any],
    dst_weights: list[Any],
) -> tuple[CommPlan, ...]:
    plans = []
    for r in range(world.size):
        try:
            plans.append(trace_mix(world, fn, flat, topology, step, r, self_weights[r], src_weights[r], dst_weights[r]))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (simulated agent {r})") from None
    return tuple(plans)


def _check_edges(fn: str, plans: Sequence[CommPlan]) -> None:
    """Every send must be received and every receive sent: the simulator's agreement check."""
    recvs = [{s for s, _ in p.recvs} for p in plans]
    sends = [{d for d, _ in p.sends} for p in plans]
    for i in range(len(plans)):
        for d in sorted(sends[i]):
            if i not in recvs[d]:
                raise MismatchError(
                    f"{fn}: agent {i} sends to agent {d} but agent {d} does not receive from agent {i} "
                    f"(agent {d} receives from {sorted(recvs[d])}); check dst_weights/src_weights"
                )
        for s in sorted(recvs[i]):
            if i not in sends[s]:
                raise MismatchError(
                    f"{fn}: agent {i} receives from agent {s} but agent {s} does not send to agent {i} "
                    f"(agent {s} sends to {sorted(sends[s])}); check dst_weights/src_weights"
                )


class _ExecCache:
    """LRU map from a tuple of plans (by identity; the entry keeps them alive) to a MixOp."""

    def __init__(self, pool: BufferPool) -> None:
        self.pool = pool
        self.entries: OrderedDict[tuple[int, ...], MixOp] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, fn: str, plans: tuple[CommPlan, ...]) -> MixOp:
        key = tuple(id(p) for p in plans)
        op = self.entries.get(key)
        if op is not None and all(a is b for a, b in zip(op.plans, plans, strict=True)):
            self.hits += 1
            self.entries.move_to_end(key)
            return op
        self.misses += 1
        _check_edges(fn, plans)
        op = MixOp.from_plans(fn, plans, self.pool)
        self.entries[key] = op
        if len(self.entries) > _EXEC_CACHE_SIZE:
            self.entries.popitem(last=False)
        return op


def exec_cache(world: World) -> _ExecCache:
    """The world's cache of stacked executors (created on first use)."""
    cache = world.sim_executors
    if cache is None:
        cache = world.sim_executors = _ExecCache(world.resources.pool)
    assert isinstance(cache, _ExecCache)
    return cache


def _done(result: Any) -> Handle[Any]:
    # The simulator computes eagerly; the handle only hands the result over.
    return Handle(lambda: result)


# ---------------------------------------------------------------------------------------------
# The ops


def neighbor_mean_sim(
    world: World,
    flat: Flat,
    topology: AnyTopology | None,
    step: int,
    self_weight: Any,
    src_weights: Any,
    dst_weights: Any,
    *,
    adjoint: bool = False,
) -> Handle[Any]:
    """``neighbor_mean`` for all agents: ``X ← W X`` with W from the agents' plans (``adjoint``: Wᵀ)."""
    fn = "neighbor_mean"
    n = world.size
    aflat, per_agent = _agent_flat(world, flat, fn)
    plans = _trace_agents(
        world, fn, aflat, topology, step,
        _self_weights(fn, self_weight, n), _src_weights(fn, src_weights, n), _dst_weights(fn, dst_weights, n),
    )
    op = exec_cache(world).get(fn, plans)
    if adjoint:
        op = op.adjoint()
    return _done(flat.unflatten(apply(op, flat.tensors, per_agent)))


def neighbor_gather_sim(
    world: World,
    tree: Any,
    topology: AnyTopology | None,
    step: int,
    src_weights: Any,
    dst_weights: Any,
) -> Handle[Any]:
    """``neighbor_gather`` for all agents: a list of n dicts ``{source: source's tree}``.

    Entry ``i`` is exactly what rank ``i`` gets on MPI (its in-neighbours, or the keys of its
    ``src_weights``); the leaves are fresh copies, without gradient (as on MPI). ``tree`` is a
    stacked tree, or a :func:`~bluefog_fn.sim.ragged` list of per-agent trees.
    """
    fn = "neighbor_gather"
    n = world.size
    if in_vmap():
        raise TypeError(
            f"{fn} cannot run inside bf.sim.vmap: its result {{rank: tree}} has different keys on "
            "different agents, which vmap cannot batch; call it on the stacked tree outside "
            "bf.sim.vmap (it returns a list of n dicts) or use neighbor_mean"
        )
    if isinstance(tree, Ragged):
        return _ragged_gather(world, tree, topology, step, src_weights, dst_weights)
    flat = flatten(tree, fn)
    aflat = strip_agent_dim(flat, n, fn)
    srcs = _src_weights(fn, src_weights, n)
    plans = _trace_agents(
        world, fn, aflat, topology, step,
        [1.0 if s is not None else None for s in srcs], srcs, _dst_weights(fn, dst_weights, n),
    )
    exec_cache(world).get(fn, plans)  # checks that sends and receives match
    edges = [(i, j) for i, p in enumerate(plans) for j, _ in p.recvs]
    src_index = torch.tensor([j for _, j in edges], dtype=torch.long)
    with torch.no_grad():
        gathered = [t.index_select(0, src_index.to(t.device)) for t in flat.tensors]
    result: list[dict[int, Any]] = [{} for _ in range(n)]
    for e, (i, j) in enumerate(edges):
        wanted = srcs[i]
        if wanted is None or j in wanted:
            result[i][j] = flat.unflatten([g[e] for g in gathered])
    return _done(result)


def _ragged_gather(
    world: World, tree: Ragged, topology: AnyTopology | None, step: int, src_weights: Any, dst_weights: Any
) -> Handle[Any]:
    """``neighbor_gather`` over per-agent trees whose leaves may differ in dim 0."""
    fn = "neighbor_gather"
    n = world.size
    if len(tree.trees) != n:
        raise ValueError(f"{fn}: bf.sim.ragged holds {len(tree.trees)} trees but the simulated world has {n} agents")
    flats = [flatten(t, fn) for t in tree.trees]
    ref = flats[0]
    for i, f in enumerate(flats[1:], start=1):
        if f.spec != ref.spec:
            raise MismatchError(f"{fn}: agent {i}'s tree has a different structure from agent 0's")
        for k, (a, b) in enumerate(zip(ref.tensors, f.tensors, strict=True)):
            if a.dim() != b.dim() or a.shape[1:] != b.shape[1:] or a.dtype != b.dtype:
                raise MismatchError(
                    f"{fn}: tree leaf {ref.path(k)} is {a.dtype} of shape {tuple(a.shape)} on agent 0 but "
                    f"{b.dtype} of shape {tuple(b.shape)} on agent {i}; only first dimensions may differ"
                )
    srcs = _src_weights(fn, src_weights, n)
    dsts = _dst_weights(fn, dst_weights, n)
    plans = []
    for r in range(n):
        try:
            sw = 1.0 if srcs[r] is not None else None
            plans.append(trace_mix(world, fn, flats[r], topology, step, r, sw, srcs[r], dsts[r], dim0_free=True))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (simulated agent {r})") from None
    _check_edges(fn, plans)
    result: list[dict[int, Any]] = [{} for _ in range(n)]
    with torch.no_grad():
        for i, p in enumerate(plans):
            for j, _ in p.recvs:
                if srcs[i] is None or j in srcs[i]:
                    result[i][j] = flats[j].unflatten([t.detach().clone() for t in flats[j].tensors])
    return _done(result)


def global_reduce_sim(world: World, flat: Flat, fn: str, mean: bool) -> Handle[Any]:
    """``global_sum`` / ``global_mean`` for all agents (every agent's row is the same; the op
    checked the dtypes)."""
    aflat, per_agent = _agent_flat(world, flat, fn)
    for r in range(world.size):
        trace_collective(world, fn, aflat, r)
    op = ReduceOp(fn, world.size, mean, world.resources.pool)
    return _done(flat.unflatten(apply(op, flat.tensors, per_agent)))


def broadcast_sim(world: World, flat: Flat, root: int) -> Handle[Any]:
    """``broadcast`` for all agents: every agent's row becomes agent ``root``'s."""
    fn = "broadcast"
    aflat, per_agent = _agent_flat(world, flat, fn)
    for r in range(world.size):
        trace_collective(world, fn, aflat, r, root)
    return _done(flat.unflatten(apply(BroadcastOp(world.size, root, world.resources.pool), flat.tensors, per_agent)))


def allgather_sim(world: World, flat: Flat) -> Handle[Any]:
    """``allgather`` for all agents: agent rows concatenated along the per-agent dim 0.

    Stacked, every agent has the same per-agent shape ``(d, …)``, so each gets ``(n·d, …)``.
    """
    fn = "allgather"
    aflat, per_agent = _agent_flat(world, flat, fn)
    for i, t in enumerate(aflat.tensors):
        if t.dim() == 0:
            raise ValueError(
                f"{fn}: tree leaf {aflat.path(i)} is 0-d per agent (stacked shape ({world.size},)); "
                "allgather concatenates along the per-agent dim 0"
            )
    for r in range(world.size):
        trace_collective(world, fn, aflat, r, dim0_free=True)
    return _done(flat.unflatten(apply(AllgatherOp(world.size, world.resources.pool), flat.tensors, per_agent)))


def _per_agent_arg(fn: str, arg: str, value: Any, n: int, single: bool) -> list[Any]:
    """One value for all agents, or a list of n (one per agent)."""
    if single:
        return [value] * n
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise ValueError(f"{fn}: {arg} given per agent must be a list of {n} entries, got {value!r:.80}")
    return list(value)


def staged_sim(
    world: World,
    fn: str,
    flat: Flat,
    *,
    graph: Topology | None = None,
    topology: AnyTopology | None = None,
    step: int = 0,
    self_weight: Any = None,
    src_machine_weights: Any = None,
    dst_machine_weights: Any = None,
    adjoint: bool = False,
) -> Handle[Any]:
    """``local_mean`` / ``hierarchical_neighbor_mean`` for all agents: the same staged plans as on
    MPI (one per agent), each stage run as a stacked mix.

    Machine weights may be given once for all agents or as a list of n (one per agent; the
    leaders' entries are the ones used, as on MPI).
    """
    n, local = world.size, world.local_size
    aflat, per_agent = _agent_flat(world, flat, fn)
    exchange = fn == "hierarchical_neighbor_mean"
    per_call = dst_machine_weights is not None
    sws = _per_agent_arg(fn, "self_weight", self_weight, n, self_weight is None or isinstance(self_weight, (int, float)))
    srcs = _per_agent_arg(fn, "src_machine_weights", src_machine_weights, n, src_machine_weights is None or isinstance(src_machine_weights, Mapping))
    dsts = _per_agent_arg(
        fn, "dst_machine_weights", dst_machine_weights, n,
        dst_machine_weights is None or isinstance(dst_machine_weights, Mapping)
        or (isinstance(dst_machine_weights, (list, tuple)) and all(isinstance(d, int) for d in dst_machine_weights)),
    )
    plans = []
    for r in range(n):
        weights = None
        try:
            if exchange and (sws[r] is not None or srcs[r] is not None or dsts[r] is not None):
                weights = machine_weights(fn, graph, r // local, world.machine_size, sws[r], srcs[r], dsts[r])
            plans.append(trace_staged(
                world, fn, aflat, r, exchange=exchange, graph=graph, topology=topology, step=step,
                weights=weights, per_call_graph=per_call,
            ))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (simulated agent {r})") from None
    cache = exec_cache(world)
    stages = [cache.get(fn, tuple(p.stages[k] for p in plans)) for k in range(len(plans[0].stages))]
    op = StagedOp(fn, stages, [r for r in range(n) if r % local], world.resources.pool)
    if adjoint:
        op = op.adjoint()
    return _done(flat.unflatten(apply(op, flat.tensors, per_agent)))
