"""BlueFog's schedules driving neighbor_mean, graph discovery and allreduce_parameters on every rank.

Every schedule's step is checked against the dense reference ``(W_t X)[rank]`` in float64, and
the simulator is checked against the same reference, so MPI and simulator agree with it.
"""

from __future__ import annotations

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import all_ranks_agree, assert_close_everywhere

N = bf.size()
ME = bf.rank()
F = torch.float64


def _schedules(n: int) -> list[tuple[str, T.AnyTopology]]:
    out: list[tuple[str, T.AnyTopology]] = [
        ("one_peer_ring", T.one_peer(T.ring(n))),
        ("one_peer_star", T.one_peer(T.star(n))),
        ("one_peer_exp2", T.one_peer(T.exponential_two(n))),
        ("ring_left", T.ring(n, style=1)),
        ("ring_right", T.ring(n, style=2)),
        ("sym_exp_base4", T.symmetric_exponential(n, base=4)),
        ("machine_exp2", T.machine_one_peer_exponential_two(n)),
    ]
    for local in (1, 3, 4, 5, 6, 8):
        if n % local == 0:
            out.append((f"inner_outer_ring_L{local}", T.inner_outer_ring(n, local)))
            out.append((f"inner_outer_exp2_L{local}", T.inner_outer_exponential_two(n, local)))
    return out


def _values(n: int) -> torch.Tensor:
    """Agent r's value: row r (distinct, not dyadic, so wrong weights show)."""
    g = torch.Generator().manual_seed(7)
    return torch.randn((n, 5), generator=g, dtype=F) / 3.0


@pytest.mark.parametrize(("label", "topo"), _schedules(N), ids=[s[0] for s in _schedules(N)])
def test_schedule_neighbor_mean_equals_dense(label: str, topo: T.AnyTopology) -> None:
    x = _values(N)
    mine = x[ME].clone()
    for t in range(2 * topo.period + 1):
        out = bf.neighbor_mean(mine, topo, t)
        expected = (topo.at(t).mixing_matrix() @ x)[ME]
        assert_close_everywhere(out, expected, f"{label} step {t}", atol=1e-14, rtol=0)
    assert torch.equal(mine, x[ME])


@pytest.mark.parametrize(("label", "topo"), _schedules(N), ids=[s[0] for s in _schedules(N)])
def test_schedule_in_the_simulator_equals_dense(label: str, topo: T.AnyTopology) -> None:
    x = _values(N)
    with bf.simulate(N):
        for t in range(topo.period + 1):
            out = bf.neighbor_mean(x, topo, t)
            torch.testing.assert_close(out, topo.at(t).mixing_matrix() @ x, atol=1e-14, rtol=0)


