"""The global ops of a process world over its transport: reductions, broadcast, allgather,
barrier, and the rank-list exchange of ``infer_sources`` / ``infer_destinations``.

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
from ..backend.errors import MismatchError
from ..backend.transport import Pending, Transport
from ..execute import pack, unpack
from ..ops.handle import Handle, plan_args, tracked
from ..plan import CommPlan
from ..tracing import trace_collective
from ..tree import Flat
from ..world import World
from .runs import is_transformed

if TYPE_CHECKING:
    from ..timeline import Span


def _device(flat: Flat) -> torch.device:
    return flat.tensors[0].device if flat.tensors else torch.device("cpu")


def _start_reduce(
    world: World, transport: Transport, fn: str, flat: Flat, mean: bool, tensors: Sequence[torch.Tensor], span: Span | None
) -> tuple[CommPlan, list[Pending], list[torch.Tensor]]:
    plan = trace_collective(world, fn, flat, world.rank)
    if span is not None:
        span.phase("trace")
    agree(world, transport, fn, plan)
    if span is not None:
        span.phase("agree")
    bufs = pack(plan, tensors, world.resources, upcast_half=True)
    if span is not None:
        span.phase("pack")
    pendings = [transport.allreduce_sum(host_array(b), fn) for b in bufs]
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
        from ..ops.collective import global_mean  # the op itself: backward may run in any world

        return (None, *global_mean(list(grads)))


def reduce(world: World, transport: Transport, fn: str, flat: Flat, mean: bool) -> Handle[Any]:
    """``global_sum`` / ``global_mean`` of ``flat`` over the transport (an allreduce per dtype)."""
    transformed = is_transformed(flat.tensors)
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    # Under a torch.func transform the leaves expose no memory: start when forward unwraps them.
    started = None if transformed else _start_reduce(world, transport, fn, flat, mean, flat.tensors, span)
    device = _device(flat)
    plans: list[CommPlan] = []  # the plan, for the timeline's arguments

    def finish_leaves(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        plan, pendings, bufs = started or _start_reduce(world, transport, fn, flat, mean, tensors, span)
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


def broadcast(world: World, transport: Transport, flat: Flat, root: int) -> Handle[Any]:
    """Root's fused buffers to every rank."""
    fn = "broadcast"
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    plan = trace_collective(world, fn, flat, world.rank, root)
    if span is not None:
        span.phase("trace")
    agree(world, transport, fn, plan)
    if span is not None:
        span.phase("agree")
    res = world.resources
    if world.rank == root:
        bufs = pack(plan, flat.tensors, res)
    else:
        bufs = [res.pool.take(g.dtype, g.numel) for g in plan.layout.groups]
    if span is not None:
        span.phase("pack")
    pendings = [transport.bcast(host_array(b), root, fn) for b in bufs]
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


def allgather(world: World, transport: Transport, flat: Flat) -> Handle[Any]:
    """Every rank's leaves concatenated along dim 0 (first dimensions may differ)."""
    fn = "allgather"
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    plan = trace_collective(world, fn, flat, world.rank, dim0_free=True)
    if span is not None:
        span.phase("trace")
    agree(world, transport, fn, plan, dim0_free=True)
    if span is not None:
        span.phase("agree")
    res = world.resources
    n = world.size
    # Every rank's first dimensions, so each can size and slice the gathered buffers.
    dims = np.array([t.shape[0] for t in flat.tensors], dtype=np.int64)
    gathered_dims = np.empty(n * len(dims), dtype=np.int64)
    transport.allgatherv(dims, gathered_dims, [len(dims)] * n, f"{fn} (first dimensions)").wait()
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
        pendings.append(transport.allgatherv(host_array(b), host_array(recv), counts, fn))
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


def barrier(world: World, transport: Transport) -> Handle[None]:
    """Every rank reached the barrier."""
    timeline = world.timeline
    span = None if timeline is None else timeline.begin("barrier")
    pending = transport.barrier("barrier")
    if span is not None:
        span.phase("send")

    def finish() -> None:
        pending.wait()
        if span is not None:
            span.phase("wait")

    return tracked(world, "barrier", finish, pending.done, span)


def infer(world: World, transport: Transport, fn: str, arg: str, ranks: Any) -> Any:
    """This rank's list exchanged with every rank's (allgathers), inverted for this rank."""
    from ..ops.infer import OP_CODE, canonical, invert

    n = world.size
    mine = canonical(fn, arg, ranks, world.rank, n)
    if n == 1:
        return ()
    header = np.array([OP_CODE[fn], len(mine)], dtype=np.int64)
    headers = np.empty(2 * n, dtype=np.int64)
    transport.allgatherv(header, headers, [2] * n, fn).wait()
    codes, degrees = headers[0::2], headers[1::2]
    for r in range(n):
        if codes[r] != OP_CODE[fn]:
            other = {code: name for name, code in OP_CODE.items()}.get(int(codes[r]), "another collective")
            raise MismatchError(f"{fn}: rank {world.rank} called {fn} but rank {r} called {other}")
    flat = np.empty(int(degrees.sum()), dtype=np.int64)
    transport.allgatherv(np.array(mine, dtype=np.int64), flat, [int(d) for d in degrees], fn).wait()
    bounds = np.concatenate([[0], np.cumsum(degrees)])
    lists = [tuple(int(v) for v in flat[bounds[r] : bounds[r + 1]]) for r in range(n)]
    return invert(lists)[world.rank]
