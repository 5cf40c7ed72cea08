"""``nn.Module`` front end: broadcasts and allreduce of modules, state dicts and ``torch.optim`` state.

:class:`~bluefog_fn.optim.DecentralizedOptimizer` lives in :mod:`bluefog_fn.optim.decentralized_optimizer`.

``nn.Module`` and ``torch.optim.Optimizer`` are stateful objects, so this is the one place
where the library updates tensors in place: the wrapper writes the averaged parameters back
into the module, and :func:`broadcast_parameters` copies the root's values into a module.
Everything still goes through the functional ops, and the arithmetic is the one of
:func:`~bluefog_fn.optim.atc` / :func:`~bluefog_fn.optim.awc`, so a module trained with
``torch.optim.SGD`` and the wrapper follows the same iterates as the functional algorithm.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import torch
from torch import nn

from ..ops import broadcast, global_mean
from ..plan import check_rank_key
from ..tree import flatten
from ..world import current
from .base import Params


def _process_world(fn: str) -> None:
    world = current()
    if world.executor.agent_shape(world):
        raise TypeError(
            f"{fn}: nn.Module and torch.optim objects hold one agent's tensors, which have no agent "
            "dimension; inside bf.simulate(n) use the functional bf.optim algorithms on stacked trees"
        )


def broadcast_parameters(params: nn.Module | Params, root: int = 0) -> Params:
    """Give every rank the root's parameters, for a consistent start.

    * an ``nn.Module``: its parameters and buffers are broadcast and **copied into the module
      in place**; the broadcast ``{name: tensor}`` dict is returned;
    * a ``module.state_dict()`` (BlueFog's idiom ``broadcast_parameters(model.state_dict(), 0)``)
      or a list of ``(name, tensor)`` pairs (``list(model.named_parameters())``): the tensors are
      overwritten **in place** — they share memory with the module, so the module is updated —
      and the same object is returned;
    * any other pytree: this is :func:`bluefog_fn.broadcast`: a new tree is returned and the
      input is untouched.

    Modules and state dicts are stateful objects, which is why they are the one exception to
    purity in the library.  A state dict is recognised by the ``_metadata`` attribute that
    ``nn.Module.state_dict()`` sets; one whose tensors cannot be written in place (e.g. a copy
    made with ``{k: v.clone() ...}`` loses ``_metadata`` and is then a plain tree) raises.

    Args:
        params: an ``nn.Module``, a state dict, ``(name, tensor)`` pairs, or a pytree of tensors
            (same structure on every rank).
        root: the rank whose values everyone receives.

    Returns:
        The broadcast tree (for a module: ``{name: tensor}`` of parameters and buffers; for a
        state dict or pairs: ``params`` itself, updated).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.broadcast_parameters({"w": torch.ones(2)}, root=0)["w"].tolist()
        [1.0, 1.0]
        >>> model = torch.nn.Linear(2, 1)
        >>> sd = model.state_dict()
        >>> bf.broadcast_parameters(sd, root=0) is sd
        True
    """
    fn = "broadcast_parameters"
    root = check_rank_key(fn, "root", root, current().size, None)
    if isinstance(params, nn.Module):
        _process_world(fn)
        named: dict[str, torch.Tensor] = dict(params.named_parameters())
        named.update(params.named_buffers())
        received: dict[str, torch.Tensor] = broadcast({k: v.detach() for k, v in named.items()}, root)
        _copy_in_place(fn, list(named.items()), received)
        return received
    if isinstance(params, Iterator):  # model.named_parameters() as BlueFog users pass it
        params = list(params)
    pairs = _in_place_pairs(fn, params)
    if pairs is None:
        return broadcast(params, root)
    _process_world(fn)
    received = broadcast({str(i): t.detach() for i, (_, t) in enumerate(pairs)}, root)
    _copy_in_place(fn, [(str(i), t) for i, (_, t) in enumerate(pairs)], received)
    return params


def _in_place_pairs(fn: str, params: object) -> list[tuple[str, torch.Tensor]] | None:
    """``(name, tensor)`` pairs of a state dict or a list of named tensors; None for other trees."""
    if isinstance(params, dict) and hasattr(params, "_metadata"):
        items = list(params.items())
        what = "state_dict"
    elif (
        isinstance(params, (list, tuple))
        and params
        and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params)
    ):
        items = list(params)
        what = "named tensors"
    else:
        return None
    for name, tensor in items:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{fn}: {what} entry {name!r} must be a torch.Tensor, got {type(tensor).__name__} {tensor!r:.60}")
    return items


def _copy_in_place(fn: str, named: list[tuple[str, torch.Tensor]], received: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, tensor in named:
            if tensor.is_inference():
                raise ValueError(f"{fn}: tensor {name!r} is an inference tensor and cannot be updated in place")
            tensor.copy_(received[name])


def allreduce_parameters(params: nn.Module | Params) -> Params:
    """Average the parameters over all ranks, :math:`x ← \\tfrac1n \\sum_r x_r` (BlueFog's ``allreduce_parameters``).

    For a pytree this is :func:`bluefog_fn.global_mean`: a new tree is returned, the input is
    untouched (in ``bf.simulate(n)`` too, over the agent dimension). For an ``nn.Module`` its
    floating-point parameters are averaged and **copied into the module in place** (like
    :func:`broadcast_parameters`), and the averaged ``{name: tensor}`` dict is returned.
    Buffers are left alone (BlueFog averages what it is given, usually
    ``named_parameters()``); integer buffers such as batch-norm counters have no mean.
    A ``module.state_dict()`` or ``(name, tensor)`` pairs (``list(model.named_parameters())``)
    are averaged **in place** like :func:`broadcast_parameters` does (they share memory with the
    module), integer entries left as they are, and the same object is returned.

    Args:
        params: an ``nn.Module`` or a pytree of floating tensors (same structure on every rank).

    Returns:
        The averaged tree (for a module: ``{name: tensor}`` of its floating parameters).

    Raises:
        TypeError: for an ``nn.Module`` inside ``bf.simulate`` (a module holds one agent).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> model = torch.nn.Linear(2, 1)
        >>> averaged = bf.allreduce_parameters(model)
        >>> torch.equal(model.weight.detach(), averaged["weight"])
        True
        >>> sd = model.state_dict()
        >>> bf.allreduce_parameters(sd) is sd
        True
    """
    fn = "allreduce_parameters"
    if isinstance(params, Iterator):  # model.named_parameters() as BlueFog users pass it
        params = list(params)
    pairs = None if isinstance(params, nn.Module) else _in_place_pairs(fn, params)
    if pairs is not None:
        _process_world(fn)
        floating = [(k, t) for k, t in pairs if t.dtype.is_floating_point or t.dtype.is_complex]
        keyed = [(str(i), t) for i, (_, t) in enumerate(floating)]
        _copy_in_place(fn, keyed, global_mean({k: t.detach() for k, t in keyed}))
        return params
    if not isinstance(params, nn.Module):
        flat = flatten(params, fn, "params")  # errors name this function, not the global_mean it runs
        for i, t in enumerate(flat.tensors):
            if not (t.dtype.is_floating_point or t.dtype.is_complex):
                raise TypeError(f"{fn}: params leaf {flat.path(i)} has dtype {t.dtype}, which has no mean")
        return global_mean(params)
    _process_world(fn)
    named = {k: v for k, v in params.named_parameters() if v.dtype.is_floating_point or v.dtype.is_complex}
    averaged: dict[str, torch.Tensor] = global_mean({k: v.detach() for k, v in named.items()})
    with torch.no_grad():
        for name, tensor in named.items():
            tensor.copy_(averaged[name])
    return averaged


def broadcast_optimizer_state(optimizer: torch.optim.Optimizer, root: int = 0) -> None:
    """Load the root's ``torch.optim`` state (buffers and hyper-parameters) on every rank.

    The root's ``state_dict()`` travels serialised, so the other ranks need not have the same
    state structure (e.g. the root restored a checkpoint, the others are fresh); their
    optimizers must be over parameters of the same shapes.  Call it after
    :func:`broadcast_parameters`.

    Args:
        optimizer: this rank's optimizer, modified in place (``load_state_dict``).
        root: the rank whose state everyone receives.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> opt = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=0.01)
        >>> bf.optim.broadcast_optimizer_state(opt, root=0)
        >>> opt.param_groups[0]["lr"]
        0.01
    """
    fn = "broadcast_optimizer_state"
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    _process_world(fn)
    world = current()
    payload = torch.zeros(0, dtype=torch.uint8)
    if world.rank == root:
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        payload = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    # The length first, so every rank passes a buffer of the root's shape.
    length = broadcast(torch.tensor([payload.numel()], dtype=torch.int64), root)
    if world.rank != root:
        payload = torch.zeros(int(length.item()), dtype=torch.uint8)
    received = broadcast(payload, root)
    state = torch.load(io.BytesIO(received.numpy().tobytes()), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)
