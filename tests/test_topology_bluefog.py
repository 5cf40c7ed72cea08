"""BlueFog's schedules and graph variants: one_peer, inner/outer ring and exponential-2, the
machine exponential-2 graph, ring styles, symmetric_exponential's base, graph discovery.

Each schedule is checked step by step against a reference that follows BlueFog's per-rank
generators (a stateful ``index`` advanced once per step, send and receive computed separately
by every rank, as BlueFog does), so the pure functions of ``step`` are tested against the
semantics they reproduce, plus the dense mixing matrix those sends imply.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T

F = torch.float64


def _average(n: int) -> torch.Tensor:
    return torch.full((n, n), 1.0 / n, dtype=F)


def _dense(n: int, sends: list[list[int]]) -> torch.Tensor:
    """W of one step where rank r sends to ``sends[r]``: receivers average self + received."""
    received: list[list[int]] = [[] for _ in range(n)]
    for src, dsts in enumerate(sends):
        for dst in dsts:
            received[dst].append(src)
    w = torch.zeros((n, n), dtype=F)
    for i in range(n):
        share = 1.0 / (len(received[i]) + 1)
        w[i, i] = share
        for j in received[i]:
            w[i, j] = share
    return w


def _period_product(d: T.DynamicTopology) -> torch.Tensor:
    prod = torch.eye(d.size, dtype=F)
    for t in range(d.period):
        prod = d.mixing_matrix(t) @ prod
    return prod


def _check_schedule(d: T.DynamicTopology, reference: list[Iterator[tuple[list[int], list[int]]]], steps: int) -> None:
    """Step t of ``d`` equals what the per-rank generators yield at their t-th ``next``."""
    n = d.size
    for t in range(steps):
        pairs = [next(gen) for gen in reference]
        sends = [s for s, _ in pairs]
        g = d.at(t)
        for r in range(n):
            assert g.out_neighbors(r) == tuple(sorted(sends[r])), (t, r)
            assert g.in_neighbors(r) == tuple(sorted(pairs[r][1])), (t, r)
        assert torch.equal(g.mixing_matrix(), _dense(n, sends)), t


# ------------------------------------------------------------------------------------ one_peer


def _one_peer_reference(topo: T.Topology, rank: int) -> Iterator[tuple[list[int], list[int]]]:
    """BlueFog's GetDynamicOnePeerSendRecvRanks, re-derived: clockwise order, index mod degree."""
    n = topo.size
    clockwise = [sorted(topo.out_neighbors(r), key=lambda j, r=r: (j - r) % n) for r in range(n)]  # type: ignore[misc]
    index = 0
    while True:
        mine = clockwise[rank]
        send = [mine[index % len(mine)]] if mine else []
        recv = [o for o in range(n) if o != rank and clockwise[o] and clockwise[o][index % len(clockwise[o])] == rank]
        yield send, recv
        index += 1


BASES = [
    ("ring", T.ring(6)),
    ("ring_left", T.ring(5, style=1)),
    ("exp2_8", T.exponential_two(8)),
    ("exp2_12", T.exponential_two(12)),
    ("star", T.star(5)),
    ("mesh", T.mesh_grid_2d(9)),
    ("sym_exp", T.symmetric_exponential(10)),
    ("full", T.fully_connected(4)),
    ("single", T.ring(1)),
]


@pytest.mark.parametrize(("label", "base"), BASES, ids=[b[0] for b in BASES])
def test_one_peer_matches_bluefog_generator(label: str, base: T.Topology) -> None:
    d = T.one_peer(base)
    degrees = [len(base.out_neighbors(r)) for r in range(base.size)]
    assert d.period == math.lcm(*[k for k in degrees if k] or [1])
    refs = [_one_peer_reference(base, r) for r in range(base.size)]
    _check_schedule(d, refs, 2 * d.period + 1)
    for g in d.graphs:
        w = g.mixing_matrix()
        assert torch.allclose(w.sum(dim=1), torch.ones(base.size, dtype=F), atol=1e-15, rtol=0)
        assert bool((torch.diagonal(w) > 0).all())
        assert all(len(g.out_neighbors(r)) <= 1 for r in range(base.size))


def test_one_peer_over_exponential_two_is_one_peer_exponential_two() -> None:
    for n in (2, 4, 8, 16):
        assert T.one_peer(T.exponential_two(n)) == T.one_peer_exponential_two(n)


