"""bf.checkpoint in one process: resume equals uninterrupted in the simulator, safe loading
(a crafted file never runs code), atomic writes, structure checks, consensus for export, and
the same resume across fresh ``bfrun -np 2`` processes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mpi import resume_cases as rc  # tests/ is on sys.path (rootdir-relative imports)

import bluefog_fn as bf
from bluefog_fn import topology as T

N_SIM = 5


@pytest.mark.parametrize("case", sorted(rc.CASES))
def test_checkpoint_resume_equals_uninterrupted_simulator(case: str, tmp_path: Path) -> None:
    path = str(tmp_path / "sim.pt")
    with bf.simulate(N_SIM):
        result = rc.uninterrupted(case, path, N_SIM, None)
        full = rc.numbers(result)
        rc.free_windows(result)
    with bf.simulate(N_SIM):  # a fresh world: new plan cache, new windows
        result = rc.resumed(case, path, N_SIM, None)
        again = rc.numbers(result)
        rc.free_windows(result)
    assert len(full) > 0 and rc.bitwise_equal(full, again)


def _tensors(tree: Any) -> list[torch.Tensor]:
    from torch.utils import _pytree as pytree

    return [t for t in pytree.tree_leaves(tree, is_leaf=lambda x: isinstance(x, bf.Window)) if isinstance(t, torch.Tensor)]


def test_checkpoint_simulator_window_slots_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "win.pt")
    with bf.simulate(4):
        topo = T.exponential_two(4)
        win = bf.Window({"a": torch.arange(8.0).reshape(4, 2)}, topo)
        win.accumulate({"a": torch.ones(4, 2)})  # mass in every slot, not collected
        bf.checkpoint.save(path, {"win": win})
        fresh = bf.Window({"a": torch.zeros(4, 2)}, topo)
        back = bf.checkpoint.load(path, like={"win": fresh})
        assert back["win"] is fresh
        expected = win.collect()["a"]
        got = fresh.collect()["a"]
        assert torch.equal(got, expected)
        assert torch.equal(expected, torch.arange(8.0).reshape(4, 2) + 2.0)  # 2 in-neighbours each
        with pytest.raises(ValueError, match=r"Window\.restore: snapshot is of a window over another tree"):
            other = bf.Window({"a": torch.zeros(4, 3)}, topo)
            bf.checkpoint.load(path, like={"win": other})


# --------------------------------------------------------------------------- safe loading


class _OpensAFile:
    """Unpickling this calls ``open(marker, "w")``: creating the marker proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


class _RunsAShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_OpensAFile, _RunsAShell])
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_checkpoint_load_refuses_code_execution(payload: type, container: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    evil = {"format": "bluefog_fn.checkpoint", "version": 1, "tree": payload(marker)}
    if container == "torch_zip":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))
    assert not marker.exists()
    with pytest.raises(bf.checkpoint.UnsafeCheckpointError, match=r"checkpoint\.load: refused .*evil\.pt.*not plain data"):
        bf.checkpoint.load(path)
    assert not marker.exists()


def test_checkpoint_load_refuses_foreign_files(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="is not a bluefog_fn checkpoint"):
        bf.checkpoint.load(tmp_path / "plain.pt")
    with pytest.raises(TypeError, match=r"checkpoint\.save: path must be a str or os\.PathLike, got int 3"):
        bf.checkpoint.save(3, {})  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        bf.checkpoint.load(tmp_path / "missing.pt")


# --------------------------------------------------------------------------- atomic writes


def test_checkpoint_save_failure_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck.pt"
    bf.checkpoint.save(path, {"v": torch.ones(3)})
    real_save = torch.save

    def dies_half_way(obj: Any, f: Any) -> None:
        real_save(obj, f)
        f.write(b"garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        bf.checkpoint.save(path, {"v": torch.zeros(3)})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ck.pt"]
    assert torch.equal(bf.checkpoint.load(path)["v"], torch.ones(3))


def test_checkpoint_save_calls_fsync_then_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    bf.checkpoint.save(tmp_path / "x.pt", [1, 2.5, "s", None, True])
    assert events == ["fsync", "replace", "fsync"]  # file, rename, directory
    assert bf.checkpoint.load(tmp_path / "x.pt") == [1, 2.5, "s", None, True]


