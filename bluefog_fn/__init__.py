"""bluefog-fn: decentralized training for PyTorch with a functional front end.

>>> import torch, bluefog_fn as bf
>>> bf.neighbor_mean({"w": torch.ones(2)}, bf.topology.ring(bf.size()))["w"].tolist()
[1.0, 1.0]
"""

from __future__ import annotations

from . import checkpoint, optim, sim, timeline, topology
from .backend.errors import CommError, CommTimeoutError, MismatchError
from .hierarchy import StagedPlan
from .inspect import plan_cache_clear, plan_cache_info, trace
from .ops import (
    Handle,
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
    hierarchical_neighbor_mean,
    hierarchical_neighbor_mean_async,
    local_mean,
    local_mean_async,
    neighbor_gather,
    neighbor_gather_async,
    neighbor_mean,
    neighbor_mean_async,
    shared_tree,
)
from .ops.window import Window
from .optim import allreduce_parameters, broadcast_parameters
from .plan import CommPlan
from .plan_cache import CacheInfo
from .sim import simulate
from .world import (
    init,
    is_homogeneous,
    local_rank,
    local_size,
    machine_rank,
    machine_size,
    rank,
    shutdown,
    size,
)

__version__ = "0.1.0"

__all__ = [
    "CacheInfo",
    "CommError",
    "CommPlan",
    "CommTimeoutError",
    "Handle",
    "MismatchError",
    "StagedPlan",
    "Window",
    "__version__",
    "allgather",
    "allgather_async",
    "allreduce_parameters",
    "barrier",
    "barrier_async",
    "broadcast",
    "broadcast_async",
    "broadcast_parameters",
    "checkpoint",
    "global_mean",
    "global_mean_async",
    "global_sum",
    "global_sum_async",
    "hierarchical_neighbor_mean",
    "hierarchical_neighbor_mean_async",
    "init",
    "is_homogeneous",
    "local_mean",
    "local_mean_async",
    "local_rank",
    "local_size",
    "machine_rank",
    "machine_size",
    "neighbor_gather",
    "neighbor_gather_async",
    "neighbor_mean",
    "neighbor_mean_async",
    "optim",
    "plan_cache_clear",
    "plan_cache_info",
    "rank",
    "shared_tree",
    "shutdown",
    "sim",
    "simulate",
    "size",
    "timeline",
    "topology",
    "trace",
]
