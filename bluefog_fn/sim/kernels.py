"""Stacked mixing kernels: every simulated agent's weighted combine in one pass over memory.

For agents ``i = 0..n-1`` with in-neighbours ``j_{i,0} < j_{i,1} < …`` (the order of the plan's
``recvs``), receive weights ``w_{i,l}`` and sender-side scales ``s_{i,l}``,

.. math::

    \\text{out}_i = \\Bigl(\\bigl(w_{ii} x_i + w_{i,0}\\,[s_{i,0} x_{j_{i,0}}]\\bigr)
                    + w_{i,1}\\,[s_{i,1} x_{j_{i,1}}]\\Bigr) + …

where ``[s·x]`` is rounded to the leaf's dtype (the sender scales before sending) and the sum is
accumulated in float64 and rounded once.  That is, term for term and in the same order, what
:func:`bluefog_fn.backend.kernels.combine` computes on each MPI rank, so float32/float64 results
of the simulator are bitwise identical to the MPI backend's.

The data structure is "padded in-neighbour lists" (``idx[i, l]``, ``w[i, l]``, ``s[i, l]`` for
``l < deg[i]``): the cost is proportional to edges × model size, never n² × model size.

Two executors:

* a Numba kernel (float32/float64 on CPU), parallel over (column block, agent) tasks for large
  inputs (serial below ~1 M elements, where starting threads costs more than it saves); agents
  with at most 4 in-neighbours and no sender scales take a single streaming pass
  (out = a·x + b·y + …), the others accumulate in an L1-resident float64 chunk, 4 terms a pass;
* a torch path (CUDA tensors, float16/bfloat16) doing the same arithmetic layer by layer with
  gathers; halves are combined in float32 as the MPI backend does.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import prange

# float64 accumulator chunk: 2048 × 8 B = 16 KiB, so the accumulator stays in L1 while each
# in-neighbour's slice streams through it.
_CHUNK = 2048
# Columns per parallel task.  Tasks run column block by column block (all agents of block b,
# then b + 1): one block of every agent's row (64 × 32 KiB of float32) stays in L2/L3 while the
# agents that read it as an in-neighbour run, so each row comes from DRAM about once whatever
# the degree.  Measured on 64 × 1 M float32, static exp-2: 2^13 is ~15 % faster than 2^16.
_BLOCK = 1 << 13

_NUMBA_CACHE = os.environ.get("NUMBA_CACHE_DIR") is not None or os.access(os.path.dirname(__file__), os.W_OK)

# Numba's default "workqueue" threading layer must not be entered by two Python threads at once.
_LOCK = threading.Lock()

NUMBA_DTYPES = (torch.float32, torch.float64)


@numba.njit(nogil=True, boundscheck=False, inline="always", cache=_NUMBA_CACHE)
def _self_plus(dst, xi, a, y0, b0, y1, b1, y2, b2, y3, b3, g):  # type: ignore[no-untyped-def]
    # dst = a·x + (up to 4 terms), left to right; one straight-line loop per term count so LLVM
    # vectorizes it (a loop over a variable number of rows would not be).
    k = dst.shape[0]
    if g == 0:
        for e in range(k):
            dst[e] = a * np.float64(xi[e])
    elif g == 1:
        for e in range(k):
            dst[e] = a * np.float64(xi[e]) + b0 * np.float64(y0[e])
    elif g == 2:
        for e in range(k):
            dst[e] = a * np.float64(xi[e]) + b0 * np.float64(y0[e]) + b1 * np.float64(y1[e])
    elif g == 3:
        for e in range(k):
            dst[e] = a * np.float64(xi[e]) + b0 * np.float64(y0[e]) + b1 * np.float64(y1[e]) + b2 * np.float64(y2[e])
    else:
        for e in range(k):
            dst[e] = (
                a * np.float64(xi[e]) + b0 * np.float64(y0[e]) + b1 * np.float64(y1[e])
                + b2 * np.float64(y2[e]) + b3 * np.float64(y3[e])
            )


@numba.njit(nogil=True, boundscheck=False, inline="always", cache=_NUMBA_CACHE)
def _acc_plus(dst, acc, y0, b0, y1, b1, y2, b2, y3, b3, g):  # type: ignore[no-untyped-def]
    # dst = acc + (1 to 4 terms), left to right.
    k = dst.shape[0]
    if g == 1:
        for e in range(k):
            dst[e] = acc[e] + b0 * np.float64(y0[e])
    elif g == 2:
        for e in range(k):
            dst[e] = acc[e] + b0 * np.float64(y0[e]) + b1 * np.float64(y1[e])
    elif g == 3:
        for e in range(k):
            dst[e] = acc[e] + b0 * np.float64(y0[e]) + b1 * np.float64(y1[e]) + b2 * np.float64(y2[e])
    else:
        for e in range(k):
            dst[e] = acc[e] + b0 * np.float64(y0[e]) + b1 * np.float64(y1[e]) + b2 * np.float64(y2[e]) + b3 * np.float64(y3[e])


@numba.njit(nogil=True, boundscheck=False, inline="always", cache=_NUMBA_CACHE)
def _span(x, out, sw, deg, idx, w, s, scaled, i, lo, hi, acc):  # type: ignore[no-untyped-def]
    # Agent i's columns [lo, hi).  Slices (not offset arithmetic) keep indices provably
    # non-negative, which lets LLVM drop Numba's wraparound checks and vectorize the loops.
    a = sw[i]
    d = deg[i]
    xi = x[i, lo:hi]
    oi = out[i, lo:hi]
    k = hi - lo
    if scaled:
        # Per-call graphs with sender scales (rare): one term at a time.
        for c0 in range(0, k, _CHUNK):
            c = min(k - c0, _CHUNK)
            src = xi[c0 : c0 + c]
            for e in range(c):
                acc[e] = a * np.float64(src[e])
            for q in range(d):
                src = x[idx[i, q], lo + c0 : lo + c0 + c]
                b = w[i, q]
                # s has x's dtype: the product is rounded to it, like the sender's x * scale.
                sl = s[i, q]
                for e in range(c):
                    acc[e] += b * np.float64(src[e] * sl)
            dst = oi[c0 : c0 + c]
            for e in range(c):
                dst[e] = acc[e]
    elif d <= 4:
        # One streaming pass straight into the output (measured: a single pass over 5 input
        # streams beats an accumulator chunk, which costs an extra pass over L1).
        y0 = x[idx[i, 0], lo:hi] if d > 0 else xi
        y1 = x[idx[i, 1], lo:hi] if d > 1 else xi
        y2 = x[idx[i, 2], lo:hi] if d > 2 else xi
        y3 = x[idx[i, 3], lo:hi] if d > 3 else xi
        b0 = w[i, 0] if d > 0 else 0.0
        b1 = w[i, 1] if d > 1 else 0.0
        b2 = w[i, 2] if d > 2 else 0.0
        b3 = w[i, 3] if d > 3 else 0.0
        _self_plus(oi, xi, a, y0, b0, y1, b1, y2, b2, y3, b3, d)
    else:
        # Self and 4 in-neighbours into an L1-resident float64 chunk, then 4 at a time, the last
        # group into the output: ``acc + t0 + t1 + …`` still adds left to right (MPI's order).
        for c0 in range(0, k, _CHUNK):
            c = min(k - c0, _CHUNK)
            base = lo + c0
            stop = base + c
            ac = acc[:c]
            _self_plus(
                ac, xi[c0 : c0 + c], a, x[idx[i, 0], base:stop], w[i, 0], x[idx[i, 1], base:stop], w[i, 1],
                x[idx[i, 2], base:stop], w[i, 2], x[idx[i, 3], base:stop], w[i, 3], 4,
            )
            q = 4
            while q < d:
                g = min(4, d - q)
                y0 = x[idx[i, q], base:stop]
                y1 = x[idx[i, q + 1], base:stop] if g > 1 else y0
                y2 = x[idx[i, q + 2], base:stop] if g > 2 else y0
                y3 = x[idx[i, q + 3], base:stop] if g > 3 else y0
                b1 = w[i, q + 1] if g > 1 else 0.0
                b2 = w[i, q + 2] if g > 2 else 0.0
                b3 = w[i, q + 3] if g > 3 else 0.0
                if q + g == d:
                    _acc_plus(oi[c0 : c0 + c], ac, y0, w[i, q], y1, b1, y2, b2, y3, b3, g)
                else:
                    _acc_plus(ac, ac, y0, w[i, q], y1, b1, y2, b2, y3, b3, g)
                q += g


@numba.njit(parallel=True, nogil=True, boundscheck=False, cache=_NUMBA_CACHE)
def _mix_nb(x, out, sw, deg, idx, w, s, scaled):  # type: ignore[no-untyped-def]
    n, m = x.shape
    blocks = (m + _BLOCK - 1) // _BLOCK
    for t in prange(n * blocks):
        # Column-block-major: consecutive tasks (one thread's share) are all agents' slices of
        # one column block, so each row slice comes from memory once and its other readers
        # (the agents it is an in-neighbour of) find it in cache.
        b = t // n
        i = t - b * n
        lo = b * _BLOCK
        hi = min(m, lo + _BLOCK)
        acc = np.empty(_CHUNK, np.float64)
        _span(x, out, sw, deg, idx, w, s, scaled, i, lo, hi, acc)


@numba.njit(nogil=True, boundscheck=False, cache=_NUMBA_CACHE)
def _mix_serial(x, out, sw, deg, idx, w, s, scaled):  # type: ignore[no-untyped-def]
    # Same tasks in order, one thread: starting the parallel pool costs ~0.1-1 ms, more than a
    # small model takes.
    n, m = x.shape
    acc = np.empty(_CHUNK, np.float64)
    for i in range(n):
        _span(x, out, sw, deg, idx, w, s, scaled, i, 0, m, acc)


# Below this many elements (n × row length) the serial kernel is faster than the parallel one.
_PARALLEL_MIN = 1 << 20


@dataclass(frozen=True)
class MixArrays:
    """The stacked form of n agents' plans: padded in-neighbour lists (see the module docstring).

    ``idx``, ``w`` and ``s`` have shape ``(n, max(1, max_deg))``; entries at ``l >= deg[i]`` are
    padding and never read.
    """

    sw: np.ndarray  # (n,) float64 self weights
    deg: np.ndarray  # (n,) int64 in-degrees
    idx: np.ndarray  # (n, L) int64 in-neighbours in increasing rank order
    w: np.ndarray  # (n, L) float64 receive weights
    s: np.ndarray  # (n, L) float64 sender-side scales
    scaled: bool  # any s != 1 (only per-call graphs with dst_weights scales)

    @property
    def n(self) -> int:
        return int(self.sw.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.deg.sum())


def mix_numba(arrays: MixArrays, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out = W x`` for C-contiguous CPU float32/float64 ``x``, ``out`` of shape ``(n, m)``."""
    xa = x.numpy()
    s = arrays.s.astype(xa.dtype)  # the sender's scale in the leaf's dtype, as on MPI
    if xa.size < _PARALLEL_MIN:
        _mix_serial(xa, out.numpy(), arrays.sw, arrays.deg, arrays.idx, arrays.w, s, arrays.scaled)
        return
    with _LOCK:
        _mix_nb(xa, out.numpy(), arrays.sw, arrays.deg, arrays.idx, arrays.w, s, arrays.scaled)