def _graph(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((n, n), generator=g) < 0.5
    return [[j for j in range(n) if j != i and bool(mask[i, j])] for i in range(n)]


@pytest.mark.parametrize("seed", range(6))
def test_infer_sources_and_destinations(seed: int) -> None:
    dst = _graph(N, seed)
    src = [sorted(j for j in range(N) if i in dst[j]) for i in range(N)]
    # Unsorted input with numpy-free ints: the answer is sorted.
    got_src = bf.topology.infer_sources(list(reversed(dst[ME])))
    got_dst = bf.topology.infer_destinations(src[ME])
    all_ranks_agree(got_src == tuple(src[ME]) and got_dst == tuple(dst[ME]), f"infer seed {seed}")
    with bf.simulate(N):
        assert bf.topology.infer_sources(dst) == [tuple(s) for s in src]


def test_infer_from_a_topology() -> None:
    topo = T.exponential_two(N)
    ok = bf.topology.infer_sources(list(topo.out_neighbors(ME))) == topo.in_neighbors(ME)
    ok = ok and bf.topology.infer_destinations(list(topo.in_neighbors(ME))) == topo.out_neighbors(ME)
    all_ranks_agree(ok, "infer from exponential_two")


@pytest.mark.skipif(N < 2, reason="a mismatch needs two ranks")
def test_infer_mismatched_calls_raise_on_every_rank() -> None:
    with pytest.raises(bf.MismatchError, match="called infer_"):
        if ME == 0:
            bf.topology.infer_sources([])
        else:
            bf.topology.infer_destinations([])
    bf.barrier()


def test_infer_bad_input_raises_before_any_message() -> None:
    # Every rank passes the same bad list, so if any message were sent first this would hang.
    with pytest.raises(ValueError, match=rf"infer_sources: dst_ranks names rank {N}, outside"):
        bf.topology.infer_sources([N])
    with pytest.raises(ValueError, match=rf"infer_destinations: src_ranks of rank {ME} names rank {ME} itself"):
        bf.topology.infer_destinations([ME])
    # The collective still works afterwards: nothing is left half-sent.
    all_ranks_agree(bf.topology.infer_sources([]) == (), "infer after errors")


def test_allreduce_parameters_module_in_place() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    values = {}
    for k, p in model.named_parameters():
        per_rank = [torch.full(p.shape, float(r) + 0.25, dtype=p.dtype) * (1 + torch.arange(p.numel()).reshape(p.shape)) for r in range(N)]
        values[k] = per_rank
        with torch.no_grad():
            p.copy_(per_rank[ME])
    with torch.no_grad():
        model[1].running_mean.fill_(float(ME))
    out = bf.allreduce_parameters(model)
    assert set(out) == {k for k, _ in model.named_parameters()}
    for k, p in model.named_parameters():
        expected = sum(v.double() for v in values[k]) / N
        assert_close_everywhere(p.detach().double(), expected, f"allreduce_parameters {k}", atol=1e-6, rtol=0)
        assert torch.equal(out[k], p.detach())
    # Buffers are not averaged.
    all_ranks_agree(bool((model[1].running_mean == float(ME)).all()), "buffers untouched")


def test_allreduce_parameters_tree_is_pure() -> None:
    tree = {"a": torch.full((2, 2), float(ME), dtype=F), "b": [torch.arange(3, dtype=F) * ME]}
    before = {"a": tree["a"].clone(), "b": [tree["b"][0].clone()]}
    out = bf.allreduce_parameters(tree)
    mean_rank = (N - 1) / 2
    assert_close_everywhere(out["a"], torch.full((2, 2), mean_rank, dtype=F), "tree a", atol=1e-15, rtol=0)
    assert_close_everywhere(out["b"][0], torch.arange(3, dtype=F) * mean_rank, "tree b", atol=1e-15, rtol=0)
    assert torch.equal(tree["a"], before["a"]) and torch.equal(tree["b"][0], before["b"][0])


def test_allreduce_parameters_state_dict_updates_the_model_in_place() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(ME))
        model[1].running_mean.fill_(2.0 * ME)
    sd = model.state_dict()
    assert bf.allreduce_parameters(sd) is sd  # BlueFog's idiom: no silent copy
    mean_rank = (N - 1) / 2
    for k, p in model.named_parameters():
        assert_close_everywhere(p.detach().double(), torch.full(p.shape, mean_rank, dtype=F), k, atol=1e-6, rtol=0)
    # Floating buffers in a state dict are averaged too; integer counters are left alone.
    assert_close_everywhere(model[1].running_mean.double(), torch.full((3,), 2.0 * mean_rank, dtype=F), "running_mean", atol=1e-6, rtol=0)
    all_ranks_agree(int(model[1].num_batches_tracked) == 0, "num_batches_tracked untouched")
    with torch.no_grad():
        model[0].weight.fill_(3.0 * ME)
    bf.allreduce_parameters(model.named_parameters())  # (name, tensor) pairs: in place as well
    assert_close_everywhere(model[0].weight.detach().double(), torch.full((3, 2), 3.0 * mean_rank, dtype=F), "pairs", atol=1e-6, rtol=0)
