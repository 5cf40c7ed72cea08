"""The ops inside ``torch.compile(fullgraph=True)``: the same numbers as eager, gradients Wᵀ·G,
one trace per signature, and a compiled ``bf.optim.atc`` step equal to the eager one.

Runs in a world of one and under ``bfrun -np 2 / -np 4`` (every rank compiles the same graphs).
Most graphs use the ``aot_eager`` backend (the custom ops and their autograd are what is under
test, and it compiles in a fraction of inductor's time); one test uses the default backend.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import all_ranks_agree

N = bf.size()
ME = bf.rank()
RING = T.ring(N)
ONE_PEER = T.one_peer_exponential_two(N)
MACHINES = T.ring(bf.machine_size())


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = 64


def _compiled(fn: Callable[..., Any], backend: str = "aot_eager") -> Callable[..., Any]:
    return torch.compile(fn, fullgraph=True, backend=backend)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if a is None:
        return b is None
    return bool(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))


def _tree(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(100 * seed + ME)
    return {"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": [torch.randn(4, generator=g), None]}


OPS: dict[str, Callable[[Any], Any]] = {
    "neighbor_mean": lambda t: bf.neighbor_mean(t, RING),
    "neighbor_mean_dynamic": lambda t: bf.neighbor_mean(t, ONE_PEER, 3),
    "neighbor_mean_weights": lambda t: bf.neighbor_mean(t, RING, self_weight=0.5, src_weights={s: 0.5 / max(1, len(RING.in_neighbors(ME))) for s in RING.in_neighbors(ME)}),
    "neighbor_gather": lambda t: bf.neighbor_gather(t, RING),
    "global_mean": bf.global_mean,
    "global_sum": bf.global_sum,
    "broadcast": lambda t: bf.broadcast(t, root=N - 1),
    "allgather": bf.allgather,
    "local_mean": bf.local_mean,
    "hierarchical_neighbor_mean": lambda t: bf.hierarchical_neighbor_mean(t, MACHINES),
    "neighbor_mean_async": lambda t: bf.neighbor_mean_async(t, RING).wait(),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_compiled_op_equals_eager(name: str) -> None:
    op = OPS[name]
    tree = _tree(1)
    eager = op(tree)
    compiled = _compiled(op)(tree)
    all_ranks_agree(_equal(eager, compiled), f"compiled {name} == eager")


def test_gradient_through_compiled_neighbor_mean_is_w_transpose_g() -> None:
    grads = [torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(7 + r)) for r in range(N)]
    for step in range(3):
        x = torch.ones(5, dtype=torch.float64, requires_grad=True)
        out = _compiled(lambda v, s: bf.neighbor_mean({"x": v}, ONE_PEER, s)["x"])(x, step)
        out.backward(grads[ME])
        expected = (ONE_PEER.at(step).mixing_matrix().T @ torch.stack(grads))[ME]
        assert x.grad is not None
        all_ranks_agree(torch.allclose(x.grad, expected, atol=1e-12, rtol=0), f"compiled Wᵀ·G at step {step}")


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return ((p["w"] @ x).sin().sum() - 1.0) ** 2


# Inductor's own imports warn about torch.jit deprecations.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_functional_step_with_func_grad_equals_eager_and_traces_once_per_signature() -> None:
    def step(p: dict[str, torch.Tensor], x: torch.Tensor, t: int) -> dict[str, torch.Tensor]:
        g = torch.func.grad(_loss)(p, x)
        return bf.neighbor_mean({k: v - 0.1 * g[k] for k, v in p.items()}, ONE_PEER, t)

    compiled = _compiled(step, backend="inductor")
    x = torch.linspace(-1, 1, 3, dtype=torch.float64)
    p_eager = p_comp = {"w": torch.full((2, 3), 0.1 * (ME + 1), dtype=torch.float64)}
    ok = True
    misses = []
    for t in range(2 * ONE_PEER.period + 2):
        p_eager = step(p_eager, x, t)
        p_comp = compiled(p_comp, x, t)
        ok &= torch.equal(p_eager["w"], p_comp["w"])
        misses.append(bf.plan_cache_info().misses)
    all_ranks_agree(ok, "compiled step == eager step")
    # After one period every graph of the topology has its plan: no more traces.
    assert misses[-1] == misses[ONE_PEER.period]


def test_compiled_atc_step_equals_eager_for_ten_steps() -> None:
    opt = bf.optim.atc(bf.optim.sgd(0.05, momentum=0.9), ONE_PEER)
    x = torch.linspace(0, 1, 3, dtype=torch.float64)

    def train_step(p: dict[str, torch.Tensor], s: Any, t: int) -> tuple[dict[str, torch.Tensor], Any]:
        g = torch.func.grad(_loss)(p, x)
        return opt.step(p, g, s, t)  # type: ignore[no-any-return]

    compiled = _compiled(train_step)
    p0 = {"w": torch.full((2, 3), 0.3 + ME, dtype=torch.float64)}
    pe, se = p0, opt.init(p0)
    pc, sc = p0, opt.init(p0)
    ok = True
    for t in range(10):
        pe, se = train_step(pe, se, t)
        pc, sc = compiled(pc, sc, t)
        ok &= torch.equal(pe["w"], pc["w"])
    all_ranks_agree(ok, "compiled atc == eager atc for 10 steps")


def test_compiled_op_in_the_simulator_equals_eager() -> None:
    with bf.simulate(4):
        topo = T.one_peer_exponential_two(4)
        x = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
        f = lambda v, s: bf.neighbor_mean({"v": v}, topo, s)["v"]  # noqa: E731
        compiled = _compiled(f)
        for s in range(3):
            assert torch.equal(f(x, s), compiled(x, s))
        w = x.clone().requires_grad_(True)
        compiled(w, 1).sum().backward()
        assert w.grad is not None
        expected = topo.at(1).mixing_matrix().T @ torch.ones(4, 3, dtype=torch.float64)
        assert torch.allclose(w.grad, expected)


def test_compiled_per_agent_code_under_sim_vmap_equals_eager() -> None:
    # The custom op's vmap rule: bf.sim.vmap batches per-agent calls into one stacked call.
    with bf.simulate(4):
        topo = T.ring(4)

        def per_agent(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            g = torch.func.grad(lambda q: ((q * x).sum()) ** 2)(p)
            return bf.neighbor_mean(p - 0.1 * g, topo)  # type: ignore[no-any-return]

        f = bf.sim.vmap(per_agent)
        p = torch.arange(12.0, dtype=torch.float64).reshape(4, 3)
        x = torch.linspace(0, 1, 12, dtype=torch.float64).reshape(4, 3)
        assert torch.equal(f(p, x), _compiled(f)(p, x))


def test_async_handle_inside_compile_is_complete() -> None:
    def f(t: torch.Tensor) -> torch.Tensor:
        handle = bf.neighbor_mean_async({"t": t}, RING)
        return handle.wait()["t"] * 2  # type: ignore[no-any-return]

    x = torch.arange(4.0, dtype=torch.float64) + ME
    all_ranks_agree(torch.equal(f(x), _compiled(f)(x)), "compiled async handle")


def test_barrier_inside_compile_says_why_it_cannot_run() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        bf.barrier()
        return x + 1

    with pytest.raises(Exception, match=r"barrier cannot run inside torch\.compile"):
        _compiled(f)(torch.ones(1))
