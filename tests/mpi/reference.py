"""Deterministic per-rank data and dense float64 references (every rank can build every rank's)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def rank_tree(rank: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """A small nested tree whose values depend on (seed, rank); same on every process."""
    g = torch.Generator().manual_seed(1000 * seed + rank)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)

    return {"w": r(3, 4), "b": r(4), "scalar": r(), "nested": [r(2, 2, 2), (r(5), None)], "empty": r(0, 3)}


def dense_mix(W: torch.Tensor, trees: list[Any], me: int) -> Any:
    """Row ``me`` of ``W @ X`` leaf by leaf, in float64."""
    flats = [pytree.tree_flatten(t) for t in trees]
    spec = flats[0][1]
    out = []
    for k, leaf in enumerate(flats[0][0]):
        if leaf is None:
            out.append(None)
            continue
        acc = torch.zeros(leaf.shape, dtype=torch.float64)
        for j in range(len(trees)):
            acc += W[me, j] * flats[j][0][k].to(torch.float64)
        out.append(acc)
    return pytree.tree_unflatten(out, spec)


def leaves(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if x is not None]
