"""The digits CNN of ``train_digits.py`` trained the ``nn.Module`` + ``torch.optim`` way.

    bfrun -np 4 python examples/train_module.py
    python examples/train_module.py --styles atc

The model is an ordinary ``nn.Module`` trained with ``loss.backward()`` and a ``torch.optim.SGD``
wrapped in :class:`bluefog_fn.optim.DecentralizedOptimizer`, BlueFog style:

* ``allreduce`` — the baseline: gradients averaged with ``bf.global_mean`` before ``opt.step()``
  (what DDP/Horovod do), no wrapper;
* ``atc``       — ``DecentralizedOptimizer(..., style="atc")``: local step, then neighbour averaging
  over the one-peer exponential-2 graph;
* ``awc``       — ``style="awc"``: the averaging of the pre-step parameters overlaps the local step.

``bf.broadcast_parameters(model)`` and ``bf.optim.broadcast_optimizer_state(opt)`` give every
rank the same start.  Prints test accuracy (mean over ranks) and wall time per epoch, and writes a
PNG like ``train_digits.py``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import bluefog_fn as bf
from bluefog_fn import topology as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import CNN, load, plot, report, shard  # the same data, model and report


def train(style: str, args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict[str, list[float]]:
    n, me = bf.size(), bf.rank()
    x_train, y_train, x_test, y_test = data
    idx = shard(y_train, n, me, args.non_iid)
    steps_per_epoch = len(idx) // args.batch_size
    total = steps_per_epoch * args.epochs

    torch.manual_seed(args.seed + me)  # deliberately different: the broadcast below aligns them
    model = CNN()
    bf.broadcast_parameters(model, root=0)
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    bf.optim.broadcast_optimizer_state(sgd, root=0)
    # Cosine decay to 5 % of the initial rate, as in train_digits.py.
    sched = torch.optim.lr_scheduler.LambdaLR(sgd, lambda k: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    opt = None
    if style != "allreduce":
        opt = bf.optim.DecentralizedOptimizer(sgd, model, T.one_peer_exponential_two(n), style=style)  # type: ignore[arg-type]

    history: dict[str, list[float]] = {"acc": [], "time": []}
    elapsed = 0.0
    bar = tqdm(range(args.epochs), desc=f"{style:>10}", disable=me != 0, ncols=90)
    for epoch in bar:
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch * 100 + me)
        order = idx[torch.randperm(len(idx), generator=g)]
        model.train()
        bf.barrier()
        t0 = time.perf_counter()
        for s in range(steps_per_epoch):
            batch = order[s * args.batch_size : (s + 1) * args.batch_size]
            sgd.zero_grad()
            F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
            if opt is None:
                grads = bf.global_mean([p.grad for p in model.parameters()])
                for p, gr in zip(model.parameters(), grads, strict=True):
                    p.grad = gr
                sgd.step()
            else:
                opt.step()
            sched.step()
        bf.barrier()
        elapsed += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            acc = float((model(x_test).argmax(1) == y_test).float().mean())
        acc = float(bf.global_mean(torch.tensor([acc], dtype=torch.float64)))
        history["acc"].append(100.0 * acc)
        history["time"].append(elapsed)
        bar.set_postfix(test_acc=f"{100 * acc:.2f}%")
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--styles", default="allreduce,atc,awc", help="comma-separated: allreduce, atc, awc")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--non-iid", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/train_module.png")
    args = parser.parse_args()
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    for s in styles:
        if s not in ("allreduce", "atc", "awc"):
            raise SystemExit(f"--styles: unknown style {s!r}; choose from allreduce, atc, awc")

    torch.set_num_threads(1)
    bf.init()
    data = load(args.seed)
    train("atc", argparse.Namespace(**{**vars(args), "epochs": 1}), data)  # warm-up, not reported
    results = {style: train(style, args, data) for style in styles}
    if bf.rank() == 0:
        report(results, args)
        plot(results, args)


if __name__ == "__main__":
    main()
