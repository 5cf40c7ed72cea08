"""Communication plans: plain, frozen descriptions of what one call does on one rank.

A plan is built from the call's abstract signature only (tree structure, leaf shapes, dtypes,
devices, the graph at ``step``, weights) and never looks at tensor values, so it is cached and
reused.  Nothing here imports MPI; the planner is testable without a backend.

Layout: the tensor leaves are grouped by dtype; each group is one fused contiguous buffer, leaves
at increasing offsets in tree order.  A group is cut into *segments*, one message per peer each:
a leaf of at least :data:`SEGMENT_MIN_BYTES` travels alone, straight from the caller's memory
(zero copy); runs of smaller leaves are packed together so that a model with hundreds of
small tensors still sends a handful of messages.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .tree import LeafMeta

# Leaves at least this large are sent from their own memory; smaller ones are packed.  At
# 256 KiB the per-message latency (a few µs) is < 5 % of the transfer time of the leaf itself.
SEGMENT_MIN_BYTES = 256 * 1024


@dataclass(frozen=True)
class LeafSlot:
    """Where one tensor leaf lives in its dtype's fused buffer."""

    leaf: int  # index among the tree's tensor leaves
    path: str
    shape: tuple[int, ...]
    offset: int  # in elements
    numel: int


@dataclass(frozen=True)
class Segment:
    """A contiguous range of a fused buffer that travels as one message per peer."""

    start: int
    stop: int
    slots: tuple[int, ...]  # indices into the group's ``slots``
    packed: bool  # True when several leaves are copied together before sending


@dataclass(frozen=True)
class BufferGroup:
    """One fused buffer: all leaves of one dtype."""

    dtype: torch.dtype
    numel: int
    slots: tuple[LeafSlot, ...]
    segments: tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class Layout:
    """How a tree's tensor leaves map into fused buffers."""

    groups: tuple[BufferGroup, ...]
    n_tensors: int
    device: str

    @property
    def nbytes(self) -> int:
        return sum(g.nbytes for g in self.groups)

    @property
    def n_messages(self) -> int:
        """Messages per peer."""
        return sum(len(g.segments) for g in self.groups)


# Ops whose plans move one copy of the layout per peer (the stages of the hierarchical ops too).
POINT_TO_POINT_OPS = frozenset(
    {"neighbor_mean", "neighbor_gather", "neighbor_mean_backward", "local_reduce", "machine_exchange", "local_broadcast"}
)


@dataclass(frozen=True)
class CommPlan:
    """What one call does on one rank.

    ``recvs`` holds ``(source, weight)``: the weight this rank puts on the source's value.
    ``sends`` holds ``(destination, scale)``: the sender multiplies what it sends by ``scale``
    (1 unless ``dst_weights`` said otherwise).  For a mixing op the result is
    ``self_weight · x + Σ weight · scale_at_source · x_source``.
    """

    op: str
    rank: int
    size: int
    layout: Layout
    self_weight: float = 1.0
    recvs: tuple[tuple[int, float], ...] = ()
    sends: tuple[tuple[int, float], ...] = ()
    root: int | None = None
    step: int | None = None
    topology: str | None = None  # fingerprint of the graph at ``step``; None for per-call weights
    tag: int = 0
    signature: str = field(default="", compare=False)

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sends per call (point-to-point ops; collectives report the buffer)."""
        if self.op in POINT_TO_POINT_OPS:
            return self.layout.nbytes * len(self.sends)
        return self.layout.nbytes

    @property
    def bytes_received(self) -> int:
        if self.op in POINT_TO_POINT_OPS:
            return self.layout.nbytes * len(self.recvs)
        return self.layout.nbytes

    def reversed(self) -> CommPlan:
        """The plan of the adjoint exchange (multiplication by Wᵀ): edges reversed, weights kept.

        Forward, receiver i weights sender j's value by ``W[i, j] = scale_j→i · weight_i←j``;
        backward, i sends its gradient to j scaled by ``weight_i←j`` (known at i) and j weights it
        by ``scale_j→i`` (known at j), so no rank needs information it does not already hold.
        """
        return CommPlan(
            op="neighbor_mean_backward",
            rank=self.rank,
            size=self.size,
            layout=self.layout,
            self_weight=self.self_weight,
            recvs=self.sends,
            sends=self.recvs,
            step=self.step,
            topology=self.topology,
            tag=(self.tag + 1) % _TAG_SPACE or 1,
            signature=self.signature + ":T",
        )

    def __str__(self) -> str:
        lines = [
            f"CommPlan {self.op} rank {self.rank}/{self.size}"
            + (f" step {self.step}" if self.step is not None else "")
            + (f" root {self.root}" if self.root is not None else ""),
            f"  self weight {self.self_weight:g}",
        ]
        if self.recvs or self.sends:
            lines.append("  recv " + ", ".join(f"{s}×{w:g}" for s, w in self.recvs))
            lines.append("  send " + ", ".join(f"{d}×{w:g}" for d, w in self.sends))
        for g in self.layout.groups:
            lines.append(
                f"  {str(g.dtype).removeprefix('torch.')}: {len(g.slots)} leaves, {g.numel} elements, "
                f"{len(g.segments)} message(s)/peer"
            )
        lines.append(f"  bytes sent {self.bytes_sent}, received {self.bytes_received}")
        return "\n".join(lines)


# MPI guarantees tags up to 32767; tag 0 is left to nobody in particular.
_TAG_SPACE = 32767


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def make_tag(*parts: object) -> int:
    """A tag in [1, 32766] derived from ``parts``; equal parts give equal tags on every rank."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (_TAG_SPACE - 1) + 1


