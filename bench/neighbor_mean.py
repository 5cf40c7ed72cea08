"""neighbor_mean against the floor and the alternatives, measured side by side in one run.

    bfrun -np 2 python bench/neighbor_mean.py            # the unoversubscribed setting on 2 cores
    bfrun -np 4 python bench/neighbor_mean.py --reps 5   # oversubscribed on 2 cores: distorted

Rows, per payload (a ResNet-50-shaped tree of 161 float32 leaves, 25.6 M values; one 1 M-float
tensor):

* ``bf one-peer``  — ``bf.neighbor_mean(tree, one_peer_exponential_two(n), step)`` as configured
  (ranks of one machine read each other's buffers in shared memory: the default for trees of
  at least 32 MiB);
* ``bf one-peer, shared tree`` — the same call on the tree made by ``bf.shared_tree`` (its leaves
  live in this machine's shared memory: peers read them in place, nothing is written first);
* ``bf one-peer, shared tree, out= other`` — two shared trees, each call combining one into the
  other (``out=``), which the next call starts from: the atc optimizer's loop, no output buffer;
* ``bf one-peer, MPI only`` — the same call with the same-host transport switched off (on every
  rank together, for this row only): what two-sided MPI gives;
* ``floor``        — raw mpi4py ``Sendrecv`` of one pre-fused buffer with the same peer, then
  ``(x + recv) / 2`` into a preallocated buffer: what a hand-written exchange costs at best;
* ``mpi Allreduce``— mpi4py ``Allreduce`` of the pre-fused buffer, then ``/ n`` (global mean);
* ``gloo allreduce`` — ``torch.distributed.all_reduce`` (gloo) of the fused tensor, then ``/ n``:
  what DDP does per bucket;
* ``naive per-leaf`` — a Python loop of ``Sendrecv`` + average per leaf;
* ``local 3-stream pass`` — no communication: one compiled pass reading this rank's fused buffer
  and another buffer of the same size and writing the average (what the shared-memory path
  cannot go below: it reads x and the peer's x and writes the output).

Times are medians over ``--reps`` timed calls after warm-up; every rank times the same calls and
rank 0 prints.  Ratios are "row / floor" (lower is better).

``--hierarchical`` (needs several machines, e.g. ``BLUEFOG_FN_RANKS_PER_MACHINE=2 bfrun -np 4``)
instead compares, per payload, with the bytes that cross machines per call (all ranks, exact,
from the traced plans, averaged over the schedule's period):

* ``hierarchical`` — ``bf.hierarchical_neighbor_mean(tree, machine_one_peer_exponential_two(M), step)``:
  local reduce to the leader, leader-to-leader exchange, local broadcast;
* ``flat one-peer`` — ``bf.neighbor_mean(tree, one_peer_exponential_two(n), step)``;
* ``two flat mixes`` — the machine mean then ``W_M ⊗ I_L`` as two ``neighbor_mean`` calls on
  world graphs (every local rank crosses machines: L× the bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import mpi4py

# Same MPI thread level for every row (bluefog-fn's own setting; MULTIPLE makes polling slow).
mpi4py.rc.thread_level = "serialized"

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI
from tiny_call import (  # bench/ is the script's directory, first on sys.path
    tiny_costs,
    tiny_global_costs,
)
from tqdm import tqdm

import bluefog_fn as bf
from bluefog_fn.backend.kernels import combine_rows
from bluefog_fn.world import current


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of ResNet-50 (conv weights, batch-norm weight/bias, fc): 161 tensors."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_ch = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3), strict=True):
        for b in range(blocks):
            out_ch = width * 4
            shapes += [(width, in_ch, 1, 1), (width,), (width,)]
            shapes += [(width, width, 3, 3), (width,), (width,)]
            shapes += [(out_ch, width, 1, 1), (out_ch,), (out_ch,)]
            if b == 0:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(1000, 2048), (1000,)]
    return shapes


def timed(fn: Callable[[], object], reps: int, comm: MPI.Comm) -> float:
    """Median seconds per call; ranks start each call together."""
    fn()
    fn()
    times = []
    for _ in tqdm(range(reps), disable=comm.Get_rank() != 0, leave=False, ncols=90, mininterval=0.5):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    # The slowest rank's time is the step time.
    return float(comm.allreduce(statistics.median(times), op=MPI.MAX))


def measure(
    name: str, leaves: list[torch.Tensor], topo: bf.topology.DynamicTopology, comm: MPI.Comm, reps: int
) -> list[tuple[str, str, float, float]]:
    """Time every method on one payload; returns (payload, method, seconds, ratio to floor)."""
    rank, n = comm.Get_rank(), comm.Get_size()
    fused = torch.cat([x.reshape(-1) for x in leaves])
    recv = torch.empty_like(fused)
    out = torch.empty_like(fused)
    x_np, r_np, o_np = fused.numpy(), recv.numpy(), out.numpy()
    state = {"step": 0}

    def next_peer() -> tuple[int, int]:
        k = 1 << (state["step"] % topo.period)
        state["step"] += 1
        return (rank + k) % n, (rank - k) % n

    def bf_one_peer() -> None:
        bf.neighbor_mean(leaves, topo, state["step"])
        state["step"] += 1

    exchanges = getattr(current().executor, "exchanges", None)
    shared = bf.shared_tree(leaves)

    def bf_shared_tree() -> None:
        bf.neighbor_mean(shared, topo, state["step"])
        state["step"] += 1

    pair = [shared, bf.shared_tree(leaves)]

    def bf_shared_pair() -> None:
        # The atc optimizer's loop: combine the current tree into the other one, which is next.
        bf.neighbor_mean(pair[0], topo, state["step"], out=pair[1])
        pair.reverse()
        state["step"] += 1

    def bf_mpi_only() -> None:
        if exchanges is None:
            return bf_one_peer()
        with exchanges.policy_as(dataclasses.replace(exchanges.policy, enabled=False)):  # every rank, same call
            bf_one_peer()
        return None

    def three_stream() -> None:
        combine_rows(x_np, [r_np], [0.5], 0.5, o_np)

    def floor() -> None:
        dst, src = next_peer()
        if n > 1:
            comm.Sendrecv(x_np, dest=dst, recvbuf=r_np, source=src)
        else:
            np.copyto(r_np, x_np)
        np.add(x_np, r_np, out=o_np)
        np.multiply(o_np, 0.5, out=o_np)

    def mpi_allreduce() -> None:
        comm.Allreduce(x_np, o_np, op=MPI.SUM)
        np.divide(o_np, n, out=o_np)

    def gloo_allreduce() -> None:
        out.copy_(fused)
        dist.all_reduce(out)
        out.div_(n)

    def naive() -> None:
        dst, src = next_peer()
        for leaf in leaves:
            a = leaf.numpy()
            r = np.empty_like(a)
            if n > 1:
                comm.Sendrecv(a, dest=dst, recvbuf=r, source=src)
            else:
                r[...] = a
            _ = (a + r) * 0.5

    base = timed(floor, reps, comm)
    rows = []
    for label, fn in [
        ("bf one-peer neighbor_mean", bf_one_peer),
        ("bf one-peer, shared tree", bf_shared_tree),
        ("bf one-peer, shared tree, out= other", bf_shared_pair),
        ("bf one-peer, MPI only", bf_mpi_only),
        ("floor: Sendrecv fused + average", floor),
        ("mpi4py Allreduce mean", mpi_allreduce),
        ("gloo all_reduce mean (DDP)", gloo_allreduce),
        ("naive per-leaf Sendrecv loop", naive),
        ("local 3-stream pass (no comm)", three_stream),
    ]:
        t = base if fn is floor else timed(fn, reps, comm)
        rows.append((name, label, t, t / base))
    if rank == 0:
        print(f"# {name}: {fused.numel() * 4 / 2**20:.1f} MiB per rank", flush=True)
    return rows


def crossing_bytes(plans: list[object], local: int) -> int:
    """Bytes sent to another machine per call, summed over the ranks' plans."""
    total = 0
    for r, plan in enumerate(plans):
        if isinstance(plan, bf.StagedPlan):
            total += plan.bytes_across_machines
        else:
            assert isinstance(plan, bf.CommPlan)
            total += sum(plan.layout.nbytes for d, _ in plan.sends if d // local != r // local)
    return total


def hierarchical(comm: MPI.Comm, payloads: dict[str, list[torch.Tensor]], reps: int) -> None:
    """Hierarchical vs flat one-peer (and the two-mix construction), with bytes across machines."""
    n, machines, local = bf.size(), bf.machine_size(), bf.local_size()
    if machines < 2:
        raise SystemExit("--hierarchical needs several machines (e.g. BLUEFOG_FN_RANKS_PER_MACHINE=2 bfrun -np 4)")
    rows = []
    for name, leaves in payloads.items():
        rows += hierarchical_payload(comm, name, leaves, reps)
    if bf.rank() == 0:
        over = "oversubscribed: times distorted, bytes exact" if n > (os.cpu_count() or 1) else "not oversubscribed"
        print(f"\nhierarchical benchmark, {n} ranks as {machines} machines x {local} ({over})")
        print(f"{'payload':34} {'method':32} {'ms':>9} {'x flat':>7} {'MiB across machines/call':>25}")
        for name, label, t, ratio, cross in rows:
            print(f"{name:34} {label:32} {t * 1e3:9.2f} {ratio:7.2f} {cross / 2**20:25.2f}")


def hierarchical_payload(
    comm: MPI.Comm, name: str, leaves: list[torch.Tensor], reps: int
) -> list[tuple[str, str, float, float, float]]:
    n, machines, local = bf.size(), bf.machine_size(), bf.local_size()
    T = bf.topology
    machine_topo = T.machine_one_peer_exponential_two(machines)
    flat_topo = T.one_peer_exponential_two(n)
    block = torch.full((local, local), 1.0 / local, dtype=torch.float64)
    intra = T.from_matrix(torch.kron(torch.eye(machines, dtype=torch.float64), block))
    inter = [
        T.from_matrix(torch.kron(machine_topo.at(s).mixing_matrix(), torch.eye(local, dtype=torch.float64)))
        for s in range(machine_topo.period)
    ]
    state = {"step": 0}

    def hier() -> None:
        bf.hierarchical_neighbor_mean(leaves, machine_topo, state["step"])
        state["step"] += 1

    def flat() -> None:
        bf.neighbor_mean(leaves, flat_topo, state["step"])
        state["step"] += 1

    def two_mixes() -> None:
        bf.neighbor_mean(bf.neighbor_mean(leaves, intra), inter[state["step"] % len(inter)])
        state["step"] += 1

    def mean_over_period(crossing_at: Callable[[int], int], period: int) -> float:
        return sum(crossing_at(s) for s in range(period)) / period

    def traced(op: Callable[..., object], topo: object, s: int) -> int:
        return crossing_bytes([bf.trace(op, leaves, topo, s, rank=r) for r in range(n)], local)

    crossing = {
        "hierarchical_neighbor_mean": mean_over_period(
            lambda s: traced(bf.hierarchical_neighbor_mean, machine_topo, s), machine_topo.period
        ),
        "flat one-peer neighbor_mean": mean_over_period(lambda s: traced(bf.neighbor_mean, flat_topo, s), flat_topo.period),
        "two flat mixes (L x crossing)": mean_over_period(
            lambda s: traced(bf.neighbor_mean, inter[s], 0) + traced(bf.neighbor_mean, intra, 0), len(inter)
        ),
    }
    base = timed(flat, reps, comm)
    rows = []
    for label, fn in [
        ("hierarchical_neighbor_mean", hier),
        ("flat one-peer neighbor_mean", flat),
        ("two flat mixes (L x crossing)", two_mixes),
    ]:
        t = base if fn is flat else timed(fn, reps, comm)
        rows.append((name, label, t, t / base, crossing[label]))
    return rows


def world_of_one_cost() -> float:
    """Seconds per cached one-element ``neighbor_mean`` in a world of one (a fresh process
    without the MPI launcher's environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_", "HYDRA_", "BLUEFOG_FN_JOB"))}
    code = (
        "import time, torch, bluefog_fn as bf\n"
        "t = {'x': torch.ones(1)}; topo = bf.topology.ring(1)\n"
        "for _ in range(500): bf.neighbor_mean(t, topo, 0)\n"
        "best = 1.0\n"
        "for _ in range(20):\n"
        "    t0 = time.perf_counter()\n"
        "    for _ in range(500): bf.neighbor_mean(t, topo, 0)\n"
        "    best = min(best, (time.perf_counter() - t0) / 500)\n"
        "print(best)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--port", type=int, default=29533)
    parser.add_argument("--hierarchical", action="store_true", help="hierarchical vs flat rows only")
    parser.add_argument("--tiny", action="store_true", help="the one-element per-call rows only")
    args = parser.parse_args()

    bf.init()
    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    topo = bf.topology.one_peer_exponential_two(n)
    if args.hierarchical:
        gen = torch.Generator().manual_seed(rank)
        hierarchical(comm, {
            "resnet50 (161 leaves, 25.6M f32)": [torch.randn(s, generator=gen) for s in resnet50_shapes()],
            "one tensor (1M f32)": [torch.randn(1_000_000, generator=gen)],
        }, args.reps)
        return
    if args.tiny:
        t_bf, t_floor = tiny_costs(comm, topo, max(args.reps, 15))
        g_bf, g_floor = tiny_global_costs(comm, max(args.reps, 15))
        if rank == 0:
            alone = world_of_one_cost()
            print(f"one-element tree, cached plan, {n} ranks: bf {t_bf * 1e6:.1f} us per call, floor (Sendrecv + "
                  f"average) {t_floor * 1e6:.1f} us: {t_bf / t_floor:.1f}x floor; world of one: {alone * 1e6:.1f} us per call")
            print(f"one-element global_mean, {n} ranks: bf {g_bf * 1e6:.1f} us per call, floor (Allreduce + "
                  f"division) {g_floor * 1e6:.1f} us: {g_bf / g_floor:.1f}x floor")
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=n)

    gen = torch.Generator().manual_seed(rank)
    payloads = {
        "resnet50 (161 leaves, 25.6M f32)": [torch.randn(s, generator=gen) for s in resnet50_shapes()],
        "one tensor (1M f32)": [torch.randn(1_000_000, generator=gen)],
    }
    rows: list[tuple[str, str, float, float]] = []
    for name, leaves in payloads.items():
        rows += measure(name, leaves, topo, comm, args.reps)

    t_bf, t_floor = tiny_costs(comm, topo, max(args.reps, 15))
    dist.destroy_process_group()
    if rank == 0:
        print(f"\nneighbor_mean benchmark, {n} ranks ({'oversubscribed: distorted' if n > (os.cpu_count() or 1) else 'not oversubscribed'})")
        print(f"{'payload':34} {'method':34} {'ms':>9} {'x floor':>8}")
        for name, label, t, ratio in rows:
            print(f"{name:34} {label:34} {t * 1e3:9.2f} {ratio:8.2f}")
        exchanges = getattr(current().executor, "exchanges", None)
        channel = getattr(exchanges, "channel", None)
        if channel is not None and exchanges is not None:
            policy = exchanges.policy
            print(f"\nsame-host transport (bf one-peer through shared memory; trees of at least "
                  f"{policy.min_bytes >> 20} MiB, shared trees of at least {policy.min_tree_bytes >> 20} MiB):")
            for name, leaves in payloads.items():
                size = sum(x.numel() * x.element_size() for x in leaves)
                if size < policy.min_tree_bytes:
                    print(f"  {name}: below both thresholds, MPI (as the rows above show)")
                    continue
                if size < policy.min_bytes:
                    print(f"  {name}: below the plain-tree threshold; its plain row takes shared memory too, because "
                          "a shared tree of its size exists")
                t = {label: s for p, label, s, _ in rows if p == name}
                floor_t, three = t["floor: Sendrecv fused + average"], t["local 3-stream pass (no comm)"]
                for row in ("bf one-peer neighbor_mean", "bf one-peer, shared tree", "bf one-peer, shared tree, out= other"):
                    print(f"  {name}, {row}: {floor_t / t[row]:.2f}x faster than the floor, {t[row] / three:.2f}x the "
                          f"local 3-stream pass, {t['bf one-peer, MPI only'] / t[row]:.2f}x faster than bf over MPI")
        alone = world_of_one_cost()
        print(f"\none-element tree, cached plan: bf {t_bf * 1e6:.1f} us per call, floor (Sendrecv + average) "
              f"{t_floor * 1e6:.1f} us: {t_bf / t_floor:.1f}x floor; world of one: {alone * 1e6:.1f} us per call")
        print(f"plan cache: {bf.plan_cache_info()}")


if __name__ == "__main__":
    main()
