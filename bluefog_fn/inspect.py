"""``bf.trace`` and ``bf.plan_cache_info``: look at plans without running anything."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .hierarchy import StagedPlan, trace_staged_call
from .plan import CommPlan
from .plan_cache import CacheInfo
from .tracing import AnyTopology, check_step, trace_collective, trace_mix
from .tree import flatten
from .world import current

_MIX_OPS = ("neighbor_mean", "neighbor_gather")
_COLLECTIVE_OPS = ("global_mean", "global_sum", "broadcast", "allgather")
_STAGED_OPS = ("local_mean", "hierarchical_neighbor_mean")


def _op_name(op: Callable[..., Any] | str) -> str:
    name = op if isinstance(op, str) else getattr(op, "__name__", repr(op))
    name = name.removesuffix("_async")
    if name not in _MIX_OPS + _COLLECTIVE_OPS + _STAGED_OPS:
        raise ValueError(f"trace: op must be one of {list(_MIX_OPS + _COLLECTIVE_OPS + _STAGED_OPS)}, got {name!r}")
    return name


def trace(
    op: Callable[..., Any] | str,
    tree: Any,
    topology: AnyTopology | None = None,
    step: int = 0,
    *,
    rank: int | None = None,
    **kwargs: Any,
) -> CommPlan | StagedPlan:
    """The :class:`CommPlan` that ``op(tree, topology, step, **kwargs)`` runs on ``rank``.

    For ``local_mean`` and ``hierarchical_neighbor_mean`` (``topology`` is then the machine
    topology) it is a :class:`~bluefog_fn.hierarchy.StagedPlan`: the stages' plans in order.

    Tracing reads only the tree's structure, shapes, dtypes and devices; it sends nothing and
    caches the plan, so the call it describes will hit the cache.  ``rank`` defaults to this
    process's rank (any rank of the world may be asked for, e.g. in a simulated world).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> plan = bf.trace(bf.neighbor_mean, {"w": torch.zeros(4)}, bf.topology.ring(bf.size()))
        >>> plan.layout.nbytes
        16
    """
    name = _op_name(op)
    world = current()
    # A plan describes one agent (a simulated world's leaves carry the agent dimension).
    flat = world.executor.agent_view(world, flatten(tree, "trace"), "trace")
    who = world.rank if rank is None else rank
    if not 0 <= who < world.size:
        raise ValueError(f"trace: rank {who} is out of range for a world of {world.size} ranks")
    if name in _STAGED_OPS:
        return trace_staged_call(world, name, flat, who, topology, step, kwargs)
    if name in _MIX_OPS:
        step = check_step("trace", step)
        allowed = {"self_weight", "src_weights", "dst_weights"}
        unknown = set(kwargs) - allowed
        if unknown:
            raise TypeError(f"trace: {name} takes no argument(s) {sorted(unknown)}")
        if name == "neighbor_gather" and kwargs.get("src_weights") is not None:
            kwargs.setdefault("self_weight", 1.0)
        return trace_mix(world, name, flat, topology, step, who, **kwargs)
    root = kwargs.pop("root", None)
    if kwargs:
        raise TypeError(f"trace: {name} takes no argument(s) {sorted(kwargs)}")
    return trace_collective(world, name, flat, who, root, dim0_free=name == "allgather")


def plan_cache_info() -> CacheInfo:
    """Hits, misses, size and bound of the current world's plan cache.

    Example:
        >>> import bluefog_fn as bf
        >>> info = bf.plan_cache_info()
        >>> info.size <= info.maxsize
        True
    """
    return current().plans.info()


def plan_cache_clear() -> None:
    """Empty the current world's plan cache (plans are re-traced and re-agreed on next use)."""
    world = current()
    world.plans.clear()
    world.agreed.clear()
    world.executor.clear()
