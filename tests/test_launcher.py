"""bfrun, the world without mpiexec, and failure behaviour across processes (timed subprocesses)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bluefog_fn.cli import build_command, main

BFRUN = os.path.join(os.path.dirname(sys.executable), "bfrun")
ENV = {**os.environ, "BLUEFOG_FN_TIMEOUT": "10"}
for key in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMI_FD"):
    ENV.pop(key, None)


def run(args: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def test_size_is_one_without_mpiexec() -> None:
    out = run([sys.executable, "-c", "import bluefog_fn as bf; print(bf.size(), bf.rank(), bf.machine_size())"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "0", "1"]


def test_import_does_not_load_mpi() -> None:
    out = run([sys.executable, "-c", "import sys, bluefog_fn as bf; bf.size(); print('mpi4py.MPI' in sys.modules)"])
    assert out.stdout.strip() == "False", out.stderr


def test_bfrun_starts_four_distinct_ranks() -> None:
    # One write(2) per rank so lines from different ranks cannot interleave.
    code = "import os, bluefog_fn as bf; os.write(1, f'{bf.rank()} {bf.size()}\\n'.encode())"
    out = run([BFRUN, "-np", "4", sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr
    lines = sorted(out.stdout.split("\n")[:-1])
    assert lines == ["0 4", "1 4", "2 4", "3 4"]


def test_ranks_per_machine_env_splits_one_host() -> None:
    code = (
        "import os, bluefog_fn as bf; os.write(1, ('%d %d %d %d %d\\n' % (bf.rank(), bf.local_rank(), "
        "bf.local_size(), bf.machine_rank(), bf.machine_size())).encode())"
    )
    out = run([BFRUN, "-np", "4", sys.executable, "-c", code], env={**ENV, "BLUEFOG_FN_RANKS_PER_MACHINE": "2"})
    assert out.returncode == 0, out.stderr
    rows = sorted(tuple(map(int, line.split())) for line in out.stdout.strip().splitlines())
    assert rows == [(0, 0, 2, 0, 2), (1, 1, 2, 0, 2), (2, 0, 2, 1, 2), (3, 1, 2, 1, 2)]


def test_real_node_layout_is_one_machine() -> None:
    code = "import os, bluefog_fn as bf; os.write(1, f'{bf.local_size()} {bf.machine_size()}\\n'.encode())"
    out = run([BFRUN, "-np", "2", sys.executable, "-c", code])
    assert out.stdout.split() == ["2", "1", "2", "1"], out.stderr


def test_bfrun_version_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert "bfrun (bluefog-fn)" in capsys.readouterr().out
    for argv, message in [
        (["python", "x.py"], "-np N is required"),
        (["-np", "zero", "python"], "-np must be a positive integer, got 'zero'"),
        (["-np", "0", "python"], "-np must be a positive integer, got 0"),
        (["-np", "2"], "no program to run"),
    ]:
        with pytest.raises(SystemExit, match=message):
            build_command(argv, "mpiexec")


def test_bfrun_passes_mpiexec_options_and_timeline() -> None:
    cmd, env = build_command(["-np", "3", "--timeline", "/tmp/tl", "-bind-to", "python", "a.py", "-v"], "/x/mpiexec")
    assert cmd == ["/x/mpiexec", "-n", "3", "-bind-to", "python", "a.py", "-v"]
    assert env == {"BLUEFOG_FN_TIMELINE": "/tmp/tl"}


def test_bfrun_knows_which_mpiexec_options_take_values() -> None:
    cmd, _ = build_command(["-bind-to", "core", "-np", "2", "-genv", "A", "1", "python", "x.py"], "mpiexec")
    assert cmd == ["mpiexec", "-n", "2", "-bind-to", "core", "-genv", "A", "1", "python", "x.py"]
    cmd, _ = build_command(["-np", "2", "-custom", "v", "--", "python", "x.py"], "mpiexec")
    assert cmd == ["mpiexec", "-n", "2", "-custom", "v", "python", "x.py"]
    # A "--" inside the program's own arguments is the program's business.
    cmd, _ = build_command(["-np", "2", "python", "x.py", "--", "--flag"], "mpiexec")
    assert cmd == ["mpiexec", "-n", "2", "python", "x.py", "--", "--flag"]
    cmd, _ = build_command(["-np", "2", "--", "python", "x.py"], "mpiexec")
    assert cmd == ["mpiexec", "-n", "2", "python", "x.py"]
    with pytest.raises(SystemExit, match="option -hosts needs 1 value"):
        build_command(["-np", "2", "-hosts"], "mpiexec")


def test_bfrun_without_mpiexec_says_so(tmp_path: os.PathLike[str]) -> None:
    # A Python whose directory has no mpiexec and a PATH without one.
    code = "import sys; from bluefog_fn.cli import main; sys.executable = '/nonexistent/python'; sys.exit(main(['-np', '2', 'true']))"
    out = run([sys.executable, "-c", code], env={**ENV, "PATH": str(tmp_path)})
    assert out.returncode != 0
    assert "no mpiexec found" in out.stderr


def test_dead_rank_makes_the_others_fail_in_bounded_time() -> None:
    code = (
        "import os, torch, bluefog_fn as bf\n"
        "bf.init()\n"
        "if bf.rank() == 1: os._exit(3)\n"
        "bf.neighbor_mean(torch.ones(4), bf.topology.ring(bf.size()))\n"
    )
    start = time.monotonic()
    out = run([BFRUN, "-np", "2", sys.executable, "-c", code], timeout=90)
    assert out.returncode != 0
    assert time.monotonic() - start < 60


def test_mismatched_step_on_dynamic_topology_raises_everywhere() -> None:
    code = (
        "import os, torch, bluefog_fn as bf\n"
        "topo = bf.topology.one_peer_exponential_two(4)\n"
        "try:\n"
        "    bf.neighbor_mean(torch.ones(2), topo, step=bf.rank() % 2)\n"
        "except bf.MismatchError as e:\n"
        "    os.write(1, f'MISMATCH {bf.rank()}\\n'.encode())\n"
    )
    out = run([BFRUN, "-np", "4", sys.executable, "-c", code], timeout=90)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split("\n")[:-1]) == [f"MISMATCH {r}" for r in range(4)]


def test_rank_skipping_a_call_times_out_with_a_clear_error() -> None:
    code = (
        "import time, torch, bluefog_fn as bf\n"
        "topo = bf.topology.ring(2)\n"
        "bf.neighbor_mean(torch.ones(2), topo)\n"  # agreed once; the next call skips agreement
        "if bf.rank() == 0:\n"
        "    try:\n"
        "        bf.neighbor_mean(torch.ones(2), topo)\n"
        "    except bf.CommTimeoutError as e:\n"
        "        print('TIMEOUT', e, flush=True)\n"
        "else:\n"
        "    time.sleep(30)\n"  # alive but silent; rank 0's bounded exit then ends the job
    )
    start = time.monotonic()
    out = run([BFRUN, "-np", "2", sys.executable, "-c", code], timeout=90, env={**ENV, "BLUEFOG_FN_TIMEOUT": "3"})
    assert "TIMEOUT" in out.stdout and "rank(s) [1]" in out.stdout, out.stdout + out.stderr
    assert time.monotonic() - start < 60
