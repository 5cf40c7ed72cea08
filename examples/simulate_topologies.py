"""Average consensus with 64 simulated agents in one process: how fast do topologies mix?

    python examples/simulate_topologies.py                       # writes out/simulate_topologies.png
    python examples/simulate_topologies.py --agents 48 --iters 100 --out /tmp/consensus.png

Every agent starts from its own random vector; each iteration is one ``bf.neighbor_mean`` over
the topology, ``x ← W(t) x``.  Plotted (log scale) and tabulated: the consensus error

    max_i ||x_i − x̄|| / ||x̄||,    x̄ = the agents' mean (which every W here preserves),

for a ring, the static exponential-2 graph, the one-peer exponential-2 schedule and the Base-2
and Base-3 graphs of Takezawa et al. (2023).  With n a power of two, one-peer exp-2 and Base-2
reach the exact average after log2(n) steps sending one message per agent per step; Base-(k+1)
reaches it after finitely many steps for every n.  Errors at the float64 floor are drawn at 1e-16.

The same loop runs unchanged on MPI (``bfrun -np 64``) with per-rank vectors instead of the stacked
tensor: inside ``bf.simulate(n)`` every op takes a leading agent dimension, and per-agent code can
be run over it with ``bf.sim.vmap`` (see ``bluefog_fn.sim``).
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

import bluefog_fn as bf

FLOOR = 1e-16  # where exact zeros are drawn on the log scale


def consensus_error(x: torch.Tensor) -> float:
    """max_i ||x_i − x̄|| / ||x̄|| over the agents (rows) of ``x``."""
    mean = x.mean(dim=0, keepdim=True)
    return float((torch.linalg.vector_norm(x - mean, dim=1) / torch.linalg.vector_norm(mean)).max())


def messages_per_step(topo: bf.topology.Topology | bf.topology.DynamicTopology) -> float:
    """Messages each agent receives per step, averaged over the agents and the period."""
    graphs = [topo.at(t) for t in range(topo.period)]
    return sum(len(g.in_neighbors(i)) for g in graphs for i in range(g.size)) / (len(graphs) * topo.size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--dim", type=int, default=1000, help="length of each agent's vector")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join("out", "simulate_topologies.png"))
    args = parser.parse_args()
    n = args.agents

    topologies = {
        "ring": bf.topology.ring(n),
        "exp-2 (static)": bf.topology.exponential_two(n),
        "one-peer exp-2": bf.topology.one_peer_exponential_two(n),
        "Base-2 (base_graph k=1)": bf.topology.base_graph(n, 1),
        "Base-3 (base_graph k=2)": bf.topology.base_graph(n, 2),
    }
    errors: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    with bf.simulate(n):
        # Agent r's vector, built exactly as MPI rank r would build its own.
        x0 = bf.sim.per_agent(
            lambda r: torch.randn(args.dim, generator=torch.Generator().manual_seed(bf.sim.agent_seed(args.seed, r)), dtype=torch.float64) + r
        )
        for name, topo in tqdm(topologies.items(), desc="topologies", ncols=90):
            x = x0
            errs = [consensus_error(x)]
            t0 = time.perf_counter()
            for step in range(args.iters):
                x = bf.neighbor_mean(x, topo, step)
                errs.append(consensus_error(x))
            seconds[name] = time.perf_counter() - t0
            errors[name] = errs
        cache = bf.plan_cache_info()

    print(f"average consensus, {n} simulated agents × {args.dim} float64, {args.iters} iterations")
    print(f"{'topology':26s} {'msgs/agent/step':>15s} {'iters to 1e-6':>13s} {'iters to 1e-12':>14s} {'final error':>12s} {'ms/step':>8s}")
    for name, errs in errors.items():
        def first_below(tol: float, errs: list[float] = errs) -> str:
            return next((str(k) for k, e in enumerate(errs) if e <= tol), f">{args.iters}")

        print(
            f"{name:26s} {messages_per_step(topologies[name]):15.2f} {first_below(1e-6):>13s} {first_below(1e-12):>14s} "
            f"{errs[-1]:12.2e} {1e3 * seconds[name] / args.iters:8.3f}"
        )
    print(f"plan cache: {cache.hits} hits, {cache.misses} misses (one plan per agent per distinct graph)")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Dashed/dotted styles keep schedules that coincide (e.g. Base-2 and one-peer exp-2 for a
    # power of two) visible on top of each other.
    styles = ["-", "-", "-", "--", ":"]
    for k, (name, errs) in enumerate(errors.items()):
        ax.semilogy(
            range(len(errs)), [max(e, FLOOR) for e in errs], label=name, linestyle=styles[k % len(styles)],
            marker="." if len(errs) <= 80 else None,
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"consensus error  $\max_i \|x_i - \bar x\| / \|\bar x\|$")
    ax.set_title(f"{n} simulated agents (bf.simulate)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"plot written to {args.out}")


if __name__ == "__main__":
    main()
