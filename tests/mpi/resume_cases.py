"""Training runs that are checkpointed half way and resumed: shared by the in-process tests
(simulator and MPI) and by the job that resumes in fresh processes (``resume_job.py``).

A run is ``2·K`` steps of a decentralized least-squares problem (plus a float32 leaf, a nested
structure and a ``None`` leaf, so trees are not trivial).  ``uninterrupted`` saves at step ``K``
and continues; ``resumed`` builds a brand-new optimizer, loads the file and continues.  The
final parameters and states must be bitwise equal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

import bluefog_fn as bf
from bluefog_fn import topology as T

DIM, ROWS, K = 4, 8, 5

Factory = Callable[[int], bf.optim.Transformation]

# Functional cases: name -> factory(n).  Push-sum runs synchronously (deterministic).
CASES: dict[str, Factory] = {
    "dsgd_ring": lambda n: bf.optim.dsgd(0.05, T.ring(n)),
    "awc_adam_local_steps_global": lambda n: bf.optim.awc(
        bf.optim.adam(0.02), T.exponential_two(n), communicate_every=2, global_every=3
    ),
    "atc_momentum_one_peer": lambda n: bf.optim.atc(bf.optim.sgd(0.03, momentum=0.5), T.one_peer_exponential_two(n)),
    "gradient_tracking_ring": lambda n: bf.optim.gradient_tracking(bf.optim.sgd(0.03, nesterov=True, momentum=0.3), T.ring(n)),
    "exact_diffusion_adam": lambda n: bf.optim.exact_diffusion(bf.optim.adam(0.02), T.exponential_two(n)),
    "allreduce_adam": lambda n: bf.optim.allreduce(bf.optim.adam(0.02)),
    "push_sum_exp2": lambda n: bf.optim.push_sum(0.05, T.exponential_two(n)),
    "push_sum_adam_one_peer": lambda n: bf.optim.push_sum(bf.optim.adam(0.02), T.one_peer_exponential_two(n)),
    "push_diging_exp2": lambda n: bf.optim.push_diging(0.03, T.exponential_two(n)),
}


def problem(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every agent's ``A_i`` and ``b_i`` (float64), the same on every rank."""
    g = torch.Generator().manual_seed(11)
    A = torch.randn(n, ROWS, DIM, generator=g, dtype=torch.float64) / ROWS**0.5
    b = torch.randn(n, ROWS, generator=g, dtype=torch.float64) * 3.0
    return A, b


def start(n: int) -> Any:
    """Different starting points per agent, stacked (leading agent dimension)."""
    g = torch.Generator().manual_seed(7)
    return {
        "layer": {"w": torch.randn(n, DIM, generator=g, dtype=torch.float64)},
        "extra": [torch.randn(n, 2, generator=g, dtype=torch.float32)],
        "frozen": None,
    }


def grads(params: Any, A: torch.Tensor, b: torch.Tensor) -> Any:
    """∇ of ‖A w − b‖² + ½‖e − 1‖² (per agent, or stacked)."""
    w = params["layer"]["w"]
    residual = torch.einsum("...rd,...d->...r", A, w) - b
    return {
        "layer": {"w": 2.0 * torch.einsum("...rd,...r->...d", A, residual)},
        "extra": [params["extra"][0] - 1.0],
        "frozen": None,
    }


def agent_data(n: int, me: int | None) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Start and data of agent ``me``, or of all agents stacked (``me=None``, simulator)."""
    A, b = problem(n)
    x0 = start(n)
    if me is None:
        return x0, A, b
    return pytree.tree_map(lambda t: None if t is None else t[me].clone(), x0), A[me], b[me]


def train(opt: bf.optim.Transformation, params: Any, state: Any, A: torch.Tensor, b: torch.Tensor, steps: range) -> tuple[Any, Any]:
    for k in steps:
        params, state = opt.step(params, grads(params, A, b), state, k)
    return params, state


def uninterrupted(case: str, path: str, n: int, me: int | None) -> tuple[Any, Any]:
    """``2K`` steps, saving ``{params, state, step}`` at ``K``; returns the final (params, state)."""
    opt = CASES[case](n)
    x0, A, b = agent_data(n, me)
    params, state = train(opt, x0, opt.init(x0), A, b, range(K))
    bf.checkpoint.save(path, {"params": params, "state": state, "step": K})
    return train(opt, params, state, A, b, range(K, 2 * K))


def resumed(case: str, path: str, n: int, me: int | None) -> tuple[Any, Any]:
    """A fresh optimizer that loads the step-``K`` file and runs to ``2K``."""
    opt = CASES[case](n)
    x0, A, b = agent_data(n, me)
    like = {"params": x0, "state": opt.init(x0), "step": 0}
    ckpt = bf.checkpoint.load(path, like=like)
    assert ckpt["step"] == K
    return train(opt, ckpt["params"], ckpt["state"], A, b, range(ckpt["step"], 2 * K))


def numbers(tree: Any) -> list[torch.Tensor]:
    """The tensors of (params, state), windows replaced by their current numbers."""
    out: list[torch.Tensor] = []
    for leaf in pytree.tree_leaves(tree, is_leaf=lambda x: isinstance(x, bf.Window)):
        if isinstance(leaf, bf.Window):
            snap = leaf.snapshot()
            out.extend([*snap.own, *snap.slots])
        elif isinstance(leaf, torch.Tensor):
            out.append(leaf)
    return out


def free_windows(tree: Any) -> None:
    for leaf in pytree.tree_leaves(tree, is_leaf=lambda x: isinstance(x, bf.Window)):
        if isinstance(leaf, bf.Window):
            leaf.free()


def bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------- nn.Module front end


def module_run(style: str, path: str, n: int, me: int, *, resume: bool) -> list[torch.Tensor]:
    """``DecentralizedOptimizer`` over torch Adam; uninterrupted (saving at K) or resumed from K."""
    A, b = problem(n)
    torch.manual_seed(100 + me if not resume else 999)  # a resumed run starts from other weights
    model = torch.nn.Linear(DIM, 1).double()
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.02), model, T.one_peer_exponential_two(n), style=style  # type: ignore[arg-type]
    )
    if resume:
        ckpt = bf.checkpoint.load(path)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    while opt.steps < 2 * K:
        if opt.steps == K and not resume:
            bf.checkpoint.save(path, {"model": model.state_dict(), "optimizer": opt.state_dict()})
        opt.zero_grad()
        ((model(A[me]).squeeze(-1) - b[me]) ** 2).sum().backward()
        opt.step()
    return [t.detach().clone() for t in model.state_dict().values()] + [
        v for s in opt.optimizer.state_dict()["state"].values() for v in s.values()
    ]
