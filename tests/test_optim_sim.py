"""bf.optim on simulated agents: exactness, bias, and equality with dense references.

Distributed least squares with heterogeneous data: agent i holds ``A_i, b_i`` (its own local
minimiser), the global objective is ``Σ_i ‖A_i x − b_i‖²`` with the closed-form minimiser
``x* = (Σ A_iᵀA_i)⁻¹ Σ A_iᵀ b_i``.  With a constant step size gradient tracking and exact
diffusion reach ``x*``; DSGD/ATC stop at a fixed point whose distance to ``x*`` (the bias) is
computed here in closed form; allreduce is centralised gradient descent.  Everything in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

import bluefog_fn as bf
from bluefog_fn import topology as T

N, DIM, ROWS = 8, 4, 12
F64 = torch.float64


def problem(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, ROWS, DIM, generator=g, dtype=F64) / ROWS**0.5
    truth = 3.0 * torch.randn(n, DIM, generator=g, dtype=F64)  # far-apart local minimisers
    b = torch.einsum("nrd,nd->nr", A, truth) + 0.1 * torch.randn(n, ROWS, generator=g, dtype=F64)
    return A, b


def grad(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Stacked ∇‖A_i x_i − b_i‖² (works per agent too: no leading dimension needed)."""
    out: torch.Tensor = 2.0 * torch.einsum("...rd,...r->...d", A, torch.einsum("...rd,...d->...r", A, x) - b)
    return out


