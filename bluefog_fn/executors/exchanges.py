"""How a process world moves one plan's data: MPI point-to-point, or same-host shared memory.

The choice is made per call and per peer, the same way on every rank: a mixing plan whose
shared buffer is at least ``min_bytes`` (see :class:`SharedMemoryPolicy`) and that has a peer on
this machine runs as a :class:`~bluefog_fn.shared_exchange.SharedExchange` — peers on this
machine through shared memory, the others over MPI in the same call; everything else runs as
an :class:`~bluefog_fn.execute.Exchange`.  Every input of the choice (the policy, agreed at
start-up; the buffer size, equal on every rank of an agreed call; the segments allocated so
far) is the same on the writer's and the reader's side, so both pick the same path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..backend.shared_memory import SharedChannel
from ..backend.transport import Transport
from ..call_order import CallOrder
from ..execute import Exchange, Resources, describe
from ..plan import CommPlan
from ..shared_exchange import SharedExchange, buffer_bytes, local_edges

if TYPE_CHECKING:
    from ..timeline import Span

# Ops whose plans may read peers' buffers in place (the gather keeps its own receive buffers).
_MIXING_OPS = ("neighbor_mean", "local_reduce", "machine_exchange", "local_broadcast")

DEFAULT_MIN_BYTES = 32 << 20
"""Trees smaller than this keep MPI by default: below it MPI's own shared-memory path (its
copies stay in cache) was as fast or faster than writing the tree into the shared buffer on
the machines measured (docs/performance.md)."""
DEFAULT_MIN_TREE_BYTES = 1 << 20
"""``bf.shared_tree`` of smaller trees returns an ordinary copy by default: below it a call's
fixed cost (flags, tokens) outweighs the copy it saves."""
DEFAULT_MAX_MB = 4096


@dataclass(frozen=True)
class SharedMemoryPolicy:
    """When the same-host transport is used (the same on every rank: checked at start-up).

    ``enabled``: at all (``BLUEFOG_FN_SHM=0`` or ``bf.init(shm=False)`` turn it off);
    ``min_bytes``: smallest shared buffer that uses it (``BLUEFOG_FN_SHM=1`` or
    ``bf.init(shm=True)``: 0, every size); ``min_tree_bytes``: smallest ``bf.shared_tree`` kept
    in shared memory (forced: 0) — calls of a buffer size some shared tree has use the
    transport whatever ``min_bytes`` says, since that tree is read in place; ``max_bytes``: the
    most shared memory one rank allocates (``BLUEFOG_FN_SHM_MAX_MB``).
    """

    enabled: bool = True
    min_bytes: int = DEFAULT_MIN_BYTES
    max_bytes: int = DEFAULT_MAX_MB << 20
    min_tree_bytes: int = DEFAULT_MIN_TREE_BYTES

    @staticmethod
    def from_env(shm: bool | None = None) -> SharedMemoryPolicy:
        """The policy asked for by ``bf.init(shm=...)`` (``None``: ``BLUEFOG_FN_SHM``)."""
        raw = os.environ.get("BLUEFOG_FN_SHM", "auto").strip().lower()
        if raw not in ("0", "1", "auto", ""):
            raise ValueError(f"BLUEFOG_FN_SHM must be 0, 1 or auto, got {raw!r}")
        max_raw = os.environ.get("BLUEFOG_FN_SHM_MAX_MB", str(DEFAULT_MAX_MB))
        try:
            max_mb = int(max_raw)
        except ValueError:
            raise ValueError(f"BLUEFOG_FN_SHM_MAX_MB must be an integer (MiB), got {max_raw!r}") from None
        if max_mb < 0:
            raise ValueError(f"BLUEFOG_FN_SHM_MAX_MB must be >= 0, got {max_mb}")
        if shm is None:
            enabled, forced = raw != "0", raw == "1"
        else:
            enabled, forced = shm, shm
        if forced:
            return SharedMemoryPolicy(enabled, 0, max_mb << 20, 0)
        return SharedMemoryPolicy(enabled, DEFAULT_MIN_BYTES, max_mb << 20, DEFAULT_MIN_TREE_BYTES)


class Exchanges:
    """Posts a plan's exchange for a process world (see the module docstring)."""

    def __init__(self, transport: Transport, channel: SharedChannel | None = None, policy: SharedMemoryPolicy | None = None) -> None:
        self.transport = transport
        self.channel = channel
        self.policy = policy or SharedMemoryPolicy(enabled=channel is not None)

    def __repr__(self) -> str:
        return f"Exchanges({self.channel!r}, {self.policy})"

    @contextlib.contextmanager
    def policy_as(self, policy: SharedMemoryPolicy) -> Iterator[None]:
        """Use ``policy`` inside the block (every rank must enter it at the same call: the
        choice of path must stay the same on writers and readers).  For benchmarks and tests
        that compare the paths side by side."""
        saved, self.policy = self.policy, policy
        try:
            yield
        finally:
            self.policy = saved

    def applies(self, nbytes: int) -> bool:
        """Whether the policy sends a shared buffer of ``nbytes`` through shared memory (the
        same answer on every rank of a machine: shared trees are allocated collectively)."""
        channel = self.channel
        if channel is None or not self.policy.enabled or nbytes <= 0:
            return False
        return nbytes >= self.policy.min_bytes or nbytes in channel.tree_sizes

    def keeps_tree(self, nbytes: int) -> bool:
        """Whether ``bf.shared_tree`` of a tree whose buffer has ``nbytes`` puts it in shared memory."""
        return self.channel is not None and self.policy.enabled and nbytes > 0 and nbytes >= self.policy.min_tree_bytes

    def shared_segment(self, plan: CommPlan, *, first: bool, what: str) -> int | None:
        """The shared segment this plan's call uses, or None for MPI only.

        ``first``: every rank of the machine reaches this call's choice (the first exchange of
        an op; not a stage only some ranks run), so a segment may be allocated collectively.
        """
        channel = self.channel
        if channel is None or plan.op not in _MIXING_OPS:
            return None
        nbytes = buffer_bytes(plan.layout)
        if not self.applies(nbytes):
            return None
        seg = channel.segment_for(nbytes, what) if first else channel.lookup(nbytes)
        if seg is None or not local_edges(plan, channel):
            return None
        return seg

    def post(
        self,
        res: Resources,
        plan: CommPlan,
        tensors: Sequence[torch.Tensor],
        *,
        call: int | None = None,
        calls: CallOrder | None = None,
        what: str | None = None,
        span: Span | None = None,
        sync: bool = False,
        first: bool = True,
    ) -> Exchange | SharedExchange:
        """Post the call's messages; ``sync``: the caller combines at once (fused write)."""
        what = what or describe(plan)
        seg = self.shared_segment(plan, first=first, what=what)
        if seg is None:
            return Exchange(self.transport, res, plan, tensors, call=call, calls=calls, what=what, span=span)
        assert self.channel is not None
        return SharedExchange(
            self.transport, self.channel, res, plan, tensors, seg, call=call, calls=calls, what=what, span=span, sync=sync,
        )

    def uses_shared_memory(self, plan: CommPlan) -> bool:
        """Whether a call of ``plan`` (whose buffer size was seen before) reads peers in place."""
        return self.shared_segment(plan, first=False, what=describe(plan)) is not None
