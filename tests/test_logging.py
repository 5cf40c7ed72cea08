"""The ``bluefog_fn`` logger: records carry the rank, the env-var level, the warnings, no prints."""

from __future__ import annotations

import ast
import gc
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import log, world

ROOT = Path(__file__).resolve().parents[1]
BFRUN = os.path.join(os.path.dirname(sys.executable), "bfrun")
ENV = {**os.environ, "BLUEFOG_FN_TIMEOUT": "30"}


def test_records_carry_the_rank(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="bluefog_fn"):
        bf.plan_cache_clear()
        bf.neighbor_mean({"w": torch.ones(2)}, bf.topology.ring(bf.size()))
    records = [r for r in caplog.records if r.name.startswith("bluefog_fn")]
    assert any("traced a plan for neighbor_mean" in r.getMessage() for r in records)
    assert records and all(r.rank == bf.rank() for r in records)  # type: ignore[attr-defined]


def test_rank_before_init_comes_from_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(world, "_process_world", lambda: None)
    monkeypatch.setenv("PMI_RANK", "5")
    assert log.current_rank() == 5


def test_env_level_configures_a_stderr_handler_showing_the_rank() -> None:
    code = "import torch, bluefog_fn as bf\nbf.neighbor_mean(torch.ones(2), bf.topology.ring(1))\n"
    env = {k: v for k, v in ENV.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL"))}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "BLUEFOG_FN_LOG_LEVEL": "debug"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[bluefog_fn rank 0 DEBUG] traced a plan for neighbor_mean" in out.stderr
    assert out.stdout == ""


def test_bad_level_names_the_variable_and_value() -> None:
    with pytest.raises(ValueError, match=r"BLUEFOG_FN_LOG_LEVEL must be .* got 'LOUD'"):
        log._level_from_env("LOUD")
    assert log._level_from_env("warning") == logging.WARNING
    assert log._level_from_env("15") == 15


def test_oversubscription_is_warned_once_per_machine(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(world, "_cpu_count", lambda: 2)
    w0 = world.World("mpi", 0, 4, 0, 4, 0, 1, None)  # type: ignore[arg-type]  # no executor needed
    w1 = world.World("mpi", 1, 4, 1, 4, 0, 1, None)  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="bluefog_fn"):
        world._warn_about(w0, "serialized", 4)
        world._warn_about(w1, "serialized", 4)
        world._warn_about(w0, "serialized", 2)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "4 ranks run on this machine" in warnings[0].getMessage()
    assert warnings[0].rank == 0  # type: ignore[attr-defined]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert [r.rank for r in infos] == [0, 1, 0]  # type: ignore[attr-defined]


def test_window_never_freed_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bluefog_fn"):
        freed = bf.Window(torch.ones(2), bf.topology.ring(bf.size()))
        freed.free()
        del freed
        gc.collect()
        assert not caplog.records
        leaked = bf.Window(torch.ones(3), bf.topology.ring(bf.size()))
        del leaked
        gc.collect()
    assert len(caplog.records) == 1
    assert "bf.Window of 12 bytes per region was never freed" in caplog.records[0].getMessage()


def test_mpi_world_logs_with_each_rank_and_warns_about_thread_multiple() -> None:
    code = (
        "from mpi4py import MPI\n"  # before bluefog_fn: mpi4py initializes MPI with MULTIPLE
        "import bluefog_fn as bf\n"
        "bf.init()\n"
    )
    out = subprocess.run([BFRUN, "-np", "2", sys.executable, "-c", code], env={**ENV, "BLUEFOG_FN_LOG_LEVEL": "INFO"},
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    for r in range(2):
        assert f"[bluefog_fn rank {r} INFO] world: rank {r} of 2" in out.stderr, out.stderr
    assert out.stderr.count("MPI_THREAD_MULTIPLE") == 1
    assert "[bluefog_fn rank 0 WARNING] MPI was initialized with MPI_THREAD_MULTIPLE" in out.stderr


def test_the_library_never_prints() -> None:
    """Only the command-line entry points (bfrun and its job watcher, the commands) write to stdout; the library logs."""
    allowed = {"cli.py", "launch_watch.py", "__main__.py", "timeline_merge.py", "timeline_summary.py"}  # bfrun and commands
    offenders = []
    for base in ("bluefog_fn", "backend"):
        for path in sorted((ROOT / base).rglob("*.py")):
            if path.name in allowed:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
