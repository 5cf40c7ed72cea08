"""Soak: 10 000 mixed operations at ``-np 4``; memory, live MPI requests and windows stay bounded.

Excluded from the default run (marker ``soak``).  Run it with::

    bfrun -np 4 python -m pytest tests/soak -m soak -q -s -p no:cacheprovider -o addopts="--strict-markers" --timeout 900

The mix cycles through dynamic topologies (one-peer exponential-2, Base-2 graph), per-call graphs
(BlueFog-style weights, a new graph each call), async handles waited out of order, the global
collectives, neighbour gathers, push-sum on a long-lived window, window churn (create,
accumulate, collect, free) and trees of changing shapes (so the plan cache evicts).  Live MPI
requests and windows are counted from the interpreter's objects (``gc``): what is counted is
what the library still holds, however it holds it.  Resident memory is read from
``/proc/self/statm`` after a warm-up, half way and at the end; the second half must not grow.
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.world import current

pytestmark = pytest.mark.soak

OPS = int(os.environ.get("BLUEFOG_FN_SOAK_OPS", "10000"))
WARMUP = OPS // 10


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def shared_memory_windows() -> int:
    """MPI windows of the same-host transport (its control block and one per buffer size)."""
    channel = getattr(getattr(current().executor, "exchanges", None), "channel", None)
    return 0 if channel is None else len(channel.memory.windows)


def live_mpi_objects() -> tuple[int, int]:
    """(active MPI requests, open MPI windows other than the same-host transport's) still
    referenced anywhere in this process."""
    if bf.size() == 1:
        return 0, 0
    from mpi4py import MPI

    gc.collect()
    requests = windows = 0
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance: that reads __class__, which some lazy modules warn on
        if issubclass(kind, MPI.Request) and obj != MPI.REQUEST_NULL:
            requests += 1
        elif issubclass(kind, MPI.Win) and obj != MPI.WIN_NULL:
            windows += 1
    return requests, windows - shared_memory_windows()


def test_soak_mixed_operations_stay_bounded(capsys: pytest.CaptureFixture[str]) -> None:
    n, me = bf.size(), bf.rank()
    one_peer = T.one_peer_exponential_two(n)
    base = T.base_graph(n, 1)
    ring = T.ring(n)
    x = {"w": torch.full((64,), float(me)), "b": [torch.ones(3, 5, dtype=torch.float64)]}
    push = bf.optim.push_sum(0.01, T.exponential_two(n))
    px = {"w": torch.full((16,), float(me), dtype=torch.float64)}
    pstate = push.init(px)
    zero = {"w": torch.zeros(16, dtype=torch.float64)}
    win = bf.Window({"v": torch.zeros(8)}, ring)
    windows0 = live_mpi_objects()[1]
    rejected = 0

    def op(i: int) -> None:
        nonlocal px, pstate, rejected
        kind = i % 12
        if kind == 0:
            shape = 1 + (i // 12) % 600  # more shapes than the plan cache holds: it must evict
            bf.neighbor_mean({"s": torch.ones(shape)}, one_peer, i)
        elif kind == 1:
            bf.neighbor_mean_async(x, base, i).wait()
        elif kind == 2:
            s = 1 + (i // 12) % max(1, n - 1)
            if n > 1:
                bf.neighbor_mean(x, None, self_weight=0.5, src_weights={(me - s) % n: 0.5}, dst_weights=[(me + s) % n])
        elif kind == 3:
            h1 = bf.neighbor_mean_async(x, one_peer, i)
            h2 = bf.global_sum_async(x)
            h3 = bf.broadcast_async(x, i % n)
            h3.wait()
            h2.wait()
            h1.wait()
        elif kind == 4:
            bf.allgather_async(x).wait()
        elif kind == 5:
            px, pstate = push.step(px, zero, pstate, i)
        elif kind == 6:
            win.accumulate({"v": torch.ones(8)})
            bf.barrier()
            win.collect()
            bf.barrier()
        elif kind == 7:
            bf.neighbor_gather_async(x, ring, i).wait()
        elif kind == 8:
            bf.global_mean(x)
        elif kind == 9:
            if (i // 12) % 10 == 0:  # window churn
                w = bf.Window({"t": torch.ones(4)}, one_peer)
                w.accumulate({"t": torch.ones(4)}, step=i)
                bf.barrier()
                w.collect(step=i)
                w.free()
            else:
                bf.barrier_async().wait()
        elif kind == 10:
            try:
                bf.neighbor_mean(x, ring, -1)
            except ValueError:
                rejected += 1
        else:
            bf.hierarchical_neighbor_mean(x, T.ring(bf.machine_size()), i)

    for i in range(WARMUP):
        op(i)
    gc.collect()
    rss_start = rss_bytes()
    start = time.perf_counter()
    for i in range(WARMUP, OPS):
        op(i)
        if i == (WARMUP + OPS) // 2:
            requests_mid, windows_mid = live_mpi_objects()  # collects garbage first
            shared_mid = shared_memory_windows()
            rss_mid = rss_bytes()
    elapsed = time.perf_counter() - start
    gc.collect()
    rss_end = rss_bytes()
    requests, windows = live_mpi_objects()
    total_weight = float(bf.global_sum(pstate.weight))
    info = bf.plan_cache_info()
    pstate.window.free()
    win.free()
    after_free = live_mpi_objects()[1]
    report = (
        f"soak rank {me}/{n}: {OPS - WARMUP} ops in {elapsed:.1f} s = {(OPS - WARMUP) / elapsed:.0f} ops/s; "
        f"RSS {rss_start / 2**20:.1f} -> {rss_mid / 2**20:.1f} -> {rss_end / 2**20:.1f} MiB; "
        f"live requests {requests_mid} (half way), {requests} (end); windows {windows_mid}, {windows} (4 expected) "
        f"-> {after_free} after free; {info}"
    )
    with capsys.disabled():
        print("\n" + report)
    assert requests == requests_mid == 0, report
    # Two bf.Windows, each an MPI window for its memory and one for its mutexes.
    assert windows == windows_mid == windows0 == (4 if n > 1 else 0), report
    # The same-host transport allocates once per buffer size, all seen in the first half.
    assert shared_memory_windows() == shared_mid, report
    assert after_free == 0, report
    assert info.size <= info.maxsize, report
    assert rejected == sum(1 for i in range(OPS) if i % 12 == 10)
    assert total_weight == pytest.approx(n, rel=1e-9)  # push-sum conserved its mass throughout
    # The second half of the run must not grow: a leak of even 1 KiB per op would show as ~4 MiB.
    assert rss_end - rss_mid < 4 * 2**20, report
    assert rss_end - rss_start < 32 * 2**20, report