def digest(*parts: object) -> str:
    """A stable hex digest of ``parts`` (their repr), equal across processes."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def build_layout(metas: Sequence[LeafMeta], segment_min_bytes: int = SEGMENT_MIN_BYTES) -> Layout:
    """Group leaves by dtype (first appearance order) and cut each group into segments.

    Example:
        >>> import torch
        >>> from bluefog_fn.tree import flatten
        >>> lay = build_layout(flatten([torch.zeros(3), torch.zeros(2, dtype=torch.float64)], "ex").metas)
        >>> [(str(g.dtype), g.numel) for g in lay.groups]
        [('torch.float32', 3), ('torch.float64', 2)]
    """
    devices = {str(m.device) for m in metas}
    if len(devices) > 1:
        raise ValueError(f"all leaves of a tree must be on one device, got {sorted(devices)}")
    order: list[torch.dtype] = []
    for m in metas:
        if m.dtype not in order:
            order.append(m.dtype)
    groups = []
    for dtype in order:
        slots: list[LeafSlot] = []
        offset = 0
        for i, m in enumerate(metas):
            if m.dtype == dtype:
                slots.append(LeafSlot(i, m.path, m.shape, offset, m.numel))
                offset += m.numel
        groups.append(BufferGroup(dtype, offset, tuple(slots), _segments(slots, dtype, segment_min_bytes)))
    return Layout(tuple(groups), len(metas), devices.pop() if devices else "cpu")


def _segments(slots: Sequence[LeafSlot], dtype: torch.dtype, min_bytes: int) -> tuple[Segment, ...]:
    itemsize = _itemsize(dtype)
    out: list[Segment] = []
    run: list[int] = []

    def flush() -> None:
        if run:
            start = slots[run[0]].offset
            stop = slots[run[-1]].offset + slots[run[-1]].numel
            out.append(Segment(start, stop, tuple(run), packed=len(run) > 1))
            run.clear()

    for k, s in enumerate(slots):
        if s.numel == 0:
            continue  # empty leaves own no bytes and need no message
        if s.numel * itemsize >= min_bytes:
            flush()
            out.append(Segment(s.offset, s.offset + s.numel, (k,), packed=False))
        else:
            run.append(k)
    flush()
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Weights of a mixing call


def _check_weight(fn: str, arg: str, key: object, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {arg}[{key!r}] must be a real number, got {type(value).__name__} {value!r}")
    w = float(value)
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{fn}: {arg}[{key!r}] must be finite and >= 0, got {w!r}")
    return w


def check_rank_key(fn: str, arg: str, key: object, size: int, me: int | None) -> int:
    """Validate a rank used as a dict key / list entry of a weight argument."""
    if isinstance(key, bool) or not isinstance(key, int):
        raise TypeError(f"{fn}: {arg} keys must be int ranks, got {type(key).__name__} {key!r}")
    if not 0 <= key < size:
        raise ValueError(f"{fn}: {arg} has rank {key} but the world has {size} ranks")
    if me is not None and key == me:
        raise ValueError(f"{fn}: {arg} names rank {key}, this rank itself; use self_weight instead")
    return key


def canonical_src_weights(
    fn: str, src_weights: Mapping[int, float] | None, size: int, me: int
) -> tuple[tuple[int, float], ...] | None:
    """``src_weights`` as a sorted tuple of ``(rank, weight)``, validated."""
    if src_weights is None:
        return None
    if not isinstance(src_weights, Mapping):
        raise TypeError(f"{fn}: src_weights must be a dict {{rank: weight}}, got {type(src_weights).__name__}")
    return tuple(
        sorted(
            (check_rank_key(fn, "src_weights", k, size, me), _check_weight(fn, "src_weights", k, v))
            for k, v in src_weights.items()
        )
    )


def canonical_dst_weights(
    fn: str, dst_weights: Mapping[int, float] | Sequence[int] | None, size: int, me: int
) -> tuple[tuple[int, float], ...] | None:
    """``dst_weights`` (ranks, or ``{rank: scale}``) as a sorted tuple of ``(rank, scale)``."""
    if dst_weights is None:
        return None
    if isinstance(dst_weights, Mapping):
        items = [
            (check_rank_key(fn, "dst_weights", k, size, me), _check_weight(fn, "dst_weights", k, v))
            for k, v in dst_weights.items()
        ]
    elif isinstance(dst_weights, (list, tuple)):
        items = [(check_rank_key(fn, "dst_weights", k, size, me), 1.0) for k in dst_weights]
        if len({k for k, _ in items}) != len(items):
            raise ValueError(f"{fn}: dst_weights must not repeat a rank, got {list(dst_weights)}")
    else:
        raise TypeError(
            f"{fn}: dst_weights must be a list of ranks or a dict {{rank: weight}}, got "
            f"{type(dst_weights).__name__}"
        )
    return tuple(sorted(items))


def canonical_self_weight(fn: str, self_weight: float | None) -> float | None:
    if self_weight is None:
        return None
    return _check_weight(fn, "self_weight", "self", self_weight)
