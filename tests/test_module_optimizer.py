"""``DecentralizedOptimizer`` in a world of one: buckets, hooks and argument checks.

The multi-rank arithmetic is tested against dense references in tests/mpi/test_module_optimizer.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.optim.buckets import form_buckets

STYLES = ["atc", "awc", "gradient_allreduce", "allreduce", "push_sum", "win_put", "pull_get", "hierarchical"]


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()


def test_buckets_are_reverse_order_and_capped() -> None:
    params = [torch.zeros(4, dtype=torch.float64) for _ in range(5)]  # 32 bytes each
    assert form_buckets(params, 64) == [[4, 3], [2, 1], [0]]
    assert form_buckets(params, 1) == [[4], [3], [2], [1], [0]]
    assert form_buckets(params, 10**9) == [[4, 3, 2, 1, 0]]
    assert form_buckets([], 64) == []


def test_bucket_names_skip_frozen_parameters() -> None:
    model = _model()
    model[0].requires_grad_(False)
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, T.ring(1), bucket_cap_mb=1e-6
    )
    assert opt.buckets == [["4.bias"], ["4.weight"], ["2.bias"], ["2.weight"]]


@pytest.mark.parametrize("style", ["awc", "gradient_allreduce"])
def test_exchanges_start_during_backward_with_overlap(style: str) -> None:
    model = _model()
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, T.ring(1), style=style, bucket_cap_mb=1e-6  # type: ignore[arg-type]
    )
    hooks = opt._hooks
    assert hooks is not None
    model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    assert hooks.in_flight() == len(opt.buckets) == 6
    opt.step()
    assert hooks.in_flight() == 0
    off = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, T.ring(1), style=style, overlap=False  # type: ignore[arg-type]
    )
    assert off._hooks is None


def _recording_starts(model: nn.Module, style: str) -> tuple[bf.optim.DecentralizedOptimizer, list[int]]:
    """A one-parameter-per-bucket optimizer whose hooks record which bucket they start, in order."""
    started: list[int] = []
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, T.ring(1), style=style, bucket_cap_mb=1e-6  # type: ignore[arg-type]
    )
    inner = opt._start_hooked

    def spy(b: int) -> bf.Handle[object]:
        started.append(b)
        return inner(b)

    assert opt._hooks is not None
    opt._hooks.start = spy
    return opt, started


def test_a_reused_parameter_starts_its_bucket_once() -> None:
    lin = nn.Linear(2, 2).double()
    model = nn.Sequential(lin, lin)
    opt, started = _recording_starts(model, "gradient_allreduce")
    model(torch.ones(1, 2, dtype=torch.float64)).sum().backward()
    assert sorted(started) == [0, 1]
    opt.step()


class _LastUsedFirst(nn.Module):
    """Registers its layers in the reverse of their use: backward fires hooks against bucket order."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Linear(4, 1)
        self.inp = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(torch.tanh(self.inp(x)))
        return out


@pytest.mark.parametrize("style", ["awc", "gradient_allreduce"])
def test_hooks_start_the_exchanges_in_bucket_order(style: str) -> None:
    model = _LastUsedFirst().double()
    opt, started = _recording_starts(model, style)
    assert opt.buckets == [["inp.bias"], ["inp.weight"], ["out.bias"], ["out.weight"]]
    for _ in range(2):
        started.clear()
        opt.zero_grad()
        model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
        assert started == [0, 1, 2, 3]  # all from hooks, the last of them once inp's gradients came
        opt.step()
    started.clear()
    opt.zero_grad()
    opt.step()  # no backward: step() starts them, in the same order
    assert started == [0, 1, 2, 3]


@pytest.mark.parametrize("style", STYLES)
def test_world_of_one_is_the_local_optimizer(style: str) -> None:
    a, b = _model(), _model()
    opt = bf.optim.DecentralizedOptimizer(
        torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9), a, T.ring(1), style=style  # type: ignore[arg-type]
    )
    plain = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    x = torch.linspace(0, 1, 6, dtype=torch.float64).reshape(2, 3)
    for _ in range(3):
        for m, o in ((a, opt), (b, plain)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-14, rtol=1e-14)
    opt.free()


