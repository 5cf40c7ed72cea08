"""Neighbour ops: ``neighbor_mean`` (weighted mixing) and ``neighbor_gather``.

Each op reads validate → trace (cached plan) → execute.  In a simulated world the same plans
are executed for all agents at once by :mod:`bluefog_fn.sim`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..agreement import agree
from ..backend.errors import MismatchError
from ..execute import Exchange, RaggedGather, describe
from ..plan import CommPlan, build_layout, make_tag
from ..tracing import AnyTopology, check_step, trace_mix
from ..tree import Flat, LeafMeta, flatten
from ..world import World, current
from .handle import Handle, plan_args, tracked

if TYPE_CHECKING:
    from ..timeline import Span

SrcWeights = Mapping[int, float]
DstWeights = Mapping[int, float] | Sequence[int]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_floating(fn: str, flat: Flat) -> None:
    for i, t in enumerate(flat.tensors):
        if t.dtype not in _FLOATING:
            raise TypeError(f"{fn}: tree leaf {flat.path(i)} has dtype {t.dtype}; mixing needs floating-point leaves")


def _is_transformed(tensors: Sequence[torch.Tensor]) -> bool:
    """True for tensors wrapped by a ``torch.func`` transform (they expose no memory to send)."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class _Run(Protocol):
    """A call in flight that an autograd Function can finish and differentiate."""

    def forward(self, tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]: ...

    def backward(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]: ...


