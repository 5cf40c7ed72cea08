"""Static topologies: the Topology value type, the builders, and the networkx/matrix bridges.

References are exact: hand-written mixing matrices for small cases, networkx's adjacency for
``from_networkx``, and independent eigenvalue computations for the spectral gap.
"""

from __future__ import annotations

import copy
import doctest
import math
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import networkx as nx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bluefog_fn import topology as T
from bluefog_fn.topology import builders, graph, schedules

Builder = Callable[[int], T.Topology]

# Every static constructor as a function of n alone (hypercube only takes powers of two).
BUILDERS: dict[str, Builder] = {
    "ring": T.ring,
    "star": T.star,
    "star_last_center": lambda n: T.star(n, center=n - 1),
    "mesh_grid_2d": T.mesh_grid_2d,
    "fully_connected": T.fully_connected,
    "exponential_two": T.exponential_two,
    "exponential_base3": lambda n: T.exponential(n, 3),
    "symmetric_exponential": T.symmetric_exponential,
    "hypercube": T.hypercube,
}
SIZES = range(1, 65)
POW2 = {1, 2, 4, 8, 16, 32, 64}


def _sizes(name: str) -> Iterator[int]:
    return (n for n in SIZES if name != "hypercube" or n in POW2)


def _all_builtins() -> Iterator[tuple[str, int, T.Topology]]:
    for name, build in BUILDERS.items():
        for n in _sizes(name):
            yield name, n, build(n)


ALL = list(_all_builtins())
# Topologies are immutable values, so the tests share one instance per (builder, n).
BUILT: dict[str, list[tuple[int, T.Topology]]] = {
    name: [(n, t) for other, n, t in ALL if other == name] for name in BUILDERS
}

# A small sample for the slower per-graph checks (eigenvalues, networkx, pickling).
SAMPLE = [item for item in ALL if item[1] in {1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 31, 64}]
SAMPLE_IDS = [f"{name}-{n}" for name, n, _ in SAMPLE]

F = torch.float64


def _w(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F)


# ----------------------------------------------------------------------------- builders: W


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builders_rows_sum_to_one_and_support_is_the_edges(name: str) -> None:
    for n, t in BUILT[name]:
        w = t.mixing_matrix()
        assert w.dtype == F and w.shape == (n, n)
        assert torch.allclose(w.sum(dim=1), torch.ones(n, dtype=F), atol=1e-12, rtol=0)
        expected_support = torch.eye(n, dtype=torch.bool)
        for src, dst, weight in t.edges:
            assert weight > 0
            expected_support[dst, src] = True
        # W is positive exactly on the edges and the diagonal: every built-in keeps a positive
        # self weight (star's centre keeps 1/n, its leaves 1 − 1/n).
        assert torch.equal(w > 0, expected_support), (name, n)
        assert bool((torch.diagonal(w) > 0).all())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builders_doubly_stochastic_regular_and_strongly_connected(name: str) -> None:
    for n, t in BUILT[name]:
        if t.is_regular():
            assert t.is_doubly_stochastic(), (name, n)
        # Every built-in happens to be doubly stochastic (star and mesh by their weight rules).
        assert t.is_doubly_stochastic(), (name, n)
        assert t.is_strongly_connected(), (name, n)
        w = t.mixing_matrix()
        assert torch.allclose(w.sum(dim=0), torch.ones(n, dtype=F), atol=1e-12, rtol=0)


def test_regularity_of_builtins() -> None:
    assert T.ring(7).is_regular()
    assert T.exponential_two(11).is_regular()
    assert T.symmetric_exponential(12).is_regular()
    assert T.hypercube(16).is_regular()
    assert not T.star(5).is_regular()
    assert not T.mesh_grid_2d(6).is_regular()
    assert T.star(2).is_regular()  # two agents: centre and leaf are symmetric


@pytest.mark.parametrize(("name", "n", "t"), SAMPLE, ids=SAMPLE_IDS)
def test_builders_spectral_gap_in_unit_interval(name: str, n: int, t: T.Topology) -> None:
    gap = t.spectral_gap()
    assert 0.0 < gap <= 1.0, (name, n, gap)


