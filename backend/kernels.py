"""Compiled weighted-combine kernels.

``combine(x, recv, weights, self_weight, out)`` computes, in one pass over memory,

    out[i] = self_weight · x[i] + Σ_j weights[j] · recv[j, i]

for any number of received rows.  float32/float64 run a Numba kernel that accumulates in float64
(so float32 results are rounded once, not once per neighbour); other floating dtypes fall back to
torch, computing in float32.
"""

from __future__ import annotations

import os

import numba
import numpy as np
import torch

_NUMBA_CACHE = os.environ.get("NUMBA_CACHE_DIR") is not None or os.access(os.path.dirname(__file__), os.W_OK)


@numba.njit(cache=_NUMBA_CACHE, nogil=True, boundscheck=False)
def _combine_nb(x, recv, weights, self_weight, out):  # type: ignore[no-untyped-def]
    n = x.shape[0]
    k = recv.shape[0]
    for i in range(n):
        acc = self_weight * np.float64(x[i])
        for j in range(k):
            acc += weights[j] * np.float64(recv[j, i])
        out[i] = acc


_NUMBA_DTYPES = (torch.float32, torch.float64)


def combine(
    x: torch.Tensor, recv: torch.Tensor, weights: np.ndarray, self_weight: float, out: torch.Tensor
) -> None:
    """``out = self_weight · x + weightsᵀ · recv`` (x, out: 1-D; recv: rows × len(x)); CPU tensors.

    Example:
        >>> import torch, numpy as np
        >>> out = torch.empty(2)
        >>> combine(torch.ones(2), torch.full((1, 2), 3.0), np.array([0.5]), 0.5, out)
        >>> out.tolist()
        [2.0, 2.0]
    """
    if x.dtype in _NUMBA_DTYPES and x.device.type == "cpu":
        _combine_nb(x.numpy(), recv.numpy(), weights, float(self_weight), out.numpy())
        return
    acc = x.to(torch.float32) * self_weight
    for j in range(recv.shape[0]):
        acc.add_(recv[j].to(torch.float32), alpha=float(weights[j]))
    out.copy_(acc)


def warmup() -> None:
    """Compile the kernels for float32 and float64 ahead of the first call."""
    for dtype in _NUMBA_DTYPES:
        x = torch.zeros(1, dtype=dtype)
        combine(x, torch.zeros((1, 1), dtype=dtype), np.ones(1), 1.0, torch.empty_like(x))