def minimiser(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = torch.linalg.solve(torch.einsum("nrd,nre->de", A, A), torch.einsum("nrd,nr->d", A, b))
    return out


def run(opt: bf.optim.Transformation, A: torch.Tensor, b: torch.Tensor, steps: int, x0: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Iterates x_0 … x_steps of all agents, stacked (n, DIM), inside a simulated world."""
    n = A.shape[0]
    with bf.simulate(n):
        x = torch.zeros(n, DIM, dtype=F64) if x0 is None else x0
        state = opt.init(x)
        out = [x]
        for k in range(steps):
            x, state = opt.step(x, grad(A, b, x), state, k)
            out.append(x)
    return out


def rel_error(x: torch.Tensor, target: torch.Tensor) -> float:
    """max over agents of ‖x_i − target_i‖ / max_i ‖target_i‖ (``target`` one vector or stacked)."""
    return float((x - target).norm(dim=-1).max() / target.norm(dim=-1).max())


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "topology", [T.ring(N), T.one_peer_exponential_two(N), T.exponential_two(N)], ids=["ring", "one_peer_exp2", "exp2"]
)
def test_gradient_tracking_reaches_exact_minimiser(topology: T.AnyTopology) -> None:
    A, b = problem()
    xs = run(bf.optim.gradient_tracking(0.05, topology), A, b, 400)
    assert rel_error(xs[-1], minimiser(A, b)) < 1e-6


@pytest.mark.parametrize("topology", [T.ring(N), T.exponential_two(N)], ids=["ring", "exp2"])
def test_exact_diffusion_reaches_exact_minimiser(topology: T.AnyTopology) -> None:
    A, b = problem()
    xs = run(bf.optim.exact_diffusion(0.05, topology), A, b, 400)
    assert rel_error(xs[-1], minimiser(A, b)) < 1e-6


def test_gradient_tracking_with_local_steps_and_global_averaging_stays_exact() -> None:
    A, b = problem()
    opt = bf.optim.gradient_tracking(0.05, T.ring(N), communicate_every=2, global_every=7)
    assert rel_error(run(opt, A, b, 600)[-1], minimiser(A, b)) < 1e-6


def test_gradient_tracking_tracker_sums_to_network_gradient() -> None:
    """Σ_i y_i^k = Σ_i g_i(x_i^k) at every k (W doubly stochastic): the invariant behind exactness."""
    A, b = problem()
    opt = bf.optim.gradient_tracking(0.05, T.one_peer_exponential_two(N))
    with bf.simulate(N):
        x = torch.zeros(N, DIM, dtype=F64)
        state = opt.init(x)
        for k in range(20):
            g = grad(A, b, x)
            x, state = opt.step(x, g, state, k)
            torch.testing.assert_close(state.tracker.sum(0), g.sum(0), atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- the bias of DSGD / ATC


def _fixed_point(A: torch.Tensor, b: torch.Tensor, W: torch.Tensor, gamma: float, style: str) -> torch.Tensor:
    """The exact limit of DSGD (``X = W X − γ G(X)``) or ATC (``X = W (X − γ G(X))``).

    ``G(X)_i = H_i x_i − c_i`` with ``H_i = 2 A_iᵀA_i``, ``c_i = 2 A_iᵀ b_i``: one linear system
    of size n·d, ``M x = r``, in the row-major vec of X (``vec(W X) = (W ⊗ I) vec X``).
    """
    n = A.shape[0]
    H = torch.block_diag(*[2.0 * A[i].T @ A[i] for i in range(n)])
    c = torch.cat([2.0 * A[i].T @ b[i] for i in range(n)])
    Wk = torch.kron(W, torch.eye(DIM, dtype=F64))
    eye = torch.eye(n * DIM, dtype=F64)
    if style == "dsgd":
        M, r = eye - Wk + gamma * H, gamma * c
    else:
        M, r = eye - Wk + gamma * Wk @ H, gamma * Wk @ c
    out: torch.Tensor = torch.linalg.solve(M, r).reshape(n, DIM)
    return out


@pytest.mark.parametrize("style", ["dsgd", "atc"])
def test_dsgd_and_atc_stall_at_their_computed_bias(style: str) -> None:
    A, b = problem()
    gamma, topology = 0.05, T.ring(N)
    opt = (bf.optim.dsgd if style == "dsgd" else bf.optim.atc)(gamma, topology)
    xs = run(opt, A, b, 600)
    limit = _fixed_point(A, b, topology.mixing_matrix(), gamma, style)
    xstar = minimiser(A, b)
    bias = rel_error(limit, xstar)
    # The iterates do converge — to the biased fixed point, not to x*.
    assert rel_error(xs[-1], limit) < 1e-8
    assert bias > 1e-3, f"{style}: computed bias {bias:.3e} too small to be measurable"
    assert rel_error(xs[-1], xstar) == pytest.approx(bias, rel=1e-6)
    assert rel_error(xs[-1], xstar) > 1e-3


def test_dsgd_bias_shrinks_with_the_step_size() -> None:
    A, b = problem()
    W = T.ring(N).mixing_matrix()
    xstar = minimiser(A, b)
    biases = [rel_error(_fixed_point(A, b, W, g, "dsgd"), xstar) for g in (0.04, 0.02, 0.01)]
    assert biases[0] > biases[1] > biases[2] > 1e-3  # O(γ), never 0 for γ > 0


# --------------------------------------------------------------------------- allreduce


@pytest.mark.parametrize("local", ["sgd", "momentum"])
def test_allreduce_equals_centralised_gradient_descent(local: str) -> None:
    """allreduce = GD on the concatenated data, objective (1/n) ‖A x − b‖²."""
    A, b = problem()
    opt = bf.optim.sgd(0.05) if local == "sgd" else bf.optim.sgd(0.05, momentum=0.9)
    xs = run(bf.optim.allreduce(opt), A, b, 100)
    A_all, b_all = A.reshape(N * ROWS, DIM), b.reshape(N * ROWS)
    x = torch.zeros(DIM, dtype=F64)
    buf = torch.zeros(DIM, dtype=F64)
    for k in range(100):
        g = 2.0 * A_all.T @ (A_all @ x - b_all) / N
        buf = 0.9 * buf + g if local == "momentum" else g
        x = x - 0.05 * buf
        torch.testing.assert_close(xs[k + 1], x.expand(N, DIM), atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- against dense W references


def _case(name: str, n: int) -> tuple[str, Callable[[], bf.optim.Transformation], Callable[[], bf.optim.Transformation], T.AnyTopology, int, int | None]:
    """(algorithm, factory, local-optimizer factory, topology, communicate_every, global_every)."""
    cases: dict[str, tuple[str, Callable[[], bf.optim.Transformation], T.AnyTopology, int, int | None]] = {
        "dsgd_ring": ("awc", lambda: bf.optim.sgd(0.05), T.ring(n), 1, None),
        "awc_exp2_local_steps_global": ("awc", lambda: bf.optim.sgd(0.05), T.exponential_two(n), 2, 5),
        "atc_one_peer_momentum": ("atc", lambda: bf.optim.sgd(0.03, momentum=0.5), T.one_peer_exponential_two(n), 1, None),
        "atc_base_graph_local_steps": ("atc", lambda: bf.optim.sgd(0.05), T.base_graph(n, 1), 3, None),
        "gradient_tracking_one_peer_adam": ("gradient_tracking", lambda: bf.optim.adam(0.02), T.one_peer_exponential_two(n), 1, None),
        "gradient_tracking_ring_global": ("gradient_tracking", lambda: bf.optim.sgd(0.03), T.ring(n), 1, 4),
        "exact_diffusion_ring": ("exact_diffusion", lambda: bf.optim.sgd(0.05), T.ring(n), 1, None),
        "exact_diffusion_one_peer_momentum": ("exact_diffusion", lambda: bf.optim.sgd(0.02, momentum=0.5), T.one_peer_exponential_two(n), 1, None),
    }
    algo, local, topo, every, glob = cases[name]

    def factory() -> bf.optim.Transformation:
        fn = getattr(bf.optim, algo)
        if algo == "exact_diffusion":
            return fn(local(), topo)  # type: ignore[no-any-return]
        return fn(local(), topo, communicate_every=every, global_every=glob)  # type: ignore[no-any-return]

    return algo, factory, local, topo, every, glob


CASE_NAMES = [
    "dsgd_ring",
    "awc_exp2_local_steps_global",
    "atc_one_peer_momentum",
    "atc_base_graph_local_steps",
    "gradient_tracking_one_peer_adam",
    "gradient_tracking_ring_global",
    "exact_diffusion_ring",
    "exact_diffusion_one_peer_momentum",
]


def dense_reference(name: str, A: torch.Tensor, b: torch.Tensor, X0: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The update equations of the docstrings with explicit mixing matrices (no bf ops).

    The local optimizers are elementwise, so one of them stepping the stacked (n, d) iterate is
    every agent's local optimizer at once; only the mixing is written out here.
    """
    n = X0.shape[0]
    algo, _, local_factory, topo, every, glob = _case(name, n)
    local = local_factory()

    def W(k: int) -> torch.Tensor:
        if glob is not None and (k + 1) % glob == 0:
            return torch.full((n, n), 1.0 / n, dtype=F64)
        if (k + 1) % every:
            return torch.eye(n, dtype=F64)
        return topo.at(k // every).mixing_matrix()

    X, s = X0, local.init(X0)
    Y, G_prev, Psi = torch.zeros_like(X0), torch.zeros_like(X0), X0
    out = [X]
    for k in range(steps):
        G = grad(A, b, X)
        if algo == "awc":
            L, s = local.step(X, G, s, k)
            X = W(k) @ X + (L - X)
        elif algo == "atc":
            L, s = local.step(X, G, s, k)
            X = W(k) @ L
        elif algo == "gradient_tracking":
            Y, G_prev = W(k) @ Y + (G - G_prev), G
            L, s = local.step(X, Y, s, k)
            X = W(k) @ X + (L - X)
        else:  # exact diffusion, W̄ = (I + W)/2
            P, s = local.step(X, G, s, k)
            Phi, Psi = P + (X - Psi), P
            X = 0.5 * (torch.eye(n, dtype=F64) + W(k)) @ Phi
        out.append(X)
    return out


@pytest.mark.parametrize("name", CASE_NAMES)
def test_simulated_algorithm_equals_dense_reference(name: str) -> None:
    A, b = problem(n=6, seed=1)  # 6: not a power of two, so one-peer graphs do not average exactly
    x0 = torch.randn(6, DIM, generator=torch.Generator().manual_seed(3), dtype=F64)
    _, factory, *_ = _case(name, 6)
    got = run(factory(), A, b, 40, x0)
    expected = dense_reference(name, A, b, x0, 40)
    for k, (g, e) in enumerate(zip(got, expected, strict=True)):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=f"{name}: iterate {k} differs")


# --------------------------------------------------------------------------- per-agent code under bf.sim.vmap


@pytest.mark.parametrize("name", ["awc_exp2_local_steps_global", "gradient_tracking_one_peer_adam", "exact_diffusion_ring"])
def test_algorithm_step_runs_per_agent_under_sim_vmap(name: str) -> None:
    """The same step written for one agent (as on one MPI rank) inside bf.sim.vmap."""
    n = 4
    A, b = problem(n=n, seed=2)
    _, factory, *_ = _case(name, n)
    opt = factory()
    stacked = run(opt, A, b, 12)
    with bf.simulate(n):
        x = torch.zeros(n, DIM, dtype=F64)
        state = opt.init(x)

        def agent_step(x: torch.Tensor, A_i: torch.Tensor, b_i: torch.Tensor, state: Any, k: int) -> tuple[Any, Any]:
            return opt.step(x, grad(A_i, b_i, x), state, k)

        for k in range(12):
            x, state = bf.sim.vmap(agent_step, in_dims=(0, 0, 0, 0, None))(x, A, b, state, k)
            torch.testing.assert_close(x, stacked[k + 1], atol=1e-12, rtol=1e-12)


def test_sim_state_leaves_carry_the_agent_dimension() -> None:
    opt = bf.optim.gradient_tracking(bf.optim.adam(0.01), T.ring(N))
    A, b = problem()
    with bf.simulate(N):
        x = torch.zeros(N, DIM, dtype=F64)
        x, state = opt.step(x, grad(A, b, x), opt.init(x), 0)
    for leaf in pytree.tree_leaves(state):
        assert leaf is None or leaf.shape == (N, DIM)
