"""The same-host protocol (``backend/shared_memory.py``) without MPI: members are threads.

Each thread is one member of a machine with its own :class:`SharedChannel`; the regions are
numpy arrays all threads see, so the flags and buffers behave as in shared memory.  A schedule
of calls (random graphs, random sizes, reads held across later calls and released in random
order, as async handles are) is drawn once and run by every member; every value read is
checked exactly, and the run must finish: a deadlock would end in ``CommTimeoutError``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bluefog_fn.backend.errors import CallMismatchError, CommTimeoutError
from bluefog_fn.backend.shared_memory import SharedChannel


class _Hub:
    def __init__(self, n: int) -> None:
        self.n = n
        self.barrier = threading.Barrier(n)
        self.values: list[Any] = [None] * n
        self.lock = threading.Lock()
        self.allocations: dict[int, list[np.ndarray]] = {}


class ThreadMemory:
    """:class:`~bluefog_fn.backend.shared_memory.HostMemory` for threads of one process."""

    def __init__(self, hub: _Hub, local: int) -> None:
        self.hub = hub
        self.local = local
        self.members = tuple(range(hub.n))
        self.count = 0

    def agree(self, value: Any, what: str) -> list[Any]:
        self.hub.values[self.local] = value
        self.hub.barrier.wait(timeout=20)
        out = list(self.hub.values)
        self.hub.barrier.wait(timeout=20)
        return out

    def allocate(self, nbytes: int, what: str) -> list[np.ndarray]:
        k, self.count = self.count, self.count + 1
        with self.hub.lock:
            regions = self.hub.allocations.setdefault(k, [np.zeros(nbytes, dtype=np.uint8) for _ in self.members])
        self.hub.barrier.wait(timeout=20)
        return regions

    def close(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _fast_thread_switches() -> Iterator[None]:
    # Waits spin between flag reads; switch threads often so the member waited for can run.
    saved = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(saved)


def run_members(n: int, body: Callable[[SharedChannel], Any], timeout: float = 20.0) -> list[Any]:
    """Run ``body(channel)`` on ``n`` member threads; re-raise the first member's exception."""
    hub = _Hub(n)
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def member(q: int) -> None:
        try:
            channel = SharedChannel(ThreadMemory(hub, q), timeout, max_bytes=1 << 26)
            results[q] = body(channel)
        except BaseException as exc:
            errors[q] = exc
            hub.barrier.abort()

    threads = [threading.Thread(target=member, args=(q,), daemon=True) for q in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 30)
        assert not t.is_alive(), "a member thread did not finish: the protocol hung"
    for e in errors:
        if e is not None and not isinstance(e, threading.BrokenBarrierError):
            raise e
    return results


def payload(writer: int, call: int, nbytes: int) -> np.ndarray:
    return ((np.arange(nbytes, dtype=np.int64) * 7 + 131 * writer + 17 * call) % 251).astype(np.uint8)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[int, list[tuple[list[list[int]], int, int]]]:
    """Members, then calls: (out-neighbours per member, bytes, how many calls a read is held)."""
    n = draw(st.integers(2, 3))
    calls = []
    for _ in range(draw(st.integers(1, 12))):
        outs = [draw(st.lists(st.sampled_from([r for r in range(n) if r != q]), unique=True)) for q in range(n)]
        calls.append((outs, draw(st.sampled_from([64, 192, 4096, 70_000])), draw(st.integers(0, 2))))
    return n, calls


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedules())
def test_random_schedules_read_exact_bytes_and_never_deadlock(schedule: tuple[int, list[Any]]) -> None:
    n, calls = schedule

    def body(ch: SharedChannel) -> bool:
        me = ch.me
        held: list[tuple[int, Any, int, np.ndarray]] = []  # (release after call, subscription, writer, expected)
        for c, (outs, nbytes, hold) in enumerate(calls):
            seg = ch.segment_for(nbytes, "test")
            assert seg is not None
            ins = [q for q in range(n) if me in outs[q]]
            subs = [(q, ch.subscribe(q, nbytes, c, 7, "test")) for q in ins]
            pub = ch.publish(seg, nbytes, [(q, 1.0) for q in outs[me]], c, 7, "test")
            pub.buffer[:] = payload(me, c, nbytes)
            pub.advance(nbytes)
            pub.release()
            for q, sub in subs:
                ch.wait(sub.complete, "test: waiting for data", lambda q=q: [q])
                held.append((c + hold, sub, q, payload(q, c, nbytes)))
            # Release the reads whose hold ended, newest first (as handles waited in reverse).
            due = [h for h in held if h[0] <= c]
            held = [h for h in held if h[0] > c]
            for _, sub, _, want in reversed(due):
                assert sub.view is not None and np.array_equal(sub.view, want)
                sub.release()
        for _, sub, _, want in reversed(held):
            assert sub.view is not None and np.array_equal(sub.view, want)
            sub.release()
        return True

    assert all(run_members(n, body))


