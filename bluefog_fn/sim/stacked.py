"""Stacked executors of the simulator and the autograd/vmap plumbing around them.

A :class:`StackedOp` maps tensors whose dim 0 indexes the n agents to results of the same kind
(``run``), and knows its adjoint (``adjoint``; ``None`` when, as on MPI, the op is not
differentiable).  Two ``torch.autograd.Function`` s apply one:

* :class:`_Stacked` — on stacked tensors.  Backward applies the adjoint, itself through
  ``_Stacked``, so higher derivatives work; its ``vmap`` rule moves an outer batch dimension
  behind the agent dimension (the ops act independently on every element of an agent's row).
* :class:`_PerAgent` — on per-agent tensors inside :func:`bluefog_fn.sim.vmap`.  Its ``vmap``
  rule receives all agents' tensors stacked and runs ``_Stacked``; backward applies the adjoint
  through ``_PerAgent`` again, so ``torch.func.grad`` inside ``vmap`` sees Wᵀ.

Both use ``setup_context`` (forward takes no ctx), which is what lets ``torch.func`` transforms
compose with them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..backend.buffers import BufferPool
from ..plan import CommPlan
from ..world import current
from . import kernels

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Per-agent mode: the stack of agent-index tensors pushed by bf.sim.vmap, kept on the current
# world (the library's one context object) rather than in a module global.


def _agents_stack() -> list[torch.Tensor]:
    return current().vmap_agents


def push_agents(index: torch.Tensor) -> None:
    """Enter per-agent mode (called by ``bf.sim.vmap`` inside the vmapped function)."""
    _agents_stack().append(index)


def pop_agents() -> None:
    _agents_stack().pop()


def in_vmap() -> bool:
    """True while a function run by ``bf.sim.vmap`` executes: ops see per-agent tensors."""
    return bool(_agents_stack())


def current_agents() -> torch.Tensor | None:
    stack = _agents_stack()
    return stack[-1] if stack else None


# ---------------------------------------------------------------------------------------------
# Output buffers


def fused_empty(
    specs: Sequence[tuple[tuple[int, ...], torch.dtype, torch.device]], pool: BufferPool | None = None
) -> list[torch.Tensor]:
    """Empty tensors of the given shapes, all leaves of one (dtype, device) in one buffer.

    Each leaf is a contiguous block (leaf-major), so every returned leaf is contiguous and they
    share storage, like the MPI backend's fused outputs.  Large CPU buffers come from ``pool``
    (the world's :class:`~bluefog_fn.backend.buffers.BufferPool`): a fresh 256 MiB allocation
    page-faults on first touch, which costs more than the mix itself.
    """
    totals: dict[tuple[torch.dtype, torch.device], int] = {}
    offsets = []
    for shape, dtype, device in specs:
        key = (dtype, device)
        numel = 1
        for d in shape:
            numel *= d
        offsets.append((key, totals.get(key, 0), numel))
        totals[key] = totals.get(key, 0) + numel
    buffers = {
        key: pool.take(key[0], total) if pool is not None and key[1].type == "cpu" else torch.empty(total, dtype=key[0], device=key[1])
        for key, total in totals.items()
    }
    return [
        buffers[key][off : off + numel].view(shape)
        for (key, off, numel), (shape, _, _) in zip(offsets, specs, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# Stacked ops


class StackedOp(ABC):
    """An op on stacked tensors (dim 0 = agent)."""

    name: str
    n: int
    pool: BufferPool | None = None  # where large CPU outputs come from
    # True when the op acts on each element of an agent's row independently, so an extra batch
    # dimension placed right after the agent dimension is carried through unchanged.
    elementwise: bool = True

    @abstractmethod
    def run(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The op on plain stacked tensors (no autograd, no functorch wrappers)."""

    @abstractmethod
    def adjoint(self) -> StackedOp | None:
        """The op that maps output gradients to input gradients (``None``: not differentiable)."""


def _numba_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in kernels.NUMBA_DTYPES


class MixOp(StackedOp):
    """``X ← W X`` for the mixing matrix described by one plan per agent."""

    def __init__(self, name: str, plans: Sequence[CommPlan], arrays: kernels.MixArrays, pool: BufferPool | None = None) -> None:
        self.name = name
        self.pool = pool
        self.plans = tuple(plans)
        self.arrays = arrays
        self.n = arrays.n
        self._adjoint: MixOp | None = None
        self._torch: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, list[kernels.TorchLayer]]] = {}

    @classmethod
    def from_plans(cls, name: str, plans: Sequence[CommPlan], pool: BufferPool | None = None) -> MixOp:
        """Stack n plans; the caller has checked that sends and receives match."""
        n = len(plans)
        scale = {(p.rank, d): s for p in plans for d, s in p.sends}
        width = max(1, max((len(p.recvs) for p in plans), default=0))
        sw = np.array([p.self_weight for p in plans], dtype=np.float64)
        deg = np.array([len(p.recvs) for p in plans], dtype=np.int64)
        idx = np.zeros((n, width), dtype=np.int64)
        w = np.zeros((n, width), dtype=np.float64)
        s = np.ones((n, width), dtype=np.float64)
        for i, p in enumerate(plans):
            for k, (j, wij) in enumerate(p.recvs):  # sorted by source: the MPI combine order
                idx[i, k] = j
                w[i, k] = wij
                s[i, k] = scale[(j, i)]
        arrays = kernels.MixArrays(sw, deg, idx, w, s, bool(np.any(s != 1.0)))  # padding is 1
        return cls(name, plans, arrays, pool)

    def run(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outs = fused_empty([(tuple(t.shape), t.dtype, t.device) for t in tensors], self.pool)
        for t, o in zip(tensors, outs, strict=True):
            if t.numel() == 0:
                continue
            x = t.detach().reshape(self.n, -1).contiguous()
            y = o.view(self.n, -1)
            if _numba_ok(x):
                kernels.mix_numba(self.arrays, x, y)
            else:
                sw, layers = self._torch_layers(x.device, x.dtype)
                kernels.mix_torch(sw, layers, x, y)
        return tuple(outs)

    def _torch_layers(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, list[kernels.TorchLayer]]:
        key = (device, dtype)
        if key not in self._torch:
            acc, scale = kernels.acc_dtype(dtype)
            self._torch[key] = kernels.torch_layers(self.arrays, device, acc, scale)
        return self._torch[key]

    def adjoint(self) -> MixOp:
        # Wᵀ, exactly as the MPI backward runs it: the reversed plans (edges reversed, the
        # receiver's weight becomes the sender's scale and vice versa).
        if self._adjoint is None:
            self._adjoint = MixOp.from_plans(self.name + "_backward", [p.reversed() for p in self.plans], self.pool)
            self._adjoint._adjoint = self
        return self._adjoint


class StagedOp(StackedOp):
    """The hierarchical pipeline: one :class:`MixOp` per stage, applied in order.

    Before the last stage (the broadcast from each leader) the followers' rows are zeroed: on
    MPI a follower ignores its own value there and takes the leader's, which the mix computes
    as ``0 · (zeroed row) + 1 · leader`` — exactly, with no ``0 · inf``.
    """

    def __init__(self, name: str, stages: Sequence[MixOp], followers: Sequence[int], pool: BufferPool | None = None) -> None:
        self.name = name
        self.stages = tuple(stages)
        self.n = self.stages[0].n
        self.followers = tuple(followers)
        self.pool = pool
        self._index = torch.tensor(self.followers, dtype=torch.long)

    def run(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        ys = tuple(tensors)
        for op in self.stages[:-1]:
            ys = op.run(ys)
        if self.followers:
            for y in ys:
                y.view(self.n, -1)[self._index.to(y.device)] = 0
        return self.stages[-1].run(ys)

    def adjoint(self) -> StagedOp:
        # The reversed pipeline, as on MPI: every stage's adjoint, in reverse order.
        return StagedOp(self.name + "_backward", [op.adjoint() for op in reversed(self.stages)], self.followers, self.pool)


def allreduce_sum(rows: list[torch.Tensor]) -> torch.Tensor:
    """Σ rows in the order of MPICH's recursive-doubling allreduce.

    Ranks beyond the largest power of two ``p`` are first folded pairwise (``x_{2i} + x_{2i+1}``
    for ``i < n − p``), then the remaining ``p`` partial sums are added pairwise, level by level
    (a balanced tree).  Addition is commutative in IEEE arithmetic, so this is bitwise MPICH's
    result whenever MPICH uses that algorithm (and the most accurate order anyway).
    """
    n = len(rows)
    pof2 = 1
    while pof2 * 2 <= n:
        pof2 *= 2
    rem = n - pof2
    vals = [rows[2 * i] + rows[2 * i + 1] for i in range(rem)] + rows[2 * rem :]
    while len(vals) > 1:
        vals = [vals[2 * i] + vals[2 * i + 1] for i in range(len(vals) // 2)]
    return vals[0]


class ReduceOp(StackedOp):
    """``global_sum`` / ``global_mean``: every agent gets the (mean of the) sum over agents."""

    def __init__(self, name: str, n: int, mean: bool, pool: BufferPool | None = None) -> None:
        self.name = name
        self.n = n
        self.mean = mean
        self.pool = pool

    def run(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outs = fused_empty([(tuple(t.shape), t.dtype, t.device) for t in tensors], self.pool)
        for t, o in zip(tensors, outs, strict=True):
            # Halves are reduced in float32, like the MPI backend (MPI has no half types).
            work = t.detach().to(torch.float32) if t.dtype in _HALF else t.detach()
            total = allreduce_sum(list(work.unbind(0)))
            if self.mean:
                total = total / self.n
            o.copy_(total.unsqueeze(0).expand_as(o))
        return tuple(outs)

    def adjoint(self) -> StackedOp | None:
        # global_mean is multiplication by 11ᵀ/n, symmetric; global_sum is not differentiable
        # on MPI, so it is not here either.
        return self if self.mean else None


class BroadcastOp(StackedOp):
    """``broadcast``: every agent gets agent ``root``'s tensors."""

    def __init__(self, n: int, root: int, pool: BufferPool | None = None) -> None:
        self.name = "broadcast"
        self.n = n
        self.root = root
        self.pool = pool

    def run(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        outs = fused_empty([(tuple(t.shape), t.dtype, t.device) for t in tensors], self.pool)
        for t, o in zip(tensors, outs, strict=True):
            o.copy_(t.detach()[self.root].unsqueeze(0).expand_as(o))
        return tuple(outs)

    def adjoint(self) -> StackedOp | None:
        return None  # not differentiable on MPI either


class AllgatherOp(StackedOp):
    """``allgather``: every agent gets all agents' tensors concatenated along (per-agent) dim 0."""

    elementwise = False

    def __init__(self, n: int, pool: BufferPool | None = None) -> None:
        self.name = "allgather"
        self.n = n
        self.pool = pool

    def run(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        specs = [((self.n, self.n * t.shape[1], *t.shape[2:]), t.dtype, t.device) for t in tensors]
        outs = fused_empty(specs, self.pool)
        for t, o in zip(tensors, outs, strict=True):
            o.copy_(t.detach().reshape(o.shape[1:]).unsqueeze(0).expand_as(o))
        return tuple(outs)

    def adjoint(self) -> StackedOp | None:
        return None


# ---------------------------------------------------------------------------------------------
# autograd / functorch plumbing


class _Stacked(torch.autograd.Function):
    @staticmethod
    def forward(op: StackedOp, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return op.run(tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        op: StackedOp = inputs[0]
        ctx.op = op
        if op.adjoint() is None:
            ctx.mark_non_differentiable(*output)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        adjoint = ctx.op.adjoint()
        assert adjoint is not None  # outputs of non-differentiable ops are marked as such
        return (None, *_Stacked.apply(adjoint, *grads))  # type: ignore[no-untyped-call]

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], op: StackedOp, *tensors: torch.Tensor) -> tuple[Any, Any]:
        # An outer vmap (e.g. over hyper-parameters around the whole simulation): put its batch
        # dimension right after the agent dimension, where an elementwise op carries it along.
        if not op.elementwise:
            raise NotImplementedError(f"bf.sim: {op.name} on stacked agents does not support an enclosing vmap")
        size = info.batch_size
        moved = [
            t.movedim(d, 1) if d is not None else t.unsqueeze(1).expand(t.shape[0], size, *t.shape[1:])
            for t, d in zip(tensors, in_dims[1:], strict=True)
        ]
        outs = _Stacked.apply(op, *moved)  # type: ignore[no-untyped-call]
        return outs, (1,) * len(outs)


class _PerAgent(torch.autograd.Function):
    @staticmethod
    def forward(op: StackedOp, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Reached only when no input is batched by bf.sim.vmap: the values do not depend on the
        # agent, so there is no per-agent result vmap could return.
        raise ValueError(
            f"{op.name} inside bf.sim.vmap got tensors that are the same for every agent (not "
            "batched over agents); derive them from the function's vmapped arguments"
        )

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
        op: StackedOp = inputs[0]
        ctx.op = op
        if op.adjoint() is None:
            ctx.mark_non_differentiable(*output)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        adjoint = ctx.op.adjoint()
        assert adjoint is not None
        return (None, *_PerAgent.apply(adjoint, *grads))  # type: ignore[no-untyped-call]

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], op: StackedOp, *tensors: torch.Tensor) -> tuple[Any, Any]:
        if info.batch_size != op.n:
            raise ValueError(
                f"{op.name}: called under a vmap of size {info.batch_size} but the simulated world "
                f"has {op.n} agents; run per-agent code through bf.sim.vmap, not a vmap of your own"
            )
        moved = [
            t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(op.n, *t.shape)
            for t, d in zip(tensors, in_dims[1:], strict=True)
        ]
        outs = _Stacked.apply(op, *moved)  # type: ignore[no-untyped-call]
        return outs, (0,) * len(outs)


def apply(op: StackedOp, tensors: Sequence[torch.Tensor], per_agent: bool) -> list[torch.Tensor]:
    """Run ``op`` on stacked tensors, or on per-agent tensors inside ``bf.sim.vmap``."""
    if not tensors:
        return []
    fn = _PerAgent if per_agent else _Stacked
    return list(fn.apply(op, *tensors))  # type: ignore[no-untyped-call]
