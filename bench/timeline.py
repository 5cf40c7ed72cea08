"""What recording a timeline costs per op, measured side by side in one run.

    bfrun -np 2 python bench/timeline.py             # the unoversubscribed setting on 2 cores
    bfrun -np 2 python bench/timeline.py --reps 2000

Rows: the cached one-element ``neighbor_mean`` (the op whose fixed cost dominates small
messages) and ``global_mean``, each timed with the timeline off, on, and off again.  The two
"off" rows bracket the "on" row: their difference is the run's noise, against which the cost of
the off path (one attribute check per op) is to be judged.  Times are medians over ``--reps``
calls after warm-up; the slowest rank's median is reported by rank 0.
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


def timed(fn: Callable[[], object], reps: int, comm: MPI.Comm, label: str) -> float:
    """Median seconds per call over ``reps`` calls (slowest rank)."""
    for _ in range(20):
        fn()
    times = []
    comm.Barrier()
    for _ in tqdm(range(reps), desc=label, disable=comm.Get_rank() != 0, leave=False):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(comm.allreduce(statistics.median(times), op=MPI.MAX))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=1000)
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
    rows = []
    for label, fn in [("neighbor_mean 1 float", mix), ("global_mean 1 float", mean)]:
        off1 = timed(fn, args.reps, comm, f"{label} off")
        w.timeline = Timeline(path, rank, n)
        on = timed(fn, args.reps, comm, f"{label} on")
        w.timeline.close()
        w.timeline = None
        off2 = timed(fn, args.reps, comm, f"{label} off again")
        rows.append((label, off1, on, off2))
    os.remove(part_path(path, rank))
    if rank == 0:
        oversub = "oversubscribed: distorted" if n > (os.cpu_count() or 1) else "not oversubscribed"
        print(f"timeline cost per call, {n} ranks ({oversub}), median of {args.reps} calls")
        print(f"{'op':24} {'off us':>8} {'on us':>8} {'off again':>10} {'on - off':>9} {'noise |off-off|':>16}")
        for label, off1, on, off2 in rows:
            off = (off1 + off2) / 2
            print(f"{label:24} {off1 * 1e6:8.1f} {on * 1e6:8.1f} {off2 * 1e6:10.1f} "
                  f"{(on - off) * 1e6:9.1f} {abs(off1 - off2) * 1e6:16.1f}")


if __name__ == "__main__":
    main()
