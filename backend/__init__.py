"""Execution engine of bluefog-fn, imported as ``bluefog_fn.backend``.

The backend moves bytes and combines buffers; it knows nothing about pytrees, topologies or
optimizers.  Three pieces:

* ``transport`` — the :class:`Transport` protocol every communicator implements (two-sided
  exchanges, collectives, and one-sided :class:`WindowHandle` memory)
  (:mod:`.local` for a world of one, :mod:`.mpi` — the only module that imports mpi4py);
* :mod:`.buffers` — fused contiguous buffers and reusable pinned host staging for CUDA tensors;
* :mod:`.kernels` — Numba-compiled weighted-combine kernels.
"""

from __future__ import annotations

from .errors import CommError, CommTimeoutError, MismatchError
from .transport import ExchangePending, Pending, Transport, WindowHandle

__all__ = [
    "CommError",
    "CommTimeoutError",
    "ExchangePending",
    "MismatchError",
    "Pending",
    "Transport",
    "WindowHandle",
]