@pytest.mark.parametrize("n", [3, 5, 8, 12])
def test_one_peer_over_a_regular_circulant_is_doubly_stochastic(n: int) -> None:
    for base in (T.ring(n), T.exponential_two(n), T.symmetric_exponential(n), T.ring(n, style=2)):
        d = T.one_peer(base)
        assert all(g.is_doubly_stochastic() for g in d.graphs)
        # The period's product averages strictly: its gap is positive.
        assert T.from_matrix(_period_product(d)).spectral_gap() > 0


def test_one_peer_star_hub_receives_from_every_leaf() -> None:
    d = T.one_peer(T.star(4))
    assert d.period == 3
    for t in range(3):
        g = d.at(t)
        assert g.in_neighbors(0) == (1, 2, 3)
        assert g.self_weight(0) == 0.25
        assert g.out_neighbors(0) == (1 + t,)
        assert not g.is_doubly_stochastic()


def test_one_peer_validation() -> None:
    with pytest.raises(TypeError, match="one_peer: topology must be a static"):
        T.one_peer(T.one_peer_exponential_two(4))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="one_peer"):
        T.one_peer(4)  # type: ignore[arg-type]
    # Out-degrees 1..k give an lcm period beyond the limit: refused, naming the period.
    n = 24
    edges = [(r, (r + k) % n, 0.01) for r in range(n) for k in range(1, 1 + (r % 23) + 1) if (r + k) % n != r]
    irregular = T.Topology(n, edges, allow_non_stochastic=True)
    with pytest.raises(ValueError, match=r"one_peer: the schedule's period.*> 10000"):
        T.one_peer(irregular)


def test_one_peer_rank_without_out_neighbours_sends_nothing() -> None:
    base = T.from_matrix([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]])  # 0 → 1, 0 → 2
    d = T.one_peer(base)
    assert d.period == 2
    assert [d.at(t).out_neighbors(0) for t in range(2)] == [(1,), (2,)]
    assert d.at(0).out_neighbors(1) == () and d.at(0).self_weight(2) == 1.0


# --------------------------------------------------------------------------- inner/outer schedules


def _inner_outer_ring_reference(n: int, local: int, rank: int) -> Iterator[tuple[list[int], list[int]]]:
    """BlueFog's GetInnerOuterRingDynamicSendRecvRanks, re-derived (one machine: out rank idles)."""
    machines = n // local
    machine, me = divmod(rank, local)
    index = 0
    while True:
        out = index % local
        if me == out:
            if machines == 1:
                yield [], []
            else:
                yield (
                    [((machine + 1) % machines) * local + me],
                    [((machine - 1) % machines) * local + me],
                )
        else:
            nxt = (me + 1) % local
            if nxt == out:
                nxt = (nxt + 1) % local
            prv = (me - 1) % local
            if prv == out:
                prv = (prv - 1) % local
            if nxt == me:  # an inner ring of one
                yield [], []
            else:
                yield [machine * local + nxt], [machine * local + prv]
        index += 1


def _inner_outer_exp2_reference(n: int, local: int, rank: int) -> Iterator[tuple[list[int], list[int]]]:
    """BlueFog's GetInnerOuterExpo2DynamicSendRecvRanks, re-derived: the inner hop skips over the
    outgoing rank by adding one when it would reach or pass it."""
    machines = n // local
    a = math.floor(math.log2(machines - 1)) if machines > 2 else 0
    b = math.floor(math.log2(local - 2)) if local > 3 else 0
    machine, me = divmod(rank, local)
    index = 0
    while True:
        out = index % local
        if me == out:
            hop = 2 ** (index % (a + 1))
            if machines == 1:
                yield [], []
            else:
                yield (
                    [((machine + hop) % machines) * local + me],
                    [((machine - hop) % machines) * local + me],
                )
        else:
            hop = 2 ** (index % (b + 1))
            fwd = hop + 1 if hop >= (out - me) % local else hop
            back = hop + 1 if hop >= (me - out) % local else hop
            if local == 1 or (me + fwd) % local == me:
                yield [], []
            else:
                yield [machine * local + (me + fwd) % local], [machine * local + (me - back) % local]
        index += 1


CONFIGS = [(m, L) for m in (1, 2, 3, 4, 5, 8) for L in (1, 3, 4, 5, 6, 8)]


