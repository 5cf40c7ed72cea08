"""Global ops: ``global_sum``, ``global_mean``, ``broadcast``, ``allgather``, ``barrier``.

All leaves of a tree travel in one fused buffer per dtype.  float16/bfloat16 are reduced in
float32 (MPI has no half types, and the sum of many halves loses too much).
"""

from __future__ import annotations

from typing import Any

import torch

from ..plan import check_rank_key
from ..tree import flatten
from ..world import current
from .compiled import call_collect, call_mix, ready
from .handle import Handle


def _reduce_async(tree: Any, fn: str, mean: bool) -> Handle[Any]:
    if torch.compiler.is_compiling():
        return ready(call_mix(fn, tree, 0) if mean else call_collect(fn, tree))
    world = current()
    flat = flatten(tree, fn)
    for i, t in enumerate(flat.tensors):
        if t.dtype == torch.bool or (mean and not (t.dtype.is_floating_point or t.dtype.is_complex)):
            raise TypeError(f"{fn}: tree leaf {flat.path(i)} has dtype {t.dtype}, which {fn} does not support")
    return world.executor.reduce(world, fn, flat, mean)


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
    if torch.compiler.is_compiling():
        return call_collect("global_sum", tree)
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
    if torch.compiler.is_compiling():
        return call_mix("global_mean", tree, 0)
    return global_mean_async(tree).wait()


def _check_root(fn: str, root: object, size: int) -> int:
    return check_rank_key(fn, "root", root, size, None)


def broadcast_async(tree: Any, root: int = 0) -> Handle[Any]:
    """Start :func:`broadcast`."""
    fn = "broadcast"
    if torch.compiler.is_compiling():
        return ready(call_collect("broadcast", tree, root=root))
    world = current()
    root = _check_root(fn, root, world.size)
    flat = flatten(tree, fn)
    return world.executor.broadcast(world, flat, root)


def broadcast(tree: Any, root: int = 0) -> Any:
    """Root's ``tree`` on every rank (every rank passes a tree of the same structure and shapes).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.broadcast(torch.tensor([1.0, 2.0]), root=0).tolist()
        [1.0, 2.0]
    """
    if torch.compiler.is_compiling():
        return call_collect("broadcast", tree, root=root)
    return broadcast_async(tree, root).wait()


def allgather_async(tree: Any) -> Handle[Any]:
    """Start :func:`allgather`."""
    fn = "allgather"
    if torch.compiler.is_compiling():
        return ready(call_collect("allgather", tree))
    world = current()
    flat = flatten(tree, fn)
    for i, t in enumerate(flat.tensors):
        if t.dim() == 0:
            raise ValueError(f"allgather: tree leaf {flat.path(i)} is 0-d; allgather concatenates along dim 0")
    return world.executor.allgather(world, flat)


def allgather(tree: Any) -> Any:
    """Every rank's ``tree`` concatenated along dim 0 in rank order (first dims may differ).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.allgather(torch.zeros(2, 3)).shape[0] == 2 * bf.size()
        True
    """
    if torch.compiler.is_compiling():
        return call_collect("allgather", tree)
    return allgather_async(tree).wait()


def barrier_async() -> Handle[None]:
    """Start :func:`barrier`."""
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "barrier cannot run inside torch.compile: it returns nothing, so a compiled graph "
            "would drop it; call bf.barrier() outside the compiled function"
        )
    world = current()
    return world.executor.barrier(world)


def barrier() -> None:
    """Block until every rank reached the barrier (a no-op in a simulated world).

    Example:
        >>> import bluefog_fn as bf
        >>> bf.barrier()
    """
    barrier_async().wait()
