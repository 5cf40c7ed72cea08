"""Host buffers: byte views for transport and reusable pinned staging for CUDA tensors."""

from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import torch

# The numpy dtype a tensor's bytes travel as (bfloat16 has none: its bytes go as int16).
_NUMPY_OF: dict[torch.dtype, type] = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.uint8,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}


def host_array(t: torch.Tensor) -> np.ndarray:
    """A numpy view (no copy) of a contiguous CPU tensor, for the transport.

    bfloat16 has no numpy dtype; its bytes travel as int16, which is all point-to-point needs.
    """
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t.numpy()


class PinnedStaging:
    """Reusable page-locked host buffers for CUDA tensors, handed out one owner at a time.

    CUDA tensors are copied into these before MPI sees them (the MPI here is not CUDA-aware).
    Pinning is far more expensive than the copy, so buffers are kept: ``acquire`` takes one off the
    free list (or pins a new one) and ``release`` puts it back once the exchange that used it has
    completed, so an async op in flight never shares its staging with a later call.  At most
    ``max_free`` buffers are kept.
    """

    def __init__(self, max_free: int = 16) -> None:
        self.max_free = max_free
        self._free: OrderedDict[tuple[torch.dtype, int], list[torch.Tensor]] = OrderedDict()
        self.pinned = 0

    def acquire(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A 1-D pinned (when CUDA is available) host tensor nobody else holds."""
        stack = self._free.get((dtype, numel))
        if stack:
            return stack.pop()
        self.pinned += 1
        return torch.empty(numel, dtype=dtype, pin_memory=torch.cuda.is_available())

    def release(self, buf: torch.Tensor) -> None:
        """Return ``buf`` (from :meth:`acquire`) once no operation uses it any more."""
        if self.free_count >= self.max_free:
            return
        self._free.setdefault((buf.dtype, buf.numel()), []).append(buf)

    @property
    def free_count(self) -> int:
        return sum(len(v) for v in self._free.values())


class BufferPool:
    """Recycles large host buffers so fresh outputs do not page-fault on every call.

    A 100 MiB ``torch.empty`` is a fresh ``mmap``: the first write to every page faults, which on
    the machines we measured costs more than the exchange itself.  ``take`` hands out a tensor
    backed by a pooled array; when the last tensor viewing it is garbage collected, the array
    goes back to the free list (at most ``max_free_bytes`` are kept).  Callers therefore get
    fresh, independent outputs — nothing is ever overwritten while still referenced.
    """

    def __init__(self, max_free_bytes: int = 1 << 30, min_bytes: int = 1 << 20) -> None:
        self.max_free_bytes = max_free_bytes
        self.min_bytes = min_bytes
        self._free: dict[tuple[str, int], list[np.ndarray]] = {}
        self._free_bytes = 0
        self.reused = 0
        self.allocated = 0

    def take(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """An uninitialized 1-D CPU tensor of ``numel`` elements of ``dtype``."""
        return self.take_pair(dtype, numel)[0]

    def take_pair(self, dtype: torch.dtype, numel: int) -> tuple[torch.Tensor, np.ndarray]:
        """:meth:`take`, plus the numpy view of the same memory that :func:`host_array` gives."""
        np_dtype = _NUMPY_OF[dtype]
        nbytes = numel * dtype.itemsize
        if nbytes < self.min_bytes:
            arr: np.ndarray = np.empty(numel, dtype=np_dtype)
            t = torch.from_numpy(arr)
            return (t if t.dtype == dtype else t.view(dtype)), arr
        key = ("u8", nbytes)
        stack = self._free.get(key)
        if stack:
            raw = stack.pop()
            self._free_bytes -= nbytes
            self.reused += 1
        else:
            raw = np.empty(nbytes, dtype=np.uint8)
            self.allocated += 1
        view = raw.view()
        weakref.finalize(view, self._give_back, key, raw)
        return torch.from_numpy(view).view(dtype), view.view(np_dtype)

    def _give_back(self, key: tuple[str, int], raw: np.ndarray) -> None:
        if self._free_bytes + raw.nbytes > self.max_free_bytes:
            return
        self._free.setdefault(key, []).append(raw)
        self._free_bytes += raw.nbytes

    @property
    def free_bytes(self) -> int:
        return self._free_bytes
