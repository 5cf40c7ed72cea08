"""One simulated ``neighbor_mean`` step of 64 agents × 1 M float32 parameters, next to memcpy.

    python bench/simulator.py                    # CPU, the defaults below
    python bench/simulator.py --device cuda      # on a GPU, if there is one

Definitions (n agents, m parameters each, s bytes per value, S = n·m·s = 256 MiB by default):

* **bytes moved** by a mix step: ``(n + E)·m·s`` read (every agent's own row once and one row per
  edge, E = Σ in-degrees) plus ``S`` written.  One-peer exp-2 (E = n) moves 3 S, static exp-2
  with 64 agents (E = 6n) moves 8 S.  This is what the kernel really touches: no agent's row is
  assumed to come from cache.
* **memcpy bandwidth**: ``2 S / t`` (S read + S written) for ``dst.copy_(src)`` into a
  preallocated buffer of the same size, measured in the same run, interleaved with the steps.
* **achieved** = bytes moved / step time; **% memcpy** = achieved / memcpy bandwidth.  The issue's
  target is ≥ 50 % for one-peer exp-2.  ``t / t_copy`` is also printed: how many memcpys of the
  stacked parameters one step costs (independent of the byte accounting).

Rows: the two topologies through ``bf.neighbor_mean`` inside ``bf.simulate(64)`` (outputs from the
world's buffer pool, as in a training loop); ``clone`` (memcpy into a fresh allocation, which
page-faults); and, for scale, the dense product ``W @ X`` in float32 (n² × m work).  Times are
medians over ``--reps`` interleaved repetitions after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

import bluefog_fn as bf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--params", type=int, default=1 << 20, help="parameters per agent")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense W @ X row")
    args = parser.parse_args()

    n, m, device = args.agents, args.params, torch.device(args.device)
    X = torch.randn(n, m, generator=torch.Generator().manual_seed(0)).to(device)
    S = X.numel() * X.element_size()
    dst = torch.empty_like(X)
    dst.copy_(X)  # touch every page once
    one_peer = bf.topology.one_peer_exponential_two(n)
    exp2 = bf.topology.exponential_two(n)
    W = exp2.mixing_matrix().to(device=device, dtype=torch.float32)

    state = {"step": 0}

    def step_one_peer() -> object:
        state["step"] += 1
        return bf.neighbor_mean(X, one_peer, state["step"])

    rows: dict[str, tuple[Callable[[], object], int]] = {
        "memcpy (copy_)": (lambda: dst.copy_(X), 2 * S),
        "memcpy (clone)": (lambda: X.clone(), 2 * S),
        "one-peer exp-2": (step_one_peer, (n + n) * m * 4 + S),
        "static exp-2": (lambda: bf.neighbor_mean(X, exp2), (n + sum(len(exp2.in_neighbors(i)) for i in range(n))) * m * 4 + S),
    }
    if not args.no_dense:
        rows["dense W @ X (float32)"] = (lambda: torch.matmul(W, X), 2 * S)  # reads X once; n² m flops

    times: dict[str, list[float]] = {name: [] for name in rows}
    with bf.simulate(n):
        for fn, _ in rows.values():  # warm-up: compile kernels, trace plans, fill the pool
            fn()
            fn()
        for rep in tqdm(range(args.reps), desc="repetitions", ncols=90, leave=False):
            for name, (fn, _) in rows.items():
                if name.startswith("dense") and rep >= 3:
                    continue  # seconds per call; three samples are enough to make the point
                _sync(device)
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
                times[name].append(time.perf_counter() - t0)
                del out

    t_copy = statistics.median(times["memcpy (copy_)"])
    memcpy_bw = 2 * S / t_copy
    print(f"simulated neighbor_mean: {n} agents × {m} float32 on {device} ({S / 2**20:.0f} MiB stacked), "
          f"torch threads {torch.get_num_threads()}, median of {args.reps}")
    print(f"{'row':24s} {'time ms':>9s} {'bytes moved':>12s} {'GB/s':>7s} {'% memcpy':>9s} {'t/t_copy':>9s}")
    for name, (_, nbytes) in rows.items():
        t = statistics.median(times[name])
        bw = nbytes / t
        print(f"{name:24s} {t * 1e3:9.1f} {nbytes / 2**20:9.0f} MiB {bw / 1e9:7.2f} {100 * bw / memcpy_bw:8.0f}% {t / t_copy:9.2f}")


if __name__ == "__main__":
    main()
