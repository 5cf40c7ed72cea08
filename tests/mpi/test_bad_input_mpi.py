"""Bad input under MPI: every rank makes the same bad call (hypothesis, derandomized), every rank
rejects it before any message, and a correct collective right after succeeds — the world is
still usable.  Also: non-contiguous, overlapping (zero-stride) and empty trees give the results
of their contiguous copies, inputs untouched.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

import bluefog_fn as bf
from bluefog_fn import topology as T

from . import bad_input_table as table
from .bad_input_checks import check_rejected, make_context, release
from .conftest import all_ranks_agree

N = bf.size()
ENTRIES = table.entries(N, bf.rank())
CASES = [(e, arg) for e in ENTRIES for arg in e.bad]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = make_context(tmp_path_factory.mktemp("bad_input_mpi"))
    yield c
    c["window"].free()


@pytest.mark.skipif(N < 2, reason="the one-process run is tests/test_bad_input.py")
@pytest.mark.parametrize(("entry", "arg"), CASES, ids=[f"{e.name}-{a}" for e, a in CASES])
@settings(max_examples=5, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_bad_input_rejected_on_every_rank(entry: table.Entry, arg: str, data: st.DataObject, ctx: dict[str, Any]) -> None:
    b = data.draw(entry.bad[arg], label=arg)
    try:
        check_rejected(entry, arg, b, ctx)
        ok, why = True, ""
    except AssertionError as e:  # report on every rank instead of leaving the others waiting
        ok, why = False, str(e)
    if not ok:
        print(f"rank {bf.rank()}: {why}")
    all_ranks_agree(ok, f"{entry.name}({arg}={b.value!r:.40})")
    # The world is still usable: a correct collective, then (for collectives) the good call.
    assert float(bf.global_sum(torch.ones(1))) == N
    if entry.collective:
        release(entry.call(entry.good(ctx)))


def _strided(kind: str, base: torch.Tensor) -> torch.Tensor:
    if kind == "transposed":
        return base.reshape(3, 4).t()
    if kind == "sliced":
        return base[::2]
    if kind == "expanded":  # overlapping memory: the rows share storage
        return base[:4].expand(3, 4)
    return base.reshape(3, 4)[:, 1:3]


@pytest.mark.parametrize("kind", ["transposed", "sliced", "expanded", "column_slice"])
@pytest.mark.parametrize("op", ["neighbor_mean", "global_mean", "broadcast", "allgather", "neighbor_gather"])
def test_non_contiguous_and_overlapping_leaves(kind: str, op: str) -> None:
    base = torch.arange(12, dtype=torch.float64) * (1 + bf.rank())
    x = {"a": _strided(kind, base), "b": torch.ones(2)}
    dense = {k: v.contiguous() for k, v in x.items()}
    before = base.clone()
    topo = T.exponential_two(N)
    call = {
        "neighbor_mean": lambda t: bf.neighbor_mean(t, topo, 0),
        "global_mean": bf.global_mean,
        "broadcast": lambda t: bf.broadcast(t, N - 1),
        "allgather": bf.allgather,
        "neighbor_gather": lambda t: bf.neighbor_gather(t, topo, 0),
    }[op]
    got, expected = call(x), call(dense)
    same = all(torch.equal(g, e) for g, e in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True))
    all_ranks_agree(same and torch.equal(base, before), f"{op} on {kind} leaves")


@pytest.mark.parametrize("empty", [{}, [], (), {"a": None}, {"a": [], "b": {}}], ids=repr)
def test_empty_trees_pass_through(empty: Any) -> None:
    topo = T.ring(N)
    for op in (lambda t: bf.neighbor_mean(t, topo), bf.global_mean, bf.global_sum, lambda t: bf.broadcast(t, 0), bf.allgather):
        assert op(empty) == empty
    assert float(bf.global_sum(torch.ones(1))) == N
