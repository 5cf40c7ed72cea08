"""The one pytree convention of the library (``torch.utils._pytree``).

Leaves are tensors.  ``None`` leaves are carried through untouched and never communicated, so
optional entries (a missing bias, say) do not need special casing.  Anything else that is not a
tensor is an error naming its key path.

Flattening is on every call's hot path, so key paths (only needed for plans and error messages)
are computed lazily and cached per tree structure.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

TreeSpec = pytree.TreeSpec

_PATHS: OrderedDict[TreeSpec, tuple[str, ...]] = OrderedDict()
_PATHS_MAX = 256


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


def _paths(tree: Any, spec: TreeSpec) -> tuple[str, ...]:
    """Key path of every leaf position of ``spec`` (cached per structure)."""
    paths = _PATHS.get(spec)
    if paths is None:
        with_path, _ = pytree.tree_flatten_with_path(tree)
        paths = tuple(pytree.keystr(kp) or "<root>" for kp, _ in with_path)
        _PATHS[spec] = paths
        if len(_PATHS) > _PATHS_MAX:
            _PATHS.popitem(last=False)
    return paths


class Flat:
    """A flattened tree: its tensor leaves and how to rebuild the tree around new ones."""

    __slots__ = ("_metas", "_tree", "key", "n_leaves", "positions", "spec", "tensors")

    def __init__(self, tree: Any, spec: TreeSpec, tensors: tuple[torch.Tensor, ...], positions: tuple[int, ...], n_leaves: int) -> None:
        self._tree = tree
        self.spec = spec
        self.tensors = tensors
        self.positions = positions
        self.n_leaves = n_leaves
        # What a plan depends on; cheap to build and to hash, used as the cache key.
        self.key: tuple[Any, ...] = (spec, tuple((t.shape, t.dtype, t.device) for t in tensors))
        self._metas: tuple[LeafMeta, ...] | None = None

    @property
    def tree(self) -> Any:
        """The tree this was flattened from."""
        return self._tree

    def path(self, i: int) -> str:
        """Key path of the i-th tensor leaf, e.g. ``['layer'][0].weight``."""
        return _paths(self._tree, self.spec)[self.positions[i]]

    @property
    def metas(self) -> tuple[LeafMeta, ...]:
        """Per tensor leaf: path, shape, dtype, device."""
        if self._metas is None:
            paths = _paths(self._tree, self.spec)
            self._metas = tuple(
                LeafMeta(paths[p], tuple(t.shape), t.dtype, t.device)
                for p, t in zip(self.positions, self.tensors, strict=True)
            )
        return self._metas

    def unflatten(self, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> Any:
        """Rebuild the tree with ``tensors`` in place of the tensor leaves."""
        if len(self.positions) == self.n_leaves:
            return pytree.tree_unflatten(list(tensors), self.spec)
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
    leaves, spec = pytree.tree_flatten(tree)
    tensors: list[torch.Tensor] = []
    positions: list[int] = []
    for pos, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
            positions.append(pos)
        elif leaf is not None:
            path = _paths(tree, spec)[pos]
            raise TypeError(
                f"{fn}: {arg} leaf at {path} must be a torch.Tensor or None, got "
                f"{type(leaf).__name__} {leaf!r:.60}"
            )
    if tensors:
        first = tensors[0].device
        if any(t.device != first for t in tensors):
            paths = _paths(tree, spec)
            where = {paths[p]: str(t.device) for p, t in zip(positions, tensors, strict=True)}
            raise ValueError(f"{fn}: {arg} leaves must all be on one device, got {where}")
    return Flat(tree, spec, tuple(tensors), tuple(positions), len(leaves))
