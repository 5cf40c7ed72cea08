"""Bad input, systematically: every public function of the table in ``tests/mpi/bad_input_table.py``
gets hypothesis-drawn bad values for each argument and must raise TypeError/ValueError naming the
function, the argument and the value, before communicating, without modifying its inputs; the
world stays usable.  Good calls never modify their inputs.  (The same table under MPI, and
non-contiguous / overlapping / empty trees: ``tests/mpi/test_bad_input_mpi.py``.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mpi import bad_input_table as table  # tests/ is on sys.path (rootdir-relative imports)
from mpi.bad_input_checks import assert_unchanged, check_rejected, make_context, release, snapshot

import bluefog_fn as bf
from bluefog_fn import topology as T

ENTRIES = table.entries(bf.size(), bf.rank())
CASES = [(e, arg) for e in ENTRIES for arg in e.bad]


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Any:
    c = make_context(tmp_path_factory.mktemp("bad_input"))
    yield c
    c["window"].free()


@pytest.mark.parametrize(("entry", "arg"), CASES, ids=[f"{e.name}-{a}" for e, a in CASES])
@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_bad_input_rejected(entry: table.Entry, arg: str, data: st.DataObject, ctx: dict[str, Any]) -> None:
    b = data.draw(entry.bad[arg], label=arg)
    check_rejected(entry, arg, b, ctx)
    assert float(bf.global_sum(torch.ones(1))) == bf.size()  # the world is still usable


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_good_input_not_mutated(entry: table.Entry, ctx: dict[str, Any]) -> None:
    args = entry.good(ctx)
    saved = snapshot(args)
    release(entry.call(args))
    assert_unchanged(saved)


def test_table_covers_the_public_functions() -> None:
    """Every public callable should appear in the table (add an Entry when adding a function)."""
    covered = {e.says for e in ENTRIES} | {e.name.split(".")[-1] for e in ENTRIES} | {e.name.split("_async")[0] for e in ENTRIES}
    # No arguments, or nothing to get wrong: world queries, cache introspection, shutdown.
    exempt = {"barrier", "barrier_async", "local_rank", "local_size", "machine_rank", "machine_size", "rank", "size",
              "shutdown", "is_homogeneous", "plan_cache_clear", "plan_cache_info", "global_mean_async", "global_sum",
              "allgather_async", "neighbor_gather_async", "hierarchical_neighbor_mean_async"}
    public = [n for n in bf.__all__ if callable(getattr(bf, n)) and not isinstance(getattr(bf, n), type)]
    public += [f"topology.{n}" for n in table.T.__all__ if callable(getattr(table.T, n)) and not isinstance(getattr(table.T, n), type)]
    covered |= {e.name for e in ENTRIES}
    missing = sorted(set(public) - covered - exempt)
    if missing:  # reported (pytest -ra), not failed: functions land before their table entries
        pytest.skip(f"public functions not yet in tests/mpi/bad_input_table.py: {missing}")


def test_simulator_rejects_like_mpi(tmp_path: Path) -> None:
    """Inside bf.simulate(n) the same validation applies, with n agents."""
    with bf.simulate(3):
        x = {"w": torch.ones(3, 2)}
        with pytest.raises(ValueError, match=r"neighbor_mean: step must be an int >= 0, got -1"):
            bf.neighbor_mean(x, T.ring(3), -1)
        with pytest.raises(ValueError, match=r"neighbor_mean: topology has size 4 but the world has 3"):
            bf.neighbor_mean(x, T.ring(4))
        with pytest.raises(ValueError, match=r"broadcast: root has rank 3"):
            bf.broadcast(x, 3)
        with pytest.raises(TypeError, match=r"global_mean: tree leaf \['w'\] has dtype torch.int64"):
            bf.global_mean({"w": torch.ones(3, 2, dtype=torch.int64)})
        assert torch.equal(bf.global_mean(x)["w"], x["w"])  # still usable
