"""Timelines: phases of every op, activities, lanes, incremental files, the merged Chrome trace.

The multi-rank cases launch ``bfrun -np 4 --timeline`` jobs in subprocesses with hard timeouts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import world
from bluefog_fn.timeline import PHASES, Timeline, part_path
from bluefog_fn.timeline_merge import merge, read_part
from bluefog_fn.timeline_summary import main as summary_main
from bluefog_fn.timeline_summary import summarize

BFRUN = os.path.join(os.path.dirname(sys.executable), "bfrun")
ENV = {**os.environ, "BLUEFOG_FN_TIMEOUT": "30", "PYTHONHASHSEED": "0"}


def load(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        trace = json.load(f)
    assert trace["displayTimeUnit"] == "ms"
    events: list[dict[str, Any]] = trace["traceEvents"]
    return events


def ops_with_phases(events: list[dict[str, Any]], pid: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each op span of rank ``pid`` with the phase events on its lane inside its span."""
    mine = [e for e in events if e.get("pid") == pid and e["ph"] == "X"]
    ops = [e for e in mine if e.get("cat") == "op"]
    phases = [e for e in mine if e.get("cat") == "phase"]
    out = []
    for op in ops:
        inside = [
            p for p in phases
            if p["tid"] == op["tid"] and op["ts"] - 1e-3 <= p["ts"] and p["ts"] + p["dur"] <= op["ts"] + op["dur"] + 1e-3
        ]
        out.append((op, sorted(inside, key=lambda p: p["ts"])))
    return out


def assert_phases_in_order(op: dict[str, Any], phases: list[dict[str, Any]]) -> None:
    names = [p["name"] for p in phases]
    assert names, f"{op['name']} has no phases"
    assert all(n in PHASES for n in names), names
    order = [PHASES.index(n) for n in names]
    assert order == sorted(order), f"{op['name']} phases out of order: {names}"


@pytest.fixture
def recording(tmp_path: Path) -> Iterator[Timeline]:
    """The process world records into a fresh timeline for the test's duration."""
    w = world.current()
    saved = w.timeline
    w.timeline = Timeline(str(tmp_path / "t.json"), w.rank)
    try:
        yield w.timeline
    finally:
        w.timeline.close()
        w.timeline = saved


