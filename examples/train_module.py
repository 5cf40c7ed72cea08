"""The digits CNN of ``train_digits.py`` trained the ``nn.Module`` + ``torch.optim`` way, every style.

    bfrun -np 4 python examples/train_module.py                       # gradient_allreduce, atc, awc
    bfrun -np 4 python examples/train_module.py --style all --epochs 10
    BLUEFOG_FN_RANKS_PER_MACHINE=2 bfrun -np 4 python examples/train_module.py --style hierarchical,atc
    python examples/train_module.py --style all --epochs 1            # a world of one

The model is an ordinary ``nn.Module`` trained with ``loss.backward()`` and a momentum
``torch.optim.SGD`` wrapped in :class:`bluefog_fn.optim.DecentralizedOptimizer`, one run per
``--style`` (a comma-separated list, or ``all``):

* ``gradient_allreduce`` — gradients averaged over all ranks before the local step (what DDP
  does): the baseline;
* ``allreduce``          — local step, then the parameters averaged over all ranks;
* ``atc``                — local step, then neighbour averaging over the one-peer exponential-2
  graph (one message per step);
* ``awc``                — the averaging of the pre-step parameters overlaps the local step;
* ``push_sum``           — push-sum over a one-sided window (column-stochastic shares);
* ``win_put``            — the adapted parameters are put into the neighbours' windows;
* ``pull_get``           — each rank gets its in-neighbours' adapted parameters from their windows;
* ``hierarchical``       — the machine's ranks averaged, then the machines averaged over a
  one-peer exponential-2 graph of ``bf.machine_size()`` machines (with one machine, that is the
  global mean; ``BLUEFOG_FN_RANKS_PER_MACHINE`` pretends there are several).

``bf.broadcast_parameters(model)`` and ``bf.optim.broadcast_optimizer_state(opt)`` give every
rank the same start; ``--overlap off`` turns off the exchanges started from gradient hooks.
Each style first takes a few untimed steps on a throw-away model (plans, agreement and kernel
compilation are one-time costs).  Prints test accuracy (mean over ranks) and wall time per
epoch, and writes a PNG of the training loss (mean over ranks) against wall time, one line per
style.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bluefog_fn as bf
from bluefog_fn import topology as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import CNN, load, report, save, shard  # data, model, report, figure

STYLES = ("gradient_allreduce", "allreduce", "atc", "awc", "push_sum", "win_put", "pull_get", "hierarchical")
DEFAULT = "gradient_allreduce,atc,awc"
WARMUP_STEPS = 4  # covers the period of the one-peer graphs below for up to 16 ranks or machines


def topology_for(style: str) -> Any:
    """The one-peer exponential-2 graph over the ranks, or over the machines for ``hierarchical``."""
    nodes = bf.machine_size() if style == "hierarchical" else bf.size()
    return T.one_peer_exponential_two(nodes)


def make(style: str, args: argparse.Namespace, total: int) -> tuple[CNN, bf.optim.DecentralizedOptimizer, Any]:
    """A model with the same start on every rank, its wrapped optimizer and its lr schedule."""
    torch.manual_seed(args.seed + bf.rank())  # deliberately different: the broadcasts align them
    model = CNN()
    bf.broadcast_parameters(model, root=0)
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    bf.optim.broadcast_optimizer_state(sgd, root=0)
    # Cosine decay to 5 % of the initial rate, as in train_digits.py.
    sched = torch.optim.lr_scheduler.LambdaLR(
        sgd, lambda k: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(k, total) / total))
    )
    opt = bf.optim.DecentralizedOptimizer(
        sgd, model, topology_for(style), style=style, overlap=args.overlap == "on"  # type: ignore[arg-type]
    )
    return model, opt, sched


def warm_up(style: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    """A few untimed steps of ``style`` on a throw-away model."""
    model, opt, _ = make(style, args, WARMUP_STEPS)
    for _ in range(WARMUP_STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.free()


def train(style: str, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict[str, list[float]]:
    """Train with one style; per-epoch test accuracy and time, per-step loss and time (all ranks)."""
    n, me = bf.size(), bf.rank()
    x_train, y_train, x_test, y_test = data
    idx = shard(y_train, n, me, args.non_iid)
    steps_per_epoch = len(idx) // args.batch_size
    warm_up(style, args, x_train[idx[: args.batch_size]], y_train[idx[: args.batch_size]])
    model, opt, sched = make(style, args, steps_per_epoch * args.epochs)

    history: dict[str, list[float]] = {"acc": [], "time": []}
    losses: list[float] = []
    clock: list[float] = []
    elapsed = 0.0
    bar = tqdm(range(args.epochs), desc=f"{style:>18}", disable=me != 0, ncols=90)
    for epoch in bar:
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch * 100 + me)
        order = idx[torch.randperm(len(idx), generator=g)]
        model.train()
        bf.barrier()  # time the epoch from a common start
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            batch = order[s * args.batch_size : (s + 1) * args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_train[batch]), y_train[batch])
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            clock.append(elapsed + time.perf_counter() - t0)
        bf.barrier()
        elapsed += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        acc = float(bf.global_mean(torch.tensor([acc], dtype=torch.float64)))
        history["acc"].append(100.0 * acc)
        history["time"].append(elapsed)
        bar.set_postfix(test_acc=f"{100 * acc:.2f}%")
    opt.free()
    # Every rank took the same steps: the loss is the mean over ranks, the clock the slowest rank's.
    history["loss"] = bf.global_mean(torch.tensor(losses, dtype=torch.float64)).tolist()
    history["clock"] = bf.allgather(torch.tensor([clock], dtype=torch.float64)).max(0).values.tolist()
    return history


def smooth(values: list[float], window: int) -> list[float]:
    """Running mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_loss(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    """Training loss (mean over ranks, running mean over ``--smooth`` steps) against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for style, h in results.items():
        ax.plot(h["clock"], smooth(h["loss"], args.smooth), label=style)
    ax.set_yscale("log")
    # Plain numbers on the log axis (the default writes 2×10⁰ when the range is short).
    ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    ax.set(xlabel="training wall time (s)", ylabel="training loss (mean over ranks)",
           title=f"digits CNN, DecentralizedOptimizer, {bf.size()} ranks on {bf.machine_size()} machine(s)")
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, args.out)


def parse_styles(text: str) -> list[str]:
    """``all`` or a comma-separated list of styles, checked."""
    if text.strip() == "all":
        return list(STYLES)
    styles = [s.strip() for s in text.split(",") if s.strip()]
    for s in styles:
        if s not in STYLES:
            raise SystemExit(f"--style: unknown style {s!r}; choose from all, {', '.join(STYLES)}")
    if not styles:
        raise SystemExit("--style: give at least one style")
    return styles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--style", "--styles", dest="style", default=DEFAULT,
                        help=f"comma-separated, or all: {', '.join(STYLES)} (default {DEFAULT})")
    parser.add_argument("--overlap", choices=("on", "off"), default="on", help="start exchanges from gradient hooks")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--non-iid", action="store_true", help="shard the training set sorted by label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smooth", type=int, default=10, help="steps in the plotted running mean of the loss")
    parser.add_argument("--out", default="out/train_module.png", help="PNG path (rank 0 writes it)")
    args = parser.parse_args()
    styles = parse_styles(args.style)
    if args.epochs < 1 or args.batch_size < 1 or args.smooth < 1:
        raise SystemExit("--epochs, --batch-size and --smooth must be >= 1")

    torch.set_num_threads(1)  # one rank per core: intra-op threads would oversubscribe
    bf.init()
    data = load(args.seed)
    results = {style: train(style, args, data) for style in styles}
    if bf.rank() == 0:
        report(results, args, baseline="gradient_allreduce")
        plot_loss(results, args)


if __name__ == "__main__":
    main()
