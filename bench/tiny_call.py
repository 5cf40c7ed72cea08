"""Per-call cost of a cached one-element ``neighbor_mean`` and ``global_mean`` against the raw
floor, in one run.

Floors: a one-element mpi4py ``Sendrecv`` with the same peer + average, and a one-element
``Allreduce`` + division (a copy + average in a world of one).  Each number is the median over 15 rounds of 200 calls, the slowest rank's; the
pair is measured three times, interleaved, and the best of each is printed.  Runs unchanged on
any tree of the library (it uses only public names), so before/after comparisons run the same
script:

    bfrun -np 2 python bench/tiny_call.py LABEL
    python bench/tiny_call.py LABEL          # a world of one
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import mpi4py

mpi4py.rc.thread_level = "serialized"  # bluefog_fn's own setting (MULTIPLE makes polling slow)

import numpy as np
import torch
from mpi4py import MPI

import bluefog_fn as bf


def tiny_costs(comm: MPI.Comm, topo: object, rounds: int = 15) -> tuple[float, float]:
    """Seconds per call of a cached one-element ``neighbor_mean`` and of the floor (best of three
    interleaved measurements, each the median over ``rounds`` rounds of 200 calls)."""
    rank, n = comm.Get_rank(), comm.Get_size()
    period = getattr(topo, "period", 1)
    tiny = {"x": torch.ones(1)}
    one = np.ones(1, dtype=np.float32)
    one_r, one_o = np.empty_like(one), np.empty_like(one)
    state = {"step": 0}

    def bf_call() -> None:
        state["step"] += 1
        bf.neighbor_mean(tiny, topo, state["step"])  # type: ignore[arg-type]

    def floor_call() -> None:
        state["step"] += 1
        k = 1 << (state["step"] % period)
        if n > 1:
            comm.Sendrecv(one, dest=(rank + k) % n, recvbuf=one_r, source=(rank - k) % n)
        else:
            np.copyto(one_r, one)
        np.add(one, one_r, out=one_o)
        np.multiply(one_o, 0.5, out=one_o)

    return _best_of_three(comm, bf_call, floor_call, rounds)


def tiny_global_costs(comm: MPI.Comm, rounds: int = 15) -> tuple[float, float]:
    """Seconds per call of a cached one-element ``global_mean`` and of its floor (a one-element
    ``Allreduce`` + division), measured like :func:`tiny_costs`."""
    n = comm.Get_size()
    tiny = {"x": torch.ones(1)}
    one = np.ones(1, dtype=np.float32)
    total = np.empty_like(one)

    def bf_call() -> None:
        bf.global_mean(tiny)

    def floor_call() -> None:
        if n > 1:
            comm.Allreduce(one, total, op=MPI.SUM)
        else:
            np.copyto(total, one)
        np.divide(total, n, out=total)

    return _best_of_three(comm, bf_call, floor_call, rounds)


def _best_of_three(comm: MPI.Comm, bf_call: Callable[[], None], floor_call: Callable[[], None], rounds: int) -> tuple[float, float]:
    def per_call(fn: Callable[[], None]) -> float:
        for _ in range(200):
            fn()
        times = []
        for _ in range(rounds):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            times.append((time.perf_counter() - t0) / 200)
        return float(comm.allreduce(statistics.median(times), op=MPI.MAX))

    ours, floor = [], []
    for _ in range(3):
        ours.append(per_call(bf_call))
        floor.append(per_call(floor_call))
    return min(ours), min(floor)


def main() -> None:
    label = sys.argv[1] if len(sys.argv) > 1 else "bf"
    bf.init()
    comm = MPI.COMM_WORLD
    n = comm.Get_size()
    topo = bf.topology.one_peer_exponential_two(n) if n > 1 else bf.topology.ring(1)
    ours, floor = tiny_costs(comm, topo)
    g_ours, g_floor = tiny_global_costs(comm)
    if comm.Get_rank() == 0:
        print(f"{label} np={n}: neighbor_mean bf {ours * 1e6:.1f} us, floor {floor * 1e6:.1f} us, ratio {ours / floor:.1f}x")
        print(f"{label} np={n}: global_mean bf {g_ours * 1e6:.1f} us, floor {g_floor * 1e6:.1f} us, ratio {g_ours / g_floor:.1f}x")


if __name__ == "__main__":
    main()
