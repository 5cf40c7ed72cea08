"""No hangs: when a rank fails, the whole job ends in bounded time and bfrun names the rank.

Each scenario launches a small job with ``bfrun`` in a subprocess with a hard timeout and checks
the exit status, the wall time against the bound, what bfrun and the ranks print, and that no
process of the job is left (every job carries a unique marker argument, looked for in /proc).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

BFRUN = os.path.join(os.path.dirname(sys.executable), "bfrun")
ENV = {**os.environ, "BLUEFOG_FN_TIMEOUT": "60"}
for key in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "PMI_FD"):
    ENV.pop(key, None)
# The bound for a job with a failed rank; startup of 4 oversubscribed ranks is included.
BOUND_SECONDS = 60

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

PRELUDE = "import os, sys, time, threading, torch, bluefog_fn as bf\nbf.init()\n"


def processes_with(marker: str) -> list[str]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{entry}: {cmdline}")
    return found


def run_job(
    np_: int, body: str, timeout_s: float | None = None, shm: str | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``body`` (after :data:`PRELUDE`) on ``np_`` ranks; returns the result and wall time.

    ``shm``: ``BLUEFOG_FN_SHM`` for the job ("1": every exchange between these ranks of one
    machine goes through shared memory, so waits are on peers' flags, not MPI requests)."""
    env = dict(ENV)
    if shm is not None:
        env["BLUEFOG_FN_SHM"] = shm
    if timeout_s is not None:
        env["BLUEFOG_FN_TIMEOUT"] = str(timeout_s)
    return run_code(np_, PRELUDE + body, env)


