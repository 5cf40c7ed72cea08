"""Parameter buckets and gradient hooks: when each part of a module's exchange may start.

:class:`~bluefog_fn.optim.DecentralizedOptimizer` with ``overlap=True`` starts the exchange
of a bucket of parameters from autograd as soon as the last gradient of the bucket has been
accumulated, so the messages travel while backward computes the earlier layers.  Buckets are
formed once, deterministically, in reverse registration order (the order in which backward
usually produces gradients, as in DDP) and capped at ``bucket_cap_mb`` megabytes; every rank
builds the same buckets from the same module, so every rank starts the same ops in the same
order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops.handle import Handle


def form_buckets(params: Sequence[torch.Tensor], cap_bytes: int) -> list[list[int]]:
    """Indices into ``params``, grouped in reverse order, each group at most ``cap_bytes``.

    A parameter larger than the cap gets a bucket of its own.

    Example:
        >>> import torch
        >>> form_buckets([torch.zeros(2), torch.zeros(2), torch.zeros(4)], cap_bytes=16)
        [[2], [1, 0]]
    """
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for i in reversed(range(len(params))):
        nbytes = params[i].numel() * params[i].element_size()
        if current and size + nbytes > cap_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
    if current:
        buckets.append(current)
    return buckets


@dataclass
class BucketHooks:
    """Per-step bookkeeping of which buckets are ready and which exchanges are in flight.

    ``start(bucket)`` returns the handle of the bucket's exchange.  Exchanges are always
    started in bucket order, as DDP does: a bucket whose gradients are all there is started
    from the hook that completed it once every earlier bucket has been started, else it waits
    for them.  ``pending()`` lists the handles of the step and starts, still in bucket order,
    whatever backward did not (a rank that skipped backward, a parameter without gradient).
    While ``paused`` (``DecentralizedOptimizer.no_sync()``) the hooks start nothing and
    ``deferred`` records that gradients of this step were held back.  So every rank issues the same ops in the same order whatever its backward did: the order
    in which hooks fire differs between modules (and between ranks, when one skips backward),
    and collectives paired across ranks by their order would otherwise mix different buckets
    (a global mean of one bucket with another's values).
    """

    params: Sequence[torch.Tensor]
    buckets: list[list[int]]
    start: Callable[[int], Handle[Any]]
    enabled: Callable[[], bool]
    _bucket_of: dict[int, int] = field(default_factory=dict)
    _ready: list[set[int]] = field(default_factory=list)
    _handles: dict[int, Handle[Any]] = field(default_factory=dict)
    _complete: set[int] = field(default_factory=set)  # buckets whose gradients are all there
    _next: int = 0  # every bucket before this one has been started
    _removers: list[Any] = field(default_factory=list)
    paused: bool = False  # inside no_sync(): backward only accumulates
    deferred: bool = False  # a backward of this step ran while paused

    def __post_init__(self) -> None:
        for b, idx in enumerate(self.buckets):
            for i in idx:
                self._bucket_of[i] = b
        self._ready = [set() for _ in self.buckets]
        for i, p in enumerate(self.params):
            self._removers.append(p.register_post_accumulate_grad_hook(self._hook(i)))  # type: ignore[no-untyped-call]

    def _hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            if not self.enabled():
                return
            if self.paused:
                self.deferred = True
                if self._handles:  # they carry older gradients: what step() sends must include these
                    self._restart()
                return
            b = self._bucket_of[i]
            ready = self._ready[b]
            ready.add(i)
            if len(ready) < len(self.buckets[b]):
                return
            ready.clear()
            if b in self._handles:  # a second backward before step(): the newer gradients win
                self._restart()
            self._complete.add(b)
            while self._next in self._complete:
                self._complete.discard(self._next)
                self._handles[self._next] = self.start(self._next)
                self._next += 1

        return hook

    def _restart(self) -> None:
        """Finish the exchanges started so far and start again from the first bucket."""
        for b in sorted(self._handles):
            self._handles[b].wait()
        self._handles.clear()
        self._next = 0

    def pending(self) -> list[tuple[int, Handle[Any]]]:
        """Every bucket's handle for this step, in bucket order; resets for the next step."""
        out = []
        for b in range(len(self.buckets)):
            handle = self._handles.pop(b, None)
            out.append((b, handle if handle is not None else self.start(b)))
        self.reset()
        return out

    def reset(self) -> None:
        """Forget partial readiness (e.g. after ``zero_grad`` or a step without exchange)."""
        for ready in self._ready:
            ready.clear()
        self._complete.clear()
        self._next = 0
        self.deferred = False

    def in_flight(self) -> int:
        """How many bucket exchanges were started and not yet collected by :meth:`pending`."""
        return len(self._handles)

    def remove(self) -> None:
        """Unregister the hooks."""
        for r in self._removers:
            r.remove()
        self._removers.clear()
