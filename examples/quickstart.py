"""Quick start: a decentralized training loop with torch.func and an optax-style optimizer.

    python examples/quickstart.py               # a world of one (no MPI needed)
    bfrun -np 4 python examples/quickstart.py   # 4 agents, each with its own data

Every agent fits the same linear model to its own noisy samples of y = a·w* + b*; the agents
never exchange data, only parameters (adapt-then-combine over the one-peer exponential-2 graph).
"""

from __future__ import annotations

import torch
from torch.func import grad

import bluefog_fn as bf

W_TRUE, B_TRUE = torch.tensor([2.0, -3.0, 0.5]), 1.0


def local_data(rank: int, samples: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(rank)  # each agent draws its own samples
    a = torch.randn(samples, 3, generator=g)
    return a, a @ W_TRUE + B_TRUE + 0.01 * torch.randn(samples, generator=g)


def loss(params: dict[str, torch.Tensor], a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((a @ params["w"] + params["b"] - y) ** 2).mean()


def main(steps: int = 300) -> float:
    bf.init()
    a, y = local_data(bf.rank())
    params = bf.broadcast({"w": torch.zeros(3), "b": torch.zeros(())}, root=0)  # same start everywhere
    opt = bf.optim.atc(bf.optim.sgd(0.05), bf.topology.one_peer_exponential_two(bf.size()))
    state = opt.init(params)
    for step in range(steps):
        grads = grad(loss)(params, a, y)
        params, state = opt.step(params, grads, state, step)  # local step, then neighbour averaging
    final = bf.global_mean(loss(params, a, y).reshape(1))  # the mean loss over all agents
    if bf.rank() == 0:
        print(f"{bf.size()} agent(s): w = {[round(v, 3) for v in params['w'].tolist()]}, b = {params['b'].item():.3f}, "
              f"mean loss {final.item():.2e}")
    return final.item()


if __name__ == "__main__":
    main()