@dataclass(frozen=True)
class TorchLayer:
    """The l-th in-neighbour of every agent that has one, as tensors on one device."""

    rows: torch.Tensor | None  # receiving agents (None: all of them)
    src: torch.Tensor  # their l-th in-neighbour
    w: torch.Tensor  # (len(rows), 1) receive weights, in the accumulation dtype
    s: torch.Tensor | None  # (len(rows), 1) sender scales (None when all are 1)


def torch_layers(arrays: MixArrays, device: torch.device, acc: torch.dtype, scale: torch.dtype) -> tuple[torch.Tensor, list[TorchLayer]]:
    """Self weights and per-layer gathers for :func:`mix_torch` on ``device``."""
    n = arrays.n
    sw = torch.tensor(arrays.sw, dtype=torch.float64).to(acc).to(device).unsqueeze(1)
    layers = []
    width = int(arrays.deg.max()) if n else 0
    for layer in range(width):
        rows_np = np.nonzero(arrays.deg > layer)[0]
        rows = None if len(rows_np) == n else torch.from_numpy(rows_np).to(device)
        src = torch.from_numpy(arrays.idx[rows_np, layer].copy()).to(device)
        w = torch.tensor(arrays.w[rows_np, layer], dtype=torch.float64).to(acc).to(device).unsqueeze(1)
        s_np = arrays.s[rows_np, layer]
        s = None if bool(np.all(s_np == 1.0)) else torch.tensor(s_np, dtype=torch.float64).to(scale).to(device).unsqueeze(1)
        layers.append(TorchLayer(rows, src, w, s))
    return sw, layers


def acc_dtype(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """``(accumulation dtype, sender-scale dtype)`` for a leaf dtype, matching the MPI backend."""
    if dtype in NUMBA_DTYPES:
        return torch.float64, dtype
    # Halves: the MPI kernel combines in float32, and torch scales a half by a float32 scalar.
    return torch.float32, torch.float32


def mix_torch(sw: torch.Tensor, layers: list[TorchLayer], x: torch.Tensor, out: torch.Tensor) -> None:
    """``out = W x`` with torch ops, layer by layer (any device, any floating dtype)."""
    acc_t = sw.dtype
    acc = x.to(acc_t) * sw
    for layer in layers:
        y = x.index_select(0, layer.src)
        if layer.s is not None:
            y = (y * layer.s).to(x.dtype)  # rounded to the leaf dtype, as the sender does
        term = y.to(acc_t) * layer.w
        if layer.rows is None:
            acc += term
        else:
            # Rows are distinct, so this index_put is deterministic (no accumulation races).
            acc[layer.rows] = acc.index_select(0, layer.rows) + term
    out.copy_(acc)
