"""Where the time went, from a merged timeline, as a table in the terminal.

    python -m bluefog_fn.timeline_summary out.json            # every rank
    python -m bluefog_fn.timeline_summary out.json --rank 1   # one rank

For each op (``neighbor_mean``, ``DecentralizedOptimizer.step``...) and each activity
(``forward``, your own ``bf.timeline.activity`` blocks), and under each op its phases: the
number of calls, the total and mean time, and the share of the traced time.  Totals are the mean
over the ranks shown; ``max rank`` names the rank with the largest total and gives it, so a
straggler stands out.  An ``_async`` op's span runs from its start to its ``wait()``, so its total
includes the caller's work in between (the phases show what the op itself spent).
"""

from __future__ import annotations

import bisect
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """The spans of one name on every rank: per rank, the number of spans and their total time (µs)."""

    name: str
    kind: str  # "op", "phase" or "activity"
    calls: dict[int, int] = field(default_factory=dict)
    total_us: dict[int, float] = field(default_factory=dict)
    phases: dict[str, Row] = field(default_factory=dict)

    def add(self, rank: int, dur_us: float) -> None:
        self.calls[rank] = self.calls.get(rank, 0) + 1
        self.total_us[rank] = self.total_us.get(rank, 0.0) + dur_us


@dataclass
class Summary:
    """Rows (ops with their phases, then activities) and each rank's traced time (µs)."""

    ranks: list[int]
    span_us: dict[int, float]
    rows: list[Row]

    def table(self) -> str:
        """The summary as aligned text (see the module docstring)."""
        n = max(1, len(self.ranks))
        traced = sum(self.span_us.values()) / n
        lines = [
            f"{len(self.ranks)} rank(s), {traced / 1e6:.3f} s traced per rank (first event to last)",
            f"{'':38} {'calls':>8} {'total ms':>10} {'mean ms':>9} {'% traced':>9} {'max rank':>16}",
        ]

        def line(row: Row, indent: str) -> None:
            calls = sum(row.calls.values()) / n
            total = sum(row.total_us.values()) / n
            mean = total / calls if calls else 0.0
            share = 100.0 * total / traced if traced else 0.0
            worst = max(row.total_us, key=lambda r: row.total_us[r])
            label = (indent + row.name + (" (activity)" if row.kind == "activity" else ""))[:38]
            lines.append(
                f"{label:38} {calls:8.4g} {total / 1e3:10.2f} {mean / 1e3:9.3f} {share:8.1f}% "
                f"{f'{worst}: {row.total_us[worst] / 1e3:.2f}':>16}"
            )

        for row in self.rows:
            line(row, "")
            for phase in sorted(row.phases.values(), key=lambda p: -sum(p.total_us.values())):
                line(phase, "  ")
        return "\n".join(lines)


def summarize(events: Sequence[dict[str, Any]], rank: int | None = None) -> Summary:
    """Sum the spans of a merged trace's ``events`` (of ``rank`` only, if given).

    Example:
        >>> ev = [{"name": "neighbor_mean", "cat": "op", "ph": "X", "ts": 0, "dur": 10, "pid": 0, "tid": 0},
        ...       {"name": "wait", "cat": "phase", "ph": "X", "ts": 2, "dur": 6, "pid": 0, "tid": 0}]
        >>> s = summarize(ev)
        >>> s.rows[0].name, s.rows[0].total_us, s.rows[0].phases["wait"].total_us
        ('neighbor_mean', {0: 10.0}, {0: 6.0})
    """
    spans = [e for e in events if e.get("ph") == "X" and (rank is None or e.get("pid") == rank)]
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for e in spans:
        pid, ts, end = int(e["pid"]), float(e["ts"]), float(e["ts"]) + float(e["dur"])
        first[pid] = min(first.get(pid, ts), ts)
        last[pid] = max(last.get(pid, end), end)
    ops: dict[str, Row] = {}
    activities: dict[str, Row] = {}
    # Ops of one lane never overlap (overlapping ops get lanes of their own), and a phase is
    # on its op's lane inside the op's span: find it by the op that starts last before it.
    lanes: dict[tuple[int, int], list[tuple[float, float, str]]] = defaultdict(list)
    for e in spans:
        pid, cat = int(e["pid"]), e.get("cat")
        if cat == "op":
            ops.setdefault(e["name"], Row(e["name"], "op")).add(pid, float(e["dur"]))
            lanes[(pid, int(e["tid"]))].append((float(e["ts"]), float(e["ts"]) + float(e["dur"]), e["name"]))
        elif cat == "activity":
            activities.setdefault(e["name"], Row(e["name"], "activity")).add(pid, float(e["dur"]))
    starts = {}
    for key, lane in lanes.items():
        lane.sort()
        starts[key] = [s for s, _, _ in lane]
    for e in spans:
        if e.get("cat") != "phase":
            continue
        key = (int(e["pid"]), int(e["tid"]))
        if key not in lanes:
            continue
        lane = lanes[key]
        i = bisect.bisect_right(starts[key], float(e["ts"]) + 1e-3) - 1
        if i < 0 or float(e["ts"]) + float(e["dur"]) > lane[i][1] + 1e-3:
            continue
        row = ops[lane[i][2]]
        row.phases.setdefault(e["name"], Row(e["name"], "phase")).add(key[0], float(e["dur"]))
    rows = sorted(ops.values(), key=lambda r: -sum(r.total_us.values()))
    rows += sorted(activities.values(), key=lambda r: -sum(r.total_us.values()))
    ranks = sorted(first)
    return Summary(ranks, {r: last[r] - first[r] for r in ranks}, rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bluefog_fn.timeline_summary PATH [--rank R]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    rank = None
    if "--rank" in args:
        i = args.index("--rank")
        try:
            rank = int(args[i + 1])
        except (IndexError, ValueError):
            sys.stderr.write("timeline_summary: --rank needs an integer\n")
            return 2
        del args[i : i + 2]
    if len(args) != 1:
        sys.stderr.write("usage: python -m bluefog_fn.timeline_summary PATH [--rank R]\n")
        return 2
    try:
        with open(args[0]) as f:
            events = json.load(f)["traceEvents"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.stderr.write(f"timeline_summary: cannot read a merged timeline from {args[0]}: {e}\n")
        return 1
    summary = summarize(events, rank)
    if not summary.rows:
        sys.stderr.write(f"timeline_summary: no spans{'' if rank is None else f' of rank {rank}'} in {args[0]}\n")
        return 1
    print(summary.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
