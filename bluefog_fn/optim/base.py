"""The optimizer contract, its tree helpers, argument checks and learning-rate schedules.

An optimizer is a :class:`Transformation`: a named tuple of two pure functions (optax's shape,
with the iteration number passed explicitly because decentralized algorithms need it for the
dynamic topology and the schedule alike)::

    state = opt.init(params)
    params, state = opt.step(params, grads, state, step)

``params`` and ``grads`` are pytrees (``torch.utils._pytree``) of tensors with the same
structure; ``None`` leaves pass through.  Nothing passed in is modified.  Every state is a
named tuple of such trees, so it can be checkpointed with ``torch.save``/``torch.load``
(the state classes are registered as safe globals for ``weights_only`` loading).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol, TypeAlias, cast

import torch
from torch.utils import _pytree as pytree

from ..topology import DynamicTopology, Topology
from ..world import current

Params: TypeAlias = Any
"""A pytree of tensors (``None`` leaves allowed)."""
Grads: TypeAlias = Any
"""A pytree with the structure of the parameters; a ``None`` leaf means "no gradient"."""
OptState: TypeAlias = Any
"""An optimizer state: a named tuple of pytrees of tensors."""
Schedule: TypeAlias = Callable[[int], float]
"""A learning rate as a function of the 0-based step."""
ScalarOrSchedule: TypeAlias = "float | Schedule"
AnyTopology: TypeAlias = "Topology | DynamicTopology"


class InitFn(Protocol):
    """``init(params) -> state``."""

    def __call__(self, params: Params) -> OptState: ...


class StepFn(Protocol):
    """``step(params, grads, state, step) -> (params, state)``."""

    def __call__(self, params: Params, grads: Grads, state: OptState, step: int) -> tuple[Params, OptState]: ...


class Transformation(NamedTuple):
    """An optimizer: a pair of pure functions.

    Attributes:
        init: ``init(params) -> state`` builds the initial state (buffers shaped like ``params``).
        step: ``step(params, grads, state, step) -> (new_params, new_state)`` applies iteration
            ``step`` (0-based).  In a decentralized algorithm every rank must call it with the
            same ``step`` (it picks the graph of a dynamic topology and the learning rate).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = bf.optim.sgd(0.5)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> params, state = opt.step(params, {"w": torch.ones(2)}, state, 0)
        >>> params["w"].tolist()
        [0.5, 0.5]
    """

    init: InitFn
    step: StepFn


# --------------------------------------------------------------------------- tree helpers


def flatten_params(fn: str, params: Params) -> tuple[list[torch.Tensor | None], pytree.TreeSpec]:
    """Leaves of ``params`` (tensors or ``None``) and its structure; anything else is a TypeError."""
    with_path, spec = pytree.tree_flatten_with_path(params)
    leaves: list[torch.Tensor | None] = []
    for path, leaf in with_path:
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise TypeError(
                f"{fn}: params leaf at {pytree.keystr(path) or '<root>'} must be a torch.Tensor or None, "
                f"got {type(leaf).__name__}"
            )
        leaves.append(leaf)
    return leaves, spec


def flatten_like(fn: str, arg: str, tree: Any, spec: pytree.TreeSpec) -> list[torch.Tensor | None]:
    """Leaves of ``tree``, which must have the structure ``spec`` (of the parameters)."""
    leaves, tspec = pytree.tree_flatten(tree)
    if tspec != spec:
        raise ValueError(f"{fn}: {arg} must have the structure of params {spec}, got {tspec}")
    for k, leaf in enumerate(leaves):
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{fn}: {arg} leaf {k} must be a torch.Tensor or None, got {type(leaf).__name__}")
    return leaves


def check_grads(fn: str, params: Params, grads: Grads) -> pytree.TreeSpec:
    """Check params' leaves and that ``grads`` has their structure; returns the structure."""
    leaves, spec = flatten_params(fn, params)
    check_grad_shapes(fn, leaves, flatten_like(fn, "grads", grads, spec))
    return spec


def check_grad_shapes(fn: str, params: list[torch.Tensor | None], grads: list[torch.Tensor | None]) -> None:
    """Every gradient leaf has its parameter's shape (broadcasting would hide a wrong one)."""
    for k, (p, g) in enumerate(zip(params, grads, strict=True)):
        if p is not None and g is not None and g.shape != p.shape:
            raise ValueError(f"{fn}: grads leaf {k} has shape {tuple(g.shape)}, its parameter {tuple(p.shape)}")