@pytest.mark.parametrize("n", SIZES)
def test_fully_connected_spectral_gap_is_one(n: int) -> None:
    assert T.fully_connected(n).spectral_gap() == 1.0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_neighbor_views_consistent_with_w(name: str) -> None:
    for n, t in BUILT[name]:
        w = t.mixing_matrix().tolist()
        for r in range(n):
            ins = t.in_neighbors(r)
            outs = t.out_neighbors(r)
            assert ins == tuple(sorted(ins)) and outs == tuple(sorted(outs))
            assert ins == tuple(j for j in range(n) if j != r and w[r][j] > 0)
            assert outs == tuple(i for i in range(n) if i != r and w[i][r] > 0)
            assert t.recv_weights(r) == {j: w[r][j] for j in ins}
            assert list(t.recv_weights(r)) == list(ins)
            assert t.send_weights(r) == {i: w[i][r] for i in outs}
            assert t.self_weight(r) == w[r][r]


# ----------------------------------------------------------------------------- exact small W


def test_ring4_exact() -> None:
    a = 1 / 3
    expected = _w([[a, a, 0, a], [a, a, a, 0], [0, a, a, a], [a, 0, a, a]])
    assert torch.equal(T.ring(4).mixing_matrix(), expected)


def test_ring_small_sizes() -> None:
    assert torch.equal(T.ring(1).mixing_matrix(), _w([[1.0]]))
    assert torch.equal(T.ring(2).mixing_matrix(), _w([[0.5, 0.5], [0.5, 0.5]]))
    assert T.ring(1).edges == ()


def test_star4_exact() -> None:
    q = 0.25
    expected = _w([[q, q, q, q], [q, 0.75, 0, 0], [q, 0, 0.75, 0], [q, 0, 0, 0.75]])
    assert torch.equal(T.star(4).mixing_matrix(), expected)


def test_star_center_moves_the_hub() -> None:
    t = T.star(4, center=2)
    assert t.in_neighbors(2) == (0, 1, 3)
    assert t.in_neighbors(0) == (2,)
    assert t.self_weight(2) == 0.25 and t.self_weight(0) == 0.75
    assert T.star(1).mixing_matrix().tolist() == [[1.0]]


def test_mesh_grid_2d_6_exact() -> None:
    # 2 × 3 grid   0 1 2 / 3 4 5 ; degrees 2 3 2 / 2 3 2 ; w_ij = 1/(1 + max(d_i, d_j)).
    q, t3 = 1 / 4, 1 / 3
    s_corner = 1 - (q + t3)
    expected = _w(
        [
            [s_corner, q, 0, t3, 0, 0],
            [q, 1 - 3 * q, q, 0, q, 0],
            [0, q, s_corner, 0, 0, t3],
            [t3, 0, 0, s_corner, q, 0],
            [0, q, 0, q, 1 - 3 * q, q],
            [0, 0, t3, 0, q, s_corner],
        ]
    )
    got = T.mesh_grid_2d(6).mixing_matrix()
    assert torch.allclose(got, expected, atol=1e-15, rtol=0)
    assert torch.equal(got, got.T)


def test_mesh_grid_2d_shape_choice_and_override() -> None:
    # Largest divisor a <= sqrt(n): 12 -> 3 × 4, 7 (prime) -> 1 × 7 (a path).
    assert T.mesh_grid_2d(12).in_neighbors(0) == (1, 4)
    assert T.mesh_grid_2d(7).in_neighbors(3) == (2, 4)
    assert T.mesh_grid_2d(12, shape=(2, 6)).in_neighbors(0) == (1, 6)
    with pytest.raises(ValueError, match=r"mesh_grid_2d: shape \(3, 3\) has 9 cells but n = 12"):
        T.mesh_grid_2d(12, shape=(3, 3))


