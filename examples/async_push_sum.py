"""Asynchronous push-sum: ranks that run at different speeds still agree on the exact average.

    bfrun -np 4 python examples/async_push_sum.py
    bfrun -np 4 python examples/async_push_sum.py --seconds 5 --max-delay-ms 40

Every rank holds a pair (u_i, w_i) = (x_i, 1) in a one-sided ``bf.Window`` over a directed
graph (exponential-2: not doubly stochastic, so plain averaging would be biased).  In each of
its iterations a rank sleeps a random time of its own (a stand-in for uneven compute), splits
its pair into out-degree + 1 equal shares, keeps one and pushes the others into its
out-neighbours' slots with ``accumulate_async`` (no barrier, no waiting for anybody), sleeps
again while the push is in flight, then collects whatever has arrived.  Fast ranks iterate
more often than slow ones; nobody waits for anybody.  The estimate u_i / w_i still converges:
push-sum conserves Σ u and Σ w, whichever order the pushes land in.

Printed: each rank's consensus error |u_i / w_i − x̄|∞ over wall time (x̄ is known in advance
here, so no rank needs anybody else to measure it).  After the asynchronous phase the ranks
meet once (a quiescent point): the mass is checked (Σ w = n, Σ u = Σ x) and a few synchronous
rounds finish the job, ending with every rank's estimate equal to the true average.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import bluefog_fn as bf


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="length of the asynchronous phase"
    )
    parser.add_argument(
        "--max-delay-ms", type=float, default=20.0, help="largest random sleep per iteration"
    )
    parser.add_argument("--dim", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    bf.init()
    n, me = bf.size(), bf.rank()
    rng = random.Random(args.seed * 7919 + me)
    # Rank r starts from x_r = r·1 + a ramp, so the average is known without communication.
    ramp = torch.linspace(0.0, 1.0, args.dim, dtype=torch.float64)
    x = ramp + me
    average = ramp + (n - 1) / 2
    topo = bf.topology.exponential_two(n)
    u, w = x.clone(), torch.ones((), dtype=torch.float64)
    slowness = 0.25 + rng.random()  # each rank has its own typical speed
    with bf.Window((u, w), topo) as win:
        bf.barrier()
        start = time.perf_counter()
        next_report, iterations = 0.0, 0
        while (elapsed := time.perf_counter() - start) < args.seconds:
            time.sleep(slowness * rng.uniform(0.0, args.max_delay_ms) / 2000)
            share = win.uniform_share(iterations)
            pushed = (u * share, w * share)
            handle = win.accumulate_async(pushed, step=iterations)
            time.sleep(
                slowness * rng.uniform(0.0, args.max_delay_ms) / 2000
            )  # work overlapping the push
            u, w = win.collect(pushed, step=iterations)  # completes the push first
            assert handle.done()
            iterations += 1
            if elapsed >= next_report:
                error = float((u / w - average).abs().max())
                print(
                    f"rank {me}  t={elapsed:5.2f}s  iteration {iterations:4d}  consensus error {error:.3e}",
                    flush=True,
                )
                next_report = max(
                    2 * next_report, 0.02
                )  # the error falls geometrically: report at t doubling

        bf.barrier()  # quiescent point: every rank stopped pushing, every push completed
        u, w = win.collect((u, w))
        bf.barrier()
        total_w = float(bf.global_sum(w.reshape(1)))
        mass_error = float((bf.global_sum(u) - n * average).abs().max())
        counts = bf.allgather(torch.tensor([iterations]))
        error = float((u / w - average).abs().max())
        print(
            f"rank {me}  after {iterations} asynchronous iterations: consensus error {error:.3e}",
            flush=True,
        )
        if me == 0:
            print(
                f"iterations per rank {counts.tolist()}; Σ w = {total_w:.15f} (n = {n}); |Σ u − Σ x| = {mass_error:.2e}"
            )
        assert abs(total_w - n) < 1e-12 and mass_error < 1e-9, "push-sum lost or duplicated mass"

        step = iterations
        for _ in range(200):  # a few synchronous rounds to machine precision
            share = win.uniform_share(step)
            pushed = (u * share, w * share)
            win.accumulate(pushed, step=step)
            bf.barrier()
            u, w = win.collect(pushed, step=step)
            bf.barrier()
            step += 1
            worst = float(bf.allgather((u / w - average).abs().max().reshape(1)).max())
            if worst < 1e-12:
                break
    estimate = u / w
    print(
        f"rank {me}  final estimate error {float((estimate - average).abs().max()):.1e}", flush=True
    )
    assert torch.allclose(estimate, average, atol=1e-12, rtol=0.0), (
        "estimate differs from the average"
    )
    if me == 0:
        print(
            f"every rank's estimate equals the true average (to 1e-12) after {step - iterations} synchronous rounds"
        )
    bf.shutdown()


if __name__ == "__main__":
    main()
