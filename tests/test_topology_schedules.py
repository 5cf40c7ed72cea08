"""Dynamic topologies: DynamicTopology, the one-peer exponential-2 graph and the Base-(k+1) graph."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bluefog_fn import topology as T

F = torch.float64
SIZES = range(1, 65)
POW2 = {1, 2, 4, 8, 16, 32, 64}


def _average(n: int) -> torch.Tensor:
    return torch.full((n, n), 1.0 / n, dtype=F)


def _period_product(d: T.DynamicTopology, start: int = 0) -> torch.Tensor:
    """W_{start+p-1} ⋯ W_{start+1} W_{start}: the map x ↦ x after one period from ``start``."""
    prod = torch.eye(d.size, dtype=F)
    for t in range(start, start + d.period):
        prod = d.mixing_matrix(t) @ prod
    return prod


def _check_step_graph(g: T.Topology, max_degree: int) -> None:
    w = g.mixing_matrix()
    n = g.size
    assert torch.allclose(w.sum(dim=1), torch.ones(n, dtype=F), atol=1e-12, rtol=0)
    assert g.is_doubly_stochastic()
    assert bool((torch.diagonal(w) > 0).all())  # every step keeps a positive self weight
    for r in range(n):
        assert len(g.in_neighbors(r)) <= max_degree
        assert len(g.out_neighbors(r)) <= max_degree
    # For a doubly stochastic W with positive diagonal the gap is positive iff strongly connected.
    assert (g.spectral_gap() > 0) == g.is_strongly_connected()


# ----------------------------------------------------------------------------- one-peer exp-2


@pytest.mark.parametrize("n", SIZES)
def test_one_peer_exponential_two_structure(n: int) -> None:
    d = T.one_peer_exponential_two(n)
    assert isinstance(d, T.DynamicTopology)
    assert d.size == n and d.name == f"one_peer_exponential_two({n})"
    assert d.period == (1 if n == 1 else math.ceil(math.log2(n)))
    for t in range(2 * d.period + 1):
        g = d.at(t)
        k = t % d.period
        _check_step_graph(g, max_degree=1)
        if n == 1:
            assert g.edges == ()
            continue
        for r in range(n):
            assert g.out_neighbors(r) == ((r + 2**k) % n,)
            assert g.recv_weights(r) == {(r - 2**k) % n: 0.5}
            assert g.self_weight(r) == 0.5


@pytest.mark.parametrize("n", SIZES)
def test_one_peer_exponential_two_period_product(n: int) -> None:
    prod = _period_product(T.one_peer_exponential_two(n))
    # Exact (bit for bit) average when n is a power of two, and only then: the product is
    # (1/2^τ) Σ_{j < 2^τ} P^j, which equals 11ᵀ/n only when n divides 2^τ.
    assert torch.equal(prod, _average(n)) == (n in POW2)
    if n in POW2:
        # Any window of one period works, not just the one starting at 0 (the factors commute).
        assert torch.equal(_period_product(T.one_peer_exponential_two(n), start=1), _average(n))


def test_one_peer_exponential_two_small_cases() -> None:
    assert T.one_peer_exponential_two(2).period == 1
    assert T.one_peer_exponential_two(2).mixing_matrix(5).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    d = T.one_peer_exponential_two(5)
    assert d.period == 3
    assert [d.at(t).in_neighbors(0) for t in range(3)] == [(4,), (3,), (1,)]


# ----------------------------------------------------------------------------- Base-(k+1)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_base_graph_exact_average_for_every_n(k: int) -> None:
    for n in SIZES:
        d = T.base_graph(n, k)
        assert d.size == n and d.name == f"base_graph({n}, {k})"
        for t in range(d.period):
            _check_step_graph(d.at(t), max_degree=k)
            assert torch.equal(d.mixing_matrix(t), d.mixing_matrix(t).T)  # undirected steps
        prod = _period_product(d)
        assert torch.allclose(prod, _average(n), atol=1e-12, rtol=0), (n, k)
        # The paper's bound on the length of the sequence.
        assert d.period <= (2 * math.log(n, k + 1) + 2 if n > 1 else 1), (n, k, d.period)


def test_base_graph_periods_match_the_reference() -> None:
    # Sequence lengths for k = 1, n = 1..16 as produced by the authors' reference code
    # (yukiTakezawa/BaseGraph), whose matrices this implementation reproduces.
    got = [T.base_graph(n, 1).period for n in range(1, 17)]
    assert got == [1, 1, 3, 2, 5, 4, 5, 3, 7, 6, 7, 5, 7, 6, 7, 4]


@pytest.mark.parametrize(("n", "k", "period"), [(8, 1, 3), (27, 2, 3), (64, 3, 3), (25, 4, 2)])
def test_base_graph_on_powers_of_k_plus_1_is_a_hypercube(n: int, k: int, period: int) -> None:
    d = T.base_graph(n, k)
    assert d.period == period
    # Every step is a disjoint union of cliques of k + 1 nodes with weight 1/(k + 1).
    for t in range(period):
        g = d.at(t)
        for r in range(n):
            assert len(g.in_neighbors(r)) == k
            assert set(g.recv_weights(r).values()) == {1 / (k + 1)}


def test_base_graph_small_cases() -> None:
    one = T.base_graph(1)
    assert one.period == 1 and one.at(0).edges == () and one.at(0).self_weights == (1.0,)
    two = T.base_graph(2)
    assert two.period == 1 and two.mixing_matrix(0).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    # n = 3, k = 1 (Base-2, 3 = 2 + 1): average inside {0, 1}; then node 2 takes 2/3 of node
    # 1's value (n_0/N_0 = 2/3), which makes node 2 exact; then {0, 1} re-average.
    d = T.base_graph(3, 1)
    third = 1 / 3
    assert d.period == 3
    assert d.mixing_matrix(0).tolist() == [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]]
    assert torch.allclose(
        d.mixing_matrix(1),
        torch.tensor([[1, 0, 0], [0, third, 1 - third], [0, 1 - third, third]], dtype=F),
    )
    assert d.mixing_matrix(2).tolist() == [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_base_graph_rejects_bad_k(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^base_graph: k must be an int >= 1, got "):
        T.base_graph(8, bad)


def test_base_graph_k_beyond_n_is_one_exact_step() -> None:
    d = T.base_graph(5, k=7)
    assert d.period == 1
    assert d.at(0) == T.fully_connected(5)


# ----------------------------------------------------------------------------- DynamicTopology


def test_dynamic_at_is_a_pure_function_of_step() -> None:
    d = T.base_graph(12, 2)
    p = d.period
    for t in range(3 * p):
        assert d.at(t) is d.graphs[t % p]
        assert d.at(t) is d.at(t + p)
        assert torch.equal(d.mixing_matrix(t), d.at(t).mixing_matrix())
    assert d.at(10**15) is d.graphs[10**15 % p]
    for bad in (-1, 0.5, True, "3"):
        with pytest.raises(ValueError, match=r"DynamicTopology.at: step must be an int >= 0"):
            d.at(bad)
        with pytest.raises(ValueError, match=r"DynamicTopology.mixing_matrix: step must be an int"):
            d.mixing_matrix(bad)


def test_dynamic_value_semantics() -> None:
    a = T.one_peer_exponential_two(8)
    b = T.one_peer_exponential_two(8)
    assert a == b and hash(a) == hash(b) and a.fingerprint == b.fingerprint
    assert {a: 1}[b] == 1
    assert a != T.one_peer_exponential_two(16)
    assert a != T.base_graph(8)  # same period (3) and peers, different graphs
    # The name is a label, not identity.
    renamed = T.DynamicTopology(a.graphs, name="mine")
    assert renamed == a and renamed.name == "mine"
    assert T.DynamicTopology([T.ring(4)]) != T.ring(4)
    assert T.DynamicTopology([T.ring(4)]).at(3) == T.ring(4)
    assert T.DynamicTopology([T.ring(4), T.star(4)]) != T.DynamicTopology([T.star(4), T.ring(4)])
    assert pickle.loads(pickle.dumps(a)) == a
    assert repr(a).startswith(
        "DynamicTopology(name='one_peer_exponential_two(8)', size=8, period=3,"
    )
    with pytest.raises(AttributeError):
        a._graphs = ()


def test_dynamic_constructor_validation() -> None:
    with pytest.raises(ValueError, match=r"DynamicTopology: graphs must hold at least one"):
        T.DynamicTopology([])
    with pytest.raises(ValueError, match=r"graphs\[1\] has size 5 but graphs\[0\] has size 4"):
        T.DynamicTopology([T.ring(4), T.ring(5)])
    with pytest.raises(ValueError, match=r"graphs\[0\] must be a Topology, got 'x'"):
        T.DynamicTopology(["x"])
    with pytest.raises(ValueError, match=r"graphs\[0\] must be a Topology"):
        T.DynamicTopology([T.one_peer_exponential_two(4)])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 5), x=st.lists(st.floats(-1e3, 1e3), min_size=40))
def test_base_graph_reaches_the_mean_from_any_start(n: int, k: int, x: list[float]) -> None:
    d = T.base_graph(n, k)
    v = torch.tensor(x[:n], dtype=F)
    mean = float(v.mean())
    for t in range(d.period):
        v = d.mixing_matrix(t) @ v
    assert torch.allclose(v, torch.full((n,), mean, dtype=F), atol=1e-9, rtol=0)
