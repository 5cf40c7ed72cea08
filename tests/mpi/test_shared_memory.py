"""The same-host transport under ``bfrun -np 2`` / ``-np 4``: exact against the dense reference.

Every rank can compute every rank's input (a pure function of rank and step), so the dense
reference ``W @ X`` of each step is computed locally, in float64, with no communication: a
stale read (last step's buffer), a torn read (half old, half new) or a read of the wrong peer
shows up as a mismatch at that very step.  Values are small integers and the one-peer weights
are 1/2, so every expected value is exact in float32.

The whole exchange suite also runs with the transport forced on (``BLUEFOG_FN_SHM=1``) and
off (``BLUEFOG_FN_SHM=0``): see ``tests/run_all.sh``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.world import current

from .conftest import all_ranks_agree

N, ME = bf.size(), bf.rank()
EXCHANGES = getattr(current().executor, "exchanges", None)
CHANNEL = None if EXCHANGES is None else EXCHANGES.channel
pytestmark = pytest.mark.skipif(N < 2, reason="needs at least 2 ranks")

# Two leaves of float32 (one spanning two 1 MiB chunks) and a float64 leaf: 1.3 MiB.
SHAPES = {"big": (300_001,), "small": (7, 3), "f64": (1000,)}


_BASE: dict[tuple[int, str], torch.Tensor] = {}


def _base(rank: int, name: str) -> torch.Tensor:
    """The step-independent part of rank ``rank``'s leaf ``name`` (float64, cached)."""
    key = (rank, name)
    if key not in _BASE:
        k = list(SHAPES).index(name)
        n = 1
        for d in SHAPES[name]:
            n *= d
        _BASE[key] = (torch.arange(n, dtype=torch.float64) % 1024 + 4096 * rank + k).reshape(SHAPES[name])
    return _BASE[key]


