"""Compiled weighted-combine kernels.

``combine(x, recv, weights, self_weight, out)`` computes, in one pass over memory,

    out[i] = self_weight · x[i] + Σ_j weights[j] · recv[j, i]

for any number of received rows.  float32/float64 run a Numba kernel that accumulates in float64
(so float32 results are rounded once, not once per neighbour); other floating dtypes fall back to
torch, computing in float32.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numba
import numpy as np
import torch

_NUMBA_CACHE = os.environ.get("NUMBA_CACHE_DIR") is not None or os.access(os.path.dirname(__file__), os.W_OK)


# One kernel per small neighbour count: with the rows as separate 1-D arrays the loop body is a
# straight-line expression LLVM vectorizes (measured 3x faster than a nested loop over a 2-D
# receive buffer).  Every variant evaluates ws·x + w0·r0 + w1·r1 + ... left to right in float64
# and rounds once, so all of them (and the simulator) produce the same bits.
@numba.njit(cache=_NUMBA_CACHE, nogil=True, boundscheck=False)
def _combine0(x, ws, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        out[i] = ws * np.float64(x[i])


@numba.njit(cache=_NUMBA_CACHE, nogil=True, boundscheck=False)
def _combine1(x, r0, w0, ws, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        out[i] = ws * np.float64(x[i]) + w0 * np.float64(r0[i])


@numba.njit(cache=_NUMBA_CACHE, nogil=True, boundscheck=False)
def _combine2(x, r0, r1, w0, w1, ws, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        out[i] = ws * np.float64(x[i]) + w0 * np.float64(r0[i]) + w1 * np.float64(r1[i])


@numba.njit(cache=_NUMBA_CACHE, nogil=True, boundscheck=False)
def _combine3(x, r0, r1, r2, w0, w1, w2, ws, out):  # type: ignore[no-untyped-def]
    for i in range(x.shape[0]):
        out[i] = (
            ws * np.float64(x[i]) + w0 * np.float64(r0[i]) + w1 * np.float64(r1[i]) + w2 * np.float64(r2[i])
        )


@numba.njit(cache=_NUMBA_CACHE, nogil=True, boundscheck=False)
def _combine_many(x, recv, weights, ws, out):  # type: ignore[no-untyped-def]
    n = x.shape[0]
    k = recv.shape[0]
    for i in range(n):
        acc = ws * np.float64(x[i])
        for j in range(k):
            acc += weights[j] * np.float64(recv[j, i])
        out[i] = acc


@numba.njit(cache=_NUMBA_CACHE, nogil=True, boundscheck=False)
def _combine_rows(x, rows, weights, ws, out):  # type: ignore[no-untyped-def]
    # rows: a tuple of separate 1-D arrays (peers' buffers in place); _combine_many's order.
    n = x.shape[0]
    k = len(rows)
    for i in range(n):
        acc = ws * np.float64(x[i])
        for j in range(k):
            acc += weights[j] * np.float64(rows[j][i])
        out[i] = acc


_NUMBA_DTYPES = (torch.float32, torch.float64)


def uses_numba(dtype: torch.dtype) -> bool:
    """Whether :func:`combine_arrays` handles ``dtype`` (else use :func:`combine`'s torch path)."""
    return dtype in _NUMBA_DTYPES


def combine_arrays(
    x: np.ndarray, recv: np.ndarray, weights: Sequence[float], self_weight: float, out: np.ndarray
) -> None:
    """:func:`combine` on numpy float32/float64 arrays (the hot path: no tensor conversions)."""
    if recv.shape[0] > 3:
        _combine_many(x, recv, np.asarray(weights, dtype=np.float64), self_weight, out)
    else:  # the rows of the 2-D buffer, as separate arrays
        combine_rows(x, recv, weights, self_weight, out)  # type: ignore[arg-type]


def combine_rows(
    x: np.ndarray, rows: Sequence[np.ndarray], weights: Sequence[float], self_weight: float, out: np.ndarray
) -> None:
    """:func:`combine_arrays` with the received rows as separate 1-D arrays (float32/float64),
    e.g. peers' buffers read in place; the same arithmetic, so the same bits."""
    k = len(rows)
    if k == 0:
        _combine0(x, self_weight, out)
    elif k == 1:
        _combine1(x, rows[0], weights[0], self_weight, out)
    elif k == 2:
        _combine2(x, rows[0], rows[1], weights[0], weights[1], self_weight, out)
    elif k == 3:
        _combine3(x, rows[0], rows[1], rows[2], weights[0], weights[1], weights[2], self_weight, out)
    else:
        _combine_rows(x, tuple(rows), np.asarray(weights, dtype=np.float64), self_weight, out)


def combine_tensor_rows(
    x: torch.Tensor, rows: Sequence[torch.Tensor], weights: Sequence[float], self_weight: float, out: torch.Tensor
) -> None:
    """:func:`combine`'s torch path (half types) with the rows as separate tensors."""
    acc = x.to(torch.float32) * self_weight
    for r, w in zip(rows, weights, strict=True):
        acc.add_(r.to(torch.float32), alpha=float(w))
    out.copy_(acc)


def combine(
    x: torch.Tensor, recv: torch.Tensor, weights: Sequence[float], self_weight: float, out: torch.Tensor
) -> None:
    """``out = self_weight · x + weightsᵀ · recv`` (x, out: 1-D; recv: rows × len(x)); CPU tensors.

    Example:
        >>> import torch
        >>> out = torch.empty(2)
        >>> combine(torch.ones(2), torch.full((1, 2), 3.0), [0.5], 0.5, out)
        >>> out.tolist()
        [2.0, 2.0]
    """
    if x.dtype in _NUMBA_DTYPES and x.device.type == "cpu":
        combine_arrays(x.numpy(), recv.numpy(), [float(w) for w in weights], float(self_weight), out.numpy())
        return
    # Half types: float32 arithmetic in the same order, one rounding at the end.
    acc = x.to(torch.float32) * self_weight
    for j in range(recv.shape[0]):
        acc.add_(recv[j].to(torch.float32), alpha=float(weights[j]))
    out.copy_(acc)


def warmup() -> None:
    """Compile every kernel variant for float32 and float64 ahead of the first call."""
    for dtype in _NUMBA_DTYPES:
        x = torch.zeros(1, dtype=dtype)
        for k in range(5):
            combine(x, torch.zeros((k, 1), dtype=dtype), [1.0] * k, 1.0, torch.empty_like(x))
