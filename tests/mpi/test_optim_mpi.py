"""bf.optim under MPI: each rank's iterates equal its row of the same run on all agents' data.

Every rank builds every rank's least-squares data deterministically, runs the algorithm for all
agents in one process (the simulator, ``bf.simulate(n)``), and runs the real MPI algorithm on
its own shard; the trajectories must agree to 1e-10 in float64.  At size 1 (plain pytest) the
same tests compare the local world with a simulated world of one agent.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import all_ranks_agree, assert_close_everywhere

N = bf.size()
ME = bf.rank()
DIM, ROWS, STEPS = 4, 12, 60
TOL = {"atol": 1e-10, "rtol": 1e-10}


def problem(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Agent i's ``A_i`` (ROWS × DIM) and ``b_i``, heterogeneous local minimisers; float64."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, ROWS, DIM, generator=g, dtype=torch.float64) / ROWS**0.5
    truth = 3.0 * torch.randn(n, DIM, generator=g, dtype=torch.float64)
    b = torch.einsum("nrd,nd->nr", A, truth) + 0.1 * torch.randn(n, ROWS, generator=g, dtype=torch.float64)
    return A, b


def grad(A: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """∇ ‖A x − b‖² for one agent, or for all agents at once (leading agent dimension)."""
    residual = torch.einsum("...rd,...d->...r", A, x) - b
    out: torch.Tensor = 2.0 * torch.einsum("...rd,...r->...d", A, residual)
    return out


Factory = Callable[[], bf.optim.Transformation]

CASES: dict[str, Factory] = {
    "dsgd_ring": lambda: bf.optim.dsgd(0.05, T.ring(N)),
    "awc_exp2_local_steps_global": lambda: bf.optim.awc(
        0.05, T.exponential_two(N), communicate_every=2, global_every=5
    ),
    "atc_one_peer_momentum": lambda: bf.optim.atc(bf.optim.sgd(0.03, momentum=0.5), T.one_peer_exponential_two(N)),
    "gradient_tracking_ring": lambda: bf.optim.gradient_tracking(0.03, T.ring(N)),
    "gradient_tracking_one_peer": lambda: bf.optim.gradient_tracking(0.03, T.one_peer_exponential_two(N)),
    "exact_diffusion_ring": lambda: bf.optim.exact_diffusion(0.05, T.ring(N)),
    "exact_diffusion_exp2_adam": lambda: bf.optim.exact_diffusion(bf.optim.adam(0.02), T.exponential_two(N)),
    "allreduce": lambda: bf.optim.allreduce(0.05),
}


def run(factory: Factory, A: torch.Tensor, b: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The trajectory ``[x_0, …, x_STEPS]`` of one run (per agent, or stacked in the simulator)."""
    opt = factory()
    x = x0.clone()
    state = opt.init(x)
    trajectory = [x]
    for k in range(STEPS):
        x, state = opt.step(x, grad(A, b, x), state, k)
        trajectory.append(x)
    return torch.stack(trajectory)


def start(n: int) -> torch.Tensor:
    """Different starting points per agent (the algorithms must not assume consensus)."""
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@pytest.mark.parametrize("case", sorted(CASES))
def test_optim_mpi_iterates_equal_simulator(case: str) -> None:
    A, b = problem(N)
    x0 = start(N)
    with bf.simulate(N):
        expected = run(CASES[case], A, b, x0)[:, ME]
    actual = run(CASES[case], A[ME], b[ME], x0[ME])
    assert_close_everywhere(actual, expected, f"{case}: MPI trajectory vs simulator", **TOL)


def test_optim_mpi_allreduce_keeps_agents_identical() -> None:
    A, b = problem(N)
    x = run(CASES["allreduce"], A[ME], b[ME], torch.zeros(DIM, dtype=torch.float64))[-1]
    gathered = bf.allgather(x.reshape(1, DIM))
    assert_close_everywhere(gathered, x.expand(N, DIM), "allreduce consensus", atol=0.0, rtol=0.0)


