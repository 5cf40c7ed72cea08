"""Push-sum (subgradient-push) on one-sided windows: decentralized optimization on directed graphs.

Algorithms that mix with a row-stochastic ``W`` need ``W`` doubly stochastic to reach the
average (or the minimiser of ``Σ_i f_i``); on a directed graph such as ``exponential_two`` or
``one_peer_exponential_two`` with uniform weights it is not.  Push-sum instead *pushes mass*:
every agent splits its pair ``(u_i, w_i)`` into ``d_i + 1`` equal shares (``d_i`` its
out-degree), keeps one and accumulates the others into its out-neighbours' window slots — a
column-stochastic ``A`` — then collects what it received.  ``Σ_i w_i = n`` and ``Σ_i u_i`` are
conserved exactly (up to rounding), and the ratio ``z_i = u_i / w_i`` converges to the average.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from ..ops import barrier
from ..ops.window import Window
from ..world import current
from .algorithms import _grads_or_zeros, _local
from .base import (
    AnyTopology,
    Grads,
    OptState,
    Params,
    ScalarOrSchedule,
    Transformation,
    check_grads,
    check_state,
    check_step,
    check_topology,
    check_world,
    finish_tree,
    flatten_like,
    flatten_params,
    tree_add,
    tree_clone,
    tree_sub,
    tree_zeros_like,
)


class PushSumState(NamedTuple):
    """State of :func:`push_sum`.

    Attributes:
        inner: the local optimizer's state.
        numerator: ``u_i``, the pushed mass of the parameters (the parameters are ``u_i / w_i``).
        weight: ``w_i``, the push-sum weight (float64, ``1`` at init; shape ``(n,)`` in the
            simulator); ``Σ_i w_i = n`` after every step.
        window: the :class:`bluefog_fn.Window` that carries ``(u, w)``; free it with
            ``state.window.free()`` when done.  It is live communication state: checkpoint
            ``inner``, ``numerator`` and ``weight``, not the window.
    """

    inner: Any
    numerator: Any
    weight: torch.Tensor
    window: Window


class PushDigingState(NamedTuple):
    """State of :func:`push_diging`.

    Attributes:
        inner: the local optimizer's state.
        numerator: ``u_i`` (the parameters are ``u_i / w_i``).
        weight: ``w_i`` (float64, ``1`` at init, ``(n,)`` in the simulator); ``Σ_i w_i = n``.
        tracker: ``Σ_j a_ij y_j^{k−1}``, the tracker mass received last step (zeros at init).
        prev_grads: ``g_i^{k−1}`` (zeros at init).
        window: the :class:`bluefog_fn.Window` carrying ``(u, w, y)``; free it when done.
    """

    inner: Any
    numerator: Any
    weight: torch.Tensor
    tracker: Any
    prev_grads: Any
    window: Window


def _device(params: Params) -> torch.device:
    """Where the parameters live (the window's tree must be on one device)."""
    leaf = next((t for t in pytree.tree_leaves(params) if isinstance(t, torch.Tensor)), None)
    return leaf.device if leaf is not None else torch.device("cpu")


def _scale(x: torch.Tensor | None, s: torch.Tensor) -> torch.Tensor | None:
    """``s · x`` with ``s`` a scalar (MPI) or one value per agent (``(n,)``, simulator)."""
    if x is None:
        return None
    return x * s.to(x.dtype).reshape(s.shape + (1,) * (x.dim() - s.dim())).to(x.device)


def _divide(x: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor | None:
    if x is None:
        return None
    return x / w.to(x.dtype).reshape(w.shape + (1,) * (x.dim() - w.dim())).to(x.device)


def _checked(
    fn: str, optimizer: Transformation | ScalarOrSchedule, topology: AnyTopology, synchronous: object
) -> tuple[Transformation, AnyTopology]:
    """The construction-time checks shared by the push-sum family."""
    local = _local(fn, optimizer)
    topo = check_topology(fn, topology)
    if not isinstance(synchronous, bool):
        raise TypeError(f"{fn}: synchronous must be a bool, got {type(synchronous).__name__} {synchronous!r}")
    return local, topo


def _unit_weight(params: Params) -> torch.Tensor:
    """The initial push-sum weight ``w = 1``: a float64 scalar, one per agent in the simulator."""
    world = current()
    return torch.ones(world.executor.agent_shape(world), dtype=torch.float64, device=_device(params))


def push_sum(
    optimizer: Transformation | ScalarOrSchedule,
    topology: AnyTopology,
    *,
    synchronous: bool = True,
) -> Transformation:
    """Push-sum / subgradient-push: exact consensus and optimization on directed graphs.

    With ``d_i^k`` the out-degree of agent ``i`` in ``topology.at(k)`` and
    ``a^k_{ji} = 1/(d_i^k + 1)`` for every out-neighbour ``j`` and ``j = i`` (a
    column-stochastic matrix ``A_k``):

    .. math::

        u_i' &= L_i(u_i^k, g_i(z_i^k)) \\;(= u_i^k − γ\\, g_i(z_i^k) \\text{ for SGD}) \\\\
        u_i^{k+1} &= \\sum_j a^k_{ij}\\, u_j', \\qquad w_i^{k+1} = \\sum_j a^k_{ij}\\, w_j^k \\\\
        z_i^{k+1} &= u_i^{k+1} / w_i^{k+1}

    ``z`` are the parameters the caller sees and takes gradients at; ``u`` and ``w`` (with
    ``u^0 = z^0``, ``w^0 = 1``) live in the state.  Each step accumulates the shares
    ``a_ji·(u', w)`` into the out-neighbours' slots of a :class:`bluefog_fn.Window`
    (``MPI_Accumulate``) and collects its own slots with ``update(reset=True)``, a read-and-reset
    atomic per element, so mass is never lost: ``Σ_i w_i = n`` and, without gradients,
    ``Σ_i u_i = Σ_i u_i^0`` after every step (to rounding).  With zero gradients ``z_i``
    converges geometrically to the exact average ``(1/n) Σ_i z_i^0`` on any strongly connected
    (possibly directed, time-varying) graph; with diminishing step sizes and convex ``f_i`` to
    the minimiser of ``Σ_i f_i`` (Nedić & Olshevsky 2015).

    Args:
        optimizer: the local optimizer, or a learning rate (``sgd(lr)``).
        topology: a static or dynamic ``bf.topology`` graph; only its edges are used (the
            weights are the push-sum shares), so it need not be doubly stochastic.
        synchronous: ``True`` (default) puts a :func:`bluefog_fn.barrier` after the pushes and
            after the collect, so each step collects exactly that step's mass: deterministic,
            and equal to the simulator.  ``False`` skips them (BlueFog's asynchronous push-sum):
            mass that arrives late is collected by a later step; the sums are still conserved
            once every rank has finished and collected.

    Returns:
        A :class:`Transformation` whose state is :class:`PushSumState`; ``init`` is collective
        (it creates the window).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.push_sum(0.5, bf.topology.exponential_two(bf.size()))
        >>> x = torch.ones(2)
        >>> s = opt.init(x)
        >>> x, s = opt.step(x, torch.ones(2), s, 0)
        >>> x.tolist(), float(bf.global_sum(s.weight)) == bf.size()
        ([0.5, 0.5], True)
        >>> s.window.free()

    Reference:
        Kempe, Dobra & Gehrke, "Gossip-Based Computation of Aggregate Information", FOCS 2003;
        Nedić & Olshevsky, "Distributed Optimization over Time-Varying Directed Graphs", IEEE
        TAC 2015.
    """
    fn = "push_sum"
    local, topo = _checked(fn, optimizer, topology, synchronous)

    def init(params: Params) -> OptState:
        flatten_params(fn, params)
        check_world(fn, topo)
        weight = _unit_weight(params)
        numerator = tree_clone(params)
        window = Window((numerator, weight), topo)
        return PushSumState(local.init(params), numerator, weight, window)

    def step(params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]:
        step = check_step(fn, step)
        check_state(fn, state, PushSumState)
        spec = check_grads(fn, params, grads)
        flatten_like(fn, "state.numerator", state.numerator, spec)
        check_world(fn, topo)
        with torch.no_grad():
            adapted, inner = local.step(state.numerator, grads, state.inner, step)
            numerator, weight = _push(state.window, (adapted, state.weight), step, synchronous)
            new = pytree.tree_map(lambda x: _divide(x, weight), numerator)
        return finish_tree(new, params), PushSumState(inner, numerator, weight, state.window)

    return Transformation(init, step)


def _push(window: Window, tree: Any, step: int, synchronous: bool) -> Any:
    """One push-sum round on ``tree``: keep a share, accumulate the others, collect."""
    share = window.uniform_share(step)
    pushed = pytree.tree_map(lambda x: _scale(x, share), tree)
    window.accumulate(pushed, step=step)
    if synchronous:
        barrier()
    out = window.collect(pushed, step=step)
    if synchronous:
        barrier()
    return out


def push_diging(
    optimizer: Transformation | ScalarOrSchedule,
    topology: AnyTopology,
    *,
    synchronous: bool = True,
) -> Transformation:
    """Push-DIGing: gradient tracking with push-sum, exact and linear on directed graphs.

    With the column-stochastic push-sum shares ``A_k`` of :func:`push_sum`:

    .. math::

        y_i^k &= \\sum_j a^{k−1}_{ij}\\, y_j^{k−1} + g_i(z_i^k) − g_i(z_i^{k−1})
            \\qquad (y^{−1} = 0,\\ g(z^{−1}) = 0,\\ \\text{so } y^0 = g(z^0)) \\\\
        u_i^{k+1} &= \\sum_j a^k_{ij}\\, L_i(u_j^k, y_j^k) \\;(= u_j^k − γ\\, y_j^k \\text{ for SGD}),
            \\qquad w_i^{k+1} = \\sum_j a^k_{ij}\\, w_j^k \\\\
        z_i^{k+1} &= u_i^{k+1} / w_i^{k+1}

    ``(u, w, y)`` travel together through one :class:`bluefog_fn.Window` per step.  Since
    ``A_k`` preserves sums, ``Σ_i y_i^k = Σ_i g_i(z_i^k)``: the trackers carry the network
    gradient, so with a constant step size small enough the parameters ``z`` converge
    geometrically to the exact minimiser of ``Σ_i f_i`` (strongly convex, smooth ``f_i``) on
    directed, time-varying, strongly connected graphs.  ``Σ_i w_i = n`` after every step.

    Args:
        optimizer: the local optimizer, or a learning rate (``sgd(lr)``).
        topology: a static or dynamic ``bf.topology`` graph (only its edges are used).
        synchronous: barriers around the collect, as in :func:`push_sum`.

    Returns:
        A :class:`Transformation` whose state is :class:`PushDigingState`; ``init`` is
        collective (it creates the window).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.push_diging(0.5, bf.topology.exponential_two(bf.size()))
        >>> x = torch.ones(2)
        >>> s = opt.init(x)
        >>> x, s = opt.step(x, torch.ones(2), s, 0)
        >>> x.tolist()
        [0.5, 0.5]
        >>> s.window.free()

    Reference:
        Nedić, Olshevsky & Shi, "Achieving Geometric Convergence for Distributed Optimization
        over Time-Varying Graphs", SIAM J. Optim. 2017 (Push-DIGing, Algorithm 2).
    """
    fn = "push_diging"
    local, topo = _checked(fn, optimizer, topology, synchronous)

    def init(params: Params) -> OptState:
        flatten_params(fn, params)
        check_world(fn, topo)
        weight = _unit_weight(params)
        numerator = tree_clone(params)
        tracker = tree_zeros_like(params)
        window = Window((numerator, weight, tracker), topo)
        return PushDigingState(local.init(params), numerator, weight, tracker, tree_zeros_like(params), window)

    def step(params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]:
        step = check_step(fn, step)
        check_state(fn, state, PushDigingState)
        g, spec = _grads_or_zeros(fn, params, grads)
        for name in ("numerator", "tracker", "prev_grads"):
            flatten_like(fn, f"state.{name}", getattr(state, name), spec)
        check_world(fn, topo)
        with torch.no_grad():
            y = tree_add(state.tracker, tree_sub(g, state.prev_grads))
            adapted, inner = local.step(state.numerator, y, state.inner, step)
            numerator, weight, tracker = _push(state.window, (adapted, state.weight, y), step, synchronous)
            new = pytree.tree_map(lambda x: _divide(x, weight), numerator)
            prev = tree_clone(g)  # the caller may reuse its gradient buffers in place
        return finish_tree(new, params), PushDigingState(inner, numerator, weight, tracker, prev, state.window)

    return Transformation(init, step)
