"""``hierarchical_neighbor_mean``: average inside each machine, then across machines.

Two stages, both plain neighbour mixes on world-level graphs derived from the machine layout
(machines are blocks of ``local_size`` consecutive ranks):

1. *intra-machine*: every rank takes the mean of its machine's ranks (``I_M ⊗ 11ᵀ/L``) — cheap
   shared-memory traffic;
2. *inter-machine*: local rank l of machine m mixes with local rank l of m's in-neighbour machines
   with the machine topology's weights (``W_M ⊗ I_L``), so each rank sends one message per
   neighbour machine and all links between two machines are used in parallel.

The result on every rank of machine m is ``Σ_m' W_M[m, m'] · mean(machine m')``.  Because both
stages are ``neighbor_mean`` calls it is differentiable and runs unchanged in the simulator.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..topology import DynamicTopology, Topology
from ..tracing import check_step
from ..world import current
from .handle import Handle
from .neighbor import neighbor_mean


@lru_cache(maxsize=64)
def _intra_machine(machines: int, local: int) -> Topology:
    """Each machine fully connected, weights 1/L: the machine mean on every rank."""
    edges = [
        (m * local + a, m * local + b, 1.0 / local)
        for m in range(machines)
        for a in range(local)
        for b in range(local)
        if a != b
    ]
    return Topology.from_edges(machines * local, edges, [1.0 / local] * (machines * local))


@lru_cache(maxsize=64)
def _inter_machine(graph: Topology, local: int) -> Topology:
    """``W_M ⊗ I_L``: local rank l talks to local rank l of the neighbour machines."""
    n = graph.size * local
    edges = [(src * local + j, dst * local + j, w) for src, dst, w in graph.edges for j in range(local)]
    self_weights = [graph.self_weight(m) for m in range(graph.size) for _ in range(local)]
    return Topology.from_edges(n, edges, self_weights)


def _layout(fn: str, machine_topology: object) -> tuple[int, int]:
    world = current()
    if not isinstance(machine_topology, (Topology, DynamicTopology)):
        raise TypeError(
            f"{fn}: machine_topology must be a bf.topology Topology or DynamicTopology, got "
            f"{type(machine_topology).__name__}"
        )
    machines, local = world.machine_size, world.local_size
    if machines * local != world.size:
        raise ValueError(
            f"{fn}: machines must all have the same number of ranks; the world has {world.size} "
            f"ranks on {machines} machines with {local} ranks on this one"
        )
    if machine_topology.size != machines:
        raise ValueError(
            f"{fn}: machine_topology has size {machine_topology.size} but the world has {machines} machines"
        )
    return machines, local


def hierarchical_neighbor_mean(tree: Any, machine_topology: Topology | DynamicTopology, step: int = 0) -> Any:
    """Mean within each machine, then a neighbour mean across machines.

    On every rank of machine m:

        x ← Σ_{m'} W_M[m, m'] · (1/L) Σ_{l} x_{m', l}

    where ``W_M`` is ``machine_topology.at(step)`` over ``bf.machine_size()`` machines of
    ``L = bf.local_size()`` ranks each (``BLUEFOG_FN_RANKS_PER_MACHINE`` fakes machines on one
    host).  Inputs are not modified; differentiable.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.hierarchical_neighbor_mean(torch.ones(2), bf.topology.ring(bf.machine_size())).tolist()
        [1.0, 1.0]
    """
    fn = "hierarchical_neighbor_mean"
    machines, local = _layout(fn, machine_topology)
    step = check_step(fn, step)
    graph = machine_topology.at(step)
    inside = tree if local == 1 else neighbor_mean(tree, _intra_machine(machines, local))
    if machines == 1:
        return inside
    return neighbor_mean(inside, _inter_machine(graph, local))


def hierarchical_neighbor_mean_async(
    tree: Any, machine_topology: Topology | DynamicTopology, step: int = 0
) -> Handle[Any]:
    """Start :func:`hierarchical_neighbor_mean` (the intra-machine stage completes before return;
    the inter-machine exchange is in flight until ``wait()``)."""
    from .neighbor import neighbor_mean_async

    fn = "hierarchical_neighbor_mean"
    machines, local = _layout(fn, machine_topology)
    step = check_step(fn, step)
    inside = tree if local == 1 else neighbor_mean(tree, _intra_machine(machines, local))
    if machines == 1:
        return Handle(lambda: inside)
    return neighbor_mean_async(inside, _inter_machine(machine_topology.at(step), local))
