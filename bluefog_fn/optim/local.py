"""Local (per-agent) optimizers: ``sgd`` and ``adam``, pure versions of ``torch.optim``'s.

They move one agent's parameters along its own gradient and communicate nothing; the
decentralized algorithms in :mod:`bluefog_fn.optim.algorithms` wrap them.  Their updates follow
``torch.optim.SGD`` (dampening 0) and ``torch.optim.Adam`` (L2 weight decay, no amsgrad), so a
functional loop and a ``torch.optim`` loop step alike.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch.utils import _pytree as pytree

from .base import (
    Grads,
    OptState,
    Params,
    ScalarOrSchedule,
    Transformation,
    check_lr,
    check_number,
    check_range,
    check_state,
    check_step,
    fail,
    finish,
    flatten_like,
    flatten_params,
    learning_rate,
    tree_zeros_like,
)


class SgdState(NamedTuple):
    """State of :func:`sgd`: the momentum buffers (a tree like the params).

    Without momentum it is ``()``, a tree without leaves (not ``None``, which
    ``torch.func.vmap`` — and so ``bf.sim.vmap`` — would reject as an input).
    """

    momentum: Any


class AdamState(NamedTuple):
    """State of :func:`adam`: first and second moment estimates (trees like the params)."""

    mu: Any
    nu: Any


def sgd(
    lr: ScalarOrSchedule, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0
) -> Transformation:
    """Stochastic gradient descent, with optional (Nesterov) momentum and L2 weight decay.

    For every leaf, with learning rate ``γ_k`` (a number or ``lr(k)``), momentum ``μ`` and
    weight decay ``λ``:

    .. math::

        d_k = g_k + λ x_k, \\qquad b_{k+1} = μ b_k + d_k \\;(b_0 = 0), \\qquad
        x_{k+1} = x_k − γ_k \\,(d_k + μ b_{k+1} \\text{ if Nesterov else } b_{k+1})

    which is ``torch.optim.SGD`` with ``dampening=0`` (``b_1 = d_0`` in both).  A ``None``
    gradient leaf leaves that parameter and its buffer unchanged, like ``torch.optim``.

    Args:
        lr: ``γ > 0``, or a callable ``step -> γ_k`` (see :func:`exponential_decay`).
        momentum: ``μ`` in ``[0, 1)``.
        nesterov: use Nesterov momentum (needs ``μ > 0``).
        weight_decay: ``λ >= 0``.

    Returns:
        A :class:`Transformation` whose state is :class:`SgdState`.

    Raises:
        ValueError / TypeError: at construction, naming the bad argument and its value.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.sgd(0.5, momentum=0.5)
        >>> x = torch.tensor([1.0])
        >>> s = opt.init(x)
        >>> x, s = opt.step(x, torch.tensor([1.0]), s, 0)
        >>> x, s = opt.step(x, torch.tensor([1.0]), s, 1)
        >>> x.tolist()  # 1 − 0.5·1 − 0.5·(0.5·1 + 1)
        [-0.25]

    Reference:
        Sutskever et al., "On the importance of initialization and momentum in deep learning", ICML 2013.
    """
    fn = "sgd"
    lr = check_lr(fn, lr)
    mu = check_range(fn, "momentum", momentum, 0.0, 1.0)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{fn}: nesterov must be a bool, got {type(nesterov).__name__} {nesterov!r}")
    if nesterov and mu == 0.0:
        raise fail(fn, f"nesterov=True needs momentum > 0, got momentum={momentum!r}")
    wd = check_number(fn, "weight_decay", weight_decay)
    if wd < 0:
        raise fail(fn, f"weight_decay must be >= 0, got {weight_decay!r}")

    def init(params: Params) -> OptState:
        flatten_params(fn, params)
        return SgdState(tree_zeros_like(params) if mu else ())

    def step(params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]:
        step = check_step(fn, step)
        check_state(fn, state, SgdState)
        xs, spec = flatten_params(fn, params)
        gs = flatten_like(fn, "grads", grads, spec)
        bs = flatten_like(fn, "state.momentum", state.momentum, spec) if mu else [None] * len(xs)
        gamma = learning_rate(fn, lr, step)
        new_x: list[torch.Tensor | None] = []
        new_b: list[torch.Tensor | None] = []
        with torch.no_grad():
            for x, g, b in zip(xs, gs, bs, strict=True):
                if x is None or g is None:
                    new_x.append(x)
                    new_b.append(b)
                    continue
                d = g + wd * x if wd else g
                if mu:
                    assert b is not None  # init made a buffer for every tensor leaf
                    b = mu * b + d
                    d = d + mu * b if nesterov else b
                new_x.append(x - gamma * d)
                new_b.append(b)
        new_state = SgdState(pytree.tree_unflatten(new_b, spec) if mu else ())
        return finish(new_x, xs, spec), new_state

    return Transformation(init, step)


def adam(
    lr: ScalarOrSchedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Transformation:
    """Adam (Kingma & Ba), with L2 weight decay added to the gradient as in ``torch.optim.Adam``.

    With ``t = step + 1`` (the step is 0-based):

    .. math::

        d = g + λ x, \\quad m ← β_1 m + (1−β_1) d, \\quad v ← β_2 v + (1−β_2) d^2, \\quad
        x ← x − \\frac{γ_k}{1−β_1^t} \\cdot \\frac{m}{\\sqrt{v}/\\sqrt{1−β_2^t} + ε}

    The bias correction reads the ``step`` argument, so resume a checkpoint with the step
    number it was saved at.

    Args:
        lr: ``γ > 0`` or a callable ``step -> γ_k``.
        betas: ``(β_1, β_2)``, each in ``[0, 1)``.
        eps: ``ε > 0``.
        weight_decay: ``λ >= 0``.

    Returns:
        A :class:`Transformation` whose state is :class:`AdamState`.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.adam(0.1)
        >>> x = torch.tensor([1.0])
        >>> x, s = opt.step(x, torch.tensor([3.0]), opt.init(x), 0)
        >>> round(x.item(), 4)  # the first Adam step has length ≈ lr
        0.9

    Reference:
        Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015.
    """
    fn = "adam"
    lr = check_lr(fn, lr)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"{fn}: betas must be a pair (beta1, beta2), got {betas!r}")
    b1 = check_range(fn, "betas[0]", betas[0], 0.0, 1.0)
    b2 = check_range(fn, "betas[1]", betas[1], 0.0, 1.0)
    e = check_number(fn, "eps", eps)
    if e <= 0:
        raise fail(fn, f"eps must be > 0, got {eps!r}")
    wd = check_number(fn, "weight_decay", weight_decay)
    if wd < 0:
        raise fail(fn, f"weight_decay must be >= 0, got {weight_decay!r}")

    def init(params: Params) -> OptState:
        flatten_params(fn, params)
        return AdamState(tree_zeros_like(params), tree_zeros_like(params))

    def step(params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]:
        step = check_step(fn, step)
        check_state(fn, state, AdamState)
        xs, spec = flatten_params(fn, params)
        gs = flatten_like(fn, "grads", grads, spec)
        ms = flatten_like(fn, "state.mu", state.mu, spec)
        vs = flatten_like(fn, "state.nu", state.nu, spec)
        gamma = learning_rate(fn, lr, step)
        t = step + 1
        bc1 = 1.0 - b1**t
        bc2_sqrt = math.sqrt(1.0 - b2**t)
        new_x: list[torch.Tensor | None] = []
        new_m: list[torch.Tensor | None] = []
        new_v: list[torch.Tensor | None] = []
        with torch.no_grad():
            for x, g, m, v in zip(xs, gs, ms, vs, strict=True):
                if x is None or g is None or m is None or v is None:
                    new_x.append(x)
                    new_m.append(m)
                    new_v.append(v)
                    continue
                d = g + wd * x if wd else g
                # The same operations as torch.optim.Adam, so the two agree to rounding.
                m = torch.lerp(m, d, 1.0 - b1)
                v = b2 * v + (1.0 - b2) * d * d
                denom = v.sqrt() / bc2_sqrt + e
                new_x.append(x - (gamma / bc1) * (m / denom))
                new_m.append(m)
                new_v.append(v)
        new_state = AdamState(pytree.tree_unflatten(new_m, spec), pytree.tree_unflatten(new_v, spec))
        return finish(new_x, xs, spec), new_state

    return Transformation(init, step)