def test_checkpoint_rank_in_path_and_inputs_untouched(tmp_path: Path) -> None:
    opt = bf.optim.gradient_tracking(bf.optim.adam(0.1), T.ring(1))
    params = {"w": torch.ones(2)}
    state = opt.init(params)
    params, state = opt.step(params, {"w": torch.ones(2)}, state, 0)
    before = [t.clone() for t in _tensors((params, state))]
    bf.checkpoint.save(tmp_path / "s.{rank}.pt", {"p": params, "s": state})
    assert os.listdir(tmp_path) == ["s.0.pt"]
    assert rc.bitwise_equal(before, _tensors((params, state)))
    back = bf.checkpoint.load(tmp_path / "s.{rank}.pt", like={"p": params, "s": state})
    assert type(back["s"]) is type(state) and rc.bitwise_equal(_tensors(back), before)


def test_checkpoint_like_must_match(tmp_path: Path) -> None:
    bf.checkpoint.save(tmp_path / "m.pt", {"w": torch.ones(2)})
    with pytest.raises(ValueError, match="like must have the saved structure"):
        bf.checkpoint.load(tmp_path / "m.pt", like={"v": torch.ones(2)})
    with pytest.raises(ValueError, match=r"leaf \['w'\] of like is a \(3,\) torch.float32 tensor, the file has \(\(2,\), torch.float32\)"):
        bf.checkpoint.load(tmp_path / "m.pt", like={"w": torch.ones(3)})


def test_checkpoint_decentralized_optimizer_state_dict_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = bf.optim.DecentralizedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), model, T.ring(1))
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
    bf.checkpoint.save(tmp_path / "o.pt", opt.state_dict())
    fresh = bf.optim.DecentralizedOptimizer(torch.optim.Adam(model.parameters(), lr=0.5), model, T.ring(1))
    fresh.load_state_dict(bf.checkpoint.load(tmp_path / "o.pt"))
    assert fresh.steps == 3 and fresh.param_groups[0]["lr"] == 0.1
    a, b = opt.optimizer.state_dict()["state"], fresh.optimizer.state_dict()["state"]
    assert all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


def test_checkpoint_consensus_simulator_returns_one_model() -> None:
    with bf.simulate(3):
        x = {"w": torch.tensor([[0.0, 3.0], [1.0, 4.0], [2.0, 8.0]]), "n": None}
        out = bf.checkpoint.consensus(x)
    assert out["w"].tolist() == [1.0, 5.0] and out["n"] is None


def test_broadcast_parameters_state_dict_is_in_place() -> None:
    model = torch.nn.BatchNorm1d(2)
    sd = model.state_dict()
    out = bf.broadcast_parameters(sd, root=0)
    assert out is sd and all(sd[k].data_ptr() == v.data_ptr() for k, v in model.state_dict().items())
    pairs = list(model.named_parameters())
    assert bf.broadcast_parameters(pairs, root=0) is pairs
    assert bf.broadcast_parameters(model.named_parameters(), root=0)[0][0] == "weight"
    with pytest.raises(TypeError, match=r"broadcast_parameters: state_dict entry 'x' must be a torch.Tensor, got int"):
        bad = model.state_dict()
        bad["x"] = 3  # type: ignore[assignment]
        bf.broadcast_parameters(bad, root=0)
    plain = {"w": torch.ones(2)}
    assert bf.broadcast_parameters(plain, root=0) is not plain  # a plain tree: functional


# --------------------------------------------------------------------------- fresh processes

REPO = Path(__file__).resolve().parent.parent
BFRUN = os.path.join(os.path.dirname(sys.executable), "bfrun")


def test_checkpoint_resume_in_fresh_processes_np2(tmp_path: Path) -> None:
    """Run to K, save, run to 2K; then new ``bfrun -np 2`` processes load at K and finish: equal."""
    env = {**os.environ, "BLUEFOG_FN_TIMEOUT": "60", "PYTHONPATH": str(REPO)}
    for mode in ("full", "resume"):
        proc = subprocess.run(
            [BFRUN, "-np", "2", sys.executable, str(REPO / "tests" / "mpi" / "resume_job.py"), mode, str(tmp_path)],
            capture_output=True, text=True, timeout=400, env=env, cwd=REPO,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [*rc.CASES, "module_atc", "module_awc"]
    for name in names:
        for r in range(2):
            full = bf.checkpoint.load(tmp_path / f"{name}.full.{r}.pt")
            again = bf.checkpoint.load(tmp_path / f"{name}.resumed.{r}.pt")
            assert len(full) > 0 and rc.bitwise_equal(full, again), f"{name} rank {r}"


def test_checkpoint_load_leaves_torch_load_of_states_working(tmp_path: Path) -> None:
    state = bf.optim.adam(0.1).init({"w": torch.ones(2)})
    bf.checkpoint.save(tmp_path / "a.pt", state)
    bf.checkpoint.load(tmp_path / "a.pt")
    torch.save(state, tmp_path / "b.pt")
    assert type(torch.load(tmp_path / "b.pt", weights_only=True)).__name__ == "AdamState"
