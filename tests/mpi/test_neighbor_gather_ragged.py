"""neighbor_gather whose leaves' first dimensions differ between ranks (and between calls).

Every rank builds every rank's tree from ``(rank, call)`` alone, so the exact expected result is
known everywhere: ``got[src]`` must equal ``tree(src)`` bit for bit, with its own shapes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import all_ranks_agree

N = bf.size()
ME = bf.rank()


def _tree(r: int, k: int = 0) -> dict[str, Any]:
    """Rank r's tree at call k: first dims vary with r and k, one leaf is empty on some ranks."""
    rows = (r + k) % 3 + 1
    return {
        "a": torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3) + 100 * r + 0.5 * k,
        "b": torch.arange(2 * ((r + k) % 2), dtype=torch.int64) - r,  # length 0 or 2
        "c": torch.tensor(float(r) + k, dtype=torch.float64),  # 0-d everywhere
        "d": [torch.full((r + 1, 2, 2), r + k, dtype=torch.bfloat16)],
    }


def _same(a: Any, b: Any) -> bool:
    la, sa = torch.utils._pytree.tree_flatten(a)
    lb, sb = torch.utils._pytree.tree_flatten(b)
    return sa == sb and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(la, lb, strict=True))


def _expected(topo: T.AnyTopology, step: int, k: int) -> dict[int, Any]:
    return {src: _tree(src, k) for src in topo.at(step).in_neighbors(ME)}


@pytest.mark.parametrize("name", ["ring", "exponential_two", "one_peer_exponential_two", "fully_connected"])
def test_ragged_gather_exact_over_calls(name: str) -> None:
    topo = getattr(T, name)(N)
    for k in range(5):  # first call agrees; later calls announce their (changing) first dims
        mine = _tree(ME, k)
        before = _tree(ME, k)
        got = bf.neighbor_gather(mine, topo, k)
        ok = set(got) == set(topo.at(k).in_neighbors(ME))
        ok = ok and all(_same(got[s], e) for s, e in _expected(topo, k, k).items())
        ok = ok and _same(mine, before)
        all_ranks_agree(ok, f"ragged neighbor_gather {name} call {k}")


def test_ragged_gather_large_leaves_travel_alone() -> None:
    # 40 000+ float64 rows per rank: past the packing threshold, each leaf is its own message.
    def big(r: int) -> dict[str, torch.Tensor]:
        n_rows = 40_000 + 7 * r
        return {"x": torch.arange(n_rows, dtype=torch.float64) * (r + 1), "y": torch.ones(r + 1)}

    topo = T.ring(N)
    for _ in range(2):
        got = bf.neighbor_gather(big(ME), topo)
        all_ranks_agree(all(_same(got[s], big(s)) for s in topo.in_neighbors(ME)), "large ragged leaves")


def test_ragged_gather_async_and_per_call_graph() -> None:
    topo = T.ring(N)
    h = bf.neighbor_gather_async(_tree(ME, 1), topo)
    got = h.wait()
    ok = all(_same(got[s], _tree(s, 1)) for s in topo.in_neighbors(ME))
    if N > 1:
        src, dst = (ME - 1) % N, (ME + 1) % N
        for k in range(3):
            per_call = bf.neighbor_gather(_tree(ME, k), None, src_weights={src: 1.0}, dst_weights=[dst])
            ok = ok and set(per_call) == {src} and _same(per_call[src], _tree(src, k))
    all_ranks_agree(ok, "ragged async / per-call graph")


def test_equal_shapes_keep_the_single_exchange() -> None:
    # Fast path: once a pattern (structure, other dims, graph, step) is agreed with equal shapes
    # everywhere, a call posts one exchange (no first-dimension message); a pattern seen ragged
    # posts two (dims, then data) from then on.
    transport = bf.world.current().executor.transport  # type: ignore[attr-defined]
    if transport is None:
        pytest.skip("a world of one has no transport")
    calls: list[int] = []
    original = transport.exchange

    def counting(*args: Any, **kw: Any) -> Any:
        calls.append(1)
        return original(*args, **kw)

    topo = T.exponential_two(N)
    uniform = {"u": torch.full((4, 5), float(ME))}
    ragged = {"u": torch.full((ME + 1, 3), float(ME))}
    bf.neighbor_gather(uniform, topo)
    bf.neighbor_gather(ragged, topo)
    transport.exchange = counting  # type: ignore[method-assign]
    try:
        bf.neighbor_gather(uniform, topo)
        n_uniform = len(calls)
        got = bf.neighbor_gather(ragged, topo)
        n_ragged = len(calls) - n_uniform
    finally:
        del transport.exchange
    ok = n_uniform == 1 and n_ragged == (2 if N > 1 else 1)
    ok = ok and all(torch.equal(got[s]["u"], torch.full((s + 1, 3), float(s))) for s in topo.in_neighbors(ME))
    all_ranks_agree(ok, f"exchanges per call: uniform {n_uniform}, ragged {n_ragged}")


@pytest.mark.skipif(N < 2, reason="a mismatch needs two ranks")
def test_ragged_gather_other_dims_must_agree() -> None:
    bad = torch.zeros(2, 3 if ME == 0 else 4)
    with pytest.raises(bf.MismatchError, match="neighbor_gather: tree leaf"):
        bf.neighbor_gather(bad, T.ring(N))
    zero_d = torch.zeros(()) if ME == 0 else torch.zeros(1)
    with pytest.raises(bf.MismatchError, match=r"neighbor_gather: tree leaf .* is 0-d on rank\(s\) \[0\]"):
        bf.neighbor_gather(zero_d, T.ring(N))
    bf.barrier()


def test_ragged_gather_simulator_equals_mpi() -> None:
    for name in ("ring", "exponential_two"):
        topo = getattr(T, name)(N)
        mpi = bf.neighbor_gather(_tree(ME, 2), topo)
        with bf.simulate(N):
            sim = bf.neighbor_gather(bf.sim.ragged([_tree(r, 2) for r in range(N)]), topo)[ME]
        ok = set(sim) == set(mpi) and all(_same(sim[s], mpi[s]) for s in mpi)
        all_ranks_agree(ok, f"ragged gather sim == MPI ({name})")
