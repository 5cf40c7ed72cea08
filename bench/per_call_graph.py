"""Per-call cost of BlueFog's per-call-graph style against a ``DynamicTopology``, same run.

    bfrun -np 2 python bench/per_call_graph.py
    bfrun -np 4 python bench/per_call_graph.py     # oversubscribed on a 2-core machine: distorted

Both rows run the same one-peer exponential-2 schedule (rank r sends to r + 2^k, receives from
r - 2^k, weights 1/2):

* ``DynamicTopology`` — ``bf.neighbor_mean(x, one_peer_exponential_two(n), step)``;
* ``per-call graph`` — ``bf.neighbor_mean(x, None, self_weight=0.5, src_weights={r - 2^k: 0.5},
  dst_weights=[r + 2^k])``, the graph given with every call, as BlueFog users write it;
* ``floor`` — raw mpi4py ``Sendrecv`` with the same peer plus the average, for scale.

Times are medians of per-call means over ``--reps`` batches of ``--calls`` calls; rank 0 prints
microseconds per call and each row's ratio to the ``DynamicTopology`` row.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import mpi4py

mpi4py.rc.thread_level = "serialized"

import torch
from mpi4py import MPI

import bluefog_fn as bf


def per_call(fn: Callable[[int], object], calls: int, reps: int, comm: MPI.Comm) -> float:
    """Median over ``reps`` batches of the mean seconds per call (slowest rank)."""
    for t in range(20):
        fn(t)
    batches = []
    for _ in range(reps):
        comm.Barrier()
        t0 = time.perf_counter()
        for t in range(calls):
            fn(t)
        batches.append((time.perf_counter() - t0) / calls)
    return float(comm.allreduce(statistics.median(batches), op=MPI.MAX))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    bf.init()
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    if n < 2:
        raise SystemExit("run under bfrun -np 2 (or more)")
    topo = bf.topology.one_peer_exponential_two(n)
    rows = []
    for numel in (1, 65536):
        rows += measure(numel, topo, comm, args.calls, args.reps)
    if rank == 0:
        print(f"per-call cost, {n} ranks, one-peer exponential-2 schedule (float32)")
        print(f"{'elements':>9}  {'method':<32}{'us/call':>10}{'÷ dynamic':>11}")
        for numel, name, us, ratio in rows:
            print(f"{numel:>9}  {name:<32}{us:>10.1f}{ratio:>10.2f}x")
    bf.shutdown()


def measure(
    numel: int, topo: bf.topology.DynamicTopology, comm: MPI.Comm, calls: int, reps: int
) -> list[tuple[int, str, float, float]]:
    """Each method's microseconds per call on a ``numel``-float tree, and its ratio to the
    DynamicTopology row."""
    rank, n, period = comm.Get_rank(), comm.Get_size(), topo.period

    def peers(t: int) -> tuple[int, int]:
        shift = 1 << (t % period)
        return (rank + shift) % n, (rank - shift) % n

    x = {"w": torch.full((numel,), float(rank))}
    buf = x["w"].numpy()
    recv = buf.copy()
    out = buf.copy()

    def floor(t: int) -> None:
        dst, src = peers(t)
        comm.Sendrecv(buf, dest=dst, recvbuf=recv, source=src)
        out[:] = (buf + recv) * 0.5

    def dynamic(t: int) -> None:
        bf.neighbor_mean(x, topo, t)

    def per_call_graph(t: int) -> torch.Tensor:
        dst, src = peers(t)
        y: torch.Tensor = bf.neighbor_mean(x, None, self_weight=0.5, src_weights={src: 0.5}, dst_weights=[dst])["w"]
        return y

    # Both styles compute the same numbers: the rows measure equal work.
    for t in range(period):
        if not torch.equal(bf.neighbor_mean(x, topo, t)["w"], per_call_graph(t)):
            raise SystemExit("the two styles disagree")
    times = {
        "floor (mpi4py Sendrecv + avg)": per_call(floor, calls, reps, comm),
        "DynamicTopology": per_call(dynamic, calls, reps, comm),
        "per-call graph": per_call(per_call_graph, calls, reps, comm),
    }
    base = times["DynamicTopology"]
    return [(numel, name, sec * 1e6, sec / base) for name, sec in times.items()]


if __name__ == "__main__":
    main()
