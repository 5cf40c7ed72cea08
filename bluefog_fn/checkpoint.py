"""Checkpoints: ``save`` / ``load`` one rank's training state, ``consensus`` for export.

A checkpoint is one file per rank (put ``{rank}`` in the path: ``"ckpt.{rank}.pt"``).  It is
written **atomically** — into a temporary file in the same directory, flushed and fsynced, then
renamed over the target (and the directory fsynced) — so a crash leaves either the old file or
the new one, never half of one.  It is read **safely**: ``torch.load(weights_only=True)``
rebuilds only tensors, plain containers, numbers, strings and the library's own state classes,
so a crafted file cannot run code while it is loaded (it is refused with
:class:`UnsafeCheckpointError`).

What can be saved: any nesting of dicts, lists, tuples and named tuples of tensors, numbers,
strings, bools and ``None`` — the parameters, every ``bf.optim`` state,
``DecentralizedOptimizer.state_dict()``, ``module.state_dict()``, the step counter.  A live
:class:`bluefog_fn.Window` (inside ``push_sum`` / ``push_diging`` states) is stored as its
numbers (:class:`~bluefog_fn.ops.window.WindowSnapshot`: own value and every slot, so mass in
flight is kept); such a ``save`` is collective.  Loading it needs ``like=`` — a state made by the
same optimizer's ``init`` whose fresh windows are refilled — so mass can never be dropped silently.

Example:
    >>> import os, tempfile, torch, bluefog_fn as bf
    >>> opt = bf.optim.atc(bf.optim.adam(0.1), bf.topology.ring(bf.size()))
    >>> params = {"w": torch.ones(3)}
    >>> state = opt.init(params)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.{rank}.pt")
    >>> bf.checkpoint.save(path, {"params": params, "state": state, "step": 7})
    >>> back = bf.checkpoint.load(path)
    >>> back["step"], torch.equal(back["params"]["w"], params["w"]), type(back["state"]).__name__
    (7, True, 'AtcState')
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import optim
from .ops import global_mean
from .ops.window import Window, WindowSnapshot
from .tree import flatten
from .world import current

__all__ = ["UnsafeCheckpointError", "consensus", "load", "save"]

_FORMAT = "bluefog_fn.checkpoint"
_VERSION = 1

# Classes the loader may rebuild besides torch's defaults (tensors, containers, numbers).
_SAFE: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    optim.AdamState,
    optim.AllreduceState,
    optim.AtcState,
    optim.AwcState,
    optim.ExactDiffusionState,
    optim.GradientTrackingState,
    optim.PushDigingState,
    optim.PushSumState,
    optim.SgdState,
    WindowSnapshot,
]
# Registered once, process-wide, as bf.optim does for its states: torch's scoped
# `safe_globals` context manager un-registers on exit even what was registered before it.
torch.serialization.add_safe_globals(_SAFE)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file asked to rebuild something other than plain data (it was not loaded)."""


def _resolve(fn: str, path: object) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    text = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise ValueError(f"{fn}: path must be a non-empty file name, got {path!r}")
    return text.replace("{rank}", str(current().rank))


def _is_window(x: object) -> bool:
    return isinstance(x, (Window, WindowSnapshot))