@pytest.mark.parametrize(("machines", "local"), CONFIGS)
def test_inner_outer_ring_matches_bluefog_generator(machines: int, local: int) -> None:
    n = machines * local
    d = T.inner_outer_ring(n, local)
    assert d.period == local and d.name == f"inner_outer_ring({n}, {local})"
    _check_schedule(d, [_inner_outer_ring_reference(n, local, r) for r in range(n)], 2 * d.period + 1)


@pytest.mark.parametrize(("machines", "local"), CONFIGS)
def test_inner_outer_exponential_two_matches_bluefog_generator(machines: int, local: int) -> None:
    n = machines * local
    d = T.inner_outer_exponential_two(n, local)
    a = math.floor(math.log2(machines - 1)) if machines > 2 else 0
    b = math.floor(math.log2(local - 2)) if local > 3 else 0
    assert d.period == math.lcm(local, a + 1, b + 1)
    _check_schedule(d, [_inner_outer_exp2_reference(n, local, r) for r in range(n)], 2 * d.period + 1)


@pytest.mark.parametrize("build", [T.inner_outer_ring, T.inner_outer_exponential_two])
@pytest.mark.parametrize(("machines", "local"), CONFIGS)
def test_inner_outer_steps_are_permutation_averages_that_converge(build, machines: int, local: int) -> None:  # type: ignore[no-untyped-def]
    n = machines * local
    d = build(n, local)
    for t in range(d.period):
        g = d.at(t)
        assert g.is_doubly_stochastic()
        # One message crosses machines per machine per step (none with a single machine).
        crossing = [(s, dst) for s, dst, _ in g.edges if s // local != dst // local]
        assert len(crossing) == (machines if machines > 1 else 0)
        assert all(len(g.in_neighbors(r)) <= 1 for r in range(n))
    # Over one period the graph is connected: repeated periods reach the average.
    prod = _period_product(d)
    if n > 1:
        assert T.from_matrix(prod).spectral_gap() > 0
    assert torch.allclose(torch.linalg.matrix_power(prod, 400), _average(n), atol=1e-9, rtol=0)


def test_inner_outer_validation() -> None:
    for build in (T.inner_outer_ring, T.inner_outer_exponential_two):
        name = build.__name__
        with pytest.raises(ValueError, match=rf"{name}: n = 10 is not a multiple of local_size = 4"):
            build(10, 4)
        with pytest.raises(ValueError, match=rf"{name}: local_size = 2 leaves no inner ring"):
            build(8, 2)
        with pytest.raises(ValueError, match=rf"{name}: local_size must be an int >= 1, got 0"):
            build(8, 0)
        with pytest.raises(ValueError, match=rf"{name}: n must be an int >= 1, got 0"):
            build(0, 1)
        assert build(1, 1).at(0).edges == ()


def test_inner_outer_ring_small_case_by_hand() -> None:
    # Two machines of three: at step 0 local rank 0 crosses, 1 and 2 swap inside.
    d = T.inner_outer_ring(6, 3)
    g = d.at(0)
    assert [g.out_neighbors(r) for r in range(6)] == [(3,), (2,), (1,), (0,), (5,), (4,)]
    g = d.at(1)
    assert [g.out_neighbors(r) for r in range(6)] == [(2,), (4,), (0,), (5,), (1,), (3,)]
    assert g.recv_weights(4) == {1: 0.5} and g.self_weight(4) == 0.5


@pytest.mark.parametrize("m", range(1, 20))
def test_machine_one_peer_exponential_two(m: int) -> None:
    d = T.machine_one_peer_exponential_two(m)
    assert d.name == f"machine_one_peer_exponential_two({m})"
    # BlueFog: machine distance 2^(index mod (⌊log₂(M − 1)⌋ + 1)), weights ½.
    span = math.floor(math.log2(m - 1)) + 1 if m > 1 else 1
    assert d.period == span
    for t in range(2 * span):
        hop = 2 ** (t % span)
        sends = [[(k + hop) % m] if m > 1 else [] for k in range(m)]
        assert torch.equal(d.mixing_matrix(t), _dense(m, sends))
    assert d == T.one_peer_exponential_two(m)
    with pytest.raises(ValueError, match="machine_one_peer_exponential_two: n_machines must be an int >= 1"):
        T.machine_one_peer_exponential_two(0)


def test_machine_one_peer_exponential_two_drives_hierarchical_neighbor_mean() -> None:
    # Any DynamicTopology over machines is accepted where a machine topology is.
    d = T.machine_one_peer_exponential_two(bf.machine_size())
    x = torch.arange(3.0)
    assert torch.equal(bf.hierarchical_neighbor_mean(x, d, step=1), x)


# ----------------------------------------------------------------------------- ring styles


@pytest.mark.parametrize("n", range(1, 9))
def test_ring_styles_dense(n: int) -> None:
    for style, deltas in ((0, (-1, 1)), (1, (1,)), (2, (-1,))):
        t = T.ring(n, style=style)
        w = torch.zeros((n, n), dtype=F)
        for i in range(n):
            sources = sorted({(i + d) % n for d in deltas} - {i})
            w[i, i] = 1.0 / (len(sources) + 1)
            for j in sources:
                w[i, j] = 1.0 / (len(sources) + 1)
        assert torch.equal(t.mixing_matrix(), w), (n, style)
        assert t.is_doubly_stochastic()
    assert T.ring(n) == T.ring(n, style=0) == T.ring(n, 0)


def test_ring_one_directional_matches_bluefog() -> None:
    # BlueFog's RingGraph(size, 1): node i sends to i − 1 ("left"); style 2 to i + 1.
    assert T.ring(5, style=1).out_neighbors(2) == (1,)
    assert T.ring(5, style=2).out_neighbors(2) == (3,)
    assert T.ring(5, style=1).recv_weights(2) == {3: 0.5}
    assert T.ring(2, style=1) == T.ring(2, style=2) == T.ring(2)


@pytest.mark.parametrize("bad", [3, -1, True, 1.0, "left", None])
def test_ring_rejects_bad_style(bad: object) -> None:
    with pytest.raises(ValueError, match=r"ring: style must be 0 \(both directions\), 1 \(left\) or 2 \(right\)"):
        T.ring(4, style=bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- symmetric_exponential


def _sym_exp_sources(n: int, base: int) -> list[set[int]]:
    offsets = set()
    p = 1
    while p < n:
        offsets |= {p % n, (-p) % n}
        p *= base
    return [{(i + k) % n for k in offsets} - {i} for i in range(n)]


def _bluefog_sym_exp_sources(n: int, base: int) -> list[set[int]]:
    """BlueFog's SymmetricExponentialGraph: offsets k with min(k, n − k) a power of base."""
    def power(x: int) -> bool:
        p = 1
        while p < x:
            p *= base
        return p == x

    offsets = {k for k in range(1, n) if power(k if k <= n // 2 else n - k)}
    return [{(i + k) % n for k in offsets} for i in range(n)]


@pytest.mark.parametrize("base", [2, 3, 4, 5])
@pytest.mark.parametrize("n", range(1, 34))
def test_symmetric_exponential_dense(n: int, base: int) -> None:
    t = T.symmetric_exponential(n, base=base)
    sources = _sym_exp_sources(n, base)
    w = torch.zeros((n, n), dtype=F)
    for i in range(n):
        w[i, i] = 1.0 / (len(sources[i]) + 1)
        for j in sources[i]:
            w[i, j] = 1.0 / (len(sources[i]) + 1)
    assert torch.equal(t.mixing_matrix(), w)
    assert t.is_doubly_stochastic() and torch.equal(t.mixing_matrix(), t.mixing_matrix().T)
    # Agreement with BlueFog's construction exactly when no power of base lies in (n/2, n).
    between = any(n / 2 < base**i < n for i in range(n.bit_length() + 1))
    if not between:
        assert _bluefog_sym_exp_sources(n, base) == sources


def test_symmetric_exponential_default_base_is_unchanged() -> None:
    for n in range(1, 40):
        assert T.symmetric_exponential(n) == T.symmetric_exponential(n, base=2)
    assert T.symmetric_exponential(7) == T.fully_connected(7).with_uniform_weights()
    assert len(_bluefog_sym_exp_sources(7, 2)[0]) == 4


def test_symmetric_exponential_rejects_bad_base() -> None:
    with pytest.raises(ValueError, match="symmetric_exponential: base must be an int >= 2, got 1"):
        T.symmetric_exponential(8, base=1)


# -------------------------------------------------------------------------- infer_* (simulated)


def _random_graph(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand((n, n), generator=g) < 0.4
    return [[j for j in range(n) if j != i and bool(mask[i, j])] for i in range(n)]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_infer_in_the_simulator_inverts_the_lists(n: int, seed: int) -> None:
    dst = _random_graph(n, seed)
    with bf.simulate(n):
        sources = T.infer_sources(dst)
        back = T.infer_destinations(sources)
    for i in range(n):
        assert sources[i] == tuple(sorted(j for j in range(n) if i in dst[j]))
        assert back[i] == tuple(sorted(dst[i]))


def test_infer_matches_a_topology_neighbours() -> None:
    topo = T.exponential_two(6)
    with bf.simulate(6):
        outs = [list(topo.out_neighbors(r)) for r in range(6)]
        assert T.infer_sources(outs) == [topo.in_neighbors(r) for r in range(6)]
        ins = [list(topo.in_neighbors(r)) for r in range(6)]
        assert T.infer_destinations(ins) == [topo.out_neighbors(r) for r in range(6)]


def test_infer_validation() -> None:
    assert T.infer_sources([]) == () and T.infer_destinations(()) == ()
    with pytest.raises(ValueError, match=r"infer_sources: dst_ranks names rank 1, outside \[0, 1\)"):
        T.infer_sources([1])
    with pytest.raises(ValueError, match="infer_destinations: src_ranks of rank 0 names rank 0 itself"):
        T.infer_destinations([0])
    with pytest.raises(TypeError, match="infer_sources: dst_ranks must be a list of ranks, got int 3"):
        T.infer_sources(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="infer_sources: dst_ranks must hold int ranks, got bool"):
        T.infer_sources([True])
    with bf.simulate(3):
        with pytest.raises(ValueError, match=r"infer_sources: inside bf.simulate\(3\) dst_ranks must be a list of 3 lists"):
            T.infer_sources([1, 2])
        with pytest.raises(ValueError, match=r"infer_sources: dst_ranks\[1\] names rank\(s\) \[2\] more than once"):
            T.infer_sources([[], [2, 2], []])
        with pytest.raises(ValueError, match=r"dst_ranks\[2\] of rank 2 names rank 2 itself"):
            T.infer_sources([[], [], [2]])


def test_new_names_are_exported_where_promised() -> None:
    promised = {"infer_sources", "infer_destinations", "one_peer", "inner_outer_ring",
                "inner_outer_exponential_two", "machine_one_peer_exponential_two"}
    assert promised <= set(T.__all__)
    assert "allreduce_parameters" in bf.__all__ and "allreduce_parameters" in bf.optim.__all__


# ------------------------------------------------------------------------ allreduce_parameters


def test_allreduce_parameters_world_of_one_and_simulator() -> None:
    model = torch.nn.Linear(3, 2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    out = bf.allreduce_parameters(model)
    assert set(out) == {"weight", "bias"}
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), before[k]) and torch.equal(out[k], before[k])
    tree = {"w": torch.arange(12.0).reshape(4, 3)}
    with bf.simulate(4):
        got = bf.allreduce_parameters(tree)
        with pytest.raises(TypeError, match=r"allreduce_parameters: nn\.Module"):
            bf.allreduce_parameters(model)
    assert torch.equal(got["w"], tree["w"].mean(dim=0, keepdim=True).expand(4, 3))
    assert torch.equal(tree["w"], torch.arange(12.0).reshape(4, 3))


# ------------------------------------------------------------------ schedules in the simulator


def _sim_schedules(n: int) -> list[T.AnyTopology]:
    out: list[T.AnyTopology] = [
        T.one_peer(T.ring(n)),
        T.one_peer(T.star(n)),
        T.one_peer(T.mesh_grid_2d(n)),
        T.ring(n, style=1),
        T.ring(n, style=2),
        T.symmetric_exponential(n, base=3),
        T.machine_one_peer_exponential_two(n),
    ]
    out += [T.inner_outer_ring(n, L) for L in (1, 3, 4, 5) if n % L == 0]
    out += [T.inner_outer_exponential_two(n, L) for L in (1, 3, 4, 5) if n % L == 0]
    return out


@pytest.mark.parametrize("n", [2, 3, 6, 8, 12])
def test_schedules_in_the_simulator_equal_dense(n: int) -> None:
    x = torch.randn((n, 4), generator=torch.Generator().manual_seed(n), dtype=F)
    with bf.simulate(n):
        for topo in _sim_schedules(n):
            for t in range(topo.period + 1):
                out = bf.neighbor_mean(x, topo, t)
                torch.testing.assert_close(out, topo.at(t).mixing_matrix() @ x, atol=1e-14, rtol=0)
