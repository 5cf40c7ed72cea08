"""``bfrun``'s watch over a job: say which rank failed and how, and leave no process behind.

The ranks of a job started by ``bfrun`` share a private directory (``BLUEFOG_FN_JOB_DIR``), where
each writes its pid when it starts and a failure record when it fails with an uncaught
exception (:mod:`bluefog_fn.failure`).  While mpiexec runs, the watch notes when each rank's
process disappears; once a failure is recorded, or a rank ended inside MPI's initialization (its
``BLUEFOG_FN_INIT_TIMEOUT``: the job can never start, and mpiexec may not have noticed a rank
that had not reached it yet), it gives the job :data:`GRACE_SECONDS` to end by itself (the
failing rank aborts it) before ending it.  When the job has failed, every process
still carrying the job's directory in its environment (ranks, and anything they started) is
killed, and one line names the rank that failed first::

    bfrun: rank 2 failed: RuntimeError: loss is nan

Only processes on this machine are seen; on other hosts mpiexec's own clean-up applies.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .failure import JOB_DIR_ENV, record_path

# How long a job may take to end by itself once a rank recorded a failure (MPI_Abort takes ~1 s).
GRACE_SECONDS = 10.0
_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Failure:
    """A rank's failure record."""

    rank: int
    type: str
    message: str
    where: str
    time: float


@dataclass(frozen=True, order=True)
class Departure:
    """A rank whose process ended while mpiexec still ran; ``wave`` counts the watch's wake-ups,
    so ranks ending in the same wave cannot be told apart in time."""

    wave: int
    rank: int
    pid: int
    left: bool  # it recorded leaving the job cleanly (interpreter exit after a bounded shutdown)
    starting: bool  # it ended inside MPI's initialization (its deadline, BLUEFOG_FN_INIT_TIMEOUT)


def read_failures(job_dir: str) -> list[Failure]:
    """Every failure record of the job, earliest first."""
    out = []
    for name in os.listdir(job_dir):
        if not name.endswith(".failure.json"):
            continue
        try:
            with open(os.path.join(job_dir, name)) as f:
                r = json.load(f)
            out.append(Failure(int(r["rank"]), str(r["type"]), str(r["message"]), str(r.get("where", "")), float(r["time"])))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record being written, or not one of ours
    return sorted(out, key=lambda f: (f.time, f.rank))


def _read_pids(job_dir: str, known: dict[int, int]) -> None:
    for name in os.listdir(job_dir):
        if name.startswith("rank") and name.endswith(".pid"):
            with open(os.path.join(job_dir, name)) as f:
                text = f.read().strip()
            if text.isdigit():
                known.setdefault(int(name[4:-4]), int(text))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def job_processes(job_dir: str) -> list[int]:
    """Pids of this user's processes whose environment names the job's directory."""
    marker = f"{JOB_DIR_ENV}={job_dir}".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue  # gone, or another user's
        if marker in env.split(b"\0"):
            found.append(int(entry))
    return found


def kill_job(job_dir: str) -> int:
    """SIGKILL every process of the job (repeating for ones started meanwhile); how many."""
    killed: set[int] = set()
    for _ in range(10):
        pids = [p for p in job_processes(job_dir) if p not in killed or _alive(p)]
        pids = [p for p in pids if _alive(p)]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.05)
    return len(killed)


class _ExitWatch:
    """Wakes up as soon as a watched process ends (pidfds; polling where there are none)."""

    def __init__(self) -> None:
        self.poller = select.poll()
        self.fds: dict[int, int] = {}  # fd -> key
        self.polled: dict[int, int] = {}  # pid -> key, without a pidfd

    def add(self, pid: int, key: int) -> bool:
        """Watch ``pid``; False if it has already ended."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except (AttributeError, OSError):  # no pidfds (old kernel): poll /proc instead
            self.polled[pid] = key
            return _alive(pid)
        self.fds[fd] = key
        self.poller.register(fd, select.POLLIN)
        return True

    def ended(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` seconds; the keys of the processes that ended."""
        out = []
        for fd, _ in self.poller.poll(timeout * 1000):
            self.poller.unregister(fd)
            os.close(fd)
            out.append(self.fds.pop(fd))
        for pid, key in list(self.polled.items()):
            if not _alive(pid):
                del self.polled[pid]
                out.append(key)
        return out

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


_MPIEXEC = -1  # the watch's key for mpiexec itself