def tree_zeros_like(params: Params) -> Any:
    """Zeros shaped like every tensor leaf (``None`` stays ``None``)."""
    return pytree.tree_map(lambda x: None if x is None else torch.zeros_like(x), params)


def tree_clone(params: Params) -> Any:
    """A copy that shares no memory with ``params`` (detached)."""
    return pytree.tree_map(lambda x: None if x is None else x.detach().clone(), params)


def tree_add(a: Any, b: Any, scale: float = 1.0) -> Any:
    """``a + scale · b`` leaf by leaf (``None`` in ``a`` stays ``None``; in ``b`` counts as 0)."""

    def add(x: torch.Tensor | None, y: torch.Tensor | None) -> torch.Tensor | None:
        if x is None or y is None:
            return x
        return x + y if scale == 1.0 else x + scale * y

    return pytree.tree_map(add, a, b, is_leaf=lambda x: x is None)


def tree_sub(a: Any, b: Any) -> Any:
    """``a − b`` leaf by leaf."""
    return tree_add(a, b, -1.0)


def tree_scale(a: Any, scale: float) -> Any:
    """``scale · a`` leaf by leaf."""
    return pytree.tree_map(lambda x: None if x is None else scale * x, a)


def check_state(fn: str, state: object, cls: type) -> None:
    """``state`` must be the named tuple ``cls`` made by the same optimizer's ``init``."""
    if not isinstance(state, cls):
        raise TypeError(f"{fn}: state must be a {cls.__name__} from {fn}.init, got {type(state).__name__}")


def finish(new: list[torch.Tensor | None], old: list[torch.Tensor | None], spec: pytree.TreeSpec) -> Params:
    """Rebuild the params tree; a leaf that required grad gets a fresh leaf that requires grad.

    Steps run under ``torch.no_grad`` (they are not differentiated), so without this a loop
    that takes gradients with ``torch.autograd.grad`` would lose ``requires_grad`` after one step.
    """
    out: list[torch.Tensor | None] = []
    for n, o in zip(new, old, strict=True):
        if n is not None and o is not None and o.requires_grad and not n.requires_grad:
            n = n.detach().requires_grad_(True)
        out.append(n)
    return pytree.tree_unflatten(out, spec)


def finish_tree(new: Params, old: Params) -> Params:
    """:func:`finish` for whole trees of the same structure."""
    new_leaves, spec = pytree.tree_flatten(new)
    return finish(new_leaves, pytree.tree_leaves(old), spec)


# --------------------------------------------------------------------------- argument checks


def fail(fn: str, message: str) -> ValueError:
    """A ValueError whose message starts with the factory's name."""
    return ValueError(f"{fn}: {message}")


