"""Acquire/release access to int64 flags in memory shared between processes.

Plain numpy reads and writes give no ordering guarantee a peer process can rely on (a compiler
or CPU may move a data write after the flag that announces it).  These compiled helpers emit
LLVM atomic loads with acquire and stores with release ordering (the store after a full fence,
so writes made by numpy's non-temporal ``memcpy`` are visible before the flag is).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .kernels import _NUMBA_CACHE


def _load_acquire_typer(typingctx, arr, idx):  # type: ignore[no-untyped-def]
    sig = types.int64(arr, idx)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])  # type: ignore[no-untyped-call]
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


def _store_release_typer(typingctx, arr, idx, val):  # type: ignore[no-untyped-def]
    sig = types.void(arr, idx, val)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])  # type: ignore[no-untyped-call]
        builder.fence("seq_cst")
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


# Typed as Any: mypy cannot see the call signature numba gives an intrinsic.
_load_acquire: Any = intrinsic(_load_acquire_typer)
_store_release: Any = intrinsic(_store_release_typer)


@numba.njit(cache=_NUMBA_CACHE, nogil=True)
def load(flags: np.ndarray, i: int) -> int:
    """``flags[i]`` with acquire ordering: what the writer wrote before storing it is visible."""
    value: int = _load_acquire(flags, i)
    return value


@numba.njit(cache=_NUMBA_CACHE, nogil=True)
def store(flags: np.ndarray, i: int, value: int) -> None:
    """``flags[i] = value`` with release ordering (after every earlier write of this process)."""
    _store_release(flags, i, value)


@numba.njit(cache=_NUMBA_CACHE, nogil=True)
def spin_until_at_least(flags: np.ndarray, i: int, target: int, spins: int) -> int:
    """Re-read ``flags[i]`` (acquire) up to ``spins`` times until it is ``>= target``; returns
    the last value read (the caller paces longer waits and enforces the deadline)."""
    value: int = _load_acquire(flags, i)
    for _ in range(spins):
        if value >= target:
            break
        value = _load_acquire(flags, i)
    return value


def warmup() -> None:
    """Compile the helpers for int64 flag arrays ahead of the first exchange."""
    a = np.zeros(1, dtype=np.int64)
    store(a, 0, 1)
    load(a, 0)
    spin_until_at_least(a, 0, 1, 1)
