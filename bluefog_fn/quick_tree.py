"""A fast flatten/rebuild for the trees most calls pass: tensors, ``None`` and plain
``dict``/``list``/``tuple`` nests of them.

:func:`bluefog_fn.tree.flatten` goes through ``torch.utils._pytree`` (tens of microseconds for a
small tree); a cached call on a small tree must cost a few microseconds in total, so the lean path
(:mod:`bluefog_fn.executors.prepared`) describes such trees with a hashable *structure key* of its
own and rebuilds results from it.  The leaf order is ``torch.utils._pytree``'s (dicts in insertion
order, sequences in order), so results are the trees the regular path returns.  Anything else
(namedtuples, ``OrderedDict``, registered node types, non-tensor leaves) returns ``None`` and takes
the regular path.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Any

import torch

_LEAF = "T"


def quick_flatten(tree: Any) -> tuple[Hashable, list[torch.Tensor]] | None:
    """``(structure key, tensor leaves)``, or ``None`` when the tree is not a plain nest.

    Example:
        >>> import torch
        >>> key, leaves = quick_flatten({"w": torch.zeros(2), "b": None})
        >>> key, len(leaves)
        (('d', ('w', 'b'), ('T', None)), 1)
    """
    leaves: list[torch.Tensor] = []
    key = _walk(tree, leaves)
    return None if key is _UNSUPPORTED else (key, leaves)


class _Unsupported:
    pass


_UNSUPPORTED: Any = _Unsupported()


def _walk(node: Any, leaves: list[torch.Tensor]) -> Any:
    kind = type(node)
    if kind is torch.Tensor or kind is torch.nn.Parameter:
        leaves.append(node)
        return _LEAF
    if node is None:
        return None
    if kind is dict:
        children = tuple(_walk(v, leaves) for v in node.values())
        return _UNSUPPORTED if _UNSUPPORTED in children else ("d", tuple(node), children)
    if kind is list or kind is tuple:
        children = tuple(_walk(v, leaves) for v in node)
        return _UNSUPPORTED if _UNSUPPORTED in children else ("l" if kind is list else "t", children)
    return _UNSUPPORTED


def quick_rebuild(key: Hashable, leaves: Iterator[torch.Tensor]) -> Any:
    """The tree of structure ``key`` with the next tensors of ``leaves`` in its tensor leaves.

    Example:
        >>> import torch
        >>> quick_rebuild(("d", ("w", "b"), ("T", None)), iter([torch.ones(1)]))
        {'w': tensor([1.]), 'b': None}
    """
    if key == _LEAF:
        return next(leaves)
    if key is None:
        return None
    assert isinstance(key, tuple)
    if key[0] == "d":
        return {k: quick_rebuild(c, leaves) for k, c in zip(key[1], key[2], strict=True)}
    children = [quick_rebuild(c, leaves) for c in key[1]]
    return children if key[0] == "l" else tuple(children)