def test_exponential_two_5_exact() -> None:
    # r receives from r-1, r-2, r-4 (mod 5), weights 1/4.
    q = 0.25
    expected = torch.zeros(5, 5, dtype=F)
    for r in range(5):
        for j in (r, (r - 1) % 5, (r - 2) % 5, (r - 4) % 5):
            expected[r, j] = q
    assert torch.equal(T.exponential_two(5).mixing_matrix(), expected)
    assert T.exponential_two(5).in_neighbors(0) == (1, 3, 4)


def test_exponential_variants() -> None:
    assert T.exponential(16, 2) == T.exponential_two(16)
    assert T.exponential(10, 3).in_neighbors(0) == (1, 7, 9)
    assert T.exponential(10, 3).self_weight(0) == 0.25
    # 6 = 2 · 3: r ± 1, r ± 2, r ± 4 (r + 4 ≡ r − 2) -> offsets {1, 2, 4, 5}.
    assert T.symmetric_exponential(6).in_neighbors(0) == (1, 2, 4, 5)
    assert T.symmetric_exponential(6).self_weight(0) == 0.2


def test_hypercube_and_fully_connected_exact() -> None:
    t = T.hypercube(4)
    a = 1 / 3
    assert torch.equal(
        t.mixing_matrix(), _w([[a, a, a, 0], [a, a, 0, a], [a, 0, a, a], [0, a, a, a]])
    )
    assert torch.equal(T.fully_connected(3).mixing_matrix(), torch.full((3, 3), 1 / 3, dtype=F))
    assert T.hypercube(1).edges == ()


def test_with_uniform_weights() -> None:
    for build in (T.ring, T.exponential_two, T.symmetric_exponential, T.fully_connected):
        for n in (1, 2, 5, 8):
            assert build(n).with_uniform_weights() == build(n)
    t = T.star(5).with_uniform_weights()
    assert t.self_weight(0) == 0.2 and t.recv_weights(1) == {0: 0.5} and t.self_weight(1) == 0.5
    assert {(s, d) for s, d, _ in t.edges} == {(s, d) for s, d, _ in T.star(5).edges}


# ----------------------------------------------------------------------------- bad arguments

CONSTRUCTORS: dict[str, Callable[..., Any]] = {
    "ring": T.ring,
    "star": T.star,
    "mesh_grid_2d": T.mesh_grid_2d,
    "fully_connected": T.fully_connected,
    "exponential_two": T.exponential_two,
    "exponential": lambda n: T.exponential(n, 2),
    "symmetric_exponential": T.symmetric_exponential,
    "hypercube": T.hypercube,
    "one_peer_exponential_two": T.one_peer_exponential_two,
    "base_graph": T.base_graph,
}


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4", None])
def test_constructors_reject_bad_n(name: str, bad: object) -> None:
    pattern = rf"^{name}: n must be an int >= 1, got {re.escape(repr(bad))}$"
    with pytest.raises(ValueError, match=pattern):
        CONSTRUCTORS[name](bad)


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_constructors_accept_n_1_and_numpy_ints(name: str) -> None:
    assert CONSTRUCTORS[name](1).size == 1
    assert CONSTRUCTORS[name](np.int64(4)) == CONSTRUCTORS[name](4)


def test_other_arguments_rejected() -> None:
    with pytest.raises(ValueError, match=r"hypercube: n must be a power of 2, got 6"):
        T.hypercube(6)
    with pytest.raises(ValueError, match=r"exponential: base must be an int >= 2, got 1"):
        T.exponential(8, 1)
    with pytest.raises(ValueError, match=r"exponential: base must be an int >= 2, got 2.0"):
        T.exponential(8, 2.0)
    with pytest.raises(
        ValueError, match=r"star: center must be an int in \[0, n\) = \[0, 4\), got 4"
    ):
        T.star(4, center=4)
    with pytest.raises(ValueError, match=r"star: center must be an int >= 0, got -1"):
        T.star(4, center=-1)


# ----------------------------------------------------------------------------- Topology value


