"""Training throughput of a ResNet-18 ``nn.Module``: DDP on gloo against ``DecentralizedOptimizer``.

    bfrun -np 2 python bench/train_throughput.py                 # the unoversubscribed setting on 2 cores
    bfrun -np 4 python bench/train_throughput.py --iters 6       # oversubscribed on 2 cores: distorted
    bfrun -np 2 python bench/train_throughput.py --rows ddp,atc --image-size 64

Every rank trains its own copy of a ResNet-18-shaped CNN (BasicBlocks [2, 2, 2, 2], the
ImageNet stem, 11.2 M parameters, 10 classes) on one fixed random batch (BlueFog's own benchmark
style: synthetic data, warm-up iterations, then timed iterations), with momentum SGD.  Rows, all
in the same run, in the same order on every rank, each with the same number of timed iterations:

* ``ddp``                  — ``torch.nn.parallel.DistributedDataParallel`` over a gloo process group
  (gradients all-reduced in 25 MB buckets from autograd hooks): the baseline;
* ``gradient_allreduce``   — ``DecentralizedOptimizer(style="gradient_allreduce")``: the same
  arithmetic as DDP, over bluefog-fn's MPI transport;
* ``atc`` / ``awc``        — ``style="atc"`` / ``"awc"`` over ``one_peer_exponential_two(n)``:
  one message of the model's size per step;
* ``win_put`` / ``pull_get`` — the window styles over the same graph, with barriers around the
  window operations (``force_barrier=True``, the default: the same values as atc) and without
  (``False``, BlueFog's default: no rank waits for another; the overlap column reads ``async``);

each decentralized row with ``overlap=True`` and ``overlap=False`` (for ``atc`` the two run the
same code — its exchange needs the local step's result, so overlap changes nothing — and their
difference is the run's noise).  DDP runs with its defaults (25 MB buckets, buffers broadcast
from rank 0 in every forward).  With ``--rounds R`` the rows
are measured R times, interleaved (row 1, row 2, ..., row 1, row 2, ...), so that a change in the
machine's load during the run is shared by every row; the images/s of a row is the batch size
over its median step time (robust to other jobs' bursts on a shared machine; the
mean-based figure is printed beside it).  A step's time is the slowest rank's (every step
synchronises the ranks).

Threads: by default each rank uses ``cores // ranks`` intra-op threads (at least 1).  When ranks
>= cores that is 1: more would make the ranks' thread pools fight over the same cores (each
spinning OpenMP pool preempts the others), which slows every row and adds noise that has nothing
to do with communication.  ``--threads`` overrides it.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import mpi4py

# Same MPI thread level for every row (bluefog-fn's own setting; MULTIPLE makes polling slow).
mpi4py.rc.thread_level = "serialized"

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import bluefog_fn as bf

Step = Callable[[], None]


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm and a residual connection (ResNet's basic block)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.down(x))


class ResNet18(nn.Module):
    """ResNet-18's layout (He et al. 2016): 7×7 stem, max-pool, four stages of two basic blocks.

    Example:
        >>> model = ResNet18(num_classes=10)
        >>> sum(p.numel() for p in model.parameters())
        11181642
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        stages: list[nn.Module] = []
        cin = 64
        for i, width in enumerate((64, 128, 256, 512)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        logits: torch.Tensor = self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return logits


@dataclass(frozen=True)
class Row:
    """One measured configuration: a label, the ``DecentralizedOptimizer`` style (``None``: DDP)."""

    label: str
    style: str | None
    overlap: bool
    barrier: bool = True  # the window styles' force_barrier


ROWS: dict[str, list[Row]] = {
    "ddp": [Row("DDP (gloo)", None, True)],
    "local": [Row("local SGD, no exchange", "local", False)],
    "gradient_allreduce": [
        Row("bf gradient_allreduce", "gradient_allreduce", True),
        Row("bf gradient_allreduce", "gradient_allreduce", False),
    ],
    "atc": [Row("bf atc one-peer exp-2", "atc", True), Row("bf atc one-peer exp-2", "atc", False)],
    "awc": [Row("bf awc one-peer exp-2", "awc", True), Row("bf awc one-peer exp-2", "awc", False)],
    "win_put": [Row("bf win_put one-peer exp-2", "win_put", True),
                Row("bf win_put one-peer exp-2", "win_put", True, barrier=False)],
    "pull_get": [Row("bf pull_get one-peer exp-2", "pull_get", True),
                 Row("bf pull_get one-peer exp-2", "pull_get", True, barrier=False)],
}
_WINDOWED = ("win_put", "pull_get")


def free_port() -> int:
    """A TCP port nobody listens on now (rank 0 picks it; every rank gets it by broadcast)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_gloo(port: int) -> None:
    """A gloo process group over the MPI job: rank and size from bluefog-fn, rendezvous on localhost."""
    if port == 0:
        port = free_port() if bf.rank() == 0 else 0
        port = int(bf.broadcast(torch.tensor([port], dtype=torch.int64), root=0)[0])
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=bf.rank(), world_size=bf.size())


def build(row: Row, args: argparse.Namespace) -> tuple[Step, Callable[[], None]]:
    """The row's training step on a fresh model (same start on every rank) and its clean-up."""
    torch.manual_seed(args.seed)
    model = ResNet18()
    g = torch.Generator().manual_seed(args.seed + 1 + bf.rank())  # each rank its own fixed batch
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    net: nn.Module = model
    if row.style is None:
        net = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    sgd = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    opt: torch.optim.Optimizer | bf.optim.DecentralizedOptimizer = sgd
    if row.style not in (None, "local"):
        topo = bf.topology.one_peer_exponential_two(bf.size())
        opt = bf.optim.DecentralizedOptimizer(
            sgd, model, topo, style=row.style, overlap=row.overlap, bucket_cap_mb=args.bucket_cap_mb,  # type: ignore[arg-type]
        )
        opt.force_barrier = row.barrier

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    def close() -> None:
        if isinstance(opt, bf.optim.DecentralizedOptimizer):
            opt.free()

    return step, close


def measure(row: Row, args: argparse.Namespace, bar: tqdm) -> list[float]:
    """Seconds of each of ``args.iters`` timed steps of ``row`` after ``args.warmup``.

    Each entry is the slowest rank's time for that step (every step synchronises the ranks).
    """
    step, close = build(row, args)
    for _ in range(args.warmup):
        step()
    bf.barrier()
    mine = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        mine.append(time.perf_counter() - t0)
        bar.update()
    close()
    everyone = bf.allgather(torch.tensor([mine], dtype=torch.float64))  # (ranks, iters)
    if args.per_step and bf.rank() == 0:
        tqdm.write(f"{row.label} (overlap {'on' if row.overlap else 'off'}): step ms "
                   f"{[round(float(v) * 1e3) for v in everyone.max(0).values]}")
    return [float(v) for v in everyone.max(0).values]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="ddp,gradient_allreduce,atc,awc", help=f"comma-separated: {', '.join(ROWS)}")
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank per step")
    parser.add_argument("--image-size", type=int, default=32, help="height = width of the images")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row and round")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per row and round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of all rows")
    parser.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP's and the wrapper's bucket size")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads per rank (0: cores // ranks, >= 1)")
    parser.add_argument("--port", type=int, default=0, help="gloo rendezvous port (0: a free one, chosen by rank 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-step", action="store_true", help="print every timed step's time (ms) of every row")
    args = parser.parse_args()
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    for name in names:
        if name not in ROWS:
            raise SystemExit(f"--rows: unknown row {name!r}; choose from {', '.join(ROWS)}")
    if min(args.batch_size, args.image_size, args.iters, args.rounds) < 1 or args.warmup < 0:
        raise SystemExit("--batch-size, --image-size, --iters and --rounds must be >= 1, --warmup >= 0")

    bf.init()
    n, me = bf.size(), bf.rank()
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // bf.local_size())
    torch.set_num_threads(threads)
    init_gloo(args.port)
    rows = [row for name in names for row in ROWS[name]]
    load_before = os.getloadavg()
    times: dict[Row, list[float]] = {row: [] for row in rows}
    bar = tqdm(total=args.rounds * len(rows) * args.iters, disable=me != 0, ncols=90, desc="timed steps", mininterval=2.0)
    for _ in range(args.rounds):
        for row in rows:
            times[row] += measure(row, args, bar)
    bar.close()
    dist.destroy_process_group()
    if me != 0:
        return
    load_after = os.getloadavg()
    rate = {row: (args.batch_size / statistics.median(t), args.batch_size * len(t) / sum(t)) for row, t in times.items()}
    base = rate[rows[0]] if rows[0].style is None else None
    over = "oversubscribed: distorted" if n * threads > cores else "not oversubscribed"
    print(f"\nResNet-18 ({sum(p.numel() for p in ResNet18().parameters()) / 1e6:.1f} M parameters), "
          f"{args.image_size}x{args.image_size} images, batch {args.batch_size} per rank, {n} ranks x "
          f"{threads} thread(s) on {cores} cores ({over}); {args.rounds} round(s) x {args.iters} timed steps "
          f"per row after {args.warmup} warm-up; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("img/s from the median step time (per rank; total = x ranks) and from the mean step time")
    print(f"{'row':26} {'overlap':>7} {'per rank':>9} {'total':>8} {'x DDP':>6} {'mean: per rank':>15} {'x DDP':>6}")
    for row in rows:
        med, mean = rate[row]
        r_med = f"{med / base[0]:6.2f}" if base is not None else f"{'-':>6}"
        r_mean = f"{mean / base[1]:6.2f}" if base is not None else f"{'-':>6}"
        if row.style in _WINDOWED:
            overlap = "barrier" if row.barrier else "async"
        else:
            overlap = "-" if row.style in (None, "local") else ("on" if row.overlap else "off")
        print(f"{row.label:26} {overlap:>7} {med:9.1f} {med * n:8.1f} {r_med} {mean:15.1f} {r_mean}")


if __name__ == "__main__":
    main()
