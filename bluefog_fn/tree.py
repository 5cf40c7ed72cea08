"""The one pytree convention of the library (``torch.utils._pytree``).

Leaves are tensors.  ``None`` leaves are carried through untouched and never communicated, so
optional entries (a missing bias, say) do not need special casing.  Anything else that is not a
tensor is an error naming its key path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

TreeSpec = pytree.TreeSpec


@dataclass(frozen=True)
class LeafMeta:
    """The abstract value of one tensor leaf: what a plan depends on."""

    path: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Flat:
    """A flattened tree: the tensor leaves, their metadata, and how to rebuild the tree."""

    spec: TreeSpec
    tensors: tuple[torch.Tensor, ...]
    metas: tuple[LeafMeta, ...]
    # Position of each tensor in the full leaf list; the other positions hold None.
    positions: tuple[int, ...]
    n_leaves: int

    def unflatten(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
        """Rebuild the tree with ``tensors`` in place of the tensor leaves."""
        leaves: list[Any] = [None] * self.n_leaves
        for pos, t in zip(self.positions, tensors, strict=True):
            leaves[pos] = t
        return pytree.tree_unflatten(leaves, self.spec)


def flatten(tree: Any, fn: str, arg: str = "tree") -> Flat:
    """Flatten ``tree``; raise ``TypeError`` naming ``fn``, ``arg`` and the key path of a bad leaf.

    Example:
        >>> import torch
        >>> flat = flatten({"w": torch.zeros(2, 3), "b": None}, "example")
        >>> [m.path for m in flat.metas], flat.metas[0].shape
        (["['w']"], (2, 3))
    """
    with_path, spec = pytree.tree_flatten_with_path(tree)
    tensors: list[torch.Tensor] = []
    metas: list[LeafMeta] = []
    positions: list[int] = []
    for pos, (keypath, leaf) in enumerate(with_path):
        if leaf is None:
            continue
        path = pytree.keystr(keypath) or "<root>"
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{fn}: {arg} leaf at {path} must be a torch.Tensor or None, got "
                f"{type(leaf).__name__} {leaf!r:.60}"
            )
        tensors.append(leaf)
        metas.append(LeafMeta(path, tuple(leaf.shape), leaf.dtype, leaf.device))
        positions.append(pos)
    return Flat(spec, tuple(tensors), tuple(metas), tuple(positions), len(with_path))