def test_every_op_records_its_phases_in_order(recording: Timeline) -> None:
    topo = bf.topology.ring(bf.size())
    tree = {"a": torch.ones(3), "b": torch.ones(2, dtype=torch.float64)}
    with bf.timeline.activity("forward", batch=1):
        bf.neighbor_mean(tree, topo)
        bf.neighbor_gather(tree, topo)
        h = bf.global_mean_async(tree)
        bf.global_sum(torch.ones(2))
        h.wait()
    bf.broadcast(torch.ones(2))
    bf.allgather(torch.ones(2, 1))
    bf.barrier()
    x = torch.ones(3, requires_grad=True)
    bf.neighbor_mean(x, topo).sum().backward()
    win = bf.Window(torch.ones(2), topo)
    win.put(torch.ones(2))
    win.update()
    win.free()
    recording.close()
    n = merge(recording.path)
    assert n == 1
    events = load(recording.path)
    found = ops_with_phases(events, 0)
    names = [op["name"] for op, _ in found]
    assert sorted(n for n in names if not n.startswith("Window.")) == sorted([
        "neighbor_mean", "neighbor_gather", "global_mean", "global_sum", "broadcast", "allgather", "barrier",
        "neighbor_mean", "neighbor_mean.backward",
    ])
    assert {"Window.put", "Window.update"} <= set(names)
    for op, phases in found:
        if op["name"].startswith("Window."):
            continue
        assert_phases_in_order(op, phases)
        if op["name"] == "neighbor_mean":
            assert [p["name"] for p in phases][:4] == ["trace", "agree", "pack", "send"]
            assert {"wait", "combine", "unpack"} <= {p["name"] for p in phases}
            assert op["args"]["bytes_sent"] == 28 * len(op["args"]["send_to"])
    # The async global_mean started before global_sum and ended after it: separate lanes.
    lanes = {op["name"]: op["tid"] for op, _ in found}
    assert lanes["global_mean"] != lanes["global_sum"]
    forward = [e for e in events if e.get("cat") == "activity"]
    assert [(e["name"], e["args"]) for e in forward] == [("forward", {"batch": 1})]
    f = forward[0]
    for op, _ in found[:4]:
        assert f["ts"] <= op["ts"] and op["ts"] + op["dur"] <= f["ts"] + f["dur"] + 1e-3
    meta = {(e["name"], e["args"]["name"]) for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert len(meta) == 1 and next(iter(meta))[1].startswith("rank 0")


@pytest.mark.parametrize("style", ["atc", "awc", "gradient_allreduce", "win_put"])
def test_module_optimizer_steps_are_ops_with_phases_and_forwards_are_activities(recording: Timeline, style: str) -> None:
    model = torch.nn.Linear(3, 2)
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, bf.topology.ring(bf.size()), style=style,  # type: ignore[arg-type]
        communicate_every=2,
    )
    for _ in range(2):
        model(torch.ones(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    opt.free()
    model(torch.ones(1, 3))  # free() removed the forward hooks: not recorded
    recording.close()
    merge(recording.path)
    events = load(recording.path)
    found = [(op, phases) for op, phases in ops_with_phases(events, 0) if op["name"] == "DecentralizedOptimizer.step"]
    assert [(op["args"]["step"], op["args"]["communicates"], op["args"]["style"]) for op, _ in found] == [
        (0, False, style), (1, True, style)
    ]
    communicating = {
        "atc": ["local step", "send", "wait"], "awc": ["local step", "combine"],
        "gradient_allreduce": ["wait", "local step"], "win_put": ["local step", "window"],
    }[style]
    assert [[p["name"] for p in phases] for _, phases in found] == [["local step"], communicating]
    exchange = {"atc": "neighbor_mean", "awc": "neighbor_mean", "gradient_allreduce": "global_mean"}.get(style, "Window.put")
    step = found[1][0]
    inside = [e for e in events if e.get("cat") == "op" and e["name"] == exchange and e["ts"] + e["dur"] <= step["ts"] + step["dur"] + 1e-3]
    assert inside, f"no {exchange} op ends inside the communicating step"
    forwards = [e for e in events if e.get("cat") == "activity"]
    assert [(e["name"], e["args"]) for e in forwards] == [("forward", {"module": "Linear"})] * 2
    assert forwards[1]["ts"] + forwards[1]["dur"] <= step["ts"]


def test_activity_is_a_decorator_and_nests(recording: Timeline) -> None:
    @bf.timeline.activity("step")
    def step(k: int) -> int:
        with bf.timeline.activity("inner"):
            return k + 1

    assert step(1) == 2 and step(2) == 3
    recording.close()
    _, events, skipped = read_part(recording.part)
    acts = [e for e in events if e.get("cat") == "activity"]
    assert [e["name"] for e in acts] == ["inner", "step", "inner", "step"]
    assert skipped == 0
    inner, outer = acts[0], acts[1]
    assert outer["ts"] <= inner["ts"] and inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"] + 1e-3


def test_activity_without_timeline_records_nothing_and_checks_its_name() -> None:
    assert world.current().timeline is None
    assert not bf.timeline.enabled()
    with bf.timeline.activity("nothing"):
        pass
    with pytest.raises(TypeError, match=r"timeline\.activity: name must be a str"):
        bf.timeline.activity(3)  # type: ignore[arg-type]


def test_reader_skips_a_truncated_last_line(tmp_path: Path) -> None:
    path = str(tmp_path / "t.json")
    tl = Timeline(path, rank=2, size=4)
    tl.record("neighbor_mean", tl.now(), tl.now() + 1e-3, {"bytes_sent": 8})
    tl.close()
    with open(part_path(path, 2), "a") as f:
        f.write('[{"name":"global_mean","ph":"X","ts":1')  # a rank killed while writing
    assert merge(path) == 1
    with open(path) as f:
        trace = json.load(f)
    ops = [e for e in trace["traceEvents"] if e.get("cat") == "op"]
    assert [(e["name"], e["pid"], e["args"]) for e in ops] == [("neighbor_mean", 2, {"bytes_sent": 8})]
    assert trace["otherData"]["damaged_lines"] == {"2": 1}
    assert not os.path.exists(part_path(path, 2))  # merged files are removed


def test_world_of_one_writes_the_merged_trace_at_exit(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    code = "import torch, bluefog_fn as bf\nbf.neighbor_mean(torch.ones(2), bf.topology.ring(1))\n"
    env = {k: v for k, v in ENV.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "MPI_LOCAL"))}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "BLUEFOG_FN_TIMELINE": str(path)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    ops = [e["name"] for e in load(path) if e.get("cat") == "op"]
    assert ops == ["neighbor_mean"]


JOB = """
import os, signal, torch, bluefog_fn as bf
bf.init()
topo = bf.topology.ring(bf.size())
kill = int(os.environ.get("KILL_RANK", "-1"))
for s in range(4):
    with bf.timeline.activity("forward"):
        bf.neighbor_mean({"w": torch.ones(3)}, topo, s)
    if s == 1 and bf.rank() == kill:
        os.kill(os.getpid(), signal.SIGKILL)
h = bf.global_mean_async(torch.ones(2))
h.wait()
win = bf.Window(torch.ones(2), topo)
win.put(torch.ones(2))
bf.barrier()
win.update()
win.free()
"""


def run_job(tmp_path: Path, kill_rank: int | None) -> tuple[subprocess.CompletedProcess[str], Path]:
    path = tmp_path / "out.json"
    script = tmp_path / "job.py"
    script.write_text(JOB)
    env = {**ENV, "KILL_RANK": str(-1 if kill_rank is None else kill_rank)}
    if kill_rank is not None:
        env["BLUEFOG_FN_TIMEOUT"] = "10"
    out = subprocess.run([BFRUN, "-np", "4", "--timeline", str(path), sys.executable, str(script)],
                         env=env, capture_output=True, text=True, timeout=240)
    return out, path


def test_four_rank_job_writes_one_trace_with_a_track_per_rank(tmp_path: Path) -> None:
    out, path = run_job(tmp_path, None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "timeline of 4 rank(s) written" in out.stderr
    events = load(path)
    names = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(names) == [0, 1, 2, 3] and all(names[r].startswith(f"rank {r}") for r in range(4))
    assert not list(tmp_path.glob("out.json.rank*"))  # the per-rank files were merged away
    for r in range(4):
        found = ops_with_phases(events, r)
        names_r = [op["name"] for op, _ in found]
        assert names_r.count("neighbor_mean") == 4
        assert {"global_mean", "barrier", "Window.put", "Window.update"} <= set(names_r)
        for op, phases in found:
            if not op["name"].startswith("Window."):
                assert_phases_in_order(op, phases)
            if op["name"] == "neighbor_mean":
                assert sorted(op["args"]["recv_from"]) == sorted({(r - 1) % 4, (r + 1) % 4})
                assert op["args"]["bytes_received"] == 12 * 2
        acts = [e for e in events if e.get("pid") == r and e.get("cat") == "activity"]
        assert [e["name"] for e in acts] == ["forward"] * 4
    # One clock for all ranks: every rank's first op starts within a few seconds of the others'.
    starts = [min(e["ts"] for e in events if e.get("pid") == r and e.get("cat") == "op") for r in range(4)]
    assert max(starts) - min(starts) < 30e6
    # The summary counts every rank's calls: 4 neighbour ops and 4 forwards per rank.
    summary = summarize(events)
    rows = {row.name: row for row in summary.rows}
    assert summary.ranks == [0, 1, 2, 3]
    assert rows["neighbor_mean"].calls == {r: 4 for r in range(4)}
    assert rows["forward"].kind == "activity" and rows["forward"].calls == {r: 4 for r in range(4)}
    assert {"trace", "pack", "send", "wait"} <= set(rows["neighbor_mean"].phases)


def test_killed_rank_still_leaves_a_valid_partial_trace(tmp_path: Path) -> None:
    out, path = run_job(tmp_path, kill_rank=1)
    assert out.returncode != 0
    events = load(path)  # valid JSON although the job died
    ranks = sorted({e["pid"] for e in events if e["ph"] == "M" and e["name"] == "process_name"})
    assert ranks == [0, 1, 2, 3]
    killed = [op["name"] for op, _ in ops_with_phases(events, 1)]
    assert killed == ["neighbor_mean", "neighbor_mean"]  # everything before the kill, nothing after
    for op, phases in ops_with_phases(events, 1):
        assert_phases_in_order(op, phases)
    for r in (0, 2, 3):
        done = [op["name"] for op, _ in ops_with_phases(events, r)]
        assert done[:2] == ["neighbor_mean", "neighbor_mean"]


def _span(name: str, cat: str, ts: float, dur: float, pid: int = 0, tid: int = 0) -> dict[str, Any]:
    return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur, "pid": pid, "tid": tid}


def test_summary_gives_each_phase_to_the_op_around_it_on_its_lane(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    events = [
        _span("DecentralizedOptimizer.step", "op", 0, 100),  # lane 0 of rank 0
        _span("local step", "phase", 0, 30),
        _span("neighbor_mean", "op", 40, 20, tid=1),  # overlapping: lane 1
        _span("wait", "phase", 45, 10, tid=1),
        _span("wait", "phase", 60, 40),  # the step's, not neighbor_mean's (lane 0)
        _span("neighbor_mean", "op", 200, 50),  # lane 0 again, later
        _span("wait", "phase", 210, 30),
        _span("forward", "activity", 100, 90, tid=1000),
        _span("neighbor_mean", "op", 0, 300, pid=1),  # rank 1: slower
        _span("wait", "phase", 10, 280, pid=1),
        {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "rank 0"}},
    ]
    s = summarize(events)
    rows = {r.name: r for r in s.rows}
    assert [r.name for r in s.rows] == ["neighbor_mean", "DecentralizedOptimizer.step", "forward"]  # ops by total, then activities
    assert s.ranks == [0, 1] and s.span_us == {0: 250.0, 1: 300.0}
    step, mix = rows["DecentralizedOptimizer.step"], rows["neighbor_mean"]
    assert step.phases["local step"].total_us == {0: 30.0} and step.phases["wait"].total_us == {0: 40.0}
    assert mix.calls == {0: 2, 1: 1} and mix.total_us == {0: 70.0, 1: 300.0}
    assert mix.phases["wait"].total_us == {0: 40.0, 1: 280.0}
    only = summarize(events, rank=1)
    assert [r.name for r in only.rows] == ["neighbor_mean"] and only.ranks == [1]
    table = s.table()
    assert "2 rank(s)" in table and "forward (activity)" in table
    mix_line = next(line for line in table.splitlines() if line.startswith("neighbor_mean"))
    calls, _, per_call = mix_line.split()[1:4]
    assert (calls, per_call) == ("1.5", "0.123")  # calls per rank; ms per call (370 µs / 3 calls)
    assert mix_line.endswith("1: 0.30")  # the slowest rank and its total
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    assert summary_main([str(path), "--rank", "0"]) == 0
    assert "DecentralizedOptimizer.step" in capsys.readouterr().out
    assert summary_main([str(path), "--rank", "7"]) == 1
    assert summary_main([str(tmp_path / "missing.json")]) == 1
    assert summary_main([]) == 2
