"""``DecentralizedOptimizer`` on real ``nn.Module``s, every style, against dense all-agent references.

Every rank computes the whole network's trajectory in float64 (N copies of the parameters,
the style's mixing matrix applied densely) and compares its own row with what the wrapper
produced.  Also: overlap on = overlap off bit for bit, frozen and reused parameters, the
per-step weight knobs, and a state_dict round trip mid-run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import bluefog_fn as bf
from bluefog_fn import topology as T

from .conftest import all_ranks_agree, assert_close_everywhere

N = bf.size()
ME = bf.rank()
M, L = bf.machine_size(), bf.local_size()
LR = 0.05
STYLES = ["atc", "awc", "gradient_allreduce", "allreduce", "push_sum", "win_put", "pull_get", "hierarchical"]
pytestmark = pytest.mark.timeout(120)


class Net(nn.Module):
    """A small MLP; ``kind`` adds a frozen layer or a layer used twice in the forward pass, or
    (``"reordered"``) registers the layers last-used first, so that backward produces the
    gradients in bucket order instead of against it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "reordered":
            self.out = nn.Linear(4, 1)
            self.mid = nn.Linear(4, 4)
            self.inp = nn.Linear(3, 4)
        else:
            self.inp = nn.Linear(3, 4)
            self.mid = nn.Linear(4, 4)
            self.out = nn.Linear(4, 1)
        if kind == "frozen":
            self.inp.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.mid(h))
        if self.kind == "reused":
            h = torch.tanh(self.mid(h))  # the same weights twice: one hook, after accumulation
        return self.out(h)


def _net(kind: str) -> Net:
    torch.manual_seed(7)
    return Net(kind).double()


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + rank)
    return torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 1, generator=g, dtype=torch.float64)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _loss(model: nn.Module, params: dict[str, torch.Tensor], rank: int) -> torch.Tensor:
    a, b = _data(rank)
    out: torch.Tensor = ((torch.func.functional_call(model, params, (a,)) - b) ** 2).sum()
    return out


def _topology(style: str) -> Any:
    return T.ring(M) if style == "hierarchical" else T.one_peer_exponential_two(N)


def _world_matrix(style: str, topo: Any, rnd: int) -> torch.Tensor:
    if style == "hierarchical":
        wm = topo.at(rnd).mixing_matrix().double()
        return torch.kron(wm, torch.full((L, L), 1.0 / L, dtype=torch.float64))
    if style in ("gradient_allreduce", "allreduce"):
        return torch.full((N, N), 1.0 / N, dtype=torch.float64)
    return topo.at(rnd).mixing_matrix().double()


def _push_matrix(topo: Any, rnd: int) -> torch.Tensor:
    """Column-stochastic push-sum shares: a_ji = 1/(d_i + 1) for j in out(i) ∪ {i}."""
    g = topo.at(rnd)
    a = torch.zeros(N, N, dtype=torch.float64)
    for i in range(N):
        outs = g.out_neighbors(i)
        for j in (i, *outs):
            a[j, i] = 1.0 / (len(outs) + 1)
    return a