def test_from_edges_canonical_and_equal_regardless_of_order() -> None:
    edges = [(1, 0, 0.5), (0, 1, 0.25), (2, 1, 0.25), (0, 2, 1.0)]
    a = T.Topology.from_edges(3, edges, [0.5, 0.5, 0.0])
    b = T.Topology(3, list(reversed(edges)), (0.5, 0.5, 0.0))
    assert a.edges == ((0, 1, 0.25), (0, 2, 1.0), (1, 0, 0.5), (2, 1, 0.25))
    assert a == b and hash(a) == hash(b) and a.fingerprint == b.fingerprint
    assert {a: "x"}[b] == "x"
    assert len({a, b, T.ring(3)}) == 2


def test_self_weights_default_to_the_remainder() -> None:
    t = T.Topology.from_edges(3, [(0, 1, 0.25), (2, 1, 0.25)])
    assert t.self_weights == (1.0, 0.5, 1.0)


def test_zero_weight_edges_are_dropped() -> None:
    t = T.Topology.from_edges(2, [(0, 1, 0.0), (1, 0, 0.5)], [0.5, 1.0])
    assert t.edges == ((1, 0, 0.5),)
    assert t.in_neighbors(1) == ()


def test_from_edges_validation_messages() -> None:
    mk = T.Topology.from_edges
    with pytest.raises(ValueError, match=r"size must be an int >= 1, got 0"):
        mk(0, [], [])
    with pytest.raises(ValueError, match=r"edge \(0, 4\) has a rank out of range for size 4"):
        mk(4, [(0, 4, 0.5)], [1.0] * 4)
    with pytest.raises(ValueError, match=r"edge \(2, 2\) is a self edge"):
        mk(4, [(2, 2, 0.5)], [1.0] * 4)
    with pytest.raises(ValueError, match=r"edge \(0, 1\) is given more than once"):
        mk(2, [(0, 1, 0.5), (0, 1, 0.5)], [1.0, 0.5])
    with pytest.raises(
        ValueError, match=r"weight of edge \(0, 1\) must be finite and >= 0, got nan"
    ):
        mk(2, [(0, 1, float("nan"))], [1.0, 0.5])
    with pytest.raises(
        ValueError, match=r"weight of edge \(0, 1\) must be finite and >= 0, got -0.5"
    ):
        mk(2, [(0, 1, -0.5)], [1.0, 1.5])
    with pytest.raises(ValueError, match=r"self weight of rank 1 must be finite and >= 0, got inf"):
        mk(2, [], [1.0, float("inf")])
    with pytest.raises(ValueError, match=r"self_weights has 1 entries, expected size = 2"):
        mk(2, [], [1.0])
    with pytest.raises(ValueError, match=r"receiver 3's weights sum to 0.75, expected 1"):
        mk(4, [(0, 3, 0.25)], [1.0, 1.0, 1.0, 0.5])
    with pytest.raises(ValueError, match=r"receiver 1's incoming weights sum to 1.5 > 1"):
        mk(3, [(0, 1, 0.75), (2, 1, 0.75)])
    with pytest.raises(ValueError, match=r"each edge must be a \(src, dst, weight\) triple"):
        mk(2, [(0, 1)], [1.0, 1.0])


def test_allow_non_stochastic() -> None:
    # Column-stochastic (push-sum style): receiver rows need not sum to 1.
    t = T.Topology.from_edges(2, [(0, 1, 0.5)], [0.5, 1.0], allow_non_stochastic=True)
    assert t.mixing_matrix().tolist() == [[0.5, 0.0], [0.5, 1.0]]
    assert not t.is_doubly_stochastic()


def test_static_at_and_period() -> None:
    t = T.ring(5)
    assert t.period == 1
    for step in (0, 1, 7, 10**12, np.int64(3)):
        assert t.at(step) is t
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(ValueError, match=r"Topology.at: step must be an int >= 0"):
            t.at(bad)


