"""Global ops: ``global_sum``, ``global_mean``, ``broadcast``, ``allgather``, ``barrier``.

All leaves of a tree travel in one fused buffer per dtype.  float16/bfloat16 are reduced in
float32 (MPI has no half types, and the sum of many halves loses too much).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..agreement import agree
from ..backend.buffers import host_array
from ..backend.transport import Pending
from ..execute import pack, unpack
from ..plan import CommPlan, check_rank_key
from ..tracing import trace_collective
from ..tree import Flat, flatten
from ..world import World, current
from .handle import Handle, plan_args, tracked

if TYPE_CHECKING:
    from ..timeline import Span
from .neighbor import _is_transformed


def _device(flat: Flat) -> torch.device:
    return flat.tensors[0].device if flat.tensors else torch.device("cpu")


def _start_reduce(
    world: World, fn: str, flat: Flat, mean: bool, tensors: Sequence[torch.Tensor], span: Span | None
) -> tuple[CommPlan, list[Pending], list[torch.Tensor]]:
    for i, t in enumerate(flat.tensors):
        if t.dtype == torch.bool or (mean and not (t.dtype.is_floating_point or t.dtype.is_complex)):
            raise TypeError(f"{fn}: tree leaf {flat.path(i)} has dtype {t.dtype}, which {fn} does not support")
    plan = trace_collective(world, fn, flat, world.rank)
    if span is not None:
        span.phase("trace")
    agree(world, fn, plan)
    if span is not None:
        span.phase("agree")
    bufs = pack(plan, tensors, world.resources, upcast_half=True)
    if span is not None:
        span.phase("pack")
    assert world.transport is not None
    pendings = [world.transport.allreduce_sum(host_array(b), fn) for b in bufs]
    if span is not None:
        span.phase("send")
    return plan, pendings, bufs


class _GlobalMeanFunction(torch.autograd.Function):
    """global_mean is multiplication by 11ᵀ/n, which is symmetric: backward is global_mean.

    ``setup_context`` style so that ``torch.func.grad`` composes with it.
    """

    @staticmethod
    def forward(finish: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(finish(tensors))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        return (None, *global_mean(list(grads)))


def _reduce_async(tree: Any, fn: str, mean: bool) -> Handle[Any]:
    world = current()
    flat = flatten(tree, fn)
    if world.simulated:
        from ..sim import global_reduce_sim

        return global_reduce_sim(world, flat, fn, mean)
    transformed = _is_transformed(flat.tensors)
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    # Under a torch.func transform the leaves expose no memory: start when forward unwraps them.
    started = None if transformed else _start_reduce(world, fn, flat, mean, flat.tensors, span)
    device = _device(flat)
    plans: list[CommPlan] = []  # the plan, for the timeline's arguments

    def finish_leaves(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        plan, pendings, bufs = started or _start_reduce(world, fn, flat, mean, tensors, span)
        if span is not None:
            plans.append(plan)
            span.skip()
        for p in pendings:
            p.wait()
        if span is not None:
            span.phase("wait")
        if mean:
            for b in bufs:
                b.div_(world.size)
            if span is not None:
                span.phase("combine")
        leaves = unpack(plan, bufs, device)
        if span is not None:
            span.phase("unpack")
        return leaves

    differentiable = mean and (transformed or (torch.is_grad_enabled() and any(t.requires_grad for t in flat.tensors)))

    def finish() -> Any:
        if differentiable:
            leaves = _GlobalMeanFunction.apply(finish_leaves, *flat.tensors)  # type: ignore[no-untyped-call]
        else:
            leaves = finish_leaves(flat.tensors)
        return flat.unflatten(list(leaves))

    def done() -> bool:
        return started is None or all(p.done() for p in started[1])

    return tracked(world, fn, finish, done, span, lambda: plan_args(plans[0]) if plans else {})


def global_sum_async(tree: Any) -> Handle[Any]:
    """Start :func:`global_sum`."""
    return _reduce_async(tree, "global_sum", mean=False)


def global_sum(tree: Any) -> Any:
    """Sum of ``tree`` over all ranks (allreduce), leaf by leaf; integer leaves allowed.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.global_sum(torch.ones(2)).tolist() == [float(bf.size())] * 2
        True
    """
    return global_sum_async(tree).wait()


def global_mean_async(tree: Any) -> Handle[Any]:
    """Start :func:`global_mean`."""
    return _reduce_async(tree, "global_mean", mean=True)


def global_mean(tree: Any) -> Any:
    """Mean of ``tree`` over all ranks: ``(1/n) Σ_r x_r``, the centralised baseline; differentiable.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.global_mean({"w": torch.ones(2)})["w"].tolist()
        [1.0, 1.0]
    """
    return global_mean_async(tree).wait()


def _check_root(fn: str, root: object, size: int) -> int:
    return check_rank_key(fn, "root", root, size, None)


def broadcast_async(tree: Any, root: int = 0) -> Handle[Any]:
    """Start :func:`broadcast`."""
    fn = "broadcast"
    world = current()
    root = _check_root(fn, root, world.size)
    flat = flatten(tree, fn)
    if world.simulated:
        from ..sim import broadcast_sim

        return broadcast_sim(world, flat, root)
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    plan = trace_collective(world, fn, flat, world.rank, root)
    if span is not None:
        span.phase("trace")
    agree(world, fn, plan)
    if span is not None:
        span.phase("agree")
    res = world.resources
    if world.rank == root:
        bufs = pack(plan, flat.tensors, res)
    else:
        bufs = [res.pool.take(g.dtype, g.numel) for g in plan.layout.groups]
    if span is not None:
        span.phase("pack")
    assert world.transport is not None
    pendings = [world.transport.bcast(host_array(b), root, fn) for b in bufs]
    if span is not None:
        span.phase("send")
    device = _device(flat)

    def finish() -> Any:
        for p in pendings:
            p.wait()
        if span is not None:
            span.phase("wait")
        result = flat.unflatten(unpack(plan, bufs, device))
        if span is not None:
            span.phase("unpack")
        return result

    return tracked(world, fn, finish, lambda: all(p.done() for p in pendings), span, lambda: plan_args(plan))


def broadcast(tree: Any, root: int = 0) -> Any:
    """Root's ``tree`` on every rank (every rank passes a tree of the same structure and shapes).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.broadcast(torch.tensor([1.0, 2.0]), root=0).tolist()
        [1.0, 2.0]
    """
    return broadcast_async(tree, root).wait()


def allgather_async(tree: Any) -> Handle[Any]:
    """Start :func:`allgather`."""
    fn = "allgather"
    world = current()
    flat = flatten(tree, fn)
    for i, t in enumerate(flat.tensors):
        if t.dim() == 0:
            raise ValueError(f"allgather: tree leaf {flat.path(i)} is 0-d; allgather concatenates along dim 0")
    if world.simulated:
        from ..sim import allgather_sim

        return allgather_sim(world, flat)
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    plan = trace_collective(world, fn, flat, world.rank, dim0_free=True)
    if span is not None:
        span.phase("trace")
    agree(world, fn, plan, dim0_free=True)
    if span is not None:
        span.phase("agree")
    assert world.transport is not None
    res = world.resources
    n = world.size
    # Every rank's first dimensions, so each can size and slice the gathered buffers.
    dims = np.array([t.shape[0] for t in flat.tensors], dtype=np.int64)
    gathered_dims = np.empty(n * len(dims), dtype=np.int64)
    world.transport.allgatherv(dims, gathered_dims, [len(dims)] * n, f"{fn} (first dimensions)").wait()
    all_dims = gathered_dims.reshape(n, len(dims))
    if span is not None:
        span.phase("agree")  # every rank's first dimensions: part of agreeing on the shapes
    bufs = pack(plan, flat.tensors, res)
    if span is not None:
        span.phase("pack")
    gathered = []
    pendings = []
    for g, b in zip(plan.layout.groups, bufs, strict=True):
        row = [_row_numel(s.shape) for s in g.slots]
        counts = [int(sum(all_dims[r, s.leaf] * row[k] for k, s in enumerate(g.slots))) for r in range(n)]
        recv = res.pool.take(g.dtype, sum(counts))
        pendings.append(world.transport.allgatherv(host_array(b), host_array(recv), counts, fn))
        gathered.append((g, recv, counts, row))
    if span is not None:
        span.phase("send")
    device = _device(flat)

    def finish() -> Any:
        for p in pendings:
            p.wait()
        if span is not None:
            span.phase("wait")
        outs: list[torch.Tensor | None] = [None] * len(flat.tensors)
        for g, recv, counts, row in gathered:
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            total = [int(all_dims[:, s.leaf].sum()) * row[k] for k, s in enumerate(g.slots)]
            out = res.pool.take(g.dtype, sum(total))
            offset = 0
            for k, s in enumerate(g.slots):
                within = 0
                for r in range(n):
                    # Offset of leaf k inside rank r's contribution.
                    before = int(sum(all_dims[r, g.slots[q].leaf] * row[q] for q in range(k)))
                    piece = int(all_dims[r, s.leaf]) * row[k]
                    src = int(starts[r]) + before
                    out[offset + within : offset + within + piece].copy_(recv[src : src + piece])
                    within += piece
                shape = (int(all_dims[:, s.leaf].sum()), *s.shape[1:])
                view = out[offset : offset + total[k]].view(shape)
                outs[s.leaf] = view if device.type == "cpu" else view.to(device)
                offset += total[k]
        result = flat.unflatten(outs)  # type: ignore[arg-type]
        if span is not None:
            span.phase("unpack")
        return result

    return tracked(world, fn, finish, lambda: all(p.done() for p in pendings), span, lambda: plan_args(plan))


def _row_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def allgather(tree: Any) -> Any:
    """Every rank's ``tree`` concatenated along dim 0 in rank order (first dims may differ).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.allgather(torch.zeros(2, 3)).shape[0] == 2 * bf.size()
        True
    """
    return allgather_async(tree).wait()


def barrier_async() -> Handle[None]:
    """Start :func:`barrier`."""
    world = current()
    if world.simulated or world.transport is None:
        return Handle(lambda: None)
    timeline = world.timeline
    span = None if timeline is None else timeline.begin("barrier")
    pending = world.transport.barrier("barrier")
    if span is not None:
        span.phase("send")

    def finish() -> None:
        pending.wait()
        if span is not None:
            span.phase("wait")

    return tracked(world, "barrier", finish, pending.done, span)


def barrier() -> None:
    """Block until every rank reached the barrier (a no-op in a simulated world).

    Example:
        >>> import bluefog_fn as bf
        >>> bf.barrier()
    """
    barrier_async().wait()