def test_optim_mpi_inputs_not_mutated() -> None:
    A, b = problem(N)
    opt = bf.optim.gradient_tracking(bf.optim.sgd(0.03, momentum=0.5), T.ring(N))
    w = start(N)[ME]
    x = {"w": w, "none": None}
    state = opt.init(x)
    g = {"w": grad(A[ME], b[ME], w), "none": None}
    saved = copy.deepcopy((x, g, state))
    opt.step(x, g, state, 0)
    ok = all(torch.equal(u, v) for u, v in zip(_leaves((x, g, state)), _leaves(saved), strict=True))
    all_ranks_agree(ok, "gradient_tracking.step modified its inputs")


def _leaves(tree: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(tree) if t is not None]


# --------------------------------------------------------------------------- nn.Module front end


def _linear(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(DIM, 1).double()


@pytest.mark.parametrize("style", ["atc", "awc"])
def test_decentralized_optimizer_equals_functional(style: str) -> None:
    A, b = problem(N, seed=3)
    model = _linear(ME)
    bf.broadcast_parameters(model, root=0)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    topo = T.one_peer_exponential_two(N)
    wrapped = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5), model, topo, style=style  # type: ignore[arg-type]
    )
    functional = (bf.optim.atc if style == "atc" else bf.optim.awc)(bf.optim.sgd(0.05, momentum=0.5), topo)
    state = functional.init(params)

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = ((torch.func.functional_call(model, p, (A[ME],)).squeeze(-1) - b[ME]) ** 2).sum()
        return out

    for k in range(10):
        wrapped.zero_grad()
        loss(dict(model.named_parameters())).backward()
        wrapped.step()
        params, state = functional.step(params, torch.func.grad(loss)(params), state, k)
    for name, p in model.named_parameters():
        assert_close_everywhere(p.detach(), params[name], f"{style}: module {name} vs functional", atol=1e-12, rtol=1e-12)


def test_broadcast_parameters_module_copies_root() -> None:
    model = torch.nn.BatchNorm1d(3).double()
    torch.manual_seed(100 + ME)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        model.weight.normal_()
        buffers["running_mean"].normal_()
        buffers["num_batches_tracked"] += ME
    out = bf.broadcast_parameters(model, root=N - 1)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        gathered = bf.allgather(tensor.detach().reshape(1, -1))
        ok = bool((gathered == gathered[N - 1]).all()) and torch.equal(out[name], tensor.detach())
        all_ranks_agree(ok, f"broadcast_parameters {name}")
    assert int(buffers["num_batches_tracked"]) == N - 1


def test_broadcast_optimizer_state_from_root_with_state() -> None:
    model = _linear(0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01 * (ME + 1))
    if ME == 0:  # only the root has stepped: the others have no state at all
        model(torch.ones(2, DIM, dtype=torch.float64)).sum().backward()
        opt.step()
    bf.optim.broadcast_optimizer_state(opt, root=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    state = opt.state_dict()["state"]
    assert sorted(state) == [0, 1]
    for pid in (0, 1):
        exp_avg = state[pid]["exp_avg"]
        gathered = bf.allgather(exp_avg.reshape(1, -1))
        all_ranks_agree(bool((gathered == gathered[0]).all()) and bool(exp_avg.abs().sum() > 0), "exp_avg")


def test_broadcast_parameters_state_dict_updates_module_in_place() -> None:
    """BlueFog's idiom ``broadcast_parameters(model.state_dict(), root)`` changes the model."""
    model = torch.nn.BatchNorm1d(3).double()
    torch.manual_seed(200 + ME)
    with torch.no_grad():
        model.weight.normal_()
        model.running_var.uniform_()
    sd = model.state_dict()
    assert bf.broadcast_parameters(sd, root=N - 1) is sd
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        gathered = bf.allgather(tensor.detach().reshape(1, -1))
        all_ranks_agree(bool((gathered == gathered[N - 1]).all()), f"broadcast_parameters(state_dict) {name}")
    pairs = list(model.named_parameters())
    with torch.no_grad():
        model.bias.fill_(float(ME))
    bf.broadcast_parameters(pairs, root=0)
    all_ranks_agree(bool((model.bias == 0.0).all()), "broadcast_parameters(named_parameters) bias")