@pytest.mark.parametrize(
    "method", ["in_neighbors", "out_neighbors", "self_weight", "recv_weights", "send_weights"]
)
def test_rank_out_of_range_messages(method: str) -> None:
    t = T.ring(4)
    with pytest.raises(
        ValueError, match=rf"^{method}: rank 7 is out of range for a topology of size 4$"
    ):
        getattr(t, method)(7)
    with pytest.raises(ValueError, match=rf"^{method}: rank -1 is out of range"):
        getattr(t, method)(-1)
    with pytest.raises(ValueError, match=rf"^{method}: rank must be an int, got 1.0"):
        getattr(t, method)(1.0)


def test_mixing_matrix_is_a_copy() -> None:
    t = T.ring(4)
    w = t.mixing_matrix()
    w.fill_(7.0)
    assert torch.equal(t.mixing_matrix(), T.ring(4).mixing_matrix())
    assert t.mixing_matrix() is not t.mixing_matrix()


def test_topology_is_immutable() -> None:
    t = T.ring(4)
    with pytest.raises(AttributeError):
        t._size = 5
    with pytest.raises(AttributeError):
        t.foo = 1
    with pytest.raises(AttributeError):
        del t._edges


def test_repr() -> None:
    t = T.exponential_two(8)
    assert re.fullmatch(r"Topology\(size=8, edges=24, fingerprint=[0-9a-f]{8}\)", repr(t))
    assert repr(t).endswith(f"{t.fingerprint[:8]})")


@pytest.mark.parametrize(("name", "n", "t"), SAMPLE, ids=SAMPLE_IDS)
def test_pickle_and_copy_round_trip(name: str, n: int, t: T.Topology) -> None:
    for clone in (pickle.loads(pickle.dumps(t)), copy.deepcopy(t), copy.copy(t)):
        assert clone == t and clone.edges == t.edges and clone.self_weights == t.self_weights


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(2, 12),
    data=st.data(),
)
def test_fingerprint_changes_with_any_weight(n: int, data: st.DataObject) -> None:
    t = data.draw(st.sampled_from([T.ring(n), T.star(n), T.mesh_grid_2d(n), T.exponential_two(n)]))
    w = t.mixing_matrix().numpy()
    i = data.draw(st.integers(0, n - 1))
    nz = [j for j in range(n) if w[i, j] > 0]
    j = data.draw(st.sampled_from(nz))
    w2 = w.copy()
    w2[i, j] = np.nextafter(w2[i, j], 2.0)  # one ulp: still row-stochastic within 1e-9
    t2 = T.from_matrix(w2)
    assert t2 != t and t2.fingerprint != t.fingerprint
    assert T.from_matrix(w) == t and T.from_matrix(w).fingerprint == t.fingerprint


def test_fingerprint_is_stable_across_processes() -> None:
    code = (
        "from bluefog_fn.topology import graph, builders;"
        "print(builders.mesh_grid_2d(12).fingerprint, builders.star(5, 2).fingerprint)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=120,
    )
    assert out.stdout.split() == [T.mesh_grid_2d(12).fingerprint, T.star(5, 2).fingerprint]


def test_negative_zero_does_not_change_the_fingerprint() -> None:
    a = T.Topology.from_edges(2, [(0, 1, 1.0)], [1.0, 0.0])
    b = T.Topology.from_edges(2, [(0, 1, 1.0)], [1.0, -0.0])
    assert a == b and a.fingerprint == b.fingerprint
    assert T.from_matrix([[1.0, -0.0], [1.0, -0.0]]) == a
    assert a != T.Topology.from_edges(3, [(0, 1, 1.0)], [1.0, 0.0, 1.0])


# ----------------------------------------------------------------------------- spectral gap


def _reference_gap(w: torch.Tensor) -> float:
    eig = torch.linalg.eigvals(w)
    idx = int(torch.argmin((eig - 1).abs()))
    rest = torch.cat([eig[:idx], eig[idx + 1 :]])
    return 1.0 - float(rest.abs().max())


