"""local_mean and hierarchical_neighbor_mean in the simulator, their staged plans, and the
homogeneous-machines check.  Dense float64 references: ``(W_M ⊗ I_L)(I_M ⊗ 11ᵀ/L)``."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.hierarchy import homogeneity_problem

F64 = torch.float64
LAYOUTS = [(4, 2), (2, 4)]  # 8 agents as machines × ranks per machine


def world_matrix(wm: torch.Tensor, local: int) -> torch.Tensor:
    return torch.kron(wm.to(F64), torch.full((local, local), 1.0 / local, dtype=F64))


def dense(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (w @ x.to(F64).reshape(x.shape[0], -1)).reshape(x.shape)


def stacked_tree(n: int, seed: int = 0, dtype: torch.dtype = F64) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, 3, 4, generator=g, dtype=F64).to(dtype),
        "b": [torch.randn(n, 5, generator=g, dtype=F64).to(dtype), None],
        "empty": torch.zeros(n, 0, 2, dtype=dtype),
    }


def tensors(tree: object) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


@pytest.mark.parametrize(("machines", "local"), LAYOUTS)
@pytest.mark.parametrize("make", [T.ring, T.exponential_two, T.fully_connected, T.machine_one_peer_exponential_two])
@pytest.mark.parametrize("step", [0, 1, 2])
def test_hierarchical_neighbor_mean_sim_against_dense(machines: int, local: int, make: object, step: int) -> None:
    n = machines * local
    topo = make(machines)  # type: ignore[operator]
    wf = world_matrix(topo.at(step).mixing_matrix(), local)
    tree = stacked_tree(n, seed=step)
    before = [t.clone() for t in tensors(tree)]
    with bf.simulate(n, local_size=local):
        out = bf.hierarchical_neighbor_mean(tree, topo, step)
    for a, x in zip(tensors(out), tensors(tree), strict=True):
        torch.testing.assert_close(a, dense(wf, x), rtol=1e-12, atol=1e-12)
        # Every agent of a machine holds bitwise its leader's row.
        rows = a.reshape(machines, local, -1)
        assert torch.equal(rows, rows[:, :1].expand_as(rows))
    assert out["b"][1] is None
    assert all(torch.equal(a, b) for a, b in zip(tensors(tree), before, strict=True))


@pytest.mark.parametrize(("machines", "local"), LAYOUTS)
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_local_mean_sim_against_dense(machines: int, local: int, dtype: torch.dtype) -> None:
    n = machines * local
    tree = stacked_tree(n, seed=5, dtype=dtype)
    with bf.simulate(n, local_size=local):
        out = bf.local_mean(tree)
        out_async = bf.local_mean_async(tree).wait()
    wf = world_matrix(torch.eye(machines, dtype=F64), local)
    tol = 1e-12 if dtype == F64 else 1e-5
    for a, b, x in zip(tensors(out), tensors(out_async), tensors(tree), strict=True):
        assert a.dtype == dtype and torch.equal(a, b)
        torch.testing.assert_close(a.to(F64), dense(wf, x), rtol=tol, atol=tol)


@pytest.mark.parametrize(("machines", "local"), LAYOUTS)
def test_hierarchical_sim_machine_weights(machines: int, local: int) -> None:
    """src_machine_weights reweights the ring; dst_machine_weights is a per-call machine graph;
    both given per agent (a list of n), every agent of a machine passing its machine's."""
    n = machines * local
    x = torch.randn(n, 6, generator=torch.Generator().manual_seed(1), dtype=F64)
    ring = T.ring(machines)
    wm = torch.zeros(machines, machines, dtype=F64)
    srcs, sws = [], []
    for m in range(machines):
        ins = sorted(ring.in_neighbors(m))
        wm[m, m] = 0.3
        for k, j in enumerate(ins):
            wm[m, j] += 0.7 * (k + 1) / sum(range(1, len(ins) + 1))
        srcs.append({j: float(wm[m, j]) for j in ins})
        sws.append(0.3)
    with bf.simulate(n, local_size=local):
        out = bf.hierarchical_neighbor_mean(
            x, ring, self_weight=[sws[r // local] for r in range(n)], src_machine_weights=[srcs[r // local] for r in range(n)]
        )
    torch.testing.assert_close(out, dense(world_matrix(wm, local), x), rtol=1e-12, atol=1e-12)

    # Per-call graph: machine m sends to m+1 scaled by (1 + m) / 4, receives from m-1 with 0.5.
    wd = torch.zeros(machines, machines, dtype=F64)
    for m in range(machines):
        wd[m, m] = 0.5
        wd[m, (m - 1) % machines] += 0.5 * (1 + (m - 1) % machines) / 4
    with bf.simulate(n, local_size=local):
        out = bf.hierarchical_neighbor_mean(
            x, None, self_weight=0.5,
            src_machine_weights=[{(r // local - 1) % machines: 0.5} for r in range(n)],
            dst_machine_weights=[{(r // local + 1) % machines: (1 + r // local) / 4} for r in range(n)],
        )
    torch.testing.assert_close(out, dense(world_matrix(wd, local), x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("machines", "local"), LAYOUTS)
def test_hierarchical_sim_gradient_is_transpose(machines: int, local: int) -> None:
    n = machines * local
    topo = T.exponential_two(machines)
    wf = world_matrix(topo.mixing_matrix(), local)
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(2), dtype=F64, requires_grad=True)
    g = torch.randn(n, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    with bf.simulate(n, local_size=local):
        (grad,) = torch.autograd.grad(bf.hierarchical_neighbor_mean(x, topo), x, g)
        # Per-agent code under bf.sim.vmap with torch.func.grad: each agent gets Σ_k W[k, i] c_k.
        coef = torch.arange(1.0, n + 1, dtype=F64)

        def agent_grad(xi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
            return torch.func.grad(lambda v: (bf.hierarchical_neighbor_mean(v, topo) * ci).sum())(xi)

        per_agent = bf.sim.vmap(agent_grad)(torch.ones(n, 2, dtype=F64), coef)
        (lgrad,) = torch.autograd.grad(bf.local_mean(x), x, g)
    torch.testing.assert_close(grad, wf.T @ g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per_agent, (wf.T @ coef).unsqueeze(1).expand(n, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lgrad, world_matrix(torch.eye(machines, dtype=F64), local) @ g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("machines", "local"), LAYOUTS)
def test_hierarchical_plan_non_leaders_send_nothing_across_machines(machines: int, local: int) -> None:
    n = machines * local
    topo = T.one_peer_exponential_two(machines)
    x = torch.zeros(n, 10)
    with bf.simulate(n, local_size=local):
        for step in range(topo.period):
            plans = [bf.trace(bf.hierarchical_neighbor_mean, x, topo, step, rank=r) for r in range(n)]
            for r, plan in enumerate(plans):
                assert isinstance(plan, bf.StagedPlan)
                assert plan.is_leader == (r % local == 0)
                if not plan.is_leader:
                    assert plan.bytes_across_machines == 0
                    assert [d for p in plan.stages for d, _ in p.sends] == [r - r % local]
            # One model's worth (40 bytes) per machine edge crosses machines, from leaders only.
            assert sum(p.bytes_across_machines for p in plans) == 40 * machines
            flat = [bf.trace(bf.neighbor_mean, x, T.one_peer_exponential_two(n), step, rank=r) for r in range(n)]
            crossing = sum(p.layout.nbytes for r, p in enumerate(flat) for d, _ in p.sends if d // local != r // local)
            assert crossing >= sum(p.bytes_across_machines for p in plans)
        lm = bf.trace(bf.local_mean, x, rank=1)
        assert [p.op for p in lm.stages] == ["local_reduce", "local_broadcast"] and lm.bytes_across_machines == 0
        # The plan is cached: tracing again returns the same object.
        assert bf.trace(bf.local_mean, x, rank=1) is lm
        rev = lm.reversed()
        assert [p.op for p in rev.stages] == ["local_reduce", "local_broadcast"]
        assert rev.stages[0].sends == lm.stages[1].recvs
        edges = [(p.op, p.self_weight, p.recvs, p.sends) for p in rev.reversed().stages]
        assert edges == [(p.op, p.self_weight, p.recvs, p.sends) for p in lm.stages]


@settings(max_examples=15, deadline=None, derandomize=True)
@given(layout=st.sampled_from([(4, 2), (2, 4), (8, 1), (1, 8)]), step=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_hierarchical_preserves_the_global_mean(layout: tuple[int, int], step: int, seed: int) -> None:
    """W_M doubly stochastic ⇒ the average over all agents is preserved, and after one round the
    agents of a machine agree."""
    machines, local = layout
    n = machines * local
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=F64)
    with bf.simulate(n, local_size=local):
        out = bf.hierarchical_neighbor_mean(x, T.one_peer_exponential_two(machines), step)
    torch.testing.assert_close(out.mean(0), x.mean(0), rtol=1e-12, atol=1e-12)
    assert torch.equal(out.view(machines, local, 4), out.view(machines, local, 4)[:, :1].expand(machines, local, 4))


def test_homogeneity_problem() -> None:
    assert homogeneity_problem([(0, 2, 0), (1, 2, 0), (0, 2, 1), (1, 2, 1)]) is None
    assert homogeneity_problem([(0, 1, 0)]) is None
    msg = homogeneity_problem([(0, 3, 0), (1, 3, 0), (2, 3, 0), (0, 1, 1)])
    assert msg is not None and "different numbers of ranks (1 on rank(s) [3]; 3 on rank(s) [0, 1, 2])" in msg
    msg = homogeneity_problem([(0, 2, 0), (0, 2, 1), (1, 2, 0), (1, 2, 1)])
    assert msg is not None and msg.startswith("rank 1 is local rank 0 of machine 1")


def test_hierarchical_ops_refuse_non_homogeneous_machines() -> None:
    sim = bf.simulate(4, local_size=2)
    sim.world.homogeneity = "rank 1 is local rank 0 of machine 1 (test)"
    with sim:
        assert not bf.is_homogeneous()
        with pytest.raises(ValueError, match=r"local_mean: needs homogeneous machines of consecutive ranks, but rank 1"):
            bf.local_mean(torch.zeros(4, 2))
        with pytest.raises(ValueError, match=r"hierarchical_neighbor_mean: needs homogeneous machines"):
            bf.hierarchical_neighbor_mean(torch.zeros(4, 2), T.ring(2))
    assert bf.is_homogeneous()


def test_hierarchical_sim_argument_errors() -> None:
    with bf.simulate(8, local_size=2):
        with pytest.raises(ValueError, match="machine_topology has size 8 but the world has 4 machines"):
            bf.hierarchical_neighbor_mean(torch.zeros(8, 2), T.ring(8))
        with pytest.raises(ValueError, match=r"src_machine_weights names machine\(s\) \[2\] that are not in-neighbours of machine 0 .*simulated agent 0"):
            bf.hierarchical_neighbor_mean(torch.zeros(8, 2), T.ring(4), self_weight=0.5, src_machine_weights={2: 0.5})
        with pytest.raises(ValueError, match="self_weight given per agent must be a list of 8 entries"):
            bf.hierarchical_neighbor_mean(torch.zeros(8, 2), T.ring(4), self_weight=[0.5] * 3)
        with pytest.raises(bf.MismatchError, match="agent 0 sends to agent 2 but agent 2 does not receive"):
            bf.hierarchical_neighbor_mean(
                torch.zeros(8, 2), None, self_weight=1.0, src_machine_weights={},
                dst_machine_weights=[[(r // 2 + 1) % 4] for r in range(8)],
            )
        with pytest.raises(TypeError, match="local_mean takes only a tree"):
            bf.trace(bf.local_mean, torch.zeros(8, 2), T.ring(4))


@pytest.mark.parametrize(("machines", "local"), LAYOUTS)
def test_hierarchical_sim_gradient_with_per_call_machine_graph(machines: int, local: int) -> None:
    """The adjoint of a per-call machine graph with sender scales: Wᵀ, the scales applied at the
    other end (as on MPI, where each side only knows its own weights)."""
    n = machines * local
    wd = torch.zeros(machines, machines, dtype=F64)
    for m in range(machines):
        wd[m, m] = 0.25
        wd[m, (m - 1) % machines] += 0.75 * (2 + (m - 1) % machines) / 5
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(4), dtype=F64, requires_grad=True)
    g = torch.randn(n, 4, generator=torch.Generator().manual_seed(5), dtype=F64)
    with bf.simulate(n, local_size=local):
        out = bf.hierarchical_neighbor_mean(
            x, None, self_weight=0.25,
            src_machine_weights=[{(r // local - 1) % machines: 0.75} for r in range(n)],
            dst_machine_weights=[{(r // local + 1) % machines: (2 + r // local) / 5} for r in range(n)],
        )
        (grad,) = torch.autograd.grad(out, x, g)
    wf = world_matrix(wd, local)
    torch.testing.assert_close(out, dense(wf, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, wf.T @ g, rtol=1e-12, atol=1e-12)