def test_bad_arguments_name_the_function_and_value() -> None:
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="DecentralizedOptimizer: overlap must be a bool, got str 'yes'"):
        bf.optim.DecentralizedOptimizer(sgd, model, T.ring(1), overlap="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DecentralizedOptimizer: bucket_cap_mb must be > 0, got 0"):
        bf.optim.DecentralizedOptimizer(sgd, model, T.ring(1), bucket_cap_mb=0)
    with pytest.raises(ValueError, match=r"DecentralizedOptimizer: topology has 2 nodes but bf.size\(\) is 1"):
        bf.optim.DecentralizedOptimizer(sgd, model, T.ring(2))
    opt = bf.optim.DecentralizedOptimizer(sgd, model, T.ring(1), style="push_sum")
    with pytest.raises(ValueError, match="load_state_dict: state must be a dict from state_dict"):
        opt.load_state_dict({"optimizer": sgd.state_dict(), "steps": 0})
    opt.free()
    ga = bf.optim.DecentralizedOptimizer(sgd, model, T.ring(1), style="gradient_allreduce")
    with pytest.raises(ValueError, match="pass no closure"):
        ga.step(lambda: 0.0)


def test_inside_simulate_is_refused() -> None:
    model = _model()
    with bf.simulate(2), pytest.raises(TypeError, match=r"DecentralizedOptimizer: nn\.Module"):
        bf.optim.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, T.ring(2))


def test_atc_parameters_stay_usable_after_shutdown_and_their_values_are_kept() -> None:
    # atc keeps the parameters in buffers the world owns (shared memory under MPI); closing the
    # world moves them into private memory first, so the module outlives bf.shutdown().
    model = _model()
    opt = bf.optim.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, T.ring(1))
    for _ in range(3):
        opt.zero_grad()
        model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
        opt.step()
    values = [p.detach().clone() for p in model.parameters()]
    pointers = [p.data_ptr() for p in model.parameters()]
    bf.shutdown()
    assert all(p.data_ptr() != q for p, q in zip(model.parameters(), pointers, strict=True))
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values, strict=True))
    # The next op starts a new world; a new optimizer over the same module works there.
    opt = bf.optim.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, T.ring(1))
    opt.zero_grad()
    model(torch.ones(2, 3, dtype=torch.float64)).sum().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------- no_sync()

HOOKED = ["awc", "gradient_allreduce"]


def _micro_batches(distinct: bool) -> list[torch.Tensor]:
    """Three micro-batches: distinct, or one batch three times (see the bit-for-bit test)."""
    g = torch.Generator().manual_seed(3)
    if not distinct:
        x = torch.randn(2, 3, generator=g, dtype=torch.float64)
        return [x, x, x]
    return [torch.randn(2, 3, generator=g, dtype=torch.float64) for _ in range(3)]


def _micro_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = model(x).pow(2).sum()
    return out


@pytest.mark.parametrize("style", HOOKED)
def test_no_sync_backwards_start_no_exchange(style: str) -> None:
    model = _model()
    opt, started = _recording_starts(model, style)
    hooks = opt._hooks
    assert hooks is not None
    xs = _micro_batches(distinct=True)
    for _ in range(2):
        with opt.no_sync():
            for x in xs[:-1]:
                _micro_loss(model, x).backward()
        assert started == [] and hooks.in_flight() == 0
        _micro_loss(model, xs[-1]).backward()  # the first backward outside sends the sum
        assert started == list(range(6)) and hooks.in_flight() == 6
        opt.step()
        assert hooks.in_flight() == 0
        started.clear()
        opt.zero_grad()
    opt.free()


