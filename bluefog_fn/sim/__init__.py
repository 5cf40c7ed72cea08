"""The simulator: n decentralized agents in one process, numerically identical to MPI.

Write an algorithm once for one agent, run it on n simulated agents here and on n MPI
processes with ``bfrun -np n``::

    import torch, bluefog_fn as bf

    def step(params, batch, t):                      # one agent's code, as for one MPI rank
        grads = torch.func.grad(loss)(params, batch)
        params = {k: v - 0.1 * grads[k] for k, v in params.items()}
        return bf.neighbor_mean(params, bf.topology.one_peer_exponential_two(bf.size()), t)

    with bf.simulate(64):
        params = bf.sim.stack([init(r) for r in range(64)])      # leading agent dim
        batches = bf.sim.shard(dataset)                          # (64, N // 64, ...)
        for t in range(100):
            params = bf.sim.vmap(step, in_dims=(0, 0, None))(params, batches, t)

Representation: inside :func:`simulate` every op takes trees whose tensor leaves carry a leading
agent dimension of length n (row i is agent i's value) and returns what the MPI backend returns
on each rank, stacked:

* ``neighbor_mean``: stacked ``W X`` (bitwise equal to MPI for float32/float64 on CPU);
* ``global_sum`` / ``global_mean`` / ``broadcast``: stacked, every row equal;
* ``allgather``: per agent ``(d, …) → (n·d, …)``, stacked ``(n, n·d, …)``;
* ``neighbor_gather``: a list of n dicts ``{source rank: source's per-agent tree}``, entry i
  being rank i's MPI result (only outside :func:`vmap`); for leaves whose first dimension
  differs between agents pass :func:`ragged` ``(list of n per-agent trees)`` instead;
* per-call weights: one value for all agents, or a list of n (``self_weight`` also a tensor of
  n values); per-call graphs are checked (agent i sends to j iff j receives from i), a mismatch
  raises :class:`~bluefog_fn.MismatchError` naming the agents;
* ``_async`` forms compute eagerly and return a finished handle.

Example:
    >>> import torch, bluefog_fn as bf
    >>> with bf.simulate(2):
    ...     bf.global_mean(torch.tensor([[1.0], [3.0]])).tolist()
    [[2.0], [2.0]]
"""

from __future__ import annotations

from .api import (
    Ragged,
    agent_index,
    agent_seed,
    generators,
    per_agent,
    ragged,
    shard,
    simulate,
    stack,
    unstack,
    vmap,
)
from .ops import (
    allgather_sim,
    broadcast_sim,
    global_reduce_sim,
    neighbor_gather_sim,
    neighbor_mean_sim,
    staged_sim,
    strip_agent_dim,
)
from .stacked import in_vmap

__all__ = [
    "Ragged",
    "agent_index",
    "agent_seed",
    "allgather_sim",
    "broadcast_sim",
    "generators",
    "global_reduce_sim",
    "in_vmap",
    "neighbor_gather_sim",
    "neighbor_mean_sim",
    "per_agent",
    "ragged",
    "shard",
    "simulate",
    "stack",
    "staged_sim",
    "strip_agent_dim",
    "unstack",
    "vmap",
]