def check_number(fn: str, name: str, value: object) -> float:
    """``value`` must be a real number (not a bool); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__} {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise fail(fn, f"{name} must be finite, got {value!r}")
    return out


def check_range(
    fn: str, name: str, value: object, low: float, high: float, *, low_open: bool = False, high_open: bool = True
) -> float:
    """``value`` must be a number in the interval [low, high) (bounds' openness adjustable)."""
    out = check_number(fn, name, value)
    below = out <= low if low_open else out < low
    above = out >= high if high_open else out > high
    if below or above:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise fail(fn, f"{name} must be in {interval}, got {value!r}")
    return out


def check_lr(fn: str, lr: object, name: str = "lr") -> ScalarOrSchedule:
    """A learning rate: a positive finite number, or a callable ``step -> float``."""
    if callable(lr):
        return cast("Schedule", lr)
    return check_positive(fn, name, lr, "or a callable of the step")


def check_positive(fn: str, name: str, value: object, alternative: str = "") -> float:
    """``value`` must be a finite number ``> 0``."""
    out = check_number(fn, name, value)
    if out <= 0:
        raise fail(fn, f"{name} must be > 0{' ' + alternative if alternative else ''}, got {value!r}")
    return out


def check_positive_int(fn: str, name: str, value: object, minimum: int = 1) -> int:
    """``value`` must be an int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise fail(fn, f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def check_topology(fn: str, topology: object) -> AnyTopology:
    """``topology`` must be a ``bf.topology`` Topology or DynamicTopology."""
    if not isinstance(topology, (Topology, DynamicTopology)):
        raise TypeError(
            f"{fn}: topology must be a bf.topology Topology or DynamicTopology, got {type(topology).__name__} "
            f"{topology!r:.60}"
        )
    return topology


def check_world(fn: str, topology: AnyTopology) -> None:
    """The topology must have one node per agent of the current world (``bf.size()``)."""
    n = current().size
    if topology.size != n:
        raise fail(
            fn,
            f"topology has {topology.size} agents but the current world has {n} (bf.size()); "
            "build the topology with bf.size() inside the world that runs the steps",
        )


def graphs_of(topology: AnyTopology) -> Sequence[Topology]:
    """The static graphs of one period."""
    return topology.graphs if isinstance(topology, DynamicTopology) else (topology,)


def check_step(fn: str, step: object) -> int:
    """The iteration number: an int ``>= 0`` (numpy/torch integer scalars accepted, floats not)."""
    if isinstance(step, bool):
        raise TypeError(f"{fn}: step must be an int >= 0, got bool {step!r}")
    try:
        value = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{fn}: step must be an int >= 0, got {type(step).__name__} {step!r}") from None
    if value < 0:
        raise fail(fn, f"step must be an int >= 0, got {step!r}")
    return value


def learning_rate(fn: str, lr: ScalarOrSchedule, step: int) -> float:
    """``lr`` at ``step``; a schedule's value must be a finite number ``>= 0``."""
    if not callable(lr):
        return lr
    value: object = lr(step)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise fail(fn, f"the learning-rate schedule returned {value!r} at step {step}; expected a finite number >= 0")
    return float(value)


# --------------------------------------------------------------------------- schedules


def constant_schedule(value: float) -> Schedule:
    """``γ_k = value``.

    Example:
        >>> import bluefog_fn as bf
        >>> bf.optim.constant_schedule(0.1)(7)
        0.1
    """
    v = check_number("constant_schedule", "value", value)
    if v < 0:
        raise fail("constant_schedule", f"value must be >= 0, got {value!r}")
    return lambda step: v


def exponential_decay(init_value: float, decay_rate: float, transition_steps: int = 1) -> Schedule:
    """``γ_k = γ_0 · r^(k / T)`` (continuous exponential decay).

    Args:
        init_value: ``γ_0 > 0``.
        decay_rate: ``r`` in ``(0, 1]``.
        transition_steps: ``T >= 1``; the rate is multiplied by ``r`` every ``T`` steps.

    Example:
        >>> import bluefog_fn as bf
        >>> round(bf.optim.exponential_decay(1.0, 0.5, 2)(4), 6)
        0.25
    """
    fn = "exponential_decay"
    if callable(init_value):
        raise TypeError(f"{fn}: init_value must be a number, got a callable")
    g0 = check_positive(fn, "init_value", init_value)
    r = check_range(fn, "decay_rate", decay_rate, 0.0, 1.0, low_open=True, high_open=False)
    t = check_positive_int(fn, "transition_steps", transition_steps)
    return lambda step: g0 * r ** (step / t)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0) -> Schedule:
    """``γ_k = γ_0 · ((1 − α) · ½(1 + cos(π · min(k, K) / K)) + α)`` (Loshchilov & Hutter, 2017).

    Args:
        init_value: ``γ_0 > 0``.
        decay_steps: ``K >= 1``, after which the rate stays at ``α γ_0``.
        alpha: the final fraction ``α`` in ``[0, 1]``.

    Example:
        >>> import bluefog_fn as bf
        >>> s = bf.optim.cosine_decay_schedule(1.0, 10)
        >>> s(0), round(s(5), 6), s(20)
        (1.0, 0.5, 0.0)
    """
    fn = "cosine_decay_schedule"
    if callable(init_value):
        raise TypeError(f"{fn}: init_value must be a number, got a callable")
    g0 = check_positive(fn, "init_value", init_value)
    k_max = check_positive_int(fn, "decay_steps", decay_steps)
    a = check_range(fn, "alpha", alpha, 0.0, 1.0, high_open=False)

    def schedule(step: int) -> float:
        frac = min(step, k_max) / k_max
        return g0 * ((1.0 - a) * 0.5 * (1.0 + math.cos(math.pi * frac)) + a)

    return schedule
