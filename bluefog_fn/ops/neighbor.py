"""Neighbour ops: ``neighbor_mean`` (weighted mixing) and ``neighbor_gather``.

Each op validates its arguments, then its world's executor traces the call into a cached plan
and executes it (:mod:`bluefog_fn.executors`; in ``bf.simulate(n)`` for all agents at once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..executors.base import MISS
from ..executors.runs import is_transformed
from ..tracing import AnyTopology, check_step
from ..tree import Flat, flatten
from ..world import current
from .compiled import call_collect, call_mix, ready
from .handle import Handle

SrcWeights = Mapping[int, float]
DstWeights = Mapping[int, float] | Sequence[int]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_floating(fn: str, flat: Flat) -> None:
    for i, t in enumerate(flat.tensors):
        if t.dtype not in _FLOATING:
            raise TypeError(f"{fn}: tree leaf {flat.path(i)} has dtype {t.dtype}; mixing needs floating-point leaves")


def neighbor_mean_async(
    tree: Any,
    topology: AnyTopology | None,
    step: int = 0,
    *,
    self_weight: float | None = None,
    src_weights: SrcWeights | None = None,
    dst_weights: DstWeights | None = None,
    out: Any = None,
) -> Handle[Any]:
    """Start :func:`neighbor_mean`; ``.wait()`` on the handle returns its result.

    Communication proceeds while the caller computes (e.g. the next gradient).  With ``out``,
    neither ``tree`` nor ``out`` may be read or written until ``wait()`` returns.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> h = bf.neighbor_mean_async({"w": torch.ones(3)}, bf.topology.ring(bf.size()))
        >>> h.wait()["w"].tolist()
        [1.0, 1.0, 1.0]
    """
    fn = "neighbor_mean"
    if torch.compiler.is_compiling():
        result = call_mix(
            fn, tree, step, topology, self_weight=self_weight, src_weights=src_weights, dst_weights=dst_weights
        )
        return ready(result if out is None else _copy_into(out, result))
    return _start_mix(tree, topology, step, self_weight, src_weights, dst_weights, sync=False, out=out)


def _start_mix(
    tree: Any, topology: AnyTopology | None, step: int, self_weight: float | None, src_weights: SrcWeights | None,
    dst_weights: DstWeights | None, *, sync: bool, out: Any = None,
) -> Handle[Any]:
    fn = "neighbor_mean"
    world = current()
    flat = flatten(tree, fn)
    _check_floating(fn, flat)
    step = check_step(fn, step)
    if out is None:
        return world.executor.neighbor_mean(world, flat, topology, step, self_weight, src_weights, dst_weights, sync=sync)
    dest = _check_out(fn, flat, out)
    handle = world.executor.neighbor_mean(
        world, flat, topology, step, self_weight, src_weights, dst_weights, sync=sync, out=dest.tensors,
    )
    return Handle(lambda: (handle.wait(), out)[1], handle.done)


def _check_out(fn: str, flat: Flat, out: Any) -> Flat:
    """``out`` flattened, once it is a tree ``flat``'s result can be written into."""
    dest = flatten(out, fn, "out")
    if dest.spec != flat.spec or dest.positions != flat.positions:
        raise ValueError(f"{fn}: out must have the structure of tree; got {dest.spec!s:.200}, expected {flat.spec!s:.200}")
    for i, (o, t) in enumerate(zip(dest.tensors, flat.tensors, strict=True)):
        if (o.shape, o.dtype, o.device) != (t.shape, t.dtype, t.device):
            raise ValueError(
                f"{fn}: out leaf {flat.path(i)} is {tuple(o.shape)} {o.dtype} on {o.device}; the result is "
                f"{tuple(t.shape)} {t.dtype} on {t.device}"
            )
        if o.requires_grad:
            raise ValueError(f"{fn}: out leaf {flat.path(i)} requires grad; out= writes outside autograd (pass .detach())")
    if (torch.is_grad_enabled() and any(t.requires_grad for t in flat.tensors)) or is_transformed(flat.tensors):
        raise ValueError(
            f"{fn}: out= is not differentiable; tree has leaves that require grad (use torch.no_grad() or .detach())"
        )
    return dest


def _copy_into(out: Any, result: Any) -> Any:
    for target, value in zip(pytree.tree_leaves(out), pytree.tree_leaves(result), strict=True):
        target.copy_(value)
    return out


def neighbor_mean(
    tree: Any,
    topology: AnyTopology | None,
    step: int = 0,
    *,
    self_weight: float | None = None,
    src_weights: SrcWeights | None = None,
    dst_weights: DstWeights | None = None,
    out: Any = None,
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

    ``out`` (as torch's ``out=``): a tree of ``tree``'s structure, shapes, dtypes and device
    that receives the result instead, and is returned.  When its leaves are views into one
    buffer per dtype at the places of the call's fused layout — as those of a result, or of
    :func:`bluefog_fn.shared_tree` — and share no memory with ``tree``, the combine writes
    straight into them (no output buffer, no copy); otherwise the result is copied into
    them once the exchange is complete, so ``out=tree`` updates ``tree`` in place.  Not
    differentiable.

    Args:
        tree: a pytree of floating tensors (``None`` leaves pass through).
        topology: a static or dynamic ``bf.topology`` graph of ``bf.size()`` ranks.
        step: which graph of a dynamic topology to use (``topology.at(step)``).
        out: where to write the result (see above), or None for fresh output leaves.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> out = bf.neighbor_mean({"w": torch.ones(2, 2)}, bf.topology.exponential_two(bf.size()))
        >>> out["w"].sum().item()
        4.0
    """
    if torch.compiler.is_compiling():
        result = call_mix(
            "neighbor_mean", tree, step, topology, self_weight=self_weight, src_weights=src_weights, dst_weights=dst_weights
        )
        return result if out is None else _copy_into(out, result)
    if self_weight is None and src_weights is None and dst_weights is None and out is None:
        world = current()
        # A call seen before, with nothing to differentiate: the prepared executor (lean path).
        result = world.executor.neighbor_mean_lean(world, tree, topology, step)
        if result is not MISS:
            return result
    return _start_mix(tree, topology, step, self_weight, src_weights, dst_weights, sync=True, out=out).wait()


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
    if torch.compiler.is_compiling():
        return ready(call_collect(
            fn, tree, step, topology, src_weights=src_weights, dst_weights=dst_weights, step_in_graph=step
        ))
    world = current()
    step = check_step(fn, step)
    return world.executor.neighbor_gather(world, tree, topology, step, src_weights, dst_weights)


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
    if torch.compiler.is_compiling():
        return call_collect(  # type: ignore[no-any-return]
            "neighbor_gather", tree, step, topology, src_weights=src_weights, dst_weights=dst_weights, step_in_graph=step
        )
    return neighbor_gather_async(tree, topology, step, src_weights=src_weights, dst_weights=dst_weights).wait()
