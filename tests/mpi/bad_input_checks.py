"""How a bad call is judged, shared by the one-process and the MPI bad-input suites.

A call is rejected correctly when it raises ``TypeError`` or ``ValueError`` whose message names
the function, the argument and the value, without touching the transport (no message, no
agreement round, no one-sided operation), and without modifying any of its inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.world import current

from .bad_input_table import Bad, Entry, _tree

_SENDS = ("exchange", "allreduce_sum", "allreduce_max", "bcast", "allgatherv", "barrier", "allgather_object", "window_create",
          "put", "accumulate", "get", "swap", "free", "mutex_acquire", "mutex_release")


class Counting:
    """Wraps a transport (or a window's handle) and records every call that communicates."""

    def __init__(self, inner: Any, calls: list[str]) -> None:
        self._inner = inner
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in _SENDS or not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._calls.append(name)
            return attr(*args, **kwargs)

        return counted


@contextlib.contextmanager
def counting(windows: list[bf.Window]) -> Iterator[list[str]]:
    """Every transport and window-handle call made inside the block."""
    calls: list[str] = []
    executor: Any = current().executor
    saved_transport = getattr(executor, "transport", None)
    engines: list[Any] = [w._engine for w in windows]
    saved_handles = [getattr(e, "handle", None) for e in engines]
    if saved_transport is not None:
        executor.transport = Counting(saved_transport, calls)
    for e, h in zip(engines, saved_handles, strict=True):
        if h is not None:
            e.handle = Counting(h, calls)
    try:
        yield calls
    finally:
        if saved_transport is not None:
            executor.transport = saved_transport
        for e, h in zip(engines, saved_handles, strict=True):
            if h is not None:
                e.handle = h


def tensors_of(args: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, value in args.items():
        if name == "self":
            continue
        for path, leaf in pytree.tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                out.append((name + pytree.keystr(path), leaf))
    return out


def snapshot(args: dict[str, Any]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return [(k, t, t.detach().clone()) for k, t in tensors_of(args)]


def assert_unchanged(saved: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
    changed = [k for k, t, copy in saved if not torch.equal(t.detach(), copy)]
    assert not changed, f"inputs modified: {changed}"


def check_rejected(entry: Entry, arg: str, b: Bad, ctx: dict[str, Any]) -> str:
    """Call ``entry`` with ``arg=b.value``; returns the message after checking it."""
    args = entry.good(ctx)
    args[arg] = b.value
    saved = snapshot(args)
    with counting(ctx["windows"]) as calls, pytest.raises((TypeError, ValueError)) as info:
        entry.call(args)
    message = str(info.value)
    assert f"{entry.says}" in message, f"{entry.name}: message does not name the function: {message!r}"
    named = entry.arg_names.get(arg, arg)
    assert named in message, f"{entry.name}: message does not name the argument {named!r}: {message!r}"
    assert b.shows in message, f"{entry.name}({arg}={b.value!r}): message does not show {b.shows!r}: {message!r}"
    assert calls == [], f"{entry.name}: communicated before rejecting {arg}={b.value!r}: {calls}"
    assert_unchanged(saved)
    return message


def make_context(tmp: Path) -> dict[str, Any]:
    """The live objects the table's entries use (collective: windows are created)."""
    n = bf.size()
    window = bf.Window(_tree(), T.ring(n))
    opt = bf.optim.gradient_tracking(bf.optim.sgd(0.1), T.ring(n))
    params = {"w": torch.ones(3)}
    module = torch.nn.Linear(2, 1)
    saved = tmp / "saved.pt"
    bf.checkpoint.save(saved, {"w": torch.ones(1)})
    return {
        "window": window,
        "windows": [window],
        "opt": opt,
        "params": params,
        "state": opt.init(params),
        "module": module,
        "torch_opt": torch.optim.SGD(module.parameters(), lr=0.1),
        "tmp": tmp,
        "saved": saved,
    }


def release(result: Any) -> None:
    """Free windows a good call created (collective)."""
    for leaf in pytree.tree_leaves(result, is_leaf=lambda x: isinstance(x, bf.Window)):
        if isinstance(leaf, bf.Window):
            leaf.free()