def _mix(w: torch.Tensor, xs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    return [{k: sum(w[i, j] * xs[j][k] for j in range(N)) for k in xs[0]} for i in range(N)]  # type: ignore[misc]


def _reference(
    style: str, kind: str, steps: int, every: int, skip: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """This rank's parameters after ``steps`` plain-SGD steps of ``style``, from all agents densely.

    ``skip=(k, r)``: rank ``r`` ran no backward at iteration ``k`` (its gradients were ``None``,
    which the wrapper and plain SGD treat as zeros).
    """
    model = _net(kind)
    topo = _topology(style)
    xs = [_trainable(model) for _ in range(N)]
    us = [dict(x) for x in xs]
    ws = torch.ones(N, dtype=torch.float64)
    for k in range(steps):
        gs = [torch.func.grad(lambda p, r=r: _loss(model, p, r))(xs[r]) for r in range(N)]
        if skip is not None and skip[0] == k:
            gs[skip[1]] = {n: torch.zeros_like(g) for n, g in gs[skip[1]].items()}
        comm = (k + 1) % every == 0
        rnd = k // every
        if style == "push_sum":
            us = [{n: us[r][n] - LR * gs[r][n] for n in us[r]} for r in range(N)]
            if comm:
                a = _push_matrix(topo, rnd)
                us, ws = _mix(a, us), a @ ws
            xs = [{n: us[r][n] / ws[r] for n in us[r]} for r in range(N)]
            continue
        if not comm:
            xs = [{n: xs[r][n] - LR * gs[r][n] for n in xs[r]} for r in range(N)]
            continue
        w = _world_matrix(style, topo, rnd)
        if style == "awc":
            mixed = _mix(w, xs)
            xs = [{n: mixed[r][n] - LR * gs[r][n] for n in xs[r]} for r in range(N)]
        elif style == "gradient_allreduce":
            gm = _mix(w, gs)
            xs = [{n: xs[r][n] - LR * gm[r][n] for n in xs[r]} for r in range(N)]
        else:
            xs = _mix(w, [{n: xs[r][n] - LR * gs[r][n] for n in xs[r]} for r in range(N)])
    return xs[ME]


def _train(
    style: str,
    kind: str,
    steps: int,
    *,
    every: int = 1,
    overlap: bool = True,
    cap_mb: float = 25.0,
    knobs: Callable[[bf.optim.DecentralizedOptimizer], None] | None = None,
    skip: tuple[int, int] | None = None,
) -> tuple[Net, bf.optim.DecentralizedOptimizer]:
    model = _net(kind)
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), model, _topology(style), style=style,  # type: ignore[arg-type]
        communicate_every=every, overlap=overlap, bucket_cap_mb=cap_mb,
    )
    if knobs is not None:
        knobs(opt)
    a, b = _data(ME)
    for k in range(steps):
        opt.zero_grad()
        if skip != (k, ME):
            ((model(a) - b) ** 2).sum().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", ["plain", "frozen", "reused", "reordered"])
@pytest.mark.parametrize("style", STYLES)
def test_every_style_matches_the_dense_reference(style: str, kind: str) -> None:
    model, opt = _train(style, kind, 5, cap_mb=1e-6)  # tiny buckets: one parameter each
    ref = _reference(style, kind, 5, 1)
    got = _trainable(model)
    assert set(got) == set(ref)
    for name in ref:
        assert_close_everywhere(got[name], ref[name], f"{style}/{kind}: {name}", atol=1e-11, rtol=1e-11)
    if kind == "frozen":
        all_ranks_agree(torch.equal(model.inp.weight, _net(kind).inp.weight), f"{style}: a frozen parameter moved")
    opt.free()


@pytest.mark.parametrize("style", STYLES)
def test_local_steps_between_communications(style: str) -> None:
    model, opt = _train(style, "plain", 5, every=2)
    ref = _reference(style, "plain", 5, 2)
    for name, p in _trainable(model).items():
        assert_close_everywhere(p, ref[name], f"{style} communicate_every=2: {name}", atol=1e-11, rtol=1e-11)
    opt.free()


@pytest.mark.parametrize("kind", ["plain", "reused"])
@pytest.mark.parametrize("cap_mb", [1e-6, 25.0])
@pytest.mark.parametrize("style", STYLES)
def test_overlap_on_equals_overlap_off_bit_for_bit(style: str, cap_mb: float, kind: str) -> None:
    on, opt_on = _train(style, kind, 4, overlap=True, cap_mb=cap_mb)
    off, opt_off = _train(style, kind, 4, overlap=False, cap_mb=cap_mb)
    same = all(torch.equal(p, q) for p, q in zip(on.parameters(), off.parameters(), strict=True))
    all_ranks_agree(same, f"{style}: overlap on and off differ")
    opt_on.free()
    opt_off.free()


