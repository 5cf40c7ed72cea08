"""Communication ops, one module per family."""

from __future__ import annotations

from .collective import (
    allgather,
    allgather_async,
    barrier,
    barrier_async,
    broadcast,
    broadcast_async,
    global_mean,
    global_mean_async,
    global_sum,
    global_sum_async,
)
from .handle import Handle
from .hierarchical import (
    hierarchical_neighbor_mean,
    hierarchical_neighbor_mean_async,
    local_mean,
    local_mean_async,
)
from .neighbor import neighbor_gather, neighbor_gather_async, neighbor_mean, neighbor_mean_async
from .shared import shared_tree

__all__ = [
    "Handle",
    "allgather",
    "allgather_async",
    "barrier",
    "barrier_async",
    "broadcast",
    "broadcast_async",
    "global_mean",
    "global_mean_async",
    "global_sum",
    "global_sum_async",
    "hierarchical_neighbor_mean",
    "hierarchical_neighbor_mean_async",
    "local_mean",
    "local_mean_async",
    "neighbor_gather",
    "neighbor_gather_async",
    "neighbor_mean",
    "neighbor_mean_async",
    "shared_tree",
]
