"""The programs the docs show: the tutorial's algorithm (examples/extra.py) against a dense float64
reference in the simulator, and the quick start (examples/quickstart.py).

The docs include these files; testing them here keeps the pages true.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

import bluefog_fn as bf

ROOT = Path(__file__).resolve().parent.parent


def _example() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("tutorial_extra", ROOT / "examples" / "extra.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # NamedTuple classes look their module up
    spec.loader.exec_module(module)
    return module


extra = _example()


# --8<-- [start:dense]
def _dense_extra(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, lr: float, steps: int) -> list[torch.Tensor]:
    """EXTRA in matrix form (Shi et al. 2015): X¹ = W X⁰ − γ∇f(X⁰),
    Xᵏ⁺² = (I + W) Xᵏ⁺¹ − W̃ Xᵏ − γ(∇f(Xᵏ⁺¹) − ∇f(Xᵏ)), W̃ = (I + W)/2."""
    n, d = a.shape[0], a.shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    w_tilde = (eye + w) / 2

    def grad(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([a[i].T @ (a[i] @ x[i] - b[i]) for i in range(n)])

    xs = [torch.zeros(n, d, dtype=torch.float64)]
    xs.append(w @ xs[0] - lr * grad(xs[0]))
    while len(xs) <= steps:
        x1, x0 = xs[-1], xs[-2]
        xs.append((eye + w) @ x1 - w_tilde @ x0 - lr * (grad(x1) - grad(x0)))
    return xs[1:]
# --8<-- [end:dense]


# --8<-- [start:test]
def test_extra_matches_the_dense_reference_on_64_simulated_agents() -> None:
    n, steps, lr = 64, 25, 0.05
    topo = bf.topology.hypercube(n)
    with bf.simulate(n):
        a, b = bf.sim.per_agent(extra.make_data)
        opt = extra.extra(lr, topo)
        x = torch.zeros(n, a.shape[-1], dtype=torch.float64)
        before = x.clone()
        state = opt.init(x)
        got = []
        for k in range(steps):
            x, state = opt.step(x, extra.gradient(a, b, x), state, k)
            got.append(x)
        assert torch.equal(before, torch.zeros_like(before))
    want = _dense_extra(topo.mixing_matrix(), a, b, lr, steps)
    for k, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12, msg=lambda m, k=k: f"step {k}: {m}")
# --8<-- [end:test]


def test_extra_reaches_the_exact_optimum_where_dsgd_stalls() -> None:
    # The tutorial's claim, checked on its own run: EXTRA ends at the optimum, DSGD at a bias.
    assert extra.main(["--agents", "64", "--steps", "300", "--check", "1e-8"]) == 0


def test_optimum_solves_the_normal_equations() -> None:
    xstar = extra.optimum(8)
    total = sum(extra.gradient(*extra.make_data(r), xstar) for r in range(8))
    assert float(torch.as_tensor(total).abs().max()) < 1e-12


def test_quickstart_example_fits_the_model_in_a_world_of_one() -> None:
    spec = importlib.util.spec_from_file_location("quickstart_example", ROOT / "examples" / "quickstart.py")
    assert spec is not None and spec.loader is not None
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    assert quickstart.main(steps=300) < 2e-4  # the noise floor is 1e-4 (σ = 0.01)