@pytest.mark.skipif(N < 2, reason="needs a rank that skips while another runs backward")
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("kind", ["plain", "reordered"])
@pytest.mark.parametrize("style", STYLES)
def test_a_rank_without_backward_contributes_zero_gradients_and_nobody_hangs(
    style: str, kind: str, overlap: bool
) -> None:
    """Rank 1 calls ``step()`` at iteration 2 without ``backward()`` (its gradients are ``None``).

    With overlap the other ranks start their bucket exchanges from the gradient hooks while
    rank 1 starts them in ``step()``; the ops must still pair up bucket by bucket (also when
    backward produces the gradients in another order than the buckets', ``"reordered"``), and
    rank 1 takes part with zeros, as the docs say for a parameter without gradient.
    """
    skip = (2, 1)
    model, opt = _train(style, kind, 4, overlap=overlap, cap_mb=1e-6, skip=skip)
    ref = _reference(style, kind, 4, 1, skip=skip)
    for name, p in _trainable(model).items():
        assert_close_everywhere(p, ref[name], f"{style}/{kind} overlap={overlap}: {name}", atol=1e-11, rtol=1e-11)
    opt.free()


def _in_weights(opt: bf.optim.DecentralizedOptimizer) -> None:
    ins = T.one_peer_exponential_two(N).at(0).in_neighbors(ME)
    opt.self_weight = 0.7
    opt.src_weights = {j: 0.3 / len(ins) for j in ins}


@pytest.mark.skipif(N < 2, reason="needs neighbours")
@pytest.mark.parametrize("style", ["atc", "win_put", "pull_get"])
def test_self_and_src_weight_knobs_are_used(style: str) -> None:
    """A fixed (graph-0) reweighting applied at every step: x ← W' L(x)."""
    model, opt = _train(style, "plain", 1, knobs=_in_weights)
    topo = T.one_peer_exponential_two(N)
    w = torch.zeros(N, N, dtype=torch.float64)
    for r in range(N):
        ins = topo.at(0).in_neighbors(r)
        w[r, r] = 0.7
        for j in ins:
            w[r, j] = 0.3 / len(ins)
    net = _net("plain")
    xs = [_trainable(net) for _ in range(N)]
    gs = [torch.func.grad(lambda p, r=r: _loss(net, p, r))(xs[r]) for r in range(N)]
    ref = _mix(w, [{n: xs[r][n] - LR * gs[r][n] for n in xs[r]} for r in range(N)])[ME]
    for name, p in _trainable(model).items():
        assert_close_everywhere(p, ref[name], f"{style} knobs: {name}", atol=1e-11, rtol=1e-11)
    opt.free()


@pytest.mark.parametrize("style", STYLES)
def test_state_dict_round_trip_mid_run_gives_the_same_trajectory(style: str) -> None:
    full, opt_full = _train(style, "plain", 6)
    model, opt = _train(style, "plain", 3)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt-{rank}.pt")
        bf.checkpoint.save(path, {"model": model.state_dict(), "opt": opt.state_dict()})
        opt.free()
        saved = bf.checkpoint.load(path)
    fresh = _net("plain")
    fresh.load_state_dict(saved["model"])
    resumed = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(fresh.parameters(), lr=LR), fresh, _topology(style), style=style  # type: ignore[arg-type]
    )
    resumed.load_state_dict(saved["opt"])
    a, b = _data(ME)
    for _ in range(3):
        resumed.zero_grad()
        ((fresh(a) - b) ** 2).sum().backward()
        resumed.step()
    same = all(torch.equal(p, q) for p, q in zip(full.parameters(), fresh.parameters(), strict=True))
    all_ranks_agree(same and resumed.steps == 6, f"{style}: resumed trajectory differs")
    opt_full.free()
    resumed.free()


