"""Tutorial: EXTRA, a decentralized algorithm written from ``bf`` ops, simulated, then run on MPI.

    python examples/extra.py                    # 64 simulated agents in one process
    bfrun -np 4 python examples/extra.py        # 4 MPI processes, the same code

Agent i holds a least-squares problem ``f_i(x) = ½‖A_i x − b_i‖²`` of its own; the network
minimises ``Σ_i f_i``.  Decentralized SGD (``bf.optim.dsgd``) with a constant step stops at a
distance from the optimum that grows with the step and with how different the agents' problems
are.  EXTRA (Shi, Ling, Wu & Yin, "EXTRA: An Exact First-Order Algorithm for Decentralized
Consensus Optimization", SIAM J. Optim. 2015) corrects that bias with the previous iterate:

    x¹     = W x⁰ − γ ∇f(x⁰)
    xᵏ⁺¹   = xᵏ + W xᵏ − ½ (xᵏ⁻¹ + W xᵏ⁻¹) − γ (∇f(xᵏ) − ∇f(xᵏ⁻¹))

and converges to the exact minimiser with a constant step when W is symmetric and doubly
stochastic.  ``W xᵏ⁻¹`` was computed one iteration earlier and kept in the state, so a step costs
one ``bf.neighbor_mean``.  The docs' tutorial page walks through this file.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

import bluefog_fn as bf

F64 = torch.float64


# -- 1. the algorithm: an optax-style Transformation built from one bf op --------------------
# --8<-- [start:algorithm]


class ExtraState(NamedTuple):
    """What EXTRA remembers from iteration k − 1 (``None`` before the first step)."""

    x: Any  # xᵏ⁻¹
    wx: Any  # W xᵏ⁻¹
    grad: Any  # ∇f(xᵏ⁻¹)


def extra(lr: float, topology: bf.topology.AnyTopology) -> bf.optim.Transformation:
    """EXTRA with step size ``lr`` over ``topology`` (symmetric, doubly stochastic W)."""

    def init(params: Any) -> ExtraState:
        return ExtraState(None, None, None)

    def step(params: Any, grads: Any, state: ExtraState, k: int) -> tuple[Any, ExtraState]:
        wx = bf.neighbor_mean(params, topology, k)  # the only communication: one row of W @ X
        if state.x is None:
            new = pytree.tree_map(lambda w, g: w - lr * g, wx, grads)
        else:
            new = pytree.tree_map(
                lambda x, w, x0, w0, g, g0: x + w - 0.5 * (x0 + w0) - lr * (g - g0),
                params, wx, state.x, state.wx, grads, state.grad,
            )
        return new, ExtraState(params, wx, grads)

    return bf.optim.Transformation(init, step)
# --8<-- [end:algorithm]


# -- 2. the problem: per-agent data, its gradient, the exact optimum --------------------------
# --8<-- [start:problem]


def make_data(agent: int, m: int = 20, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Agent ``agent``'s ``(A_i, b_i)``: a pure function of (seed, agent), so every world agrees."""
    g = torch.Generator().manual_seed(bf.sim.agent_seed(seed, agent))
    a = torch.randn(m, d, generator=g, dtype=F64) / math.sqrt(m)
    b = a @ (torch.randn(d, generator=g, dtype=F64) + 2.0) + 0.1 * torch.randn(m, generator=g, dtype=F64)
    return a, b


def gradient(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``A_iᵀ (A_i x_i − b_i)`` for one agent (a: (m, d)) or stacked agents (a: (n, m, d))."""
    residual = torch.einsum("...md,...d->...m", a, x) - b
    return torch.einsum("...md,...m->...d", a, residual)


def optimum(n: int) -> torch.Tensor:
    """argmin Σ_i f_i, solved centrally from every agent's data (the normal equations)."""
    data = [make_data(r) for r in range(n)]
    lhs = sum(a.T @ a for a, _ in data)
    rhs = sum(a.T @ b for a, b in data)
    return torch.linalg.solve(lhs, rhs)


def smoothness(n: int) -> float:
    """max_i λ_max(A_iᵀ A_i): the gradients' Lipschitz constant."""
    return max(float(torch.linalg.eigvalsh(a.T @ a).max()) for a, _ in (make_data(r) for r in range(n)))
# --8<-- [end:problem]


# -- 3. one training loop for both worlds ------------------------------------------------------
# --8<-- [start:loop]


def distance(x: torch.Tensor, xstar: torch.Tensor) -> float:
    """sqrt(mean_i ‖x_i − x*‖²): one global_mean, the same code on MPI and in the simulator."""
    sq = ((x - xstar) ** 2).sum(-1, keepdim=True)  # (n, 1) simulated, (1,) on one rank
    return math.sqrt(float(bf.global_mean(sq).reshape(-1)[0]))


def run(opt: bf.optim.Transformation, steps: int, *, simulated: bool) -> list[float]:
    """``steps`` iterations from x = 0; the distance to the optimum after each."""
    if simulated:
        a, b = bf.sim.per_agent(make_data)  # every agent's data, stacked: (n, m, d), (n, m)
    else:
        a, b = make_data(bf.rank())  # this rank's data: (m, d), (m,)
    xstar = optimum(bf.size())
    x = torch.zeros(a.shape[:-2] + a.shape[-1:], dtype=F64)
    state = opt.init(x)
    history = []
    for k in range(steps):
        x, state = opt.step(x, gradient(a, b, x), state, k)
        history.append(distance(x, xstar))
    return history
# --8<-- [end:loop]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=64, help="simulated agents (ignored under bfrun)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--check", type=float, default=None, metavar="TOL",
                        help="exit 1 unless EXTRA ends within TOL of the optimum and DSGD does not")
    args = parser.parse_args(argv)

    # --8<-- [start:main]
    bf.init()
    simulated = bf.size() == 1  # launched without bfrun: simulate the agents in this process
    with bf.simulate(args.agents) if simulated else contextlib.nullcontext():
        n = bf.size()
        graph = "hypercube" if n & (n - 1) == 0 else "ring"  # both: symmetric, doubly stochastic W
        topology = getattr(bf.topology, graph)(n)
        # EXTRA converges for γ < 2 λ_min((I + W)/2) / L = (1 + λ_min(W)) / L.
        w_min = float(torch.linalg.eigvalsh(topology.mixing_matrix()).min())
        lr = 0.9 * (1 + w_min) / smoothness(n)
        runs = {"extra": extra(lr, topology), "dsgd": bf.optim.dsgd(lr, topology)}
        results = {name: run(opt, args.steps, simulated=simulated) for name, opt in runs.items()}
    # --8<-- [end:main]

    if bf.rank() == 0:
        where = f"{n} simulated agents" if simulated else f"{n} MPI ranks"
        print(f"{where}, {graph}({n}), step size {lr:.3f}: distance to the optimum")
        print(f"{'step':>6}  {'extra':>10}  {'dsgd':>10}")
        for k in sorted({0, 9, 49, 99, args.steps - 1} & set(range(args.steps))):
            print(f"{k + 1:>6}  {results['extra'][k]:10.2e}  {results['dsgd'][k]:10.2e}")
    if args.check is not None:
        ok = results["extra"][-1] < args.check < results["dsgd"][-1]
        if not ok:
            print(f"rank {bf.rank()}: check failed: extra {results['extra'][-1]:.2e}, "
                  f"dsgd {results['dsgd'][-1]:.2e}, tolerance {args.check:g}", file=sys.stderr)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
