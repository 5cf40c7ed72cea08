"""bf.optim in one process: argument validation, purity, checkpointable state, local optimizers.

The distributed behaviour (convergence, bias, equality with centralised GD) is in
``test_optim_sim.py`` (simulator) and ``mpi/test_optim_mpi.py`` (MPI).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

import bluefog_fn as bf
from bluefog_fn import topology as T

N = bf.size()
ALGORITHMS: dict[str, Callable[[], bf.optim.Transformation]] = {
    "dsgd": lambda: bf.optim.dsgd(0.1, T.ring(N)),
    "awc": lambda: bf.optim.awc(bf.optim.sgd(0.1, momentum=0.9), T.ring(N), communicate_every=2, global_every=3),
    "atc": lambda: bf.optim.atc(bf.optim.adam(0.01), T.one_peer_exponential_two(N)),
    "gradient_tracking": lambda: bf.optim.gradient_tracking(bf.optim.sgd(0.1, momentum=0.5), T.ring(N)),
    "exact_diffusion": lambda: bf.optim.exact_diffusion(bf.optim.adam(0.01, weight_decay=0.1), T.exponential_two(N)),
    "allreduce": lambda: bf.optim.allreduce(bf.optim.sgd(0.1, nesterov=True, momentum=0.9)),
    "sgd": lambda: bf.optim.sgd(0.1, momentum=0.9, weight_decay=1e-2),
    "adam": lambda: bf.optim.adam(lambda k: 0.1 / (k + 1)),
}


def tree(seed: int, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g, dtype=dtype),
        "layers": [torch.randn(5, generator=g, dtype=dtype), (torch.randn(2, 2, generator=g, dtype=dtype), None)],
    }


def leaves(t: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(t) if x is not None]


def run(opt: bf.optim.Transformation, steps: int, params: Any = None, state: Any = None, first: int = 0) -> tuple[Any, Any]:
    params = tree(0) if params is None else params
    state = opt.init(params) if state is None else state
    for k in range(first, first + steps):
        params, state = opt.step(params, tree(100 + k), state, k)
    return params, state


# --------------------------------------------------------------------------- validation at construction

# Rows sum to 1, columns do not: averaging over it does not preserve the network mean.
ROW_STOCHASTIC = T.from_matrix(torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.25, 0.25]], dtype=torch.float64))

BAD: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("sgd lr=0", lambda: bf.optim.sgd(0), ValueError, "lr must be > 0 or a callable of the step, got 0"),
    ("sgd lr<0", lambda: bf.optim.sgd(-0.1), ValueError, "got -0.1"),
    ("sgd lr str", lambda: bf.optim.sgd("0.1"), TypeError, "sgd: lr must be a number, got str '0.1'"),  # type: ignore[arg-type]
    ("sgd lr nan", lambda: bf.optim.sgd(math.nan), ValueError, "sgd: lr must be finite, got nan"),
    ("sgd lr bool", lambda: bf.optim.sgd(True), TypeError, "lr must be a number, got bool"),
    ("sgd momentum=1", lambda: bf.optim.sgd(0.1, momentum=1.0), ValueError, "momentum must be in [0.0, 1.0), got 1.0"),
    ("sgd momentum<0", lambda: bf.optim.sgd(0.1, momentum=-0.5), ValueError, "momentum must be in [0.0, 1.0), got -0.5"),
    ("sgd nesterov no momentum", lambda: bf.optim.sgd(0.1, nesterov=True), ValueError, "nesterov=True needs momentum > 0"),
    ("sgd nesterov str", lambda: bf.optim.sgd(0.1, 0.9, nesterov="yes"), TypeError, "nesterov must be a bool, got str"),  # type: ignore[arg-type]
    ("sgd weight_decay<0", lambda: bf.optim.sgd(0.1, weight_decay=-1), ValueError, "weight_decay must be >= 0, got -1"),
    ("adam beta1=1", lambda: bf.optim.adam(0.1, betas=(1.0, 0.9)), ValueError, "betas[0] must be in [0.0, 1.0), got 1.0"),
    ("adam beta2<0", lambda: bf.optim.adam(0.1, betas=(0.9, -0.1)), ValueError, "betas[1] must be in [0.0, 1.0), got -0.1"),
    ("adam betas scalar", lambda: bf.optim.adam(0.1, betas=0.9), TypeError, "betas must be a pair"),  # type: ignore[arg-type]
    ("adam eps=0", lambda: bf.optim.adam(0.1, eps=0.0), ValueError, "adam: eps must be > 0, got 0.0"),
    ("adam lr=0", lambda: bf.optim.adam(0.0), ValueError, "adam: lr must be > 0"),
    ("dsgd topology str", lambda: bf.optim.dsgd(0.1, "ring"), TypeError, "dsgd: topology must be a bf.topology Topology or DynamicTopology, got str"),  # type: ignore[arg-type]
    ("awc optimizer str", lambda: bf.optim.awc("sgd", T.ring(1)), TypeError, "awc: optimizer must be a bf.optim Transformation"),  # type: ignore[arg-type]
    ("awc optimizer lr<0", lambda: bf.optim.awc(-1.0, T.ring(1)), ValueError, "awc: optimizer (a learning rate) must be > 0"),
    ("atc communicate_every=0", lambda: bf.optim.atc(0.1, T.ring(4), communicate_every=0), ValueError, "atc: communicate_every must be an int >= 1, got 0"),
    ("atc communicate_every float", lambda: bf.optim.atc(0.1, T.ring(4), communicate_every=2.0), TypeError, "communicate_every must be an int >= 1, got float 2.0"),  # type: ignore[arg-type]
    ("awc global_every=0", lambda: bf.optim.awc(0.1, T.ring(4), global_every=0), ValueError, "awc: global_every must be an int >= 1, got 0"),
    ("gradient_tracking row-stochastic", lambda: bf.optim.gradient_tracking(0.1, ROW_STOCHASTIC), ValueError, "gradient_tracking: topology must be doubly stochastic"),
    ("gradient_tracking communicate_every", lambda: bf.optim.gradient_tracking(0.1, T.ring(4), communicate_every=-1), ValueError, "communicate_every must be an int >= 1, got -1"),
    ("exact_diffusion row-stochastic", lambda: bf.optim.exact_diffusion(0.1, ROW_STOCHASTIC), ValueError, "exact_diffusion: topology must be doubly stochastic"),
    ("exact_diffusion topology None", lambda: bf.optim.exact_diffusion(0.1, None), TypeError, "exact_diffusion: topology must be"),  # type: ignore[arg-type]
    ("allreduce lr=0", lambda: bf.optim.allreduce(0), ValueError, "allreduce: optimizer (a learning rate) must be > 0"),
    ("allreduce optimizer None", lambda: bf.optim.allreduce(None), TypeError, "allreduce: optimizer must be"),  # type: ignore[arg-type]
    ("exponential_decay rate", lambda: bf.optim.exponential_decay(0.1, 1.5), ValueError, "decay_rate must be in (0.0, 1.0], got 1.5"),
    ("exponential_decay init", lambda: bf.optim.exponential_decay(-1.0, 0.5), ValueError, "init_value must be > 0, got -1.0"),
    ("cosine decay_steps", lambda: bf.optim.cosine_decay_schedule(0.1, 0), ValueError, "decay_steps must be an int >= 1, got 0"),
    ("cosine alpha", lambda: bf.optim.cosine_decay_schedule(0.1, 10, alpha=2.0), ValueError, "alpha must be in [0.0, 1.0], got 2.0"),
    ("constant_schedule", lambda: bf.optim.constant_schedule(-1.0), ValueError, "constant_schedule: value must be >= 0, got -1.0"),
]


@pytest.mark.parametrize(("what", "build", "error", "message"), BAD, ids=[b[0] for b in BAD])
def test_optim_factories_validate_at_construction(
    what: str, build: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        build()
    assert message in str(info.value), str(info.value)


def test_optim_dynamic_topology_checked_graph_by_graph() -> None:
    schedule = T.DynamicTopology([T.ring(3), ROW_STOCHASTIC], name="ring-then-lopsided")
    with pytest.raises(ValueError, match=r"doubly stochastic.*graph 1 of the period"):
        bf.optim.gradient_tracking(0.1, schedule)
    bf.optim.atc(0.1, schedule)  # dsgd/atc accept any topology


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_optim_step_validates_step_grads_and_state(name: str) -> None:
    opt = ALGORITHMS[name]()
    params = tree(0)
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"step must be an int >= 0, got -1"):
        opt.step(params, tree(1), state, -1)
    with pytest.raises(TypeError, match=r"step must be an int >= 0, got float 1.5"):
        opt.step(params, tree(1), state, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"grads must have the structure of params"):
        opt.step(params, {"w": params["w"]}, state, 0)
    with pytest.raises(TypeError, match=r"state must be a \w+State"):
        opt.step(params, tree(1), (), 0)
    with pytest.raises(TypeError, match=rf"{name}: params leaf at \['w'\]\[0\] must be a torch.Tensor or None, got float"):
        opt.init({"w": [1.0]})


@pytest.mark.parametrize("name", ["dsgd", "atc", "gradient_tracking", "exact_diffusion"])
def test_optim_step_checks_topology_size_against_world(name: str) -> None:
    opt = getattr(bf.optim, name)(0.1, T.ring(N + 2))
    x = torch.ones(2)
    with pytest.raises(ValueError, match=rf"{name}: topology has {N + 2} agents but the current world has {N}"):
        opt.step(x, x, opt.init(x), 0)


def test_optim_schedule_value_checked_at_step() -> None:
    opt = bf.optim.sgd(lambda k: -1.0)
    x = torch.ones(2)
    with pytest.raises(ValueError, match=r"sgd: the learning-rate schedule returned -1.0 at step 3"):
        opt.step(x, x, opt.init(x), 3)


def test_decentralized_optimizer_validates_arguments() -> None:
    model = torch.nn.Linear(2, 1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer, got Transformation"):
        bf.optim.DecentralizedOptimizer(bf.optim.sgd(0.1), model, T.ring(N))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module, got dict"):
        bf.optim.DecentralizedOptimizer(sgd, {}, T.ring(N))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="style must be one of 'atc', 'awc', 'gradient_allreduce', 'allreduce', 'push_sum', 'win_put', 'pull_get', 'hierarchical', got 'push'"):
        bf.optim.DecentralizedOptimizer(sgd, model, T.ring(N), style="push")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="communicate_every must be an int >= 1, got 0"):
        bf.optim.DecentralizedOptimizer(sgd, model, T.ring(N), communicate_every=0)
    with pytest.raises(TypeError, match=r"topology must be a bf\.topology"):
        bf.optim.DecentralizedOptimizer(sgd, model, [[1.0]])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- purity and state


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_optim_step_does_not_mutate_inputs(name: str) -> None:
    opt = ALGORITHMS[name]()
    params, state = run(opt, 3)
    grads = tree(7)
    saved = copy.deepcopy((params, grads, state))
    new_params, _ = opt.step(params, grads, state, 3)
    for a, b in zip(leaves((params, grads, state)), leaves(saved), strict=True):
        assert torch.equal(a, b), f"{name}.step modified an input"
    assert pytree.tree_structure(new_params) == pytree.tree_structure(params)
    assert new_params["layers"][1][1] is None
    assert not any(a is b for a, b in zip(leaves(new_params), leaves(params), strict=True))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_optim_state_round_trips_through_torch_save(name: str) -> None:
    opt = ALGORITHMS[name]()
    params, state = run(opt, 4)
    buf = io.BytesIO()
    torch.save({"params": params, "state": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf)  # weights_only=True: the state classes are registered as safe
    assert type(loaded["state"]) is type(state)
    assert pytree.tree_structure(loaded["state"]) == pytree.tree_structure(state)
    resumed = run(opt, 3, loaded["params"], loaded["state"], first=4)
    straight = run(opt, 3, params, state, first=4)
    for a, b in zip(leaves(resumed), leaves(straight), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_optim_state_is_a_pytree_of_tensors(name: str) -> None:
    opt = ALGORITHMS[name]()
    _, state = run(opt, 1)
    for leaf in pytree.tree_leaves(state):
        assert leaf is None or isinstance(leaf, torch.Tensor)


@pytest.mark.parametrize("name", ["dsgd", "atc", "gradient_tracking", "exact_diffusion", "allreduce"])
def test_optim_world_of_one_is_the_local_optimizer(name: str) -> None:
    """With one agent W = [1]: every algorithm reduces to its local optimizer."""
    if N != 1:
        pytest.skip("the reduction holds for a world of one")
    local = bf.optim.sgd(0.1, momentum=0.5)
    factory = getattr(bf.optim, name)
    opt = factory(local) if name == "allreduce" else factory(local, T.one_peer_exponential_two(1))
    a, _ = run(opt, 5)
    b, _ = run(local, 5)
    for x, y in zip(leaves(a), leaves(b), strict=True):
        torch.testing.assert_close(x, y, atol=1e-14, rtol=1e-14)


def test_optim_none_gradient_leaves_parameter_unchanged() -> None:
    opt = bf.optim.atc(bf.optim.sgd(0.1, momentum=0.9), T.ring(N))
    params = {"a": torch.ones(2), "b": torch.ones(3)}
    new, _ = opt.step(params, {"a": torch.ones(2), "b": None}, opt.init(params), 0)
    assert torch.equal(new["b"], params["b"])
    torch.testing.assert_close(new["a"], torch.full((2,), 0.9))


def test_optim_keeps_requires_grad_for_autograd_loops() -> None:
    w = torch.ones(3, requires_grad=True)
    opt = bf.optim.gradient_tracking(0.1, T.ring(N))
    state = opt.init(w)
    for k in range(2):
        (g,) = torch.autograd.grad((w**2).sum(), w)
        w, state = opt.step(w, g, state, k)
        assert w.requires_grad and w.grad_fn is None
    assert not any(t.requires_grad for t in leaves(state))


# --------------------------------------------------------------------------- local optimizers vs torch.optim


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}, {"momentum": 0.5, "weight_decay": 0.1}],
    ids=["plain", "momentum", "nesterov", "weight_decay"],
)
def test_sgd_matches_torch_optim_sgd(kwargs: dict[str, Any]) -> None:
    _compare_with_torch(bf.optim.sgd(0.05, **kwargs), lambda p: torch.optim.SGD(p, lr=0.05, **kwargs))


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-6}], ids=["plain", "wd"])
def test_adam_matches_torch_optim_adam(kwargs: dict[str, Any]) -> None:
    _compare_with_torch(bf.optim.adam(0.05, **kwargs), lambda p: torch.optim.Adam(p, lr=0.05, **kwargs))


def _compare_with_torch(
    opt: bf.optim.Transformation, make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
) -> None:
    params = tree(0)
    torch_params = [torch.nn.Parameter(t.clone()) for t in leaves(params)]
    torch_opt = make(torch_params)
    state = opt.init(params)
    for k in range(20):
        grads = tree(50 + k)
        params, state = opt.step(params, grads, state, k)
        for p, g in zip(torch_params, leaves(grads), strict=True):
            p.grad = g.clone()
        torch_opt.step()
    for a, p in zip(leaves(params), torch_params, strict=True):
        torch.testing.assert_close(a, p.detach(), atol=1e-13, rtol=1e-12)


def test_sgd_learning_rate_schedule_is_read_per_step() -> None:
    schedule = bf.optim.exponential_decay(0.5, 0.5)
    opt = bf.optim.sgd(schedule)
    x = torch.zeros(1, dtype=torch.float64)
    state = opt.init(x)
    for k in range(4):
        x, state = opt.step(x, torch.ones(1, dtype=torch.float64), state, k)
    assert x.item() == pytest.approx(-(0.5 + 0.25 + 0.125 + 0.0625))


def test_schedules_values() -> None:
    cos = bf.optim.cosine_decay_schedule(2.0, 4, alpha=0.5)
    assert cos(0) == 2.0 and cos(4) == pytest.approx(1.0) and cos(100) == pytest.approx(1.0)
    assert cos(2) == pytest.approx(1.5)
    assert bf.optim.constant_schedule(0.3)(10**6) == 0.3
