"""``shared_tree``: keep a tree where the ranks of this machine read it in place."""

from __future__ import annotations

from typing import Any

from ..tree import flatten
from ..world import current


def shared_tree(tree: Any) -> Any:
    """A copy of ``tree`` whose leaves live in this machine's shared memory.

    ``neighbor_mean`` (and its async form) of such a tree skips writing it into the send buffer:
    peers on this machine read the leaves in place, so a call moves about as many bytes as one
    local pass over ``x``, the peers' ``x`` and the output.  Modify the leaves in place between
    calls (e.g. an optimizer step); do not modify them while an async call of them is in flight.
    Collective: every rank calls it at the same point with a tree of the same structure and
    sizes.  The memory is reused once no leaf of the tree is referenced any more, and bounded
    by ``BLUEFOG_FN_SHM_MAX_MB``; at ``bf.shutdown()`` the leaves are moved to private memory
    (views made of them are not: do not use those after shutdown).
    Where the same-host transport is off, no peer shares the machine or the tree is smaller
    than ``min_tree_bytes`` (1 MiB by default, see ``SharedMemoryPolicy``) it returns a copy in
    private memory, so code using it runs everywhere.  Either way the leaves are views into one
    buffer per dtype in the layout ``neighbor_mean`` uses, so a call with ``out=`` a shared tree
    combines straight into it: two shared trees, each the other's ``out``, make an iteration
    that writes nothing but its result.  Calls of a tree whose size some shared tree has take
    the same-host transport whatever its size threshold.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> x = bf.shared_tree({"w": torch.ones(3)})
        >>> bf.neighbor_mean(x, bf.topology.ring(bf.size()))["w"].tolist()
        [1.0, 1.0, 1.0]
    """
    fn = "shared_tree"
    world = current()
    flat = flatten(tree, fn)
    for i, t in enumerate(flat.tensors):
        if t.device.type != "cpu":
            raise ValueError(f"{fn}: tree leaf {flat.path(i)} is on {t.device}; shared memory holds CPU tensors")
    return world.executor.shared_tree(world, flat)