def test_spectral_gap_known_values() -> None:
    assert T.ring(4).spectral_gap() == pytest.approx(2 / 3, abs=1e-14)
    n = 10  # ring: eigenvalues (1 + 2 cos(2πj/n))/3, the largest non-unit modulus at j = 1
    assert T.ring(n).spectral_gap() == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3)
    assert T.ring(1).spectral_gap() == 1.0
    assert T.star(1).spectral_gap() == 1.0
    assert T.hypercube(8).spectral_gap() == pytest.approx(0.5, abs=1e-14)


def test_spectral_gap_zero_when_disconnected_or_periodic() -> None:
    block = [[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]
    t = T.from_matrix(block)
    assert not t.is_strongly_connected()
    assert t.spectral_gap() == 0.0
    assert T.from_matrix(np.eye(3)).spectral_gap() == 0.0
    swap = T.from_matrix([[0.0, 1.0], [1.0, 0.0]])  # strongly connected but periodic
    assert swap.is_strongly_connected() and swap.spectral_gap() == 0.0


def test_spectral_gap_of_non_stochastic_matrix_can_be_negative() -> None:
    t = T.from_matrix([[2.0, 0.0], [0.0, 2.0]], allow_non_stochastic=True)
    assert t.spectral_gap() == pytest.approx(-1.0)


@st.composite
def _random_symmetric(draw: st.DrawFn) -> tuple[T.Topology, bool]:
    """Metropolis–Hastings weights on a random undirected graph; connected or not."""
    n = draw(st.integers(2, 24))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=3 * n))
    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from(chosen)
    deg = dict(g.degree)
    edges = []
    for i, j in chosen:
        w = 1.0 / (1 + max(deg[i], deg[j]))
        edges += [(i, j, w), (j, i, w)]
    return T.Topology.from_edges(n, edges), nx.is_connected(g)


@settings(max_examples=80, deadline=None)
@given(case=_random_symmetric())
def test_spectral_gap_positive_exactly_when_connected_doubly_stochastic(
    case: tuple[T.Topology, bool],
) -> None:
    t, connected = case
    assert t.is_doubly_stochastic()
    assert t.is_strongly_connected() == connected
    gap = t.spectral_gap()
    if connected:
        assert 0.0 < gap <= 1.0
        assert gap == pytest.approx(_reference_gap(t.mixing_matrix()), abs=1e-9)
    else:
        assert gap == 0.0


@st.composite
def _random_row_stochastic(draw: st.DrawFn) -> tuple[T.Topology, nx.DiGraph]:
    """A random directed graph with self loops and random positive weights, rows normalised."""
    n = draw(st.integers(1, 16))
    pairs = [(u, v) for u in range(n) for v in range(n) if u != v]
    chosen = draw(st.lists(st.sampled_from(pairs), unique=True, max_size=3 * n)) if pairs else []
    raw = {e: draw(st.floats(0.1, 10.0)) for e in chosen}
    selfs = [draw(st.floats(0.1, 10.0)) for _ in range(n)]
    totals = [selfs[v] + sum(w for (_, d), w in raw.items() if d == v) for v in range(n)]
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    for v in range(n):
        g.add_edge(v, v, weight=selfs[v] / totals[v])
    for (u, v), w in raw.items():
        g.add_edge(u, v, weight=w / totals[v])
    return T.from_networkx(g), g


@settings(max_examples=80, deadline=None)
@given(case=_random_row_stochastic())
def test_random_row_stochastic_graphs(case: tuple[T.Topology, nx.DiGraph]) -> None:
    t, g = case
    w = t.mixing_matrix()
    n = t.size
    # BlueFog's convention: W is the transpose of networkx's weighted adjacency (rows = senders).
    assert torch.allclose(w, torch.from_numpy(nx.to_numpy_array(g, nodelist=range(n))).T)
    assert torch.allclose(w.sum(dim=1), torch.ones(n, dtype=F), atol=1e-12, rtol=0)
    assert t.is_strongly_connected() == (n == 1 or nx.is_strongly_connected(g))
    gap = t.spectral_gap()
    if t.is_strongly_connected():  # positive self weights make it aperiodic
        assert 0.0 < gap <= 1.0
    assert gap == pytest.approx(max(0.0, _reference_gap(w)) if n > 1 else 1.0, abs=1e-8)
    assert T.from_matrix(w) == t
    assert T.from_networkx(t.to_networkx()) == t


