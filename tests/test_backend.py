"""Backend pieces in isolation: combine kernels, pooled buffers, pinned staging, local transport."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bluefog_fn.backend.buffers import BufferPool, PinnedStaging, host_array
from bluefog_fn.backend.kernels import combine
from bluefog_fn.backend.local import LocalTransport


@settings(max_examples=40)
@given(k=st.integers(0, 6), n=st.integers(0, 300), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 1000))
def test_combine_matches_float64_reference(k: int, n: int, dtype: torch.dtype, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    recv = torch.randn(k, n, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(k, generator=g, dtype=torch.float64).numpy()
    out = torch.empty(n, dtype=dtype)
    combine(x, recv, w, 0.25, out)
    expected = 0.25 * x.double()
    for j in range(k):
        expected = expected + w[j] * recv[j].double()
    # One rounding at the end: float64 results are exact up to summation order, float32 are the
    # correctly rounded float64 value.
    if dtype == torch.float32:
        assert torch.equal(out, expected.to(torch.float32))
    else:
        torch.testing.assert_close(out, expected, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_combine_half_types_computes_in_float32(dtype: torch.dtype) -> None:
    x = torch.tensor([1.0, 2.0, 3.0], dtype=dtype)
    recv = torch.tensor([[3.0, 2.0, 1.0]], dtype=dtype)
    out = torch.empty(3, dtype=dtype)
    combine(x, recv, np.array([0.5]), 0.5, out)
    assert out.tolist() == [2.0, 2.0, 2.0]


def test_pool_recycles_only_unreferenced_buffers() -> None:
    pool = BufferPool(min_bytes=1024)
    a = pool.take(torch.float32, 4096)
    a.fill_(1.0)
    view = a[10:20]
    del a
    gc.collect()
    b = pool.take(torch.float32, 4096)  # `view` still holds the first buffer
    assert b.data_ptr() != view.data_ptr() - 40
    assert pool.reused == 0
    del view, b
    gc.collect()
    c = pool.take(torch.float32, 4096)
    assert pool.reused == 1 and c.numel() == 4096


def test_pool_bounds_free_memory() -> None:
    pool = BufferPool(max_free_bytes=8192, min_bytes=1024)
    bufs = [pool.take(torch.float64, 1024) for _ in range(3)]  # 8 KiB each
    del bufs
    gc.collect()
    assert pool.free_bytes == 8192


def test_small_requests_bypass_the_pool() -> None:
    pool = BufferPool(min_bytes=1 << 20)
    pool.take(torch.float32, 10)
    assert pool.allocated == 0


def test_host_array_views_without_copy() -> None:
    t = torch.arange(6, dtype=torch.bfloat16)
    a = host_array(t)
    assert a.dtype == np.int16 and a.ctypes.data == t.data_ptr()
    assert host_array(torch.ones(3, dtype=torch.bool)).dtype == np.uint8


def test_pinned_staging_never_hands_out_a_buffer_twice() -> None:
    staging = PinnedStaging(max_free=2)
    a = staging.acquire(torch.float32, 8)
    b = staging.acquire(torch.float32, 8)  # a is still in use
    assert a.data_ptr() != b.data_ptr() and staging.pinned == 2
    staging.release(a)
    assert staging.acquire(torch.float32, 8) is a
    for buf in [b, *(staging.acquire(torch.float64, 4) for _ in range(3))]:
        staging.release(buf)
    assert staging.free_count == 2


def test_local_transport_refuses_peers() -> None:
    t = LocalTransport()
    t.exchange([], [], 1).wait()
    with pytest.raises(ValueError, match="no peers"):
        t.exchange([(1, np.zeros(1))], [], 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_neighbor_mean_cuda_tensors_round_trip_through_pinned_staging() -> None:
    import bluefog_fn as bf

    x = {"w": torch.randn(5, 3, device="cuda"), "b": torch.randn(3, device="cuda", dtype=torch.float64)}
    out = bf.neighbor_mean(x, bf.topology.ring(bf.size()))
    assert out["w"].device.type == "cuda"
    torch.testing.assert_close(out["w"], x["w"])
    torch.testing.assert_close(bf.global_mean(x)["b"], x["b"])
