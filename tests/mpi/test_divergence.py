"""Divergence after agreement: peers catch a rank whose calls no longer match, within one call.

Every call pattern here is agreed first (a correct call on every rank), so what catches the
divergence is the call number each message carries (point-to-point ops) or the call check every
global op starts with, not the agreement collective.  Ranks pair up
as (0, 1), (2, 3), ...: the pair (0, 1) diverges, any other pair keeps working and must be
unaffected.  Runs under ``bfrun -np 2`` and ``-np 4``.

Tree shapes here are used by no other test: an agreed pattern is remembered for the whole
session, and a later test that expects its own first-call agreement must not find it agreed.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi4py import MPI

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.backend.errors import CallMismatchError
from bluefog_fn.world import current

from .conftest import all_ranks_agree

N, ME = bf.size(), bf.rank()
PARTNER = ME ^ 1
pytestmark = pytest.mark.skipif(N < 2 or N % 2, reason="needs an even number (>= 2) of ranks")


def pairs_graph(self_weight: float) -> T.Topology:
    """Each rank averages with its partner (rank ^ 1) only."""
    w = torch.zeros(N, N, dtype=torch.float64)
    for r in range(N):
        w[r, r] = self_weight
        w[r, r ^ 1] = 1.0 - self_weight
    return T.from_matrix(w)


def resync() -> None:
    """Leave the world as a correct program would: nothing queued, call numbers equal."""
    world = current()
    comm = world.executor.transport.comm  # type: ignore[attr-defined]
    status = MPI.Status()
    for _ in range(2):
        comm.Barrier()
        while comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
            buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
            comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=status.Get_tag())
    world.calls.count = max(comm.allgather(world.calls.count))
    channel = world.executor.exchanges.channel  # type: ignore[attr-defined]
    if channel is not None:  # same-host transfers of the failed calls are forgotten too
        channel.reset()


def outcome(fn: object) -> tuple[str | None, object]:
    try:
        return None, fn()  # type: ignore[operator]
    except CallMismatchError as exc:
        return str(exc), None


def check_pair_failed(error: str | None, what: str) -> None:
    """Ranks 0 and 1 raised naming each other; every other rank raised nothing."""
    if ME in (0, 1):
        ok = error is not None and f"rank {PARTNER}" in error and f"rank {ME}" in error
    else:
        ok = error is None
    if not ok:
        print(f"rank {ME}: {what}: {error}")
    all_ranks_agree(ok, what)


def test_rank_running_another_step_of_a_dynamic_topology() -> None:
    topo = T.DynamicTopology([pairs_graph(0.5), pairs_graph(0.75)])
    x = {"w": torch.full((13,), float(ME), dtype=torch.float64)}
    for step in range(2):  # agree both patterns on every rank
        bf.neighbor_mean(x, topo, step)

    def run() -> list[torch.Tensor]:
        steps = [2, 4, 5] if ME == 1 else [2, 3, 4]  # rank 1 skipped step 3
        return [bf.neighbor_mean(x, topo, s)["w"] for s in steps]

    error, _ = outcome(run)
    resync()
    check_pair_failed(error, "another step")
    if ME in (0, 1):
        assert error is not None and "another step of a dynamic topology" in error


def test_rank_skipping_a_call_then_calling_another_op() -> None:
    topo = pairs_graph(0.5)
    x = {"w": torch.full((17,), float(ME))}
    bf.neighbor_mean(x, topo)
    bf.neighbor_gather(x, topo)

    def run() -> None:
        if ME != 1:
            bf.neighbor_mean(x, topo)
        bf.neighbor_gather(x, topo)  # rank 1's gather meets rank 0's neighbor_mean

    error, _ = outcome(run)
    resync()
    check_pair_failed(error, "skipped call")


def test_per_call_graph_that_the_receiver_does_not_share() -> None:
    x = torch.full((19,), float(ME))
    mine = {"self_weight": 0.5, "src_weights": {PARTNER: 0.5}, "dst_weights": [PARTNER]}
    bf.neighbor_mean(x, None, **mine)  # agreed once per tree signature, never again

    def run() -> torch.Tensor:
        if ME == 1:  # believes this call has no edges: sends nothing, expects nothing
            bf.neighbor_mean(x, None, self_weight=1.0, src_weights={}, dst_weights=[])
        else:
            bf.neighbor_mean(x, None, **mine)
        out: torch.Tensor = bf.neighbor_mean(x, None, **mine)
        return out

    error, out = outcome(run)
    resync()
    check_pair_failed(error, "per-call graph")
    if ME == 1:  # rank 0's message is found queued, or lands in rank 1's next receive
        assert error is not None and ("never received" in error or "rank 0 is at its call" in error)
    if ME >= 2:  # the healthy pairs computed exact averages throughout
        assert out is not None and torch.equal(out, torch.full((19,), (ME + PARTNER) / 2))


def test_per_call_graphs_run_no_agreement_collective_after_the_first_call() -> None:
    world = current()
    transport = world.executor.transport  # type: ignore[attr-defined]
    calls = []
    original = transport.allgather_object  # type: ignore[union-attr]

    def counting(obj: object, what: str = "agreement") -> list[object]:
        calls.append(obj)
        return original(obj, what)

    transport.allgather_object = counting  # type: ignore[union-attr,method-assign]
    try:
        x = torch.full((23,), float(ME), dtype=torch.float64)
        period = max(1, (N - 1).bit_length())
        for t in range(3 * period):
            shift = 1 << (t % period)
            dst, src = (ME + shift) % N, (ME - shift) % N
            out = bf.neighbor_mean(x, None, self_weight=0.5, src_weights={src: 0.5}, dst_weights=[dst])
            assert torch.equal(out, torch.full((23,), (ME + src) / 2, dtype=torch.float64))
    finally:
        del transport.allgather_object  # type: ignore[union-attr]
    all_ranks_agree(len(calls) <= 1, f"agreement collectives on per-call graphs: {len(calls)}")


def test_ragged_gather_a_call_behind_names_both_calls() -> None:
    # The ragged path's data messages carry the call number like the uniform path's: after
    # rank 1 made one call more (an edge-less per-call graph: no message at all), the pair's
    # ragged gathers meet with different numbers and each side's error says what its call was.
    ragged = {"g": torch.full((ME + 2, 3), float(ME))}
    edgeless = {"self_weight": 1.0, "src_weights": {}, "dst_weights": []}
    x = torch.full((47,), float(ME))
    bf.neighbor_mean(x, None, **edgeless)  # agreed once, on every rank
    bf.neighbor_gather(ragged, pairs_graph(0.5))  # the pattern is agreed (and seen ragged)

    def run() -> object:
        if ME == 1:
            bf.neighbor_mean(x, None, **edgeless)
        return bf.neighbor_gather(ragged, pairs_graph(0.5))

    error, got = outcome(run)
    resync()
    check_pair_failed(error, "ragged gather a call behind")
    if ME in (0, 1):
        assert error is not None and error.startswith("neighbor_gather: "), error
        assert f"rank {ME}'s call #" in error and "is neighbor_gather(" in error, error
    else:  # the healthy pairs gathered their partner's rows
        assert isinstance(got, dict) and torch.equal(got[PARTNER]["g"], torch.full((PARTNER + 2, 3), float(PARTNER)))


# ---------------------------------------------------------------- global ops
#
# A global op is a collective of every rank, so a divergence anywhere fails the call on every
# rank (the healthy pairs too): each call starts with a call check that every rank makes.


def global_call(op: str, tree: object) -> object:
    """Run the global op ``op`` on ``tree`` (``barrier`` ignores it)."""
    if op == "barrier":
        bf.barrier()
        return None
    if op == "broadcast":
        return bf.broadcast(tree, root=0)
    fns = {"global_mean": bf.global_mean, "global_sum": bf.global_sum, "allgather": bf.allgather}
    return fns[op](tree)


def global_async(op: str, tree: object) -> object:
    """The ``_async`` form of ``op``: the handle first, then its result."""
    if op == "barrier":
        return bf.barrier_async()
    if op == "broadcast":
        return bf.broadcast_async(tree, root=0)
    fns = {"global_mean": bf.global_mean_async, "global_sum": bf.global_sum_async, "allgather": bf.allgather_async}
    return fns[op](tree)


GLOBAL_OPS = ("global_mean", "global_sum", "broadcast", "allgather", "barrier")


def global_outcome(fn: object) -> str | None:
    try:
        fn()  # type: ignore[operator]
    except bf.MismatchError as exc:
        return str(exc)
    return None


def check_every_rank_failed(error: str | None, what: str, *needles: str) -> None:
    """Every rank raised ``MismatchError`` whose message contains each of ``needles``."""
    ok = error is not None and all(n in error for n in needles)
    if not ok:
        print(f"rank {ME}: {what}: {error}")
    all_ranks_agree(ok, what)


def check_world_usable(numel: int) -> None:
    """A correct global call after the failure computes the exact mean (nothing left in flight)."""
    x = torch.full((numel,), float(ME), dtype=torch.float64)
    out = bf.global_mean(x)
    all_ranks_agree(torch.equal(out, torch.full((numel,), (N - 1) / 2, dtype=torch.float64)), "usable afterwards")


def _tree(numel: int) -> list[torch.Tensor]:
    return [torch.full((numel,), float(ME), dtype=torch.float64)]


# Each op's agreed tree and, for the "new pattern" cases, a tree of another structure; sizes
# used by no other test (see the module docstring).
_SIZES = dict(zip(GLOBAL_OPS, (29, 31, 37, 41, 43), strict=True))


@pytest.mark.parametrize("op", GLOBAL_OPS)
def test_global_op_against_a_new_pattern_of_it(op: str) -> None:
    numel = _SIZES[op]
    tree = _tree(numel)
    global_call(op, tree)  # the pattern is agreed on every rank
    other = {"k": tree} if op != "barrier" else None

    def run() -> None:
        if ME == 1 and op != "barrier":
            global_call(op, other)  # a new pattern: rank 1 wants to agree first
        elif ME == 1:
            bf.global_mean({"k": tree})  # barrier has no pattern: a new global_mean instead
        else:
            global_call(op, tree)  # already agreed: straight to data

    error = global_outcome(run)
    check_every_rank_failed(error, f"{op} against a new pattern", "rank 1", "call #")
    check_world_usable(numel)
    resync()


@pytest.mark.parametrize("op", GLOBAL_OPS)
def test_global_op_against_another_global_op(op: str) -> None:
    numel = _SIZES[op] + 100
    tree = _tree(numel)
    other = GLOBAL_OPS[(GLOBAL_OPS.index(op) + 1) % len(GLOBAL_OPS)]
    global_call(op, tree)
    global_call(other, tree)  # both patterns agreed

    error = global_outcome(lambda: global_call(other if ME == 1 else op, tree))
    check_every_rank_failed(error, f"{op} against {other}", f"but rank 1 called {other}", "call #")
    check_world_usable(numel)
    resync()


@pytest.mark.parametrize("op", GLOBAL_OPS)
def test_rank_making_one_global_call_fewer(op: str) -> None:
    numel = _SIZES[op] + 200
    tree = _tree(numel)
    then = "global_sum" if op != "global_sum" else "global_mean"
    global_call(op, tree)
    global_call(then, tree)

    def run() -> None:
        if ME != 1:
            global_call(op, tree)  # rank 1 skips it: its next call meets this one
        global_call(then, tree)

    error = global_outcome(run)
    check_every_rank_failed(error, f"{op} skipped by rank 1", "rank 1", "call #")
    check_world_usable(numel)
    resync()


@pytest.mark.parametrize("op", GLOBAL_OPS)
def test_async_global_op_raises_at_wait_on_every_rank(op: str) -> None:
    numel = _SIZES[op] + 300
    tree = _tree(numel)
    other = "broadcast" if op != "broadcast" else "global_mean"
    global_call(op, tree)
    global_call(other, tree)
    handle = global_async(other if ME == 1 else op, tree)  # returns before the check completed
    assert hasattr(handle, "wait")
    error = global_outcome(handle.wait)  # type: ignore[attr-defined]
    check_every_rank_failed(error, f"async {op} against {other}", "call #")
    again = global_outcome(handle.wait)  # type: ignore[attr-defined]
    all_ranks_agree(again == error, "a failed handle raises the same error again")
    check_world_usable(numel)
    resync()


def test_agreed_global_ops_run_no_agreement_collective() -> None:
    world = current()
    transport = world.executor.transport  # type: ignore[attr-defined]
    tree = _tree(47)
    for op in GLOBAL_OPS:
        global_call(op, tree)  # agreed
    calls: list[object] = []
    original = transport.allgather_object  # type: ignore[union-attr]

    def counting(obj: object, what: str = "agreement") -> list[object]:
        calls.append(obj)
        return original(obj, what)

    transport.allgather_object = counting  # type: ignore[union-attr,method-assign]
    try:
        for _ in range(3):
            for op in GLOBAL_OPS:
                global_call(op, tree)
    finally:
        del transport.allgather_object  # type: ignore[union-attr]
    all_ranks_agree(not calls, f"agreement collectives on agreed global ops: {len(calls)}")


@settings(max_examples=12, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mine=st.sampled_from(GLOBAL_OPS), theirs=st.sampled_from(GLOBAL_OPS), rank=st.integers(0, 63),
    new_pattern=st.booleans(),
)
def test_any_diverging_rank_and_op_pair_fails_everywhere(mine: str, theirs: str, rank: int, new_pattern: bool) -> None:
    # derandomize: every rank draws the same examples, so they agree on who diverges and how.
    odd = rank % N
    numel = 53
    tree = _tree(numel)
    global_call(mine, tree)
    global_call(theirs, tree)
    their_tree: object = {"k": tree} if new_pattern else tree
    if theirs == mine and (not new_pattern or mine == "barrier"):
        theirs_call = "global_sum" if mine != "global_sum" else "global_mean"  # make them differ
    else:
        theirs_call = theirs
    error = global_outcome(lambda: global_call(theirs_call, their_tree) if bf.rank() == odd else global_call(mine, tree))
    check_every_rank_failed(error, f"rank {odd}: {theirs_call} against {mine}", f"rank {odd}", "call #")
    check_world_usable(numel)
    resync()


def test_async_global_op_in_flight_while_a_rank_waits_on_a_neighbour_op() -> None:
    # Rank 0 waits on its neighbour op while rank 1 waits on the global op first: rank 0's
    # wait must post the global op's data (its call check is in), or both wait forever.
    topo = pairs_graph(0.5)
    x = torch.full((59,), float(ME), dtype=torch.float64)
    bf.global_mean(x)
    bf.neighbor_mean(x, topo)
    handle = bf.global_mean_async(x)
    if ME % 2 == 0:
        mixed = bf.neighbor_mean(x, topo)
        mean = handle.wait()
    else:
        mean = handle.wait()
        mixed = bf.neighbor_mean(x, topo)
    ok = torch.equal(mean, torch.full((59,), (N - 1) / 2, dtype=torch.float64))
    ok = ok and torch.equal(mixed, torch.full((59,), (ME + PARTNER) / 2, dtype=torch.float64))
    all_ranks_agree(ok, "async global op overlapping a neighbour op")


def test_async_global_ops_in_flight_together_waited_in_any_order() -> None:
    # Checks are posted in call order; data follows in call order whatever order the handles
    # are waited in on each rank (here rank-dependent), so every result is exact.
    x = torch.full((61,), float(ME), dtype=torch.float64)
    for op in GLOBAL_OPS:
        global_call(op, [x])
    handles = [global_async(op, [x]) for op in GLOBAL_OPS]
    order = range(len(handles)) if ME % 2 == 0 else reversed(range(len(handles)))
    results = {i: handles[i].wait() for i in order}  # type: ignore[attr-defined]
    mean = torch.full((61,), (N - 1) / 2, dtype=torch.float64)
    gathered = torch.cat([torch.full((61,), float(r), dtype=torch.float64) for r in range(N)])
    ok = (
        torch.equal(results[0][0], mean) and torch.equal(results[1][0], mean * N)
        and torch.equal(results[2][0], torch.zeros(61, dtype=torch.float64))
        and torch.equal(results[3][0], gathered) and results[4] is None
    )
    all_ranks_agree(ok, "async global ops waited in any order")


def join_abandoned_checks() -> None:
    """Complete the call checks a failed global op left in flight on some ranks (a collective
    cannot be cancelled): every other rank joins each of them, so later checks match again."""
    transport = current().executor.transport  # type: ignore[attr-defined]
    checks = transport._checks  # type: ignore[attr-defined]
    counts = transport.comm.allgather(len(transport.abandoned))  # type: ignore[attr-defined]
    requests = list(transport.abandoned)  # type: ignore[attr-defined]
    transport.abandoned.clear()  # type: ignore[attr-defined]
    for _ in range(max(counts) - len(requests)):
        requests.append(checks.Iallreduce(MPI.IN_PLACE, np.zeros(3, np.int64), op=MPI.MAX))
    deadline = time.monotonic() + 30
    while not MPI.Request.Testall(requests):
        assert time.monotonic() < deadline, f"rank {ME}: abandoned call checks did not complete: {counts}"
        time.sleep(1e-3)


@pytest.mark.parametrize("late", [0, 1], ids=["global-op-late", "neighbour-op-late"])
def test_global_op_against_an_agreed_neighbour_op(late: int) -> None:
    # Rank 0 calls global_mean where rank 1 calls an agreed neighbour op as the same call.  Rank 1's
    # message (or same-host transfer) of that call reaches rank 0, before rank 0's op starts
    # (late=0) or while it waits in it (late=1): both raise a mismatch at once, naming each
    # other, instead of waiting for the timeout.  The other pairs mix among themselves.
    topo = pairs_graph(0.5)
    x = torch.full((67,), float(ME), dtype=torch.float64)
    bf.global_mean(x)
    bf.neighbor_mean(x, topo)  # both patterns agreed

    def run() -> object:
        if late == ME:
            time.sleep(0.3)
        return bf.global_mean(x) if ME == 0 else bf.neighbor_mean(x, topo)

    start = time.monotonic()
    error, mixed = outcome(run)
    took = time.monotonic() - start
    join_abandoned_checks()
    resync()
    if ME in (0, 1) and error is not None:
        ok = "call #" in error and (ME == 1 or "is a global op" in error)
        error = error if ok else None
    check_pair_failed(error, f"global_mean against an agreed neighbour op, rank {late} late")
    # Not a timing assertion: a timeout would have taken BLUEFOG_FN_TIMEOUT (>= 10 s in every run).
    limit = current().executor.transport.timeout / 2  # type: ignore[attr-defined]
    all_ranks_agree(ME > 1 or took < limit, f"the mismatch took {took:.1f} s")
    if ME > 1:
        all_ranks_agree(torch.equal(mixed, torch.full((67,), (ME + PARTNER) / 2, dtype=torch.float64)), "other pairs")
    else:
        all_ranks_agree(True, "other pairs")
    check_world_usable(67)