@settings(max_examples=50, deadline=None)
@given(
    case=st.sampled_from([item for item in ALL if item[1] <= 16]),
    x=st.lists(st.floats(-1e3, 1e3), min_size=16, max_size=16),
)
def test_doubly_stochastic_preserves_the_mean(
    case: tuple[str, int, T.Topology], x: list[float]
) -> None:
    _, n, t = case
    v = torch.tensor(x[:n], dtype=F)
    w = t.mixing_matrix()
    assert float((w @ v).sum()) == pytest.approx(float(v.sum()), abs=1e-9)


# ----------------------------------------------------------------------------- networkx / matrix


@pytest.mark.parametrize(("name", "n", "t"), SAMPLE, ids=SAMPLE_IDS)
def test_networkx_round_trip(name: str, n: int, t: T.Topology) -> None:
    g = t.to_networkx()
    assert isinstance(g, nx.DiGraph)
    assert sorted(g.nodes) == list(range(n))
    assert nx.number_of_selfloops(g) == 0
    assert all(g.nodes[r]["self_weight"] == t.self_weight(r) for r in range(n))
    assert {(u, v): d["weight"] for u, v, d in g.edges(data=True)} == {
        (s, d): w for s, d, w in t.edges
    }
    assert T.from_networkx(g) == t
    # Transpose of networkx's adjacency off the diagonal (self weights are node attributes).
    adj = torch.from_numpy(nx.to_numpy_array(g, nodelist=range(n)))
    off = ~torch.eye(n, dtype=torch.bool)
    assert torch.equal(t.mixing_matrix()[off], adj.T[off])


@pytest.mark.parametrize(("name", "n", "t"), SAMPLE, ids=SAMPLE_IDS)
def test_from_matrix_round_trip(name: str, n: int, t: T.Topology) -> None:
    w = t.mixing_matrix()
    assert T.from_matrix(w) == t
    assert T.from_matrix(w.numpy()) == t
    assert T.from_matrix(w.tolist()) == t
    assert T.from_matrix(w.to(torch.float32)).mixing_matrix().allclose(w, atol=1e-7)


def test_from_networkx_unweighted_is_uniform() -> None:
    for n in (3, 4, 9):
        assert T.from_networkx(nx.cycle_graph(n)) == T.ring(n)
        assert T.from_networkx(nx.complete_graph(n)) == T.fully_connected(n)
    path = T.from_networkx(nx.path_graph(3))
    assert path.recv_weights(1) == {0: 1 / 3, 2: 1 / 3} and path.self_weight(0) == 0.5
    directed = T.from_networkx(nx.DiGraph([(0, 1), (1, 2)]))
    assert directed.in_neighbors(1) == (0,) and directed.out_neighbors(1) == (2,)
    assert directed.self_weight(0) == 1.0