def _watch(
    proc: subprocess.Popen[bytes], job_dir: str, departures: dict[int, Departure], stops: list[tuple[int, float]]
) -> int:
    watch = _ExitWatch()
    pids: dict[int, int] = {}
    failed_at: float | None = None
    wave = 0
    try:
        watch.add(proc.pid, _MPIEXEC)
        while True:
            ended = watch.ended(_POLL_SECONDS)
            rc = proc.poll()
            if rc is not None:
                return rc if not stops or rc != 0 else 128 + stops[0][0]
            wave += 1
            for rank in (r for r in ended if r != _MPIEXEC):
                _depart(departures, job_dir, rank, pids[rank], wave)
            new: dict[int, int] = {}
            _read_pids(job_dir, new)
            for rank, pid in new.items():
                if rank not in pids:
                    pids[rank] = pid
                    if not watch.add(pid, rank):
                        _depart(departures, job_dir, rank, pid, wave)
            now = time.monotonic()
            if failed_at is None and any(n.endswith(".failure.json") for n in os.listdir(job_dir)):
                failed_at = now
            if failed_at is None and any(d.starting for d in departures.values()):
                # A rank gave up in MPI's initialization, which waits for every rank: the job can
                # never start.  mpiexec ends it only if that rank had reached its process manager.
                failed_at = now
            if failed_at is not None and now - failed_at > GRACE_SECONDS:
                kill_job(job_dir)
                proc.kill()
                return proc.wait()
            if stops and now - stops[0][1] > GRACE_SECONDS:
                kill_job(job_dir)
                proc.kill()
                proc.wait()
                return 128 + stops[0][0]
    finally:
        watch.close()


def _depart(departures: dict[int, Departure], job_dir: str, rank: int, pid: int, wave: int) -> None:
    left = os.path.exists(record_path(job_dir, rank, "left"))
    starting = os.path.exists(record_path(job_dir, rank, "starting"))
    departures.setdefault(rank, Departure(wave, rank, pid, left, starting))


def report(
    rc: int, failures: Sequence[Failure], departures: Sequence[Departure], never_started: Sequence[int] = ()
) -> list[str]:
    """The lines ``bfrun`` prints about a failed job (empty when there is nothing to say).

    ``never_started``: the ranks that never began to create their world (no pid record).
    """
    if failures:
        first = failures[0]
        where = f" ({first.where})" if first.where else ""
        lines = [f"bfrun: rank {first.rank} failed{where}: {first.type}: {first.message}"]
        others = [f for f in failures[1:] if f.rank != first.rank]
        for f in others[:3]:
            lines.append(f"bfrun: then rank {f.rank} failed: {f.type}: {f.message}")
        if len(others) > 3:
            lines.append(f"bfrun: ... and {len(others) - 3} more rank(s)")
        return lines
    abnormal = [d for d in departures if not d.left]
    if rc != 0 and abnormal:
        wave = min(d.wave for d in abnormal)
        if any(d.starting for d in abnormal if d.wave == wave):
            waiting = sorted(d.rank for d in abnormal if d.wave == wave and d.starting)
            missing = f"; rank(s) {list(never_started)} never started it" if never_started else ""
            return [
                f"bfrun: rank(s) {waiting} gave up waiting for every rank in MPI initialization "
                f"(BLUEFOG_FN_INIT_TIMEOUT){missing}; every rank must call bf.init() or a first op"
            ]
        who = ", ".join(f"rank {d.rank} (pid {d.pid})" for d in sorted(abnormal) if d.wave == wave)
        return [
            f"bfrun: {who} ended without a Python error (killed by a signal, os._exit or a deadline watchdog) "
            f"and the job was ended; mpiexec exit status {rc}"
        ]
    return []


def run_job(cmd: Sequence[str], env: dict[str, str], size: int | None = None) -> int:
    """Run ``cmd`` (an mpiexec command line of ``size`` ranks) under the watch; returns the
    job's exit status."""
    job_dir = tempfile.mkdtemp(prefix="bluefog_fn-job-")
    departures: dict[int, Departure] = {}
    stops: list[tuple[int, float]] = []  # (signal, when) asked to stop the job
    previous = {}
    try:
        proc = subprocess.Popen(list(cmd), env={**env, JOB_DIR_ENV: job_dir})

        def forward(signum: int, frame: object) -> None:
            # Passed on to mpiexec (which passes it to the ranks); the watch ends the job if
            # that does not within the grace period.
            stops.append((signum, time.monotonic()))
            with contextlib.suppress(OSError):
                proc.send_signal(signum)

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                previous[sig] = signal.signal(sig, forward)
        rc = _watch(proc, job_dir, departures, stops)
        failures = read_failures(job_dir)
        if rc != 0 or failures:
            kill_job(job_dir)
            started: dict[int, int] = {}
            _read_pids(job_dir, started)
            never = [r for r in range(size or 0) if r not in started] if started else []
            lines = report(rc, failures, list(departures.values()), never)
            if stops and not failures:
                lines = [f"bfrun: stopped by {signal.Signals(stops[0][0]).name}; the job was ended"]
            for line in lines:
                print(line, file=sys.stderr, flush=True)
            return rc if rc != 0 else 1
        return rc
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(job_dir, ignore_errors=True)