def inputs(rank: int, step: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s tree at ``step``: different on every rank and at every step."""
    return {
        name: (_base(rank, name) + 16 * (step % 64)).to(torch.float64 if name == "f64" else torch.float32)
        for name in SHAPES
    }


def expected(topo: T.DynamicTopology, step: int) -> dict[str, torch.Tensor]:
    """Row ``ME`` of ``W @ X`` at ``step``, in float64."""
    row = topo.at(step).mixing_matrix()[ME]
    out = {}
    for name in SHAPES:
        acc = torch.zeros(SHAPES[name], dtype=torch.float64)
        for j in range(N):
            if row[j] != 0:
                acc += float(row[j]) * (_base(j, name) + 16 * (step % 64))
        out[name] = acc
    return out


def used_shared_memory() -> int:
    return 0 if CHANNEL is None else CHANNEL.epoch


@pytest.fixture(autouse=True)
def _transport_on_for_every_size() -> Iterator[None]:
    """Where a peer shares the machine, these tests run with the transport on for every size
    (the default threshold would leave their trees to MPI); every rank enters it alike."""
    if EXCHANGES is None or CHANNEL is None or not EXCHANGES.policy.enabled:
        yield
        return
    with EXCHANGES.policy_as(dataclasses.replace(EXCHANGES.policy, min_bytes=0)):
        yield


def check(out: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(out[k].to(torch.float64), want[k]) for k in SHAPES)


def test_two_thousand_one_peer_steps_equal_the_dense_reference_at_every_step() -> None:
    topo = T.one_peer_exponential_two(N)
    before = used_shared_memory()
    bad: list[int] = []
    steps = 2000
    for step in range(steps):
        x = inputs(ME, step)
        if step % 3 == 2:  # async forms interleaved with synchronous ones
            out = bf.neighbor_mean_async(x, topo, step).wait()
        else:
            out = bf.neighbor_mean(x, topo, step)
        if not check(out, expected(topo, step)):
            bad.append(step)
    if bad:
        print(f"rank {ME}: wrong values at steps {bad[:10]} ({len(bad)} in all)")
    all_ranks_agree(not bad, "same-host exchange vs dense reference")
    if CHANNEL is not None and EXCHANGES is not None and EXCHANGES.policy.enabled and len(CHANNEL.members) == N:
        assert used_shared_memory() - before >= steps  # every step went through shared memory


def test_async_calls_waited_in_reverse_order_do_not_deadlock_and_stay_exact() -> None:
    # Four calls in flight at once, waited for newest first: buffers of earlier calls are still
    # being read when later ones are published (the writer copies and moves on, never waits).
    topo = T.one_peer_exponential_two(N)
    for rnd in range(5):
        steps = [4 * rnd + k for k in range(4)]
        handles = [bf.neighbor_mean_async(inputs(ME, s), topo, s) for s in steps]
        results = [h.wait() for h in reversed(handles)][::-1]
        ok = all(check(r, expected(topo, s)) for r, s in zip(results, steps, strict=True))
        all_ranks_agree(ok, f"async calls in reverse order, round {rnd}")


def test_weight_overrides_and_gradients_match_the_dense_reference() -> None:
    # dst_weights scales on the sender side; the reader applies the same scale in place.
    ring = T.ring(N)
    step = 5
    x = inputs(ME, step)
    left, right = (ME - 1) % N, (ME + 1) % N
    out = bf.neighbor_mean(
        x, None, self_weight=0.25, src_weights={left: 1.0},
        dst_weights={right: 0.75},
    )
    want = {k: 0.25 * x[k].to(torch.float64) + 0.75 * inputs(left, step)[k].to(torch.float64) for k in SHAPES}
    ok = check(out, want)
    # Gradient of sum(W x · c) is Wᵀ c: with c = 1 every rank gets its column sum.
    xs = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    mixed = bf.neighbor_mean(xs, ring, 0)
    sum(v.sum() for v in mixed.values()).backward()  # type: ignore[union-attr]
    col = float(ring.mixing_matrix()[:, ME].sum())
    ok = ok and all(torch.equal(xs[k].grad, torch.full(SHAPES[k], col, dtype=xs[k].dtype)) for k in SHAPES)
    all_ranks_agree(ok, "overrides and Wᵀ through shared memory")


# ---------------------------------------------------------------------------------------------
# Bit for bit the MPI transport's results: the same calls with the transport on and off.

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _graphs() -> list[tuple[str, T.Topology | T.DynamicTopology]]:
    out: list[tuple[str, T.Topology | T.DynamicTopology]] = [
        ("exponential_two", T.exponential_two(N)), ("ring", T.ring(N)), ("one_peer", T.one_peer_exponential_two(N)),
    ]
    if N > 2:
        out.append(("full", T.fully_connected(N)))
    return out


@pytest.mark.skipif(CHANNEL is None, reason="no peer on this machine: the transport never applies")
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_same_bits_as_the_mpi_transport(data: st.DataObject) -> None:
    # derandomize: every rank draws the same examples, so the ranks' calls match.
    name, topo = data.draw(st.sampled_from(_graphs()), label="topology")
    n_leaves = data.draw(st.integers(1, 4), label="leaves")
    shapes = [tuple(data.draw(st.lists(st.integers(0, 40), min_size=0, max_size=3), label="shape")) for _ in range(n_leaves)]
    dtypes = [data.draw(st.sampled_from(DTYPES), label="dtype") for _ in range(n_leaves)]
    step = data.draw(st.integers(0, 7), label="step")
    override = data.draw(st.sampled_from(["none", "self", "dst"]), label="override")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed + 7919 * ME)
    tree = [torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    kwargs: dict[str, object] = {}
    graph: T.Topology | T.DynamicTopology | None = topo
    if override == "self":
        at = topo.at(step)
        kwargs = {"self_weight": 0.375, "src_weights": {j: 0.625 / len(at.in_neighbors(ME)) for j in at.in_neighbors(ME)}}
    elif override == "dst":
        right, left = (ME + 1) % N, (ME - 1) % N
        graph = None
        kwargs = {"self_weight": 0.3, "src_weights": {left: 0.7}, "dst_weights": {right: 0.9}}
    assert EXCHANGES is not None
    forced = dataclasses.replace(EXCHANGES.policy, enabled=True, min_bytes=0)
    off = dataclasses.replace(EXCHANGES.policy, enabled=False)
    assert CHANNEL is not None
    before = CHANNEL.epoch
    with EXCHANGES.policy_as(forced):
        shared = bf.neighbor_mean(tree, graph, step, **kwargs)  # type: ignore[arg-type]
    if len(CHANNEL.members) == N and any(t.numel() for t in tree):  # every peer is on this machine
        assert CHANNEL.epoch == before + 1, "the call did not go through shared memory"
    with EXCHANGES.policy_as(off):
        mpi = bf.neighbor_mean(tree, graph, step, **kwargs)  # type: ignore[arg-type]
    ok = all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(shared, mpi, strict=True))
    all_ranks_agree(ok, f"shared memory vs MPI bits ({name}, {override}, {dtypes}, {shapes})")


def test_a_shared_tree_is_read_in_place_and_stays_exact_when_modified_between_calls() -> None:
    topo = T.one_peer_exponential_two(N)
    x = bf.shared_tree(inputs(ME, 0))
    placed_before = 0 if CHANNEL is None else CHANNEL.in_place
    bad = []
    steps = 200
    for step in range(steps):
        if step:
            for name in SHAPES:  # the optimizer's in-place update: the next call sees it
                x[name].copy_(inputs(ME, step)[name])
        out = (bf.neighbor_mean_async(x, topo, step).wait() if step % 2 else bf.neighbor_mean(x, topo, step))
        if not check(out, expected(topo, step)):
            bad.append(step)
    all_ranks_agree(not bad, f"shared tree vs dense reference (bad steps {bad[:5]})")
    if CHANNEL is not None and EXCHANGES is not None and EXCHANGES.policy.enabled and len(CHANNEL.members) == N:
        assert CHANNEL.in_place - placed_before == steps  # every call read the tree in place


def test_two_shared_trees_each_the_others_out_stay_exact_and_write_only_the_result() -> None:
    # The optimizer's atc loop: the parameters live in one tree, the call combines into the
    # other, and the next step starts from the result (modified in place first).
    topo = T.one_peer_exponential_two(N)
    trees = [bf.shared_tree(inputs(ME, 0)), bf.shared_tree(inputs(ME, 0))]
    placed_before = 0 if CHANNEL is None else CHANNEL.in_place
    bad, moved, touched = [], [], []
    steps = 200
    for step in range(steps):
        x, y = trees[step % 2], trees[(step + 1) % 2]
        for name in SHAPES:
            x[name].copy_(inputs(ME, step)[name])
        before = {k: v.clone() for k, v in x.items()}
        pointers = {k: v.data_ptr() for k, v in y.items()}
        handle = bf.neighbor_mean_async(x, topo, step, out=y) if step % 2 else None
        out = handle.wait() if handle is not None else bf.neighbor_mean(x, topo, step, out=y)
        if out is not y or any(y[k].data_ptr() != p for k, p in pointers.items()):
            moved.append(step)
        if any(not torch.equal(x[k], before[k]) for k in SHAPES):
            touched.append(step)
        if not check(out, expected(topo, step)):
            bad.append(step)
    all_ranks_agree(not (bad or moved or touched), f"out= a shared tree: bad steps {bad[:5]}, out replaced at "
                    f"{moved[:5]}, input modified at {touched[:5]}")
    if CHANNEL is not None and EXCHANGES is not None and EXCHANGES.policy.enabled and len(CHANNEL.members) == N:
        assert CHANNEL.in_place - placed_before == steps  # every call read its tree in place