@pytest.mark.parametrize("style", HOOKED)
def test_step_inside_no_sync_still_communicates(style: str) -> None:
    model = _model()
    opt, started = _recording_starts(model, style)
    with opt.no_sync():
        for x in _micro_batches(distinct=True):
            _micro_loss(model, x).backward()
        assert started == []
        opt.step()  # step() is where every exchange completes: it starts what backward did not
        assert started == list(range(6))
        started.clear()
        opt.zero_grad()
        _micro_loss(model, torch.ones(2, 3, dtype=torch.float64)).backward()
        assert started == []  # still inside: the next step's backwards do not send either
    opt.step()
    assert started == list(range(6)) and opt.steps == 2
    opt.free()


@pytest.mark.parametrize("style", HOOKED)
def test_no_sync_nests_and_is_left_cleanly_by_an_exception(style: str) -> None:
    model = _model()
    opt, started = _recording_starts(model, style)
    x = torch.ones(2, 3, dtype=torch.float64)
    with opt.no_sync():
        with opt.no_sync():
            _micro_loss(model, x).backward()
        _micro_loss(model, x).backward()  # the outer block still holds
        assert started == []
    with pytest.raises(RuntimeError, match="in the middle of a micro-batch"), opt.no_sync():
        _micro_loss(model, x).backward()
        raise RuntimeError("in the middle of a micro-batch")
    assert started == []
    _micro_loss(model, x).backward()  # outside again: exchanges start from the hooks
    assert started == list(range(6))
    opt.step()
    opt.free()


@pytest.mark.parametrize("style", HOOKED)
def test_backward_inside_no_sync_after_one_outside_leaves_no_gradient_out(style: str) -> None:
    """The exchanges the first backward started carry its gradients only: they are sent again."""
    model, reference = _model(), _model()
    opt, started = _recording_starts(model, style)
    plain = torch.optim.SGD(reference.parameters(), lr=0.1)
    xs = _micro_batches(distinct=False)
    _micro_loss(model, xs[0]).backward()
    assert started == list(range(6))
    with opt.no_sync():
        _micro_loss(model, xs[1]).backward()
    assert opt._hooks is not None and opt._hooks.in_flight() == 0
    opt.step()
    assert started == list(range(6)) * 2
    sum(_micro_loss(reference, x) for x in xs[:2]).backward()  # type: ignore[union-attr]
    plain.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
    opt.free()


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("style", STYLES)
def test_no_sync_micro_batches_equal_one_backward_over_the_summed_loss(style: str, overlap: bool) -> None:
    """Bit for bit with one batch three times: autograd adds the micro-batch gradients in the
    order the backwards ran, one backward over the summed loss in an order of its own, and only
    equal summands make every order give the same bits.  Distinct micro-batches: to rounding."""
    for distinct in (False, True):
        xs = _micro_batches(distinct)
        models, opts = [], []
        for _ in range(2):
            m = _model()
            models.append(m)
            opts.append(bf.optim.DecentralizedOptimizer(
                torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), m, T.ring(1),
                style=style, overlap=overlap, bucket_cap_mb=1e-6,  # type: ignore[arg-type]
            ))
        (accumulated, summed), (opt_acc, opt_sum) = models, opts
        for _ in range(3):
            opt_acc.zero_grad()
            with opt_acc.no_sync():
                for x in xs[:-1]:
                    _micro_loss(accumulated, x).backward()
            _micro_loss(accumulated, xs[-1]).backward()
            opt_acc.step()
            opt_sum.zero_grad()
            sum(_micro_loss(summed, x) for x in xs).backward()  # type: ignore[union-attr]
            opt_sum.step()
        for p, q in zip(accumulated.parameters(), summed.parameters(), strict=True):
            if distinct:
                torch.testing.assert_close(p, q, atol=1e-13, rtol=1e-13)
            else:
                assert torch.equal(p, q), f"{style}: no_sync() differs from the summed loss"
        for o in opts:
            o.free()
