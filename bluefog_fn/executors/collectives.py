"""The global ops of a process world over its transport: reductions, broadcast, allgather,
barrier, and the rank-list exchange of ``infer_sources`` / ``infer_destinations``.

All leaves of a tree travel in one fused buffer per dtype.  float16/bfloat16 are reduced in
float32 (MPI has no half types, and the sum of many halves loses too much).

Every call starts with its call check (:func:`~bluefog_fn.agreement.check_global`): the inputs
are packed at once (the caller may reuse them after an ``_async`` form returns), the data
collectives are posted once the check passed — when the handle is waited or polled, before the
next collective, or while this rank waits for MPI (see ``Transport.hold``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..agreement import CallCheck, check_global
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


def _then(check: CallCheck | None, post: Callable[[], None]) -> None:
    """Run ``post`` once ``check`` passed (at once in a world of one, which has no check)."""
    if check is None:
        post()
    else:
        check.hold(post)


def _posted(check: CallCheck | None) -> None:
    """Block until the call's data collectives are posted (raising the check's failure)."""
    if check is not None:
        check.posted()


def _polled(check: CallCheck | None, pendings: Sequence[Pending]) -> bool:
    """A handle's ``done``: the check passed, the data is posted, and it completed."""
    return (check is None or check.poll()) and all(p.done() for p in pendings)


def _start_reduce(
    world: World, transport: Transport, fn: str, flat: Flat, mean: bool, tensors: Sequence[torch.Tensor], span: Span | None
) -> tuple[CommPlan, CallCheck | None, list[Pending], list[torch.Tensor]]:
    plan = trace_collective(world, fn, flat, world.rank)
    if span is not None:
        span.phase("trace")
    check = check_global(world, transport, fn, plan)
    if span is not None:
        span.phase("agree")
    bufs = pack(plan, tensors, world.resources, upcast_half=True)
    if span is not None:
        span.phase("pack")
    pendings: list[Pending] = []

    def post() -> None:
        pendings.extend(transport.allreduce_sum(host_array(b), fn) for b in bufs)

    _then(check, post)
    if span is not None:
        span.phase("send")
    return plan, check, pendings, bufs


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
        plan, check, pendings, bufs = started or _start_reduce(world, transport, fn, flat, mean, tensors, span)
        if span is not None:
            plans.append(plan)
            span.skip()
        _posted(check)
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
        return started is None or _polled(started[1], started[2])

    return tracked(world, fn, finish, done, span, lambda: plan_args(plans[0]) if plans else {})


def broadcast(world: World, transport: Transport, flat: Flat, root: int) -> Handle[Any]:
    """Root's fused buffers to every rank."""
    fn = "broadcast"
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    plan = trace_collective(world, fn, flat, world.rank, root)
    if span is not None:
        span.phase("trace")
    check = check_global(world, transport, fn, plan)
    if span is not None:
        span.phase("agree")
    res = world.resources
    if world.rank == root:
        bufs = pack(plan, flat.tensors, res)
    else:
        bufs = [res.pool.take(g.dtype, g.numel) for g in plan.layout.groups]
    if span is not None:
        span.phase("pack")
    pendings: list[Pending] = []

    def post() -> None:
        pendings.extend(transport.bcast(host_array(b), root, fn) for b in bufs)

    _then(check, post)
    if span is not None:
        span.phase("send")
    device = _device(flat)

    def finish() -> Any:
        _posted(check)
        for p in pendings:
            p.wait()
        if span is not None:
            span.phase("wait")
        result = flat.unflatten(unpack(plan, bufs, device))
        if span is not None:
            span.phase("unpack")
        return result

    return tracked(world, fn, finish, lambda: _polled(check, pendings), span, lambda: plan_args(plan))


def allgather(world: World, transport: Transport, flat: Flat) -> Handle[Any]:
    """Every rank's leaves concatenated along dim 0 (first dimensions may differ)."""
    fn = "allgather"
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    plan = trace_collective(world, fn, flat, world.rank, dim0_free=True)
    if span is not None:
        span.phase("trace")
    check = check_global(world, transport, fn, plan, dim0_free=True)
    if span is not None:
        span.phase("agree")
    res = world.resources
    n = world.size
    bufs = pack(plan, flat.tensors, res)
    if span is not None:
        span.phase("pack")
    gathered: list[tuple[Any, torch.Tensor, list[int], list[int]]] = []
    pendings: list[Pending] = []
    dims_of: list[np.ndarray] = []  # every rank's first dimensions, one row per rank

    def post() -> None:
        # Every rank's first dimensions, so each can size and slice the gathered buffers.
        dims = np.array([t.shape[0] for t in flat.tensors], dtype=np.int64)
        gathered_dims = np.empty(n * len(dims), dtype=np.int64)
        transport.allgatherv(dims, gathered_dims, [len(dims)] * n, f"{fn} (first dimensions)").wait()
        all_dims = gathered_dims.reshape(n, len(dims))
        dims_of.append(all_dims)
        for g, b in zip(plan.layout.groups, bufs, strict=True):
            row = [_row_numel(s.shape) for s in g.slots]
            counts = [int(sum(all_dims[r, s.leaf] * row[k] for k, s in enumerate(g.slots))) for r in range(n)]
            recv = res.pool.take(g.dtype, sum(counts))
            pendings.append(transport.allgatherv(host_array(b), host_array(recv), counts, fn))
            gathered.append((g, recv, counts, row))

    _then(check, post)
    if span is not None:
        span.phase("send")
    device = _device(flat)

    def finish() -> Any:
        _posted(check)
        for p in pendings:
            p.wait()
        if span is not None:
            span.phase("wait")
        all_dims = dims_of[0]
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

    return tracked(world, fn, finish, lambda: _polled(check, pendings), span, lambda: plan_args(plan))


def _row_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def barrier(world: World, transport: Transport) -> Handle[None]:
    """Every rank reached the barrier."""
    timeline = world.timeline
    span = None if timeline is None else timeline.begin("barrier")
    # The call check is itself a barrier (a MAX over every rank's header completes only once
    # every rank contributed), so a world of several ranks posts nothing more.
    check = check_global(world, transport, "barrier", None)
    pendings = [transport.barrier("barrier")] if check is None else []
    if span is not None:
        span.phase("send")

    def finish() -> None:
        _posted(check)
        for p in pendings:
            p.wait()
        if span is not None:
            span.phase("wait")

    if check is not None:
        check.hold(lambda: None)
    return tracked(world, "barrier", finish, lambda: _polled(check, pendings), span)


def infer(world: World, transport: Transport, fn: str, arg: str, ranks: Any) -> Any:
    """This rank's list exchanged with every rank's (allgathers), inverted for this rank."""
    from ..ops.infer import OP_CODE, canonical, invert

    n = world.size
    mine = canonical(fn, arg, ranks, world.rank, n)
    if n == 1:
        return ()
    check = check_global(world, transport, fn, None)
    if check is not None:
        check.settle()
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