def test_a_member_that_stops_publishing_is_named_by_the_timeout() -> None:
    def body(ch: SharedChannel) -> str:
        seg = ch.segment_for(256, "test")
        assert seg is not None
        if ch.me == 1:
            return "stopped"  # alive, but never publishes
        sub = ch.subscribe(1, 256, 0, 3, "test")
        try:
            ch.wait(sub.complete, "neighbor_mean (step 0)", lambda: [1])
        except CommTimeoutError as exc:
            return str(exc)
        return "no error"

    out = run_members(2, body, timeout=0.5)
    assert "neighbor_mean (step 0): no answer from rank(s) [1] after 0.5 s" in out[0], out[0]


def test_a_transfer_of_another_call_is_a_mismatch_on_both_sides() -> None:
    def body(ch: SharedChannel) -> str:
        seg = ch.segment_for(128, "test")
        assert seg is not None
        if ch.me == 0:
            pub = ch.publish(seg, 128, [(1, 1.0)], 5, 9, "test")
            pub.advance(128)
            ch.memory.agree(None, "after the read")
            return "poisoned" if ch.poisoned_by(1) else "not told"
        sub = ch.subscribe(0, 128, 6, 9, "test")  # this member is at call 6
        try:
            ch.wait(sub.complete, "test", lambda: [0])
            text = "no error"
        except CallMismatchError as exc:
            text = str(exc)
        ch.memory.agree(None, "after the read")
        return text

    writer, reader = run_members(2, body)
    assert "rank 0 is at its call #5 but rank 1 is at call #6" in reader, reader
    assert writer == "poisoned"


def test_a_writer_reuses_a_buffer_only_after_its_readers_acked() -> None:
    # Member 1 holds its read of epoch 1 while member 0 publishes epochs 2 and 3: epoch 3 needs
    # epoch 1's buffer, so member 0 must wait until member 1 releases (here: after a pause).
    order: list[str] = []

    def body(ch: SharedChannel) -> bool:
        seg = ch.segment_for(64, "test")
        assert seg is not None
        if ch.me == 0:
            for c in range(3):
                pub = ch.publish(seg, 64, [(1, 1.0)], c, 1, "test")
                pub.buffer[:] = c + 1
                pub.advance(64)
                pub.release()
                order.append(f"published {c}")
            return True
        subs = [ch.subscribe(0, 64, c, 1, "test") for c in range(3)]
        for sub in subs:
            sub.active = True  # being combined: never drained, so only release() acks
        ch.wait(subs[0].complete, "test", lambda: [0])
        ch.wait(subs[1].complete, "test", lambda: [0])
        first = subs[0].view.copy()  # type: ignore[union-attr]
        threading.Event().wait(0.2)
        order.append("released 0")
        subs[0].release()
        ch.wait(subs[2].complete, "test", lambda: [0])
        ok = bool((first == 1).all() and (subs[1].view == 2).all() and (subs[2].view == 3).all())  # type: ignore[union-attr]
        subs[1].release()
        subs[2].release()
        return ok

    assert all(run_members(2, body))
    assert order.index("released 0") < order.index("published 2"), order


def test_shared_trees_and_atc_parameters_outlive_shutdown() -> None:
    # The shared memory is unmapped when the world closes; a shared tree kept past bf.shutdown()
    # and an atc module (whose parameters lived in the optimizer's shared buffers) must still
    # hold their values then, not fault.
    from tests.test_failures import run_job

    body = (
        "t = bf.shared_tree({'w': torch.full((300_000,), float(bf.rank()))})\n"
        "r = bf.neighbor_mean(t, bf.topology.ring(2))\n"
        "model = torch.nn.Linear(512, 512)\n"
        "torch.nn.init.constant_(model.weight, 0.25 * (bf.rank() + 1))\n"
        "opt = bf.optim.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model,\n"
        "                                      bf.topology.ring(2), style='atc')\n"
        "model(torch.ones(1, 512)).sum().backward()\n"
        "opt.step()\n"
        "bf.shutdown()\n"
        # One write(2) per rank: under PYTHONUNBUFFERED print() writes each argument on its own,
        # and mpiexec interleaves the ranks' pieces.
        "line = f\"{bf.rank()} {float(t['w'].sum())} {float(r['w'][0])} {float(model.weight.mean())}\\n\"\n"
        "os.write(1, line.encode())\n"
    )
    out, _ = run_job(2, body, timeout_s=30, shm="1")
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.split("\n")[:-1]) == ["0 0.0 0.5 0.375", "1 300000.0 0.5 0.375"], out.stdout
