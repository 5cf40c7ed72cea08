"""What recording a timeline costs per op, measured side by side in one run.

    bfrun -np 2 python bench/timeline.py             # the unoversubscribed setting on 2 cores
    bfrun -np 2 python bench/timeline.py --rounds 40 --block 200

Rows: the cached one-element ``neighbor_mean`` (the op whose fixed cost dominates small
messages) and ``global_mean``, each timed in alternating blocks with the timeline off and on,
so that both see the same machine load.  The off path costs one attribute check per op; the
"noise" column (the difference between the off medians of even and of odd rounds) is what any
cost of it must be judged against.  Times are medians per call; the slowest rank's median is
reported by rank 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import mpi4py

mpi4py.rc.thread_level = "serialized"

import torch
from mpi4py import MPI
from tqdm import tqdm

import bluefog_fn as bf
from bluefog_fn import world
from bluefog_fn.timeline import Timeline, part_path


def compare(fn: Callable[[], object], w: world.World, path: str, rounds: int, block: int, comm: MPI.Comm,
            bar: tqdm) -> tuple[float, float, float, float]:
    """Per-call medians with the timeline off and on, in alternating blocks of ``block`` calls
    (so both see the same machine load); also the medians of the off calls of even and of odd
    rounds, whose difference is the noise.  Slowest rank's values."""
    rank, n = comm.Get_rank(), comm.Get_size()
    for _ in range(50):
        fn()
    off: list[list[float]] = []
    on: list[float] = []
    for _ in range(rounds):
        for mode in ("off", "on"):
            w.timeline = Timeline(path, rank, n) if mode == "on" else None
            comm.Barrier()
            times = []
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            if w.timeline is not None:
                w.timeline.close()
                w.timeline = None
                on += times
            else:
                off.append(times)
        bar.update(1)
    flat_off = [t for ts in off for t in ts]
    even = [t for ts in off[0::2] for t in ts]
    odd = [t for ts in off[1::2] for t in ts]
    values = [statistics.median(x) for x in (flat_off, on, even, odd)]
    return tuple(float(comm.allreduce(v, op=MPI.MAX)) for v in values)  # type: ignore[return-value]


def off_path_checks(w: world.World, calls: int = 200_000) -> float:
    """Seconds per call of what a neighbor_mean adds when the timeline is off: one attribute
    read and nine ``is not None`` tests of the span (trace, agree, pack, send, wait/combine
    twice, unpack, handle), timed in a loop."""
    t0 = time.perf_counter()
    for _ in range(calls):
        timeline = w.timeline
        span = None if timeline is None else timeline
        for _ in range(9):
            if span is not None:
                pass
    loop = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(calls):
        for _ in range(9):
            pass
    return (loop - (time.perf_counter() - t0)) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="alternations of off and on blocks")
    parser.add_argument("--block", type=int, default=200, help="calls per block")
    args = parser.parse_args()
    bf.init()
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    topo = bf.topology.one_peer_exponential_two(n)
    tiny = {"x": torch.ones(1)}
    state = {"step": 0}

    def mix() -> None:
        state["step"] += 1
        bf.neighbor_mean(tiny, topo, state["step"])

    def mean() -> None:
        bf.global_mean(tiny)

    w = world.current()
    directory = tempfile.mkdtemp() if rank == 0 else None
    path = os.path.join(str(comm.bcast(directory, root=0)), "bench.json")
    cases = [("neighbor_mean 1 float", mix), ("global_mean 1 float", mean)]
    rows = []
    with tqdm(total=args.rounds * len(cases), desc="timeline bench", disable=rank != 0, mininterval=1.0) as bar:
        for label, fn in cases:
            rows.append((label, *compare(fn, w, path, args.rounds, args.block, comm, bar)))
    os.remove(part_path(path, rank))
    checks = off_path_checks(w)
    if rank == 0:
        oversub = "oversubscribed: distorted" if n > (os.cpu_count() or 1) else "not oversubscribed"
        calls = args.rounds * args.block
        print(f"timeline cost per call, {n} ranks ({oversub}), medians of {calls} calls each way, "
              f"alternating blocks of {args.block}")
        print(f"{'op':24} {'off us':>8} {'on us':>8} {'on - off':>9} {'on / off':>9} {'noise: off even-odd rounds':>27}")
        for label, off, on, even, odd in rows:
            print(f"{label:24} {off * 1e6:8.1f} {on * 1e6:8.1f} {(on - off) * 1e6:9.1f} {on / off:9.2f} "
                  f"{abs(even - odd) * 1e6:24.1f} us")
        print(f"off path alone (1 attribute read + 9 None tests per call): {checks * 1e6:.3f} us per call")


if __name__ == "__main__":
    main()