def save(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` to ``path`` atomically (temp file + fsync + rename).

    Args:
        path: the file; ``{rank}`` in it is replaced by this rank (one file per rank).
        obj: a tree of tensors and plain values (see the module docstring); any
            :class:`bluefog_fn.Window` in it is stored as its :meth:`~bluefog_fn.Window.snapshot`,
            which makes this call collective (every rank saves the same structure together).

    Example:
        >>> import os, tempfile, torch, bluefog_fn as bf
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> bf.checkpoint.save(path, {"w": torch.zeros(2), "step": 3})
        >>> sorted(os.listdir(os.path.dirname(path)))
        ['w.pt']
    """
    fn = "checkpoint.save"
    target = _resolve(fn, path)
    world = current()
    leaves, spec = pytree.tree_flatten(obj, is_leaf=_is_window)
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, WindowSnapshot):
            raise TypeError(f"{fn}: obj leaf {i} is a WindowSnapshot; save the live Window (or restore it first)")
        if isinstance(leaf, Window):
            leaves[i] = leaf.snapshot()
    payload = {
        "format": _FORMAT,
        "version": _VERSION,
        "rank": world.rank,
        "size": world.size,
        "backend": world.backend,
        "tree": pytree.tree_unflatten(leaves, spec),
    }
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(target) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike[str], *, like: Any = None, map_location: Any = None) -> Any:
    """Read what :func:`save` wrote, without running any code from the file.

    Args:
        path: the file; ``{rank}`` is replaced by this rank.
        like: a tree of the saved structure, needed when the checkpoint holds windows:
            typically ``opt.init(params)`` of the same ``push_sum``/``push_diging`` optimizer.
            Its windows are refilled from the file (collective) and returned in place of the
            snapshots; its tensors give each loaded tensor's device.  Optional otherwise (then
            shapes and dtypes are checked against it).
        map_location: passed to ``torch.load`` (e.g. ``"cpu"``).

    Returns:
        The saved tree.

    Raises:
        UnsafeCheckpointError: the file would rebuild a class that is not plain data.
        ValueError: not a bluefog_fn checkpoint, windows without ``like``, or ``like`` does
            not match.

    Example:
        >>> import os, tempfile, torch, bluefog_fn as bf
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> bf.checkpoint.save(path, [torch.arange(3), 0.5])
        >>> bf.checkpoint.load(path)
        [tensor([0, 1, 2]), 0.5]
    """
    fn = "checkpoint.load"
    source = _resolve(fn, path)
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{fn}: refused {source!r}: it asks to rebuild objects that are not plain data, so it was "
            f"not loaded (files are read with torch.load(weights_only=True); a class of your own must be "
            f"allowed with torch.serialization.add_safe_globals). Detail: {str(e).splitlines()[0]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{fn}: {source!r} is not a bluefog_fn checkpoint (written by bf.checkpoint.save)")
    if payload.get("version") != _VERSION:
        raise ValueError(f"{fn}: {source!r} has checkpoint version {payload.get('version')!r}; this library reads {_VERSION}")
    tree = payload["tree"]
    leaves, spec = pytree.tree_flatten(tree, is_leaf=_is_window)
    if like is None:
        if any(isinstance(x, WindowSnapshot) for x in leaves):
            raise ValueError(
                f"{fn}: {source!r} holds the contents of one-sided windows (a push_sum/push_diging state); "
                "pass like=opt.init(params) so the windows are recreated and refilled, no mass lost"
            )
        return tree
    like_leaves, like_spec = pytree.tree_flatten(like, is_leaf=_is_window)
    if like_spec != spec:
        raise ValueError(f"{fn}: like must have the saved structure {spec}, got {like_spec}")
    paths = [pytree.keystr(p) or "<root>" for p, _ in pytree.tree_flatten_with_path(like, is_leaf=_is_window)[0]]
    out: list[Any] = []
    for where, saved, template in zip(paths, leaves, like_leaves, strict=True):
        if isinstance(template, Window):
            if not isinstance(saved, WindowSnapshot):
                raise ValueError(f"{fn}: like has a Window at {where} but the file has {type(saved).__name__}")
            template.restore(saved)
            out.append(template)
        elif isinstance(template, torch.Tensor):
            if not isinstance(saved, torch.Tensor) or saved.shape != template.shape or saved.dtype != template.dtype:
                got = (tuple(saved.shape), saved.dtype) if isinstance(saved, torch.Tensor) else type(saved).__name__
                raise ValueError(
                    f"{fn}: leaf {where} of like is a {tuple(template.shape)} {template.dtype} tensor, the file has {got}"
                )
            out.append(saved.to(template.device))
        else:
            out.append(saved)
    return pytree.tree_unflatten(out, spec)


def consensus(tree: Any) -> Any:
    """The global average of ``tree`` over all agents: the model to export (collective).

    Decentralized training leaves every agent with a slightly different model; their mean is
    the one to evaluate or ship.  On MPI every rank receives it (:func:`bluefog_fn.global_mean`);
    inside ``bf.simulate(n)`` the stacked tree is averaged over the agent dimension and
    returned **without** it (one model).

    Args:
        tree: a tree of floating-point tensors (``None`` leaves pass through).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> with bf.simulate(4):
        ...     bf.checkpoint.consensus({"w": torch.arange(4.0).reshape(4, 1)})["w"].tolist()
        [1.5]
    """
    flatten(tree, "checkpoint.consensus")
    world = current()
    return world.executor.one_agent(world, global_mean(tree))
