"""Decentralized optimization algorithms as :class:`~bluefog_fn.optim.Transformation` s.

Each factory takes a local optimizer (a :class:`Transformation` such as :func:`sgd` or
:func:`adam`, or just a learning rate, meaning ``sgd(lr)``) and a topology, and returns a
transformation whose ``step`` performs one iteration on *this* agent: the local update plus the
neighbour averaging.  Notation, for agent ``i`` at iteration ``k``:

* ``x_i`` its parameters, ``g_i(x)`` its (stochastic) gradient;
* ``W`` the mixing matrix of ``topology.at(k)`` (``w_ij`` weight ``i`` puts on ``j``);
  ``(W x)_i = Σ_j w_ij x_j`` is one :func:`bluefog_fn.neighbor_mean`;
* ``L_i(x, d)`` the local optimizer's step from ``x`` along direction ``d`` — for plain SGD
  ``L_i(x, d) = x − γ d``, and every formula below is written for that case.

The algorithms are written only in terms of ``bf`` ops and elementwise tensor arithmetic, with
no branch on rank or data, so the same code runs under MPI (one agent per process) and inside
``bf.simulate(n)`` (every leaf carries a leading agent dimension, the ops mix across it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from ..ops import Handle, global_mean, global_mean_async, neighbor_mean, neighbor_mean_async
from .base import (
    AnyTopology,
    Grads,
    OptState,
    Params,
    ScalarOrSchedule,
    Transformation,
    check_grad_shapes,
    check_grads,
    check_lr,
    check_positive_int,
    check_state,
    check_step,
    check_topology,
    check_world,
    fail,
    finish_tree,
    flatten_like,
    flatten_params,
    graphs_of,
    tree_add,
    tree_clone,
    tree_scale,
    tree_sub,
    tree_zeros_like,
)
from .local import sgd


class AwcState(NamedTuple):
    """State of :func:`awc` / :func:`dsgd`: the local optimizer's state."""

    inner: Any


class AtcState(NamedTuple):
    """State of :func:`atc`: the local optimizer's state."""

    inner: Any


class AllreduceState(NamedTuple):
    """State of :func:`allreduce`: the local optimizer's state."""

    inner: Any


class GradientTrackingState(NamedTuple):
    """State of :func:`gradient_tracking`.

    Attributes:
        inner: the local optimizer's state.
        tracker: ``y_{k−1}``, the running estimate of the network-average gradient (zeros at init).
        prev_grads: ``g_{k−1}``, the gradient of the previous step (zeros at init).
    """

    inner: Any
    tracker: Any
    prev_grads: Any


class ExactDiffusionState(NamedTuple):
    """State of :func:`exact_diffusion`.

    Attributes:
        inner: the local optimizer's state.
        psi: ``ψ_k``, the previous adapted iterate (``x_0`` at init).
    """

    inner: Any
    psi: Any


# --------------------------------------------------------------------------- shared pieces


def _local(fn: str, optimizer: object) -> Transformation:
    """The local optimizer: a Transformation, or a learning rate meaning ``sgd(lr)``."""
    if isinstance(optimizer, Transformation):
        return optimizer
    if callable(optimizer) or (isinstance(optimizer, (int, float)) and not isinstance(optimizer, bool)):
        return sgd(check_lr(fn, optimizer, "optimizer (a learning rate)"))
    raise TypeError(
        f"{fn}: optimizer must be a bf.optim Transformation (e.g. bf.optim.sgd(0.1)) or a learning "
        f"rate, got {type(optimizer).__name__} {optimizer!r:.60}"
    )


def _check_doubly_stochastic(fn: str, topology: AnyTopology) -> None:
    for k, graph in enumerate(graphs_of(topology)):
        if not graph.is_doubly_stochastic(1e-9):
            where = "" if graph is topology else f" (graph {k} of the period)"
            raise fail(
                fn,
                f"topology must be doubly stochastic (rows and columns of W sum to 1) for the "
                f"algorithm to reach the exact optimum, got {topology!r}{where}",
            )


def _ready(tree: Any) -> Handle[Any]:
    return Handle(lambda: tree)


