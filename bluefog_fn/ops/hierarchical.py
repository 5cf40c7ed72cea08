"""Hierarchical ops: ``local_mean`` and ``hierarchical_neighbor_mean``.

Both are pipelines of point-to-point stages through each machine's leader (its local rank 0),
planned by :mod:`bluefog_fn.hierarchy` and executed stage by stage by
:class:`~bluefog_fn.execute.Exchange` over the world transport (no sub-communicators;
:mod:`bluefog_fn.executors.runs`):

* ``local_mean``: ``local_reduce`` (the leader combines ``(1/L) Σ_l x_l``) → ``local_broadcast``;
* ``hierarchical_neighbor_mean``: ``local_reduce`` → ``machine_exchange`` (leaders mix the
  machine means over the machine graph, one message per machine edge) → ``local_broadcast``.

Every local rank returns the leader's buffer, so results are bitwise identical on a machine.
Differentiable: backward runs the reversed pipeline (:meth:`StagedPlan.reversed`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..hierarchy import MachineDsts, MachineWeights, check_layout, machine_graph
from ..topology import DynamicTopology, Topology
from ..tree import flatten
from ..world import current
from .compiled import call_mix, ready
from .handle import Handle
from .neighbor import _check_floating


def local_mean_async(tree: Any) -> Handle[Any]:
    """Start :func:`local_mean`; ``.wait()`` returns its result.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.local_mean_async(torch.ones(2)).wait().tolist()
        [1.0, 1.0]
    """
    fn = "local_mean"
    if torch.compiler.is_compiling():
        return ready(call_mix("local_mean", tree, 0))
    world = current()
    flat = flatten(tree, fn)
    _check_floating(fn, flat)
    check_layout(fn, world)
    return world.executor.staged(world, fn, flat)


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
    if torch.compiler.is_compiling():
        return call_mix("local_mean", tree, 0)
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
    if torch.compiler.is_compiling():
        return ready(call_mix(
            fn, tree, step, machine_topology, self_weight=self_weight,
            src_machine_weights=src_machine_weights, dst_machine_weights=dst_machine_weights,
        ))
    world = current()
    flat = flatten(tree, fn)
    _check_floating(fn, flat)
    step, graph, topology = machine_graph(fn, world, machine_topology, step, dst_machine_weights is not None)
    return world.executor.staged(
        world, fn, flat, graph=graph, topology=topology, step=step, self_weight=self_weight,
        src_machine_weights=src_machine_weights, dst_machine_weights=dst_machine_weights,
    )


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
    if torch.compiler.is_compiling():
        return call_mix(
            "hierarchical_neighbor_mean", tree, step, machine_topology, self_weight=self_weight,
            src_machine_weights=src_machine_weights, dst_machine_weights=dst_machine_weights,
        )
    return hierarchical_neighbor_mean_async(
        tree, machine_topology, step, self_weight=self_weight, src_machine_weights=src_machine_weights,
        dst_machine_weights=dst_machine_weights,
    ).wait()