def test_from_networkx_weighted_self_weight_sources() -> None:
    g = nx.DiGraph()
    g.add_nodes_from(range(3))
    g.add_edge(0, 1, weight=0.25)
    g.add_edge(1, 2, weight=0.5)
    g.add_edge(2, 2, weight=0.5)  # explicit self loop
    t = T.from_networkx(g)
    assert t.self_weights == (1.0, 0.75, 0.5)  # 1 − Σ incoming where no loop is given
    u = nx.Graph()
    u.add_edge(0, 1, weight=0.5)
    assert T.from_networkx(u).mixing_matrix().tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_from_networkx_rejects_bad_graphs() -> None:
    with pytest.raises(
        ValueError, match=r"from_networkx: nodes must be the integers 0..1, found node 'a'"
    ):
        T.from_networkx(nx.Graph([("a", "b")]))
    with pytest.raises(ValueError, match=r"found node 5"):
        T.from_networkx(nx.Graph([(0, 5)]))
    with pytest.raises(ValueError, match=r"from_networkx: g has no nodes"):
        T.from_networkx(nx.Graph())
    with pytest.raises(ValueError, match=r"multigraph"):
        T.from_networkx(nx.MultiDiGraph([(0, 1)]))
    g = nx.DiGraph()
    g.add_edge(0, 1, weight=0.5)
    g.add_edge(1, 0)
    with pytest.raises(ValueError, match=r"edge \(1, 0\) has no 'weight' attribute"):
        T.from_networkx(g)
    h = nx.DiGraph()
    h.add_edge(0, 1, weight=0.5)
    h.add_edge(1, 1, weight=0.25)
    with pytest.raises(ValueError, match=r"from_networkx: receiver 1's weights sum to 0.75"):
        T.from_networkx(h)
    with pytest.raises(
        ValueError, match=r"weight of edge \(0, 1\) must be finite and >= 0, got nan"
    ):
        T.from_networkx(nx.DiGraph([(0, 1, {"weight": float("nan")})]))
    with pytest.raises(ValueError, match=r"g must be a networkx Graph"):
        T.from_networkx([[0, 1]])


def test_from_matrix_rejects_bad_matrices() -> None:
    with pytest.raises(
        ValueError, match=r"from_matrix: w\[0, 1\] = nan \(receiver 0's weight on sender 1\)"
    ):
        T.from_matrix([[0.5, float("nan")], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"from_matrix: w\[1, 0\] = -0.5"):
        T.from_matrix(np.array([[1.0, 0.0], [-0.5, 1.5]]))
    with pytest.raises(ValueError, match=r"from_matrix: w\[1, 1\] = inf"):
        T.from_matrix(torch.tensor([[1.0, 0.0], [0.0, float("inf")]]))
    with pytest.raises(
        ValueError, match=r"from_matrix: receiver 1's weights sum to 0.9, expected 1"
    ):
        T.from_matrix([[1.0, 0.0], [0.4, 0.5]])
    with pytest.raises(ValueError, match=r"square 2-D matrix, got shape \(2, 3\)"):
        T.from_matrix(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match=r"square 2-D matrix, got shape \(0, 0\)"):
        T.from_matrix(np.zeros((0, 0)))
    with pytest.raises(ValueError, match=r"from_matrix: w must be a square matrix of real numbers"):
        T.from_matrix([[1.0], [0.5, 0.5]])
    with pytest.raises(ValueError, match=r"w must be real"):
        T.from_matrix(np.eye(2, dtype=np.complex128))
    ok = T.from_matrix([[1.0, 0.0], [0.4, 0.5]], allow_non_stochastic=True)
    assert ok.recv_weights(1) == {0: 0.4}


def test_from_matrix_does_not_mutate_its_input() -> None:
    w = T.ring(5).mixing_matrix()
    before = w.clone()
    T.from_matrix(w)
    assert torch.equal(w, before)


# ----------------------------------------------------------------------------- docs & exports


def test_public_names() -> None:
    expected = {
        "AnyTopology",
        "DynamicTopology",
        "Topology",
        "base_graph",
        "draw",
        "exponential",
        "exponential_two",
        "from_matrix",
        "from_networkx",
        "fully_connected",
        "hypercube",
        "infer_destinations",
        "infer_sources",
        "inner_outer_exponential_two",
        "inner_outer_ring",
        "machine_one_peer_exponential_two",
        "mesh_grid_2d",
        "one_peer",
        "one_peer_exponential_two",
        "ring",
        "star",
        "symmetric_exponential",
    }
    assert set(T.__all__) == expected
    assert all(hasattr(T, name) for name in expected)
    assert isinstance(T.ring(3), T.AnyTopology)
    assert isinstance(T.base_graph(3), T.AnyTopology)


@pytest.mark.parametrize("module", [T, graph, builders, schedules], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: Any) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert result.attempted > 0
