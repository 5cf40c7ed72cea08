"""Average consensus: every rank starts from its own random vector and repeatedly averages with
its neighbours; all of them converge to the global mean.  Compares three topologies.

    bfrun -np 4 python examples/consensus.py
    bfrun -np 8 python examples/consensus.py --iters 40 --dim 100000

Printed per iteration: the consensus error max_i ||x_i − x̄|| / ||x̄|| for each topology.  With a
power-of-two number of ranks the one-peer exponential-2 graph reaches the exact average after
log2(n) steps while sending one message per step; the static exponential-2 graph sends log2(n)
messages per step; the ring needs O(n²) steps.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

import bluefog_fn as bf


def consensus_error(x: torch.Tensor, mean: torch.Tensor) -> float:
    """max over ranks of ||x_i − x̄|| / ||x̄|| (the same value on every rank)."""
    local = torch.linalg.vector_norm(x - mean) / torch.linalg.vector_norm(mean)
    return float(bf.allgather(local.reshape(1).double()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dim", type=int, default=10_000, help="length of each rank's vector")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    bf.init()
    n, me = bf.size(), bf.rank()
    x0 = torch.randn(args.dim, generator=torch.Generator().manual_seed(args.seed + me), dtype=torch.float64) + me
    mean = bf.global_mean(x0)  # the value consensus must reach
    topologies = {
        "exp2 (static)": bf.topology.exponential_two(n),
        "one-peer exp2": bf.topology.one_peer_exponential_two(n),
        "ring": bf.topology.ring(n),
    }
    errors: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for name, topo in tqdm(topologies.items(), desc="topologies", disable=me != 0, ncols=90):
        x = x0
        errs = [consensus_error(x, mean)]
        bf.barrier()
        elapsed = 0.0
        for step in range(args.iters):
            t0 = time.perf_counter()
            x = bf.neighbor_mean(x, topo, step)
            if step > 0:  # step 0 includes tracing, agreement and kernel compilation
                elapsed += time.perf_counter() - t0
            errs.append(consensus_error(x, mean))
        errors[name] = errs
        seconds[name] = elapsed
    if me == 0:
        print(f"average consensus on {n} ranks, {args.dim} float64 values each")
        print("iter  " + "".join(f"{name:>16}" for name in topologies))
        for k in range(args.iters + 1):
            print(f"{k:4d}  " + "".join(f"{errors[name][k]:16.3e}" for name in topologies))
        print("exchange time per step (ms): " + ", ".join(
            f"{name} {1e3 * seconds[name] / max(args.iters - 1, 1):.3f}" for name in topologies))
        print(f"plan cache: {bf.plan_cache_info()}")


if __name__ == "__main__":
    main()