def run_code(np_: int, code: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``code`` as it is on ``np_`` ranks; kill whatever of the job is left afterwards."""
    marker = f"bf-failure-test-{uuid.uuid4().hex}"
    start = time.monotonic()
    try:
        out = subprocess.run(
            [BFRUN, "-np", str(np_), sys.executable, "-c", code, marker],
            capture_output=True, text=True, timeout=150, env=env,
        )
    finally:
        elapsed = time.monotonic() - start
        time.sleep(0.2)
        left = processes_with(marker)
        for line in left:  # never leave a stray job behind, even when the assertion fails
            os.kill(int(line.split(":")[0]), 9)
    assert not left, f"processes of the job left behind: {left}"
    return out, elapsed


TRANSPORTS = pytest.mark.parametrize("shm", ["0", "1"], ids=["mpi", "shared-memory"])


@TRANSPORTS
def test_rank_raising_mid_run_ends_the_job_and_bfrun_names_it(shm: str) -> None:
    # The scenario: rank 2 raises right after a barrier; the others keep mixing.
    body = (
        "x = torch.ones(4)\n"
        "if bf.rank() == 0:\n"  # a process of the job that no rank waits for: it must go too
        "    import subprocess\n"
        "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', sys.argv[1]])\n"
        "bf.barrier()\n"
        "if bf.rank() == 2:\n"
        "    raise RuntimeError('loss is nan on rank 2')\n"
        "while True:\n"
        "    x = bf.neighbor_mean(x, bf.topology.exponential_two(4), 0)\n"
    )
    out, elapsed = run_job(4, body, shm=shm)
    assert out.returncode != 0
    assert elapsed < BOUND_SECONDS, f"job took {elapsed:.1f} s"
    assert "bfrun: rank 2 failed: RuntimeError: loss is nan on rank 2" in out.stderr, out.stderr
    # The traceback is printed once, every line of it tagged with the rank.
    assert out.stderr.count("Traceback (most recent call last)") == 1, out.stderr
    assert "[bluefog_fn rank 2] Traceback (most recent call last):" in out.stderr
    assert "[bluefog_fn rank 2] RuntimeError: loss is nan on rank 2" in out.stderr


@TRANSPORTS
def test_rank_that_stops_calling_the_op_is_named_by_the_timeout(shm: str) -> None:
    body = (
        "x = torch.ones(4)\n"
        "topo = bf.topology.ring(3)\n"
        "for step in range(4):\n"
        "    if bf.rank() == 1 and step == 2:\n"
        "        time.sleep(600)\n"  # alive, but no longer calling the library
        "    x = bf.neighbor_mean(x, topo, step)\n"
    )
    out, elapsed = run_job(3, body, timeout_s=3, shm=shm)
    assert out.returncode != 0
    assert elapsed < BOUND_SECONDS
    # Rank 0 and rank 2 receive from rank 1; whichever timed out first is reported.
    assert "CommTimeoutError: neighbor_mean (step 2)" in out.stderr, out.stderr
    assert "no answer from rank(s) [1] after 3 s" in out.stderr, out.stderr
    first = next(line for line in out.stderr.splitlines() if line.startswith("bfrun: rank"))
    assert first.startswith(("bfrun: rank 0 failed", "bfrun: rank 2 failed")), first


def test_collective_timeout_names_the_op_and_the_world() -> None:
    body = (
        "bf.global_mean(torch.ones(2))\n"  # agreed once; the next call skips agreement
        "if bf.rank() == 0:\n"
        "    bf.global_mean(torch.ones(2))\n"
        "else:\n"
        "    time.sleep(600)\n"
    )
    out, _ = run_job(2, body, timeout_s=3)
    assert out.returncode != 0
    assert (
        "bfrun: rank 0 failed: CommTimeoutError: global_mean: not every one of the 2 ranks entered it within 3 s"
        in out.stderr
    ), out.stderr


def test_rank_never_arriving_at_an_async_global_op_is_a_timeout() -> None:
    # The async form returns once its call check is posted; the wait names the op and the world.
    body = (
        "x = torch.ones(2)\n"
        "bf.broadcast(x)\n"  # agreed: the next call goes straight to its call check
        "if bf.rank() == 0:\n"
        "    handle = bf.broadcast_async(x)\n"
        "    handle.wait()\n"
        "else:\n"
        "    time.sleep(600)\n"
    )
    out, elapsed = run_job(2, body, timeout_s=3)
    assert out.returncode != 0
    assert elapsed < BOUND_SECONDS
    assert (
        "bfrun: rank 0 failed: CommTimeoutError: broadcast: not every one of the 2 ranks entered it within 3 s"
        in out.stderr
    ), out.stderr


@TRANSPORTS
def test_killed_rank_ends_the_job_and_bfrun_names_it(shm: str) -> None:
    body = (
        "x = torch.ones(4)\n"
        "bf.barrier()\n"
        "if bf.rank() == 1:\n"
        "    os.kill(os.getpid(), 9)\n"
        "while True:\n"
        "    x = bf.neighbor_mean(x, bf.topology.ring(3), 0)\n"
    )
    out, elapsed = run_job(3, body, shm=shm)
    assert out.returncode != 0
    assert elapsed < BOUND_SECONDS
    assert "rank 1 (pid" in out.stderr and "ended without a Python error" in out.stderr, out.stderr


@TRANSPORTS
def test_rank_exiting_early_fails_its_peers_at_once(shm: str) -> None:
    # sys.exit(1) does not go through the exception hook: the peers learn that rank 2 left.
    body = (
        "x = torch.ones(4)\n"
        "topo = bf.topology.ring(3)\n"
        "for step in range(1000):\n"
        "    if bf.rank() == 2 and step == 3:\n"
        "        sys.exit(1)\n"
        "    x = bf.neighbor_mean(x, topo, step)\n"
    )
    out, elapsed = run_job(3, body, timeout_s=100, shm=shm)
    assert out.returncode != 0
    assert elapsed < BOUND_SECONDS
    assert "CommError: neighbor_mean (step 3)" in out.stderr, out.stderr
    assert "rank(s) [2] left the job" in out.stderr, out.stderr


def test_rank_never_reaching_its_end_is_named_at_exit() -> None:
    # Rank 0 finishes; rank 1 is stuck outside the library: the exit waits only so long.
    body = "bf.barrier()\nif bf.rank() == 1:\n    time.sleep(600)\n"
    out, _ = run_job(2, body, timeout_s=3)
    assert out.returncode != 0
    assert "bfrun: rank 0 failed (at interpreter exit): CommTimeoutError: shutdown:" in out.stderr, out.stderr
    assert "but rank(s) [1] did not within 3 s" in out.stderr


def test_rank_missing_at_init_is_a_timeout_not_a_hang() -> None:
    code = (
        "import os, time, bluefog_fn as bf\n"
        "if os.environ['PMI_RANK'] == '1':\n"
        "    time.sleep(600)\n"
        "bf.init()\n"
    )
    out, _ = run_code(2, code, {**ENV, "BLUEFOG_FN_INIT_TIMEOUT": "3"})
    assert out.returncode != 0
    # MPI's own initialization waits for every rank: its deadline prints where rank 0 was stuck.
    assert "Timeout (0:00:03)!" in out.stderr, out.stderr
    assert (
        "bfrun: rank(s) [0] gave up waiting for every rank in MPI initialization (BLUEFOG_FN_INIT_TIMEOUT); "
        "rank(s) [1] never started it" in out.stderr
    ), out.stderr


def test_rank_giving_up_before_mpi_started_still_ends_the_job() -> None:
    # A rank whose initialization deadline fires before MPI even reached the process manager
    # (seen on a loaded machine: still importing mpi4py at the deadline) exits unnoticed by
    # mpiexec, which then waits for the other ranks forever; bfrun ends the job.
    code = (
        "import os, time\n"
        "import bluefog_fn.failure as failure\n"
        "if os.environ['PMI_RANK'] == '1':\n"
        "    time.sleep(600)\n"
        "with failure.startup_deadline(1.0):\n"
        "    time.sleep(60)\n"  # stuck before MPI's initialization began
    )
    out, elapsed = run_code(2, code, ENV)
    assert out.returncode != 0
    assert elapsed < BOUND_SECONDS, f"job took {elapsed:.1f} s"
    assert (
        "bfrun: rank(s) [0] gave up waiting for every rank in MPI initialization (BLUEFOG_FN_INIT_TIMEOUT); "
        "rank(s) [1] never started it" in out.stderr
    ), out.stderr


def test_uncaught_exception_in_a_thread_aborts_the_job() -> None:
    body = (
        "def work():\n"
        "    raise ValueError('bad batch')\n"
        "if bf.rank() == 1:\n"
        "    threading.Thread(target=work, name='loader').start()\n"
        "while True:\n"
        "    bf.barrier()\n"
    )
    out, elapsed = run_job(2, body)
    assert out.returncode != 0
    assert elapsed < BOUND_SECONDS
    assert "bfrun: rank 1 failed (in thread 'loader'): ValueError: bad batch" in out.stderr, out.stderr


def test_ranks_finishing_at_different_times_succeed() -> None:
    # Leaving is bounded by the timeout, not immediate failure: a late rank within it is fine.
    body = (
        "x = bf.global_mean(torch.ones(2))\n"
        "if bf.rank() == 0:\n"
        "    time.sleep(2)\n"
        "os.write(1, f'done {bf.rank()}\\n'.encode())\n"
        "sys.exit(0)\n"
    )
    out, _ = run_job(2, body, timeout_s=30)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split("\n")[:-1]) == ["done 0", "done 1"]
    assert "bfrun:" not in out.stderr


@TRANSPORTS
def test_program_that_handled_a_mismatch_exits_cleanly(shm: str) -> None:
    # After a CallMismatchError the peer's data of the failed call is never received; a program
    # that caught the error and ended normally must not fail at exit because of it.
    body = (
        "topo = bf.topology.ring(2)\n"
        "x = {'w': torch.full((10,), float(bf.rank()))}\n"
        "bf.neighbor_mean(x, topo)\n"
        "bf.neighbor_gather(x, topo)\n"
        "try:\n"
        "    if bf.rank() != 1:\n"
        "        bf.neighbor_mean(x, topo)\n"  # rank 1 skipped this call
        "    bf.neighbor_gather(x, topo)\n"
        "except bf.MismatchError as exc:\n"
        "    os.write(1, f'caught {bf.rank()} {type(exc).__name__}\\n'.encode())\n"
    )
    out, _ = run_job(2, body, timeout_s=30, shm=shm)
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split("\n")[:-1]) == ["caught 0 CallMismatchError", "caught 1 CallMismatchError"]
    assert "bfrun:" not in out.stderr and "unmatched" not in out.stderr, out.stderr


def test_exit_status_is_the_programs() -> None:
    out, _ = run_job(2, "bf.barrier()\nsys.exit(3)\n")
    assert out.returncode == 3, out.stderr
    assert "bfrun:" not in out.stderr


def test_bfrun_stopped_by_sigterm_ends_the_job() -> None:
    code = PRELUDE + (
        "import subprocess\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)', sys.argv[1]])\n"
        "os.write(1, b'ready\\n')\n"
        "while True:\n"
        "    bf.barrier()\n"
        "    time.sleep(0.05)\n"
    )
    marker = f"bf-failure-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [BFRUN, "-np", "2", sys.executable, "-c", code, marker],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )
    try:
        assert proc.stdout is not None
        ready = [proc.stdout.readline(), proc.stdout.readline()]
        assert ready == ["ready\n", "ready\n"]
        proc.terminate()
        _, err = proc.communicate(timeout=BOUND_SECONDS)
    finally:
        proc.kill()
        time.sleep(0.2)
        left = processes_with(marker)
        for line in left:
            os.kill(int(line.split(":")[0]), 9)
    assert not left, f"processes of the job left behind: {left}"
    assert proc.returncode != 0
    assert "bfrun: stopped by SIGTERM; the job was ended" in err, err