@dataclass(frozen=True)
class Mixing:
    """Which averaging iteration ``k`` does: none, neighbours (``W``), or global (``11ᵀ/n``).

    Iteration ``k`` communicates when ``(k + 1)`` is a multiple of ``communicate_every``; it
    averages globally instead when ``(k + 1)`` is a multiple of ``global_every``.  A dynamic
    topology advances once per communication round, ``topology.at(k // communicate_every)``,
    so local steps do not skip graphs of its period.
    """

    topology: AnyTopology
    communicate_every: int = 1
    global_every: int | None = None
    fn: str = "bf.optim"

    @staticmethod
    def checked(fn: str, topology: object, communicate_every: object, global_every: object) -> Mixing:
        topo = check_topology(fn, topology)
        every = check_positive_int(fn, "communicate_every", communicate_every)
        glob = None if global_every is None else check_positive_int(fn, "global_every", global_every)
        return Mixing(topo, every, glob, fn)

    def start(self, tree: Any, step: int) -> Handle[Any]:
        """Start averaging ``tree`` for iteration ``step``; the handle's ``wait()`` gives ``W x``."""
        # Checked on every step, communicating or not, so a wrong world fails on the first one.
        check_world(self.fn, self.topology)
        if self.global_every is not None and (step + 1) % self.global_every == 0:
            return global_mean_async(tree)
        if (step + 1) % self.communicate_every == 0:
            return neighbor_mean_async(tree, self.topology, step // self.communicate_every)
        return _ready(tree)


def _grads_or_zeros(fn: str, params: Params, grads: Grads) -> tuple[Any, pytree.TreeSpec]:
    """Grads with ``None`` leaves (where params has a tensor) replaced by zeros; and the structure."""
    xs, spec = flatten_params(fn, params)
    gs = flatten_like(fn, "grads", grads, spec)
    check_grad_shapes(fn, xs, gs)
    full = [g if g is not None or x is None else torch.zeros_like(x) for x, g in zip(xs, gs, strict=True)]
    return pytree.tree_unflatten(full, spec), spec


# --------------------------------------------------------------------------- algorithms


def awc(
    optimizer: Transformation | ScalarOrSchedule,
    topology: AnyTopology,
    *,
    communicate_every: int = 1,
    global_every: int | None = None,
) -> Transformation:
    """Adapt-with-combine (decentralized SGD): mix the current iterate, add the local update.

    .. math::

        x_i^{k+1} = \\sum_j w_{ij}\\, x_j^k \\;-\\; γ\\, g_i(x_i^k)
        \\qquad\\big(\\text{generally } \\textstyle\\sum_j w_{ij} x_j^k + L_i(x_i^k, g_i) − x_i^k\\big)

    The exchange of ``x^k`` is started with :func:`bluefog_fn.neighbor_mean_async` *before* the
    local update is computed and waited for after it, so communication overlaps computation.
    With a constant step size the iterates converge to a neighbourhood of the optimum whose
    radius grows with ``γ`` and with the heterogeneity of the agents' objectives (the bias that
    :func:`gradient_tracking` and :func:`exact_diffusion` remove).

    Args:
        optimizer: the local optimizer, or a learning rate (``sgd(lr)``).
        topology: a static or dynamic ``bf.topology`` graph of ``bf.size()`` agents.
        communicate_every: average only every ``k``-th iteration (local steps in between; the
            others use ``W = I``).
        global_every: every ``m``-th iteration average globally (``W = 11ᵀ/n``) instead —
            periodic global averaging (Chen et al., 2021).

    Returns:
        A :class:`Transformation` whose state is :class:`AwcState`.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.awc(0.5, bf.topology.ring(bf.size()))
        >>> x = {"w": torch.ones(2)}
        >>> x, s = opt.step(x, {"w": torch.ones(2)}, opt.init(x), 0)
        >>> x["w"].tolist()
        [0.5, 0.5]

    Reference:
        Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study
        for Decentralized Parallel Stochastic Gradient Descent", NeurIPS 2017;
        Chen et al., "Accelerating Gossip SGD with Periodic Global Averaging", ICML 2021.
    """
    return _awc("awc", optimizer, topology, communicate_every, global_every)


def dsgd(
    optimizer: Transformation | ScalarOrSchedule,
    topology: AnyTopology,
    *,
    communicate_every: int = 1,
    global_every: int | None = None,
) -> Transformation:
    """Decentralized SGD, ``x_i^{k+1} = Σ_j w_ij x_j^k − γ g_i(x_i^k)``: the same as :func:`awc`.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.dsgd(0.5, bf.topology.exponential_two(bf.size()))
        >>> x = torch.zeros(3)
        >>> opt.step(x, torch.ones(3), opt.init(x), 0)[0].tolist()
        [-0.5, -0.5, -0.5]

    Reference:
        Lian et al., NeurIPS 2017 (D-PSGD); Nedić & Ozdaglar, "Distributed Subgradient Methods
        for Multi-Agent Optimization", IEEE TAC 2009.
    """
    return _awc("dsgd", optimizer, topology, communicate_every, global_every)


def _awc(fn: str, optimizer: object, topology: object, communicate_every: object, global_every: object) -> Transformation:
    local = _local(fn, optimizer)
    mixing = Mixing.checked(fn, topology, communicate_every, global_every)

    def init(params: Params) -> OptState:
        flatten_params(fn, params)
        return AwcState(local.init(params))

    def step(params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]:
        step = check_step(fn, step)
        check_state(fn, state, AwcState)
        check_grads(fn, params, grads)
        with torch.no_grad():
            handle = mixing.start(params, step)
            # The local update is computed while the neighbours' iterates travel.
            adapted, inner = local.step(params, grads, state.inner, step)
            delta = tree_sub(adapted, params)
            new = tree_add(handle.wait(), delta)
        return finish_tree(new, params), AwcState(inner)

    return Transformation(init, step)


def atc(
    optimizer: Transformation | ScalarOrSchedule,
    topology: AnyTopology,
    *,
    communicate_every: int = 1,
    global_every: int | None = None,
) -> Transformation:
    """Adapt-then-combine (diffusion): local update first, then average the adapted iterates.

    .. math::

        ψ_i^{k+1} = x_i^k − γ\\, g_i(x_i^k) \\;(= L_i(x_i^k, g_i)), \\qquad
        x_i^{k+1} = \\sum_j w_{ij}\\, ψ_j^{k+1}

    The exchange waits for the local update (no overlap), but the freshest information is
    averaged, which for the same step size is usually more stable than :func:`awc`.  Like
    it, it has an ``O(γ)`` bias under heterogeneous data with a constant step size.

    Args:
        optimizer: the local optimizer, or a learning rate (``sgd(lr)``).
        topology: a static or dynamic ``bf.topology`` graph of ``bf.size()`` agents.
        communicate_every: average only every ``k``-th iteration (local SGD in between).
        global_every: every ``m``-th iteration average globally instead.

    Returns:
        A :class:`Transformation` whose state is :class:`AtcState`.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.atc(bf.optim.sgd(0.1, momentum=0.9), bf.topology.one_peer_exponential_two(bf.size()))
        >>> x = {"w": torch.ones(2)}
        >>> s = opt.init(x)
        >>> for k in range(2):
        ...     x, s = opt.step(x, {"w": torch.ones(2)}, s, k)
        >>> [round(v, 2) for v in x["w"].tolist()]
        [0.71, 0.71]

    Reference:
        Chen & Sayed, "Diffusion Adaptation Strategies for Distributed Optimization and Learning
        over Networks", IEEE TSP 2012; Sayed, "Adaptation, Learning, and Optimization over
        Networks", 2014.
    """
    fn = "atc"
    local = _local(fn, optimizer)
    mixing = Mixing.checked(fn, topology, communicate_every, global_every)

    def init(params: Params) -> OptState:
        flatten_params(fn, params)
        return AtcState(local.init(params))

    def step(params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]:
        step = check_step(fn, step)
        check_state(fn, state, AtcState)
        check_grads(fn, params, grads)
        with torch.no_grad():
            adapted, inner = local.step(params, grads, state.inner, step)
            new = mixing.start(adapted, step).wait()
        return finish_tree(new, params), AtcState(inner)

    return Transformation(init, step)


def gradient_tracking(
    optimizer: Transformation | ScalarOrSchedule,
    topology: AnyTopology,
    *,
    communicate_every: int = 1,
    global_every: int | None = None,
) -> Transformation:
    """Gradient tracking (DIGing): descend along a tracked estimate of the average gradient.

    .. math::

        y_i^k &= \\sum_j w_{ij}\\, y_j^{k−1} + g_i(x_i^k) − g_i(x_i^{k−1})
            \\qquad (y^{−1} = 0,\\ g(x^{−1}) = 0,\\ \\text{so } y^0 = g(x^0)) \\\\
        x_i^{k+1} &= \\sum_j w_{ij}\\, x_j^k − γ\\, y_i^k

    Because ``W`` is doubly stochastic, ``Σ_i y_i^k = Σ_i g_i(x_i^k)`` at every ``k``: the
    trackers carry the network gradient, so with a constant step size the iterates converge to
    the exact minimiser of ``Σ_i f_i`` (linearly, for strongly convex smooth ``f_i``).  ``x^k``
    and ``y^{k−1}`` travel together in one fused exchange per iteration, started before the
    gradient difference is formed.  The stable step size shrinks with the spectral gap of
    ``W`` (on a ring of 16 it is several times smaller than on the one-peer exponential-2
    graph).  With a local optimizer ``L`` other than SGD the step is
    ``x^{k+1} = W x^k + L(x^k, y^k) − x^k``.  A ``None`` gradient leaf counts as zero.

    Args:
        optimizer: the local optimizer, or a learning rate (``sgd(lr)``).
        topology: a doubly stochastic static or dynamic ``bf.topology`` graph (time-varying
            graphs are covered by the DIGing analysis).
        communicate_every: average only every ``k``-th iteration (``W = I`` in between; the
            tracking identity still holds).
        global_every: every ``m``-th iteration average globally (``W = 11ᵀ/n``) instead.

    Returns:
        A :class:`Transformation` whose state is :class:`GradientTrackingState`.

    Raises:
        ValueError: if a graph of ``topology`` is not doubly stochastic.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.gradient_tracking(0.5, bf.topology.ring(bf.size()))
        >>> x = torch.ones(2)
        >>> x, s = opt.step(x, torch.ones(2), opt.init(x), 0)
        >>> x.tolist(), s.tracker.tolist()
        ([0.5, 0.5], [1.0, 1.0])

    Reference:
        Nedić, Olshevsky & Shi, "Achieving Geometric Convergence for Distributed Optimization
        over Time-Varying Graphs", SIAM J. Optim. 2017; Qu & Li, "Harnessing Smoothness to
        Accelerate Distributed Optimization", IEEE TCNS 2018.
    """
    fn = "gradient_tracking"
    local = _local(fn, optimizer)
    mixing = Mixing.checked(fn, topology, communicate_every, global_every)
    _check_doubly_stochastic(fn, mixing.topology)

    def init(params: Params) -> OptState:
        flatten_params(fn, params)
        zeros = tree_zeros_like(params)
        return GradientTrackingState(local.init(params), zeros, tree_zeros_like(params))

    def step(params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]:
        step = check_step(fn, step)
        check_state(fn, state, GradientTrackingState)
        g, spec = _grads_or_zeros(fn, params, grads)
        flatten_like(fn, "state.tracker", state.tracker, spec)
        flatten_like(fn, "state.prev_grads", state.prev_grads, spec)
        with torch.no_grad():
            handle = mixing.start((params, state.tracker), step)
            innovation = tree_sub(g, state.prev_grads)
            mixed_x, mixed_y = handle.wait()
            tracker = tree_add(mixed_y, innovation)
            adapted, inner = local.step(params, tracker, state.inner, step)
            new = tree_add(mixed_x, tree_sub(adapted, params))
            # A copy: the caller may reuse its gradient buffers in place (``.grad`` tensors).
            prev = tree_clone(g)
        return finish_tree(new, params), GradientTrackingState(inner, tracker, prev)

    return Transformation(init, step)


def exact_diffusion(optimizer: Transformation | ScalarOrSchedule, topology: AnyTopology) -> Transformation:
    """Exact diffusion: adapt-then-combine with a correction that removes the bias.

    .. math::

        ψ_i^{k+1} &= x_i^k − γ\\, g_i(x_i^k) \\;(= L_i(x_i^k, g_i)) \\\\
        φ_i^{k+1} &= ψ_i^{k+1} + x_i^k − ψ_i^k \\qquad (ψ^0 = x^0) \\\\
        x_i^{k+1} &= \\sum_j \\bar w_{ij}\\, φ_j^{k+1}, \\qquad \\bar W = \\tfrac12 (I + W)

    ``\\bar W φ`` is computed as ``½ (φ + W φ)``: one :func:`bluefog_fn.neighbor_mean`, the
    same single message per neighbour as rewriting the weights (``w̄_ii = (1 + w_ii)/2``,
    ``w̄_ij = w_ij/2``), and identical on every rank and in the simulator without per-rank
    weight overrides.  With a constant step size the iterates converge to the exact minimiser
    of ``Σ_i f_i`` (the optimum is a fixed point: there ``φ = x*`` and ``\\bar W x* = x*``).
    The analysis assumes a symmetric doubly stochastic ``W``; only "doubly stochastic" is
    checked, so directed graphs (``exponential_two``, ``one_peer_exponential_two``) are
    accepted, but their stable step-size range can be much smaller: on L2-logistic regression
    with 16 agents and ``γ = 1/L`` it diverges on ``exponential_two(16)`` and converges on
    ``one_peer_exponential_two(16)`` and ``ring(16)`` (``examples/logistic_regression.py``).

    Args:
        optimizer: the local optimizer, or a learning rate (``sgd(lr)``).
        topology: a doubly stochastic static or dynamic ``bf.topology`` graph.

    Returns:
        A :class:`Transformation` whose state is :class:`ExactDiffusionState`.

    Raises:
        ValueError: if a graph of ``topology`` is not doubly stochastic.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.exact_diffusion(0.5, bf.topology.ring(bf.size()))
        >>> x = torch.ones(2)
        >>> x, s = opt.step(x, torch.ones(2), opt.init(x), 0)
        >>> x.tolist()
        [0.5, 0.5]

    Reference:
        Yuan, Ying, Zhao & Sayed, "Exact Diffusion for Distributed Optimization and Learning —
        Part I: Algorithm Development", IEEE TSP 2019.
    """
    fn = "exact_diffusion"
    local = _local(fn, optimizer)
    topo = check_topology(fn, topology)
    _check_doubly_stochastic(fn, topo)

    def init(params: Params) -> OptState:
        flatten_params(fn, params)
        # A copy: ψ^0 = x^0 must not change if the caller later updates its params in place.
        return ExactDiffusionState(local.init(params), tree_clone(params))

    def step(params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]:
        step = check_step(fn, step)
        check_state(fn, state, ExactDiffusionState)
        spec = check_grads(fn, params, grads)
        flatten_like(fn, "state.psi", state.psi, spec)
        with torch.no_grad():
            psi, inner = local.step(params, grads, state.inner, step)
            phi = tree_add(psi, tree_sub(params, state.psi))
            check_world(fn, topo)
            new = tree_scale(tree_add(phi, neighbor_mean(phi, topo, step)), 0.5)
            # ψ is state, not a parameter: keep no requires_grad flag the local step restored.
            psi = pytree.tree_map(lambda t: None if t is None else t.detach(), psi)
        return finish_tree(new, params), ExactDiffusionState(inner, psi)

    return Transformation(init, step)


def allreduce(optimizer: Transformation | ScalarOrSchedule) -> Transformation:
    """The centralised baseline: average the gradients over all agents, then a local step.

    .. math::

        x^{k+1} = x^k − γ \\cdot \\frac1n \\sum_i g_i(x^k)

    (``L(x^k, \\bar g)`` in general).  Started from identical parameters on every agent (see
    :func:`bluefog_fn.broadcast_parameters`) the agents stay identical: this is data-parallel
    SGD (DDP, Horovod), one :func:`bluefog_fn.global_mean` of the gradients per iteration.

    Args:
        optimizer: the local optimizer, or a learning rate (``sgd(lr)``).

    Returns:
        A :class:`Transformation` whose state is :class:`AllreduceState`.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.allreduce(bf.optim.adam(0.1))
        >>> x = torch.zeros(2)
        >>> x, s = opt.step(x, torch.ones(2), opt.init(x), 0)
        >>> [round(v, 4) for v in x.tolist()]
        [-0.1, -0.1]

    Reference:
        Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017.
    """
    fn = "allreduce"
    local = _local(fn, optimizer)

    def init(params: Params) -> OptState:
        flatten_params(fn, params)
        return AllreduceState(local.init(params))

    def step(params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]:
        step = check_step(fn, step)
        check_state(fn, state, AllreduceState)
        check_grads(fn, params, grads)
        with torch.no_grad():
            mean = global_mean(grads)
            new, inner = local.step(params, mean, state.inner, step)
        return finish_tree(new, params), AllreduceState(inner)

    return Transformation(init, step)