def test_atc_parameters_whose_storage_is_replaced_mid_run_follow_the_same_trajectory() -> None:
    # atc keeps the parameters in its own buffers and re-points them every step; a user who
    # replaces a parameter's storage in between (p.data = ...) or loads a state dict into the
    # module must get the same iterates, and free() must hand back parameters in private memory.
    full, opt_full = _train("atc", "plain", 6)
    model = _net("plain")
    opt = bf.optim.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), model, _topology("atc"), style="atc")
    a, b = _data(ME)
    for k in range(6):
        if k == 2:
            first = next(model.parameters())
            first.data = first.data.clone()
        if k == 4:
            model.load_state_dict({n: t.clone() for n, t in model.state_dict().items()})
        opt.zero_grad()
        ((model(a) - b) ** 2).sum().backward()
        opt.step()
    same = all(torch.equal(p, q) for p, q in zip(full.parameters(), model.parameters(), strict=True))
    # After free() nothing views the optimizer's buffers: a later step of the old optimizer would
    # have to use fresh memory, and the values are those of the trajectory.
    pointers = [p.data_ptr() for p in model.parameters()]
    opt.free()
    moved = all(p.data_ptr() != q for p, q in zip(model.parameters(), pointers, strict=True))
    kept = all(torch.equal(p, q) for p, q in zip(full.parameters(), model.parameters(), strict=True))
    all_ranks_agree(same and moved and kept, f"atc with replaced storage: same {same}, moved out {moved}, kept {kept}")
    opt_full.free()


# ---------------------------------------------------------------------------- no_sync()

HOOKED = ["awc", "gradient_allreduce"]


def _micro_loss(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = ((model(a) - b) ** 2).sum()
    return out


def _train_micro(
    style: str, kind: str, steps: int, batches: list[tuple[torch.Tensor, torch.Tensor]], *, summed: bool,
    overlap: bool,
) -> tuple[Net, bf.optim.DecentralizedOptimizer]:
    """``steps`` steps over the micro-batches ``batches``: all but the last backward inside
    ``no_sync()``, or (``summed``) one backward over the sum of their losses."""
    model = _net(kind)
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), model, _topology(style), style=style,  # type: ignore[arg-type]
        overlap=overlap, bucket_cap_mb=1e-6,  # one parameter per bucket: a hook per exchange
    )
    for _ in range(steps):
        opt.zero_grad()
        if summed:
            sum(_micro_loss(model, a, b) for a, b in batches).backward()  # type: ignore[union-attr]
        else:
            with opt.no_sync():
                for a, b in batches[:-1]:
                    _micro_loss(model, a, b).backward()
            _micro_loss(model, *batches[-1]).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("kind", ["plain", "reordered"])
@pytest.mark.parametrize("style", STYLES)
def test_no_sync_micro_batches_equal_one_backward_over_the_summed_loss_bit_for_bit(
    style: str, kind: str, overlap: bool
) -> None:
    """k = 3: two backwards inside ``no_sync()``, one outside, ``step()``; 3 steps.

    The micro-batch is this rank's batch three times: autograd adds the micro-batch gradients
    in the order the backwards ran, one backward over the summed loss in an order of its own,
    and only equal summands give the same bits in every order.  (Distinct micro-batches are
    checked against the dense reference in the next test.)
    """
    batch = _data(ME)
    acc, opt_acc = _train_micro(style, kind, 3, [batch] * 3, summed=False, overlap=overlap)
    ref, opt_ref = _train_micro(style, kind, 3, [batch] * 3, summed=True, overlap=overlap)
    same = all(torch.equal(p, q) for p, q in zip(acc.parameters(), ref.parameters(), strict=True))
    all_ranks_agree(same, f"{style}/{kind} overlap={overlap}: no_sync() differs from the summed loss")
    opt_acc.free()
    opt_ref.free()


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("style", STYLES)
def test_no_sync_over_a_split_batch_matches_the_dense_reference(style: str, overlap: bool) -> None:
    """This rank's 5 rows in micro-batches of 2, 2 and 1: the summed loss is the batch's loss."""
    a, b = _data(ME)
    batches = [(a[:2], b[:2]), (a[2:4], b[2:4]), (a[4:], b[4:])]
    model, opt = _train_micro(style, "plain", 4, batches, summed=False, overlap=overlap)
    ref = _reference(style, "plain", 4, 1)
    for name, p in _trainable(model).items():
        assert_close_everywhere(p, ref[name], f"{style} overlap={overlap} no_sync: {name}", atol=1e-11, rtol=1e-11)
    opt.free()