class _RunFunction(torch.autograd.Function):
    """Makes a call differentiable: ``run.forward`` computes it, ``run.backward`` is its adjoint
    (for a mix the exchange along reversed edges, Wᵀ; for a staged call the reversed pipeline).

    Written in the ``setup_context`` style so that ``torch.func.grad`` composes with it: under a
    transform ``forward`` receives the unwrapped tensors, which is when the exchange is posted.
    """

    @staticmethod
    def forward(run: _Run, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(run.forward(tensors))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.run = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        return (None, *ctx.run.backward(grads))


class _MixRun:
    """One mixing call on a process world, possibly in flight.

    The exchange is posted at construction (the async case) unless the tensors are wrapped by a
    ``torch.func`` transform; then it is posted when ``forward`` sees the unwrapped tensors.
    """

    def __init__(
        self, world: World, plan: CommPlan, tensors: Sequence[torch.Tensor], *, defer: bool, call: int | None, step: int | None = None,
        span: Span | None = None,
    ) -> None:
        assert world.transport is not None
        self.world = world
        self.plan = plan
        self.span = span
        self.call = call
        self.step = step  # the caller's, for error messages (a static graph's plan has none)
        self.exchange = None
        if not defer:
            self.exchange = Exchange(world.transport, world.resources, plan, tensors, call=call, calls=world.calls, what=describe(plan, step), span=span)
        elif call is not None:
            world.calls.defer(call)  # its messages may arrive before it posts: not stale

    def done(self) -> bool:
        return self.exchange is None or self.exchange.done()

    def forward(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        exchange = self.exchange
        if exchange is None:
            world = self.world
            assert world.transport is not None
            if self.call is not None:
                world.calls.posted(self.call)
            exchange = Exchange(
                world.transport, world.resources, self.plan, tensors, call=self.call, calls=world.calls,
                what=describe(self.plan, self.step), span=self.span,
            )
        self.exchange = None
        return exchange.mix()

    def backward(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """Wᵀ·grads, itself a differentiable mix (double backward works; under ``torch.func``
        the gradients arrive wrapped and are unwrapped by the inner ``apply``)."""
        full = [
            torch.zeros(shape, dtype=dtype) if g is None else g
            for g, (shape, dtype) in zip(grads, self._slots(), strict=True)
        ]
        # Every rank runs the backward exchanges in the same order: they are calls of their own.
        call = None if self.world.size == 1 else self.world.calls.begin(f"{self.plan.op} backward", self.plan.step)
        timeline = self.world.timeline
        span = None if timeline is None else timeline.begin(f"{self.plan.op}.backward")
        back = _MixRun(self.world, self.plan.reversed(), full, defer=True, call=call, step=self.step, span=span)
        if torch.is_grad_enabled() or _is_transformed(full):
            out = tuple(_RunFunction.apply(back, *full))  # type: ignore[no-untyped-call]
        else:
            out = tuple(back.forward(full))
        if span is not None:
            span.phase("unpack")
            span.end(**plan_args(back.plan))
        return out

    def _slots(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        slots: list[tuple[tuple[int, ...], torch.dtype] | None] = [None] * self.plan.layout.n_tensors
        for g in self.plan.layout.groups:
            for s in g.slots:
                slots[s.leaf] = (s.shape, g.dtype)
        return slots  # type: ignore[return-value]


def neighbor_mean_async(
    tree: Any,
    topology: AnyTopology | None,
    step: int = 0,
    *,
    self_weight: float | None = None,
    src_weights: SrcWeights | None = None,
    dst_weights: DstWeights | None = None,
) -> Handle[Any]:
    """Start :func:`neighbor_mean`; ``.wait()`` on the handle returns its result.

    Communication proceeds while the caller computes (e.g. the next gradient).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> h = bf.neighbor_mean_async({"w": torch.ones(3)}, bf.topology.ring(bf.size()))
        >>> h.wait()["w"].tolist()
        [1.0, 1.0, 1.0]
    """
    fn = "neighbor_mean"
    world = current()
    flat = flatten(tree, fn)
    _check_floating(fn, flat)
    step = check_step(fn, step)
    if world.simulated:
        from ..sim import neighbor_mean_sim

        return neighbor_mean_sim(world, flat, topology, step, self_weight, src_weights, dst_weights)
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    plan = trace_mix(world, fn, flat, topology, step, world.rank, self_weight, src_weights, dst_weights)
    if span is not None:
        span.phase("trace")
    call = agree(world, fn, plan, step=step, graph=dst_weights)
    if span is not None:
        span.phase("agree")
    tensors = flat.tensors
    transformed = _is_transformed(tensors)
    differentiable = transformed or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
    run = _MixRun(world, plan, tensors, defer=transformed, call=call, step=step, span=span)

    def finish() -> Any:
        outs = _RunFunction.apply(run, *tensors) if differentiable else run.forward(tensors)  # type: ignore[no-untyped-call]
        result = flat.unflatten(list(outs))
        if span is not None:
            span.phase("unpack")
        return result

    return tracked(world, fn, finish, run.done, span, lambda: plan_args(plan))


def neighbor_mean(
    tree: Any,
    topology: AnyTopology | None,
    step: int = 0,
    *,
    self_weight: float | None = None,
    src_weights: SrcWeights | None = None,
    dst_weights: DstWeights | None = None,
) -> Any:
    """Weighted average of ``tree`` with the in-neighbours' trees: one row of ``W @ X``.

    On rank i, every tensor leaf becomes

        x_i ← w_ii · x_i + Σ_{j ∈ in(i)} w_ij · s_ji · x_j

    where ``w`` are the weights of ``topology.at(step)`` (receiver side) and ``s_ji`` the
    sender-side scale (1 unless ``dst_weights`` says otherwise).  Per-call overrides follow
    BlueFog: ``self_weight`` replaces w_ii; ``src_weights`` ``{rank: w}`` (with ``self_weight``)
    reweights the in-neighbours; ``dst_weights`` (ranks or ``{rank: scale}``, with
    ``self_weight`` and ``src_weights``) defines the call's own graph, ``topology`` may then be
    ``None``.  All leaves travel fused; inputs are never modified; the output leaves are views
    into one fresh buffer per dtype.  Differentiable: the gradient is ``Wᵀ @ G``.

    Args:
        tree: a pytree of floating tensors (``None`` leaves pass through).
        topology: a static or dynamic ``bf.topology`` graph of ``bf.size()`` ranks.
        step: which graph of a dynamic topology to use (``topology.at(step)``).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> out = bf.neighbor_mean({"w": torch.ones(2, 2)}, bf.topology.exponential_two(bf.size()))
        >>> out["w"].sum().item()
        4.0
    """
    return neighbor_mean_async(
        tree, topology, step, self_weight=self_weight, src_weights=src_weights, dst_weights=dst_weights
    ).wait()


def neighbor_gather_async(
    tree: Any,
    topology: AnyTopology | None,
    step: int = 0,
    *,
    src_weights: SrcWeights | None = None,
    dst_weights: DstWeights | None = None,
) -> Handle[dict[int, Any]]:
    """Start :func:`neighbor_gather`."""
    fn = "neighbor_gather"
    world = current()
    step = check_step(fn, step)
    if world.simulated:
        from ..sim import neighbor_gather_sim

        return neighbor_gather_sim(world, tree, topology, step, src_weights, dst_weights)
    timeline = world.timeline
    span = None if timeline is None else timeline.begin(fn)
    flat = flatten(tree, fn)
    # Gathering has no self weight; a neutral one keeps the override rules of neighbor_mean.
    self_weight = 1.0 if src_weights is not None else None
    plan = trace_mix(
        world, fn, flat, topology, step, world.rank, self_weight, src_weights, dst_weights, dim0_free=True
    )
    if span is not None:
        span.phase("trace")
    call = agree(world, fn, plan, dim0_free=True, step=step, graph=dst_weights)
    dims = _first_dims(flat)
    sources = _source_dims(world, fn, plan, dims)
    if span is not None:
        span.phase("agree")
    assert world.transport is not None
    exchange: Exchange | RaggedGather
    if sources is None:  # every source's leaves have this rank's shapes
        exchange = Exchange(world.transport, world.resources, plan, flat.tensors, call=call, calls=world.calls, what=describe(plan, step), span=span)
    else:
        layouts = [build_layout(_with_first_dims(flat.metas, sources[src])) for src, _ in plan.recvs]
        exchange = RaggedGather(world.transport, world.resources, plan, flat.tensors, layouts, call=call)

    wanted = None if src_weights is None else set(src_weights)

    def finish() -> dict[int, Any]:
        gathered = exchange.gathered()
        result = {src: flat.unflatten(leaves) for src, leaves in gathered.items() if wanted is None or src in wanted}
        if span is not None:
            span.phase("unpack")
        return result

    return tracked(world, fn, finish, exchange.done, span, lambda: plan_args(plan))


def _first_dims(flat: Flat) -> tuple[int, ...]:
    """Each leaf's first dimension (``-1`` for a 0-d leaf)."""
    return tuple(t.shape[0] if t.dim() else -1 for t in flat.tensors)


def _with_first_dims(metas: Sequence[LeafMeta], dims: Sequence[int]) -> list[LeafMeta]:
    return [
        m if d < 0 else LeafMeta(m.path, (d, *m.shape[1:]), m.dtype, m.device)
        for m, d in zip(metas, dims, strict=True)
    ]


def _source_dims(world: World, fn: str, plan: CommPlan, dims: tuple[int, ...]) -> dict[int, tuple[int, ...]] | None:
    """The first dimensions of every source's leaves, or ``None`` when they are this rank's.

    The first call of a pattern (the plan's dim-0-free signature, graph and step) agrees as
    usual (the caller's :func:`agree`), then allgathers every rank's first dimensions (a per-call
    graph's pattern has no graph in it: it is one pattern per tree). If all ranks had the same, the pattern
    is *uniform* for those dimensions and later calls cost nothing extra; otherwise it is
    *ragged* and every later call first sends each out-neighbour this rank's first dimensions
    (one tiny message per edge), so they may change from call to call. Every rank keeps the
    same record, so all ranks take the same branch at every call.
    """
    if world.size == 1 or world.transport is None:
        return None
    ragged_key = ("neighbor_gather:ragged", plan.signature, plan.topology, plan.step)
    uniform_key = ("neighbor_gather:uniform", plan.signature, plan.topology, plan.step, dims)
    if ragged_key in world.agreed:
        return _exchange_dims(world, plan, dims)
    if uniform_key in world.agreed:
        return None
    everyone: list[tuple[int, ...]] = world.transport.allgather_object(dims)
    for leaf, path in enumerate(_plan_paths(plan)):
        zero_d = [r for r, d in enumerate(everyone) if d[leaf] < 0]
        if zero_d and len(zero_d) != len(everyone):
            raise MismatchError(
                f"{fn}: tree leaf {path} is 0-d on rank(s) {zero_d} but not on the others; only "
                "first dimensions may differ between ranks"
            )
    if all(d == everyone[0] for d in everyone):
        world.agreed.add(uniform_key)
        return None
    world.agreed.add(ragged_key)
    return {src: everyone[src] for src, _ in plan.recvs}


def _plan_paths(plan: CommPlan) -> list[str]:
    """Key paths of the plan's tensor leaves, in leaf order."""
    paths = [""] * plan.layout.n_tensors
    for g in plan.layout.groups:
        for s in g.slots:
            paths[s.leaf] = s.path
    return paths


def _exchange_dims(world: World, plan: CommPlan, dims: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """Send this rank's first dimensions to its out-neighbours, receive its sources' (blocking)."""
    assert world.transport is not None
    mine = np.array(dims, dtype=np.int64)
    got = {src: np.empty(len(dims), dtype=np.int64) for src, _ in plan.recvs}
    tag = make_tag(plan.signature, "first dims", plan.topology)
    # Unnumbered: the call's numbered data exchange follows, and numbering this one would mark
    # the call's receives posted before the data receives are.
    world.transport.exchange([(dst, mine) for dst, _ in plan.sends], list(got.items()), tag).wait()
    return {src: tuple(int(v) for v in arr) for src, arr in got.items()}


def neighbor_gather(
    tree: Any,
    topology: AnyTopology | None,
    step: int = 0,
    *,
    src_weights: SrcWeights | None = None,
    dst_weights: DstWeights | None = None,
) -> dict[int, Any]:
    """The in-neighbours' trees, ``{rank: tree}`` (BlueFog's ``neighbor_allgather`` per source).

    The sources are the in-neighbours of ``topology.at(step)``, or the keys of ``src_weights``
    when ``dst_weights`` defines the call's own graph (weights are ignored: nothing is mixed).
    Any dtype works.

    First dimensions may differ between ranks (as in BlueFog's ``neighbor_allgather``; the
    structure, dtypes and all other dimensions must agree): ``result[src]`` has ``src``'s own
    shapes. The first call of a pattern (structure, other dimensions, graph, step) exchanges
    every rank's first dimensions along with the usual agreement. If they were equal
    everywhere, later calls with those shapes cost nothing extra; if not, every later call of
    the pattern first sends each out-neighbour one small message with its first dimensions
    (``_async`` waits for it before returning the handle), so they may change from call to
    call. In ``bf.simulate(n)`` pass ``bf.sim.ragged([tree_0, …, tree_{n-1}])`` for per-agent
    trees of different lengths (a stacked leaf has one length for all agents).

    Differs from BlueFog: a dict ``{source: tree}`` instead of one tensor concatenated along
    dim 0 (``torch.cat([result[s] for s in sorted(result)])`` gives BlueFog's layout).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.neighbor_gather(torch.arange(3), bf.topology.ring(bf.size())) == {} or bf.size() > 1
        True
    """
    return neighbor_gather_async(tree, topology, step, src_weights=src_weights, dst_weights=dst_weights).wait()
