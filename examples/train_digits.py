"""Decentralized training of a small CNN on scikit-learn's handwritten digits, with torch.func.

    bfrun -np 4 python examples/train_digits.py
    bfrun -np 4 python examples/train_digits.py --non-iid --epochs 15
    bfrun -np 4 --timeline digits.json python examples/train_digits.py --epochs 1   # open in Perfetto
    python examples/train_digits.py --algorithms allreduce,atc          # one process

The 1,797 8×8 digit images bundled with scikit-learn (no download) are split 70/30 into train and
test sets; the training set is sharded across ranks (iid: a random split; ``--non-iid``: sorted by
label, so each rank sees only a few classes).  Each rank trains its own copy of the model with
``torch.func.grad`` over ``functional_call`` and a bf.optim algorithm:

* ``allreduce``          — gradients averaged over all ranks every step (the centralised baseline);
* ``atc``                — adapt-then-combine over the one-peer exponential-2 graph (one message
                           per step, no global synchronisation);
* ``gradient_tracking``  — DIGing over the same graph;
* also ``dsgd``/``awc``, ``exact_diffusion`` on request.

Every algorithm starts from the same broadcast initialisation and uses momentum SGD with a cosine
learning-rate schedule.  After each epoch every rank evaluates its own model on the test set; the
reported accuracy is the mean over ranks.  Prints a table of test accuracy and wall time per epoch
and writes a PNG of accuracy vs epoch and vs time.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import functional_call, grad
from tqdm import tqdm

import bluefog_fn as bf
from bluefog_fn import topology as T

Params = dict[str, torch.Tensor]


class CNN(nn.Module):
    """Two 3×3 convolutions, a 2×2 max-pool and two linear layers (~38k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        logits: torch.Tensor = self.fc2(F.relu(self.fc1(x.flatten(1))))
        return logits


def load(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/test images (N, 1, 8, 8) scaled to [0, 1] and labels; the same split on every rank."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def shard(y: torch.Tensor, n: int, rank: int, non_iid: bool) -> torch.Tensor:
    """This rank's training indices: equal-size shards, iid or sorted by label."""
    order = torch.argsort(y, stable=True) if non_iid else torch.arange(len(y))
    per = len(y) // n  # equal sizes: every rank must take the same number of steps
    return order[rank * per : (rank + 1) * per]


def make_optimizer(name: str, lr: Callable[[int], float], momentum: float, n: int) -> bf.optim.Transformation:
    local = bf.optim.sgd(lr, momentum=momentum)
    graph = T.one_peer_exponential_two(n)
    builders: dict[str, Callable[[], bf.optim.Transformation]] = {
        "allreduce": lambda: bf.optim.allreduce(local),
        "atc": lambda: bf.optim.atc(local, graph),
        "awc": lambda: bf.optim.awc(local, graph),
        "dsgd": lambda: bf.optim.dsgd(local, graph),
        "gradient_tracking": lambda: bf.optim.gradient_tracking(local, graph),
        "exact_diffusion": lambda: bf.optim.exact_diffusion(local, graph),
    }
    if name not in builders:
        raise SystemExit(f"--algorithms: unknown algorithm {name!r}; choose from {', '.join(builders)}")
    return builders[name]()


def accuracy(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((functional_call(model, params, (x,)).argmax(1) == y).float().mean())


def train(name: str, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict[str, list[float]]:
    """Train with one algorithm; returns per-epoch mean test accuracy and cumulative seconds."""
    n, me = bf.size(), bf.rank()
    x_train, y_train, x_test, y_test = data
    idx = shard(y_train, n, me, args.non_iid)
    steps_per_epoch = len(idx) // args.batch_size
    total = steps_per_epoch * args.epochs
    lr = bf.optim.cosine_decay_schedule(args.lr, total, alpha=0.05)
    opt = make_optimizer(name, lr, args.momentum, n)

    torch.manual_seed(args.seed)
    model = CNN()
    # The same start on every rank (each rank may have drawn a different one).
    params: Params = bf.broadcast_parameters({k: v.detach() for k, v in model.named_parameters()}, root=0)
    state = opt.init(params)

    def loss_fn(p: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xb,)), yb)

    grad_fn = grad(loss_fn)
    history: dict[str, list[float]] = {"acc": [], "time": []}
    elapsed = 0.0
    step = 0
    bar = tqdm(range(args.epochs), desc=f"{name:>18}", disable=me != 0, ncols=90, leave=True)
    for epoch in bar:
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch * 100 + me)
        order = idx[torch.randperm(len(idx), generator=g)]
        bf.barrier()  # time the epoch from a common start
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            batch = order[s * args.batch_size : (s + 1) * args.batch_size]
            with bf.timeline.activity("gradient"):  # shown by `bfrun --timeline out.json`
                grads = grad_fn(params, x_train[batch], y_train[batch])
            with bf.timeline.activity("optimizer step"):
                params, state = opt.step(params, grads, state, step)
            step += 1
        bf.barrier()
        elapsed += time.perf_counter() - t0
        acc = float(bf.global_mean(torch.tensor([accuracy(model, params, x_test, y_test)], dtype=torch.float64)))
        history["acc"].append(100.0 * acc)
        history["time"].append(elapsed)
        bar.set_postfix(test_acc=f"{100 * acc:.2f}%", s_per_epoch=f"{elapsed / (epoch + 1):.2f}")
    return history


def report(results: dict[str, dict[str, list[float]]], args: argparse.Namespace, baseline: str = "allreduce") -> None:
    names = list(results)
    print(f"\ndigits, {bf.size()} ranks, {'non-iid' if args.non_iid else 'iid'} shards, "
          f"batch {args.batch_size}/rank, lr {args.lr}, momentum {args.momentum}")
    print("test accuracy (%, mean over ranks) and cumulative training time (s)")
    print("epoch " + "".join(f"{name:>26}" for name in names))
    for e in range(args.epochs):
        cells = "".join(f"{results[m]['acc'][e]:17.2f} {results[m]['time'][e]:7.2f}s " for m in names)
        print(f"{e + 1:5d} {cells}")
    print("summary: " + "; ".join(
        f"{m} final {results[m]['acc'][-1]:.2f}% best {max(results[m]['acc']):.2f}% "
        f"{results[m]['time'][-1] / args.epochs:.2f} s/epoch" for m in names))
    if baseline in results:
        base = results[baseline]["acc"][-1]
        for m in names:
            if m != baseline:
                print(f"  {m} − {baseline} at epoch {args.epochs}: {results[m]['acc'][-1] - base:+.2f} points")


def plot(results: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in results.items():
        epochs = np.arange(1, len(h["acc"]) + 1)
        ax1.plot(epochs, h["acc"], marker="o", label=name)
        ax2.plot(h["time"], h["acc"], marker="o", label=name)
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"digits, {bf.size()} ranks")
    ax2.set(xlabel="training wall time (s)", ylabel="test accuracy (%)", title="accuracy vs time")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    save(fig, args.out)


def save(fig: Any, path: str) -> None:
    """Write ``fig`` to ``path`` (creating its directory) and say so."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def warm_up(x: torch.Tensor, y: torch.Tensor) -> None:
    """Trace the plans, compile the kernels and run torch.func once before any timing, so the
    first algorithm is not charged for one-time costs (about 2 s here)."""
    model = CNN()
    tree = {k: v.detach() for k, v in model.named_parameters()}
    grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(tree)
    graph = T.one_peer_exponential_two(bf.size())
    bf.global_mean(tree)
    for step in range(graph.period):
        bf.neighbor_mean(tree, graph, step)
        bf.neighbor_mean((tree, tree), graph, step)  # gradient tracking mixes (x, y) together
    bf.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algorithms", default="allreduce,atc,gradient_tracking",
                        help="comma-separated: allreduce, atc, awc, dsgd, gradient_tracking, exact_diffusion")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--non-iid", action="store_true", help="shard the training set sorted by label")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/train_digits.png", help="PNG path (rank 0 writes it)")
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 1:
        raise SystemExit("--epochs and --batch-size must be >= 1")

    torch.set_num_threads(1)  # one rank per core: intra-op threads would oversubscribe
    bf.init()
    data = load(args.seed)
    warm_up(data[0][:16], data[1][:16])
    results: dict[str, Any] = {}
    for name in [a.strip() for a in args.algorithms.split(",") if a.strip()]:
        results[name] = train(name, args, data)
    if bf.rank() == 0:
        report(results, args)
        plot(results, args)


if __name__ == "__main__":
    main()