@pytest.mark.skipif(N < 2, reason="needs ranks that disagree")
@pytest.mark.parametrize("agreed_first", [False, True])
@pytest.mark.parametrize("style", HOOKED)
def test_ranks_disagreeing_about_no_sync_all_raise_a_mismatch_error(style: str, agreed_first: bool) -> None:
    """Rank 1 runs its three backwards outside ``no_sync()``, the others two inside.

    With overlap rank 1 sends every micro-batch and the others only the sum, so rank 1's first
    exchange meets the others' only one.  Every rank must raise ``bf.MismatchError`` (on a
    fully connected graph every rank hears a rank that disagrees), none may hang or take
    mismatched averages silently.  One bucket: each rank waits for the one exchange it
    shares with the others, so the world is left consistent for the next test.
    ``agreed_first``: a step on which every rank agreed comes first.
    """
    model = _net("plain")
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=LR), model, T.fully_connected(N), style=style,  # type: ignore[arg-type]
    )
    a, b = _data(ME)

    def micro_step(inside: bool) -> None:
        opt.zero_grad()
        with opt.no_sync() if inside else contextlib.nullcontext():
            _micro_loss(model, a, b).backward()
            _micro_loss(model, a, b).backward()
        _micro_loss(model, a, b).backward()
        opt.step()

    if agreed_first:
        micro_step(True)
    error = None
    try:
        micro_step(ME != 1)
    except bf.MismatchError as exc:
        error = str(exc)
    ok = error is not None and "ranks disagree about no_sync()" in error
    if not ok:
        print(f"rank {ME}: {style}: {error!r}")
    all_ranks_agree(ok, f"{style}: a rank did not raise MismatchError")
    opt.free()


@pytest.mark.skipif(N < 2, reason="needs neighbours")
@pytest.mark.parametrize("style", ["win_put", "pull_get", "push_sum"])
def test_without_barriers_ranks_step_on_their_own(style: str) -> None:
    """``force_barrier=False``: a step waits for no rank, so ranks may even make different numbers
    of steps.  With ``lr=0`` every parameter stays a convex combination of the ranks' initial
    values ``r + 1`` (a slot read before its sender's first put, if it held zeros, would break
    that), and for win_put and pull_get mixing happened whatever the timing: the slots start with
    the neighbours' values (win_put) and a get reads them (pull_get), so no rank keeps its own
    value.  (A push-sum rank may collect before any push arrived: it may keep its value.)"""
    model = _net("plain")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(ME + 1.0)
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), model, _topology(style), style=style,  # type: ignore[arg-type]
    )
    opt.force_barrier = False
    a, b = _data(ME)
    for _ in range(3 + 2 * ME):  # a different number of steps on every rank
        opt.zero_grad()
        ((model(a) - b) ** 2).sum().backward()
        opt.step()
    opt.free()  # collective: the ranks meet here, bounded by the timeout
    values = torch.cat([p.detach().reshape(-1) for p in _trainable(model).values()])
    inside = bool(((values >= 1.0 - 1e-12) & (values <= N + 1e-12)).all())
    all_ranks_agree(inside, f"{style}: a value left the hull [1, {N}]: {values.min():.4f}..{values.max():.4f}")
    mixed = style == "push_sum" or not bool((values == ME + 1.0).all())
    all_ranks_agree(mixed, f"{style}: rank {ME} kept its own value: no mixing")
    all_ranks_agree(opt.steps == 3 + 2 * ME, "each rank counted its own steps")
