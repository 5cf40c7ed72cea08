"""Hierarchical ops: ``local_mean`` and ``hierarchical_neighbor_mean``.

Both are pipelines of point-to-point stages through each machine's leader (its local rank 0),
planned by :mod:`bluefog_fn.hierarchy` and executed stage by stage by
:class:`~bluefog_fn.execute.Exchange` over the world transport (no sub-communicators):

* ``local_mean``: ``local_reduce`` (the leader combines ``(1/L) Σ_l x_l``) → ``local_broadcast``;
* ``hierarchical_neighbor_mean``: ``local_reduce`` → ``machine_exchange`` (leaders mix the
  machine means over the machine graph, one message per machine edge) → ``local_broadcast``.

Every local rank returns the leader's buffer, so results are bitwise identical on a machine.
Differentiable: backward runs the reversed pipeline (:meth:`StagedPlan.reversed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..agreement import agree
from ..execute import Exchange
from ..hierarchy import (
    MachineDsts,
    MachineWeights,
    StagedPlan,
    check_layout,
    machine_graph,
    machine_weights,
    trace_staged,
)
from ..plan import CommPlan
from ..topology import DynamicTopology, Topology
from ..tree import Flat, flatten
from ..world import World, current
from .handle import Handle, tracked
from .neighbor import _check_floating, _is_transformed, _RunFunction


class _StagedRun:
    """One staged call on a process world, possibly in flight.

    Started at construction (unless the tensors are wrapped by a ``torch.func`` transform): the
    local reduction is posted and, on a leader with a machine exchange to do, completed and the
    exchange posted, so that the inter-machine traffic overlaps the caller's work until
    ``forward`` (``wait()``) finishes the exchange and broadcasts.
    """

    def __init__(self, world: World, plan: StagedPlan, tensors: Sequence[torch.Tensor], *, defer: bool) -> None:
        self.world = world
        self.plan = plan
        self.stage = 0  # the next stage to complete
        self.current: list[torch.Tensor] = []  # the leader's value after the completed stages
        self.exchange: Exchange | None = None  # the stage in flight
        self.started = False
        if not defer:
            self._start(tensors)

    def _post(self, plan: CommPlan, tensors: Sequence[torch.Tensor]) -> Exchange:
        assert self.world.transport is not None
        return Exchange(self.world.transport, self.world.resources, plan, tensors)

    def _start(self, tensors: Sequence[torch.Tensor]) -> None:
        self.started = True
        self.inputs = list(tensors)
        self.exchange = self._post(self.plan.stages[0], tensors)
        if self.plan.is_leader and len(self.plan.stages) == 3:
            self._complete()
            self.exchange = self._post(self.plan.stages[1], self.current)

    def _complete(self) -> None:
        """Finish the stage in flight on this rank."""
        exchange, self.exchange = self.exchange, None
        assert exchange is not None
        if self.plan.is_leader:
            self.current = exchange.mix()
        else:
            exchange.gathered()  # a follower only sent: nothing to combine
        self.stage += 1

    def done(self) -> bool:
        return self.exchange is None or self.exchange.done()

    def forward(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.started:
            self._start(tensors)
        plan = self.plan
        last = len(plan.stages) - 1
        while self.stage < last:
            if self.exchange is None:  # a follower has nothing to do in the machine exchange
                if plan.is_leader:
                    self.exchange = self._post(plan.stages[self.stage], self.current)
                else:
                    self.stage += 1
                    continue
            self._complete()
        bcast = plan.stages[last]
        if plan.is_leader:
            exchange = self._post(bcast, self.current)
            if bcast.self_weight == 1.0:
                exchange.gathered()  # sends done; the value is already a fresh buffer of ours
                out = self.current
            else:
                out = exchange.mix()
        else:
            # Followers take the leader's value; the tensors only shape the (unused) send side.
            exchange = self._post(bcast, self.inputs)
            (source, weight), = bcast.recvs
            out = exchange.gathered()[source]
            if weight != 1.0:
                out = [t * weight for t in out]
        self.current = []
        self.inputs = []
        return out

    def backward(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """The reversed pipeline on ``grads`` (itself differentiable: double backward works)."""
        full = [
            torch.zeros(shape, dtype=dtype) if g is None else g
            for g, (shape, dtype) in zip(grads, _slots(self.plan.stages[0]), strict=True)
        ]
        back = _StagedRun(self.world, self.plan.reversed(), full, defer=True)
        if torch.is_grad_enabled() or _is_transformed(full):
            return tuple(_RunFunction.apply(back, *full))  # type: ignore[no-untyped-call]
        return tuple(back.forward(full))


def _slots(plan: CommPlan) -> list[tuple[tuple[int, ...], torch.dtype]]:
    slots: list[tuple[tuple[int, ...], torch.dtype] | None] = [None] * plan.layout.n_tensors
    for g in plan.layout.groups:
        for s in g.slots:
            slots[s.leaf] = (s.shape, g.dtype)
    return slots  # type: ignore[return-value]


def _run(world: World, fn: str, flat: Flat, plan: StagedPlan, per_call_graph: bool) -> Handle[Any]:
    for stage in plan.stages:
        agree(world, fn, stage, per_call_graph=per_call_graph and stage.op == "machine_exchange")
    tensors = flat.tensors
    transformed = _is_transformed(tensors)
    differentiable = transformed or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    run = _StagedRun(world, plan, tensors, defer=transformed)

    def finish() -> Any:
        outs = _RunFunction.apply(run, *tensors) if differentiable else run.forward(tensors)  # type: ignore[no-untyped-call]
        return flat.unflatten(list(outs))

    return tracked(world, fn, finish, run.done)


def local_mean_async(tree: Any) -> Handle[Any]:
    """Start :func:`local_mean`; ``.wait()`` returns its result.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.local_mean_async(torch.ones(2)).wait().tolist()
        [1.0, 1.0]
    """
    fn = "local_mean"
    world = current()
    flat = flatten(tree, fn)
    _check_floating(fn, flat)
    check_layout(fn, world)
    if world.simulated:
        from ..sim import staged_sim

        return staged_sim(world, fn, flat)
    plan = trace_staged(world, fn, flat, world.rank)
    return _run(world, fn, flat, plan, per_call_graph=False)


def local_mean(tree: Any) -> Any:
    """Mean of ``tree`` over the ranks of this machine: ``x ← (1/L) Σ_{l < L} x_{m, l}``.

    BlueFog's ``allreduce(..., is_hierarchical_local=True)`` as its own op.  ``L =
    bf.local_size()``; machines are blocks of consecutive ranks (``BLUEFOG_FN_RANKS_PER_MACHINE``
    fakes them on one host; ``bf.simulate(n, local_size=L)`` in the simulator).  The local ranks
    send to their leader (local rank 0), which averages and sends the mean back, so the result
    is bitwise the same on every rank of a machine.  Inputs are not modified; differentiable
    (``I_M ⊗ 11ᵀ/L`` is symmetric).

    Raises:
        ValueError: when machines have different numbers of ranks or hold non-consecutive ranks
            (see :func:`bluefog_fn.is_homogeneous`), on every rank, before any message.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.local_mean({"w": torch.ones(3)})["w"].tolist()
        [1.0, 1.0, 1.0]
    """
    return local_mean_async(tree).wait()


def hierarchical_neighbor_mean_async(
    tree: Any,
    machine_topology: Topology | DynamicTopology | None,
    step: int = 0,
    *,
    self_weight: float | None = None,
    src_machine_weights: MachineWeights | None = None,
    dst_machine_weights: MachineDsts | None = None,
) -> Handle[Any]:
    """Start :func:`hierarchical_neighbor_mean`: the machine means are formed and the leaders'
    exchange is posted before return; ``wait()`` completes it and broadcasts the result.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> h = bf.hierarchical_neighbor_mean_async(torch.ones(2), bf.topology.ring(bf.machine_size()))
        >>> h.wait().tolist()
        [1.0, 1.0]
    """
    fn = "hierarchical_neighbor_mean"
    world = current()
    flat = flatten(tree, fn)
    _check_floating(fn, flat)
    step, graph, topology = machine_graph(fn, world, machine_topology, step, dst_machine_weights is not None)
    per_call = dst_machine_weights is not None
    overrides = self_weight is not None or src_machine_weights is not None or per_call
    if world.simulated:
        from ..sim import staged_sim

        return staged_sim(
            world, fn, flat, graph=graph, topology=topology, step=step, self_weight=self_weight,
            src_machine_weights=src_machine_weights, dst_machine_weights=dst_machine_weights,
        )
    weights = None
    if overrides:
        weights = machine_weights(
            fn, graph, world.machine_rank, world.machine_size, self_weight, src_machine_weights, dst_machine_weights
        )
    plan = trace_staged(
        world, fn, flat, world.rank, exchange=True, graph=graph, topology=topology, step=step,
        weights=weights, per_call_graph=per_call,
    )
    return _run(world, fn, flat, plan, per_call_graph=per_call)


def hierarchical_neighbor_mean(
    tree: Any,
    machine_topology: Topology | DynamicTopology | None,
    step: int = 0,
    *,
    self_weight: float | None = None,
    src_machine_weights: MachineWeights | None = None,
    dst_machine_weights: MachineDsts | None = None,
) -> Any:
    """Mean within each machine, then a neighbour mean of the machine means across machines.

    On every rank of machine m:

        x ← w_mm · x̄_m + Σ_{m' ∈ in(m)} w_mm' · s_m'm · x̄_m',   x̄_m = (1/L) Σ_l x_{m, l}

    with the weights of ``machine_topology.at(step)`` over ``bf.machine_size()`` machines of
    ``L = bf.local_size()`` ranks each (``BLUEFOG_FN_RANKS_PER_MACHINE`` fakes machines on one
    host), i.e. ``(W_M ⊗ I_L)`` applied after ``I_M ⊗ 11ᵀ/L``.  Per-call machine weights follow
    BlueFog's ``hierarchical_neighbor_allreduce`` and the override rules of ``neighbor_mean``,
    one level up: ``self_weight`` replaces ``w_mm``; ``src_machine_weights`` ``{machine: w}``
    (with ``self_weight``) reweights the in-neighbour machines; ``dst_machine_weights``
    (machines, or ``{machine: scale}``, with both others) is the call's own machine graph and
    ``machine_topology`` may then be ``None``.  Every rank of a machine passes the same machine
    weights (the leader's are the ones used).

    How it runs: each machine's ranks send to their leader (local rank 0), which forms the
    machine mean; leaders exchange with the leaders of neighbour machines (one model's worth of
    bytes per machine edge crosses machines; non-leaders send nothing across machines); each
    leader sends the result to its machine's ranks.  ``bf.trace(bf.hierarchical_neighbor_mean,
    tree, machine_topology, step)`` returns the :class:`~bluefog_fn.hierarchy.StagedPlan`.
    Results are bitwise identical on all ranks of a machine.  Inputs are not modified;
    differentiable (backward runs the reversed stages: ``(W_Mᵀ ⊗ I_L)`` after the local mean).

    Raises:
        ValueError: bad weights or step, a ``machine_topology`` whose size is not the number of
            machines, or machines that are not homogeneous blocks of consecutive ranks — on
            every rank, before any message.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.hierarchical_neighbor_mean(torch.ones(2), bf.topology.ring(bf.machine_size())).tolist()
        [1.0, 1.0]
    """
    return hierarchical_neighbor_mean_async(
        tree, machine_topology, step, self_weight=self_weight, src_machine_weights=src_machine_weights,
        dst_machine_weights=dst_machine_weights,
    ).wait()
