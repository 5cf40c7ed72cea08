"""Calls in flight on a process world, and the autograd Function that makes them differentiable.

A run posts its exchange(s) when created (so ``_async`` forms overlap the caller's work) unless
its tensors are wrapped by a ``torch.func`` transform, which exposes no memory: then it posts
when ``forward`` receives the unwrapped tensors.  ``backward`` is the adjoint call: the exchange
along reversed edges (Wᵀ) for a mix, the reversed pipeline for a staged call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..execute import Exchange, describe
from ..hierarchy import StagedPlan
from ..ops.handle import plan_args
from ..plan import CommPlan
from ..world import World

if TYPE_CHECKING:
    from ..shared_exchange import SharedExchange
    from ..timeline import Span
    from .exchanges import Exchanges


def is_transformed(tensors: Sequence[torch.Tensor]) -> bool:
    """True for tensors wrapped by a ``torch.func`` transform (they expose no memory to send)."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class Run(Protocol):
    """A call in flight that an autograd Function can finish and differentiate."""

    def forward(self, tensors: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]: ...

    def backward(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]: ...


class RunFunction(torch.autograd.Function):
    """Makes a call differentiable: ``run.forward`` computes it, ``run.backward`` is its adjoint
    (for a mix the exchange along reversed edges, Wᵀ; for a staged call the reversed pipeline).

    Written in the ``setup_context`` style so that ``torch.func.grad`` composes with it: under a
    transform ``forward`` receives the unwrapped tensors, which is when the exchange is posted.
    """

    @staticmethod
    def forward(run: Run, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(run.forward(tensors))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.run = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        return (None, *ctx.run.backward(grads))


class MixRun:
    """One mixing call on a process world, possibly in flight.

    The exchange is posted at construction (the async case) unless the tensors are wrapped by a
    ``torch.func`` transform; then it is posted when ``forward`` sees the unwrapped tensors.
    """

    def __init__(
        self, world: World, exchanges: Exchanges, plan: CommPlan, tensors: Sequence[torch.Tensor], *, defer: bool,
        call: int | None, step: int | None = None, span: Span | None = None, sync: bool = False,
        into: Sequence[torch.Tensor] | None = None,
    ) -> None:
        self.world = world
        self.into = into  # leaves the result is written into (the op's ``out``), or None
        self.exchanges = exchanges
        self.plan = plan
        self.span = span
        self.call = call
        self.step = step  # the caller's, for error messages (a static graph's plan has none)
        self.exchange: Exchange | SharedExchange | None = None
        if not defer:
            self.exchange = exchanges.post(
                world.resources, plan, tensors, call=call, calls=world.calls, what=describe(plan, step), span=span, sync=sync,
            )
        elif call is not None:
            world.calls.defer(call)  # its messages may arrive before it posts: not stale

    def done(self) -> bool:
        return self.exchange is None or self.exchange.done()

    def forward(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        exchange = self.exchange
        if exchange is None:
            world = self.world
            if self.call is not None:
                world.calls.posted(self.call)
            exchange = self.exchanges.post(
                world.resources, self.plan, tensors, call=self.call, calls=world.calls,
                what=describe(self.plan, self.step), span=self.span, sync=True,
            )
        self.exchange = None
        return exchange.mix(self.into)

    def backward(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """Wᵀ·grads, itself a differentiable mix (double backward works; under ``torch.func``
        the gradients arrive wrapped and are unwrapped by the inner ``apply``)."""
        full = [
            torch.zeros(shape, dtype=dtype) if g is None else g
            for g, (shape, dtype) in zip(grads, _slots(self.plan), strict=True)
        ]
        # Every rank runs the backward exchanges in the same order: they are calls of their own.
        call = None if self.world.size == 1 else self.world.calls.begin(f"{self.plan.op} backward", self.plan.step)
        timeline = self.world.timeline
        span = None if timeline is None else timeline.begin(f"{self.plan.op}.backward")
        back = MixRun(self.world, self.exchanges, self.plan.reversed(), full, defer=True, call=call, step=self.step, span=span)
        if torch.is_grad_enabled() or is_transformed(full):
            out = tuple(RunFunction.apply(back, *full))  # type: ignore[no-untyped-call]
        else:
            out = tuple(back.forward(full))
        if span is not None:
            span.phase("unpack")
            span.end(**plan_args(back.plan))
        return out


class StagedRun:
    """One staged call on a process world, possibly in flight.

    Started at construction (unless the tensors are wrapped by a ``torch.func`` transform): the
    local reduction is posted and, on a leader with a machine exchange to do, completed and the
    exchange posted, so that the inter-machine traffic overlaps the caller's work until
    ``forward`` (``wait()``) finishes the exchange and broadcasts.
    """

    def __init__(self, world: World, exchanges: Exchanges, plan: StagedPlan, tensors: Sequence[torch.Tensor], *, defer: bool) -> None:
        self.world = world
        self.exchanges = exchanges
        self.plan = plan
        self.stage = 0  # the next stage to complete
        self.current: list[torch.Tensor] = []  # the leader's value after the completed stages
        self.exchange: Exchange | SharedExchange | None = None  # the stage in flight
        self.started = False
        if not defer:
            self._start(tensors)

    def _post(self, plan: CommPlan, tensors: Sequence[torch.Tensor], *, first: bool = False) -> Exchange | SharedExchange:
        # Only the first stage is run by every rank: the others may not allocate shared memory.
        return self.exchanges.post(self.world.resources, plan, tensors, first=first)

    def _start(self, tensors: Sequence[torch.Tensor]) -> None:
        self.started = True
        self.inputs = list(tensors)
        self.exchange = self._post(self.plan.stages[0], tensors, first=True)
        if self.plan.is_leader and len(self.plan.stages) == 3:
            self._complete()
            self.exchange = self._post(self.plan.stages[1], self.current)

    def _complete(self) -> None:
        """Finish the stage in flight on this rank."""
        exchange, self.exchange = self.exchange, None
        assert exchange is not None
        if self.plan.is_leader:
            self.current = exchange.mix()
        else:
            exchange.gathered()  # a follower only sent: nothing to combine
        self.stage += 1

    def done(self) -> bool:
        return self.exchange is None or self.exchange.done()

    def forward(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not self.started:
            self._start(tensors)
        plan = self.plan
        last = len(plan.stages) - 1
        while self.stage < last:
            if self.exchange is None:  # a follower has nothing to do in the machine exchange
                if plan.is_leader:
                    self.exchange = self._post(plan.stages[self.stage], self.current)
                else:
                    self.stage += 1
                    continue
            self._complete()
        bcast = plan.stages[last]
        if plan.is_leader:
            exchange = self._post(bcast, self.current)
            if bcast.self_weight == 1.0:
                exchange.gathered()  # sends done; the value is already a fresh buffer of ours
                out = self.current
            else:
                out = exchange.mix()
        else:
            # Followers take the leader's value; the tensors only shape the (unused) send side.
            exchange = self._post(bcast, self.inputs)
            (source, weight), = bcast.recvs
            out = exchange.gathered()[source]
            if weight != 1.0:
                out = [t * weight for t in out]
        self.current = []
        self.inputs = []
        return out

    def backward(self, grads: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        """The reversed pipeline on ``grads`` (itself differentiable: double backward works)."""
        full = [
            torch.zeros(shape, dtype=dtype) if g is None else g
            for g, (shape, dtype) in zip(grads, _slots(self.plan.stages[0]), strict=True)
        ]
        back = StagedRun(self.world, self.exchanges, self.plan.reversed(), full, defer=True)
        if torch.is_grad_enabled() or is_transformed(full):
            return tuple(RunFunction.apply(back, *full))  # type: ignore[no-untyped-call]
        return tuple(back.forward(full))


def _slots(plan: CommPlan) -> list[tuple[tuple[int, ...], torch.dtype]]:
    slots: list[tuple[tuple[int, ...], torch.dtype] | None] = [None] * plan.layout.n_tensors
    for g in plan.layout.groups:
        for s in g.slots:
            slots[s.leaf] = (s.shape, g.dtype)
    return slots  # type: ignore[return-value]


