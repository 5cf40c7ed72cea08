"""The ops as PyTorch custom ops (``torch.library``), so that they work inside ``torch.compile``.

Under ``torch.compile`` (``torch.compiler.is_compiling()``) each public op does not run its
Python path (which dynamo cannot trace: numba, MPI, caches); it calls one of two custom ops,
opaque to dynamo:

* ``bluefog_fn::mix(Tensor[] xs, int spec, int step, bool adjoint) -> Tensor[]`` — the linear,
  differentiable ops: ``neighbor_mean``, ``hierarchical_neighbor_mean``, ``local_mean``,
  ``global_mean``.  Its autograd formula is the same op with ``adjoint`` flipped: Wᵀ for a mix,
  the reversed pipeline for a staged op; ``global_mean`` and ``local_mean`` are symmetric.
* ``bluefog_fn::collect(Tensor[] xs, int spec, int step) -> Tensor[]`` — the others
  (``global_sum``, ``broadcast``, ``allgather``, ``neighbor_gather``), not differentiable, as
  in eager mode.

``spec`` indexes a registry of the call's static arguments (op, topology, weights, root), filled
at trace time and deduplicated by value, so a compiled graph holds a small int; ``step`` stays an
int input, so a training loop does not recompile per step.  At run time the custom op calls the
world's executor exactly as the eager op does (same plans, same cache, same numbers); its fake
implementation gives dynamo the output shapes.  The ``_async`` forms work too: the compiled graph
runs the op where it is called and the handle is complete at once (nothing overlaps inside a
compiled graph; ``wait()`` returns the result).  Inside ``bf.sim.vmap`` the ops' own ``vmap``
rules apply (``register_vmap`` hands the batched tensors to the stacked simulator).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..hierarchy import machine_graph
from ..tree import flatten
from ..world import current
from .handle import Handle


@dataclass(frozen=True)
class CallSpec:
    """The static part of a compiled call (what the graph refers to by index)."""

    op: str
    topology: Any
    kwargs: tuple[tuple[str, Any], ...]

    def arg(self, name: str) -> Any:
        return _thaw(dict(self.kwargs).get(name))


_SPECS: list[CallSpec] = []
_INDEX: dict[Hashable, int] = {}


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return ("__dict__", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, (list, tuple)):
        return ("__list__", tuple(_freeze(v) for v in value))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__dict__":
        return {k: _thaw(v) for k, v in value[1]}
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__list__":
        return [_thaw(v) for v in value[1]]
    return value


@torch._dynamo.assume_constant_result  # type: ignore[untyped-decorator]
def _spec_id(op: str, topology: Any, kwargs: tuple[tuple[str, Any], ...]) -> int:
    key = (op, id(topology), kwargs)
    index = _INDEX.get(key)
    if index is None:
        index = _INDEX[key] = len(_SPECS)
        _SPECS.append(CallSpec(op, topology, kwargs))  # keeps the topology alive: its id stays unique
    return index


def spec_of(op: str, topology: Any = None, **kwargs: Any) -> int:
    """The registry index of a call's static arguments (trace time)."""
    index: int = _spec_id(op, topology, tuple(sorted((k, _freeze(v)) for k, v in kwargs.items())))
    return index


# ----------------------------------------------------------------------------------- execution


def _run(spec: CallSpec, xs: Sequence[torch.Tensor], step: int, adjoint: bool) -> list[torch.Tensor]:
    """The call on plain tensors, through the world's executor (as the eager op runs it)."""
    world = current()
    ex = world.executor
    flat = flatten(list(xs), spec.op)
    op = spec.op
    if op == "neighbor_mean":
        handle = ex.neighbor_mean(
            world, flat, spec.topology, step, spec.arg("self_weight"), spec.arg("src_weights"),
            spec.arg("dst_weights"), adjoint=adjoint, sync=True,
        )
    elif op == "local_mean":
        handle = ex.staged(world, op, flat, adjoint=adjoint)
    elif op == "hierarchical_neighbor_mean":
        dst = spec.arg("dst_machine_weights")
        at, graph, topology = machine_graph(op, world, spec.topology, step, dst is not None)
        handle = ex.staged(
            world, op, flat, graph=graph, topology=topology, step=at, self_weight=spec.arg("self_weight"),
            src_machine_weights=spec.arg("src_machine_weights"), dst_machine_weights=dst, adjoint=adjoint,
        )
    elif op in ("global_mean", "global_sum"):
        handle = ex.reduce(world, op, flat, op == "global_mean")
    elif op == "broadcast":
        handle = ex.broadcast(world, flat, spec.arg("root"))
    elif op == "allgather":
        handle = ex.allgather(world, flat)
    elif op == "neighbor_gather":
        gathered = ex.neighbor_gather(world, list(xs), spec.topology, step, spec.arg("src_weights"), spec.arg("dst_weights")).wait()
        return [t.clone() for src in sorted(gathered) for t in gathered[src]]
    else:  # pragma: no cover - the registry holds only the names above
        raise AssertionError(op)
    with torch.no_grad():
        return list(handle.wait())


def _fresh(outs: list[torch.Tensor], xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Custom ops may not return their inputs (a world of one's broadcast can)."""
    ids = {id(x) for x in xs}
    storages = {x.untyped_storage().data_ptr() for x in xs if x.numel()}
    return [o.clone() if id(o) in ids or (o.numel() and o.untyped_storage().data_ptr() in storages) else o for o in outs]


@torch.library.custom_op("bluefog_fn::mix", mutates_args=())
def _mix(xs: list[torch.Tensor], spec: int, step: int, adjoint: bool) -> list[torch.Tensor]:
    return _fresh(_run(_SPECS[spec], xs, step, adjoint), xs)


@_mix.register_fake
def _mix_fake(xs: list[torch.Tensor], spec: int, step: int, adjoint: bool) -> list[torch.Tensor]:
    return [torch.empty_like(x) for x in xs]


def _mix_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    _, ctx.spec, ctx.step, ctx.adjoint = inputs


def _mix_backward(ctx: Any, grads: list[torch.Tensor]) -> tuple[Any, ...]:
    spec = _SPECS[ctx.spec]
    symmetric = spec.op in ("global_mean", "local_mean")
    grads = [g.contiguous() for g in grads]
    return torch.ops.bluefog_fn.mix(grads, ctx.spec, ctx.step, ctx.adjoint if symmetric else not ctx.adjoint), None, None, None


_mix.register_autograd(_mix_backward, setup_context=_mix_setup)


@torch.library.custom_op("bluefog_fn::collect", mutates_args=())
def _collect(xs: list[torch.Tensor], spec: int, step: int) -> list[torch.Tensor]:
    return _fresh(_run(_SPECS[spec], xs, step, False), xs)


@_collect.register_fake
def _collect_fake(xs: list[torch.Tensor], spec: int, step: int) -> list[torch.Tensor]:
    s = _SPECS[spec]
    world = current()
    if s.op == "allgather":
        n = world.size
        if world.executor.agent_shape(world):
            return [x.new_empty((x.shape[0], n * x.shape[1], *x.shape[2:])) for x in xs]
        return [x.new_empty((n * x.shape[0], *x.shape[1:])) for x in xs]
    if s.op == "neighbor_gather":
        return [torch.empty_like(x) for _ in _gather_sources(s) for x in xs]
    return [torch.empty_like(x) for x in xs]


# ----------------------------------------------------------------------------------- vmap rules


def _vmap_rule(name: str) -> Any:
    def rule(info: Any, in_dims: tuple[Any, ...], xs: list[torch.Tensor], spec: int, step: int, *rest: Any) -> tuple[Any, Any]:
        # Inside bf.sim.vmap the batch dimension is the agent dimension: the stacked op on the
        # moved tensors is the per-agent op of every agent at once.
        moved = [
            x.movedim(d, 0) if d is not None else x.unsqueeze(0).expand(info.batch_size, *x.shape)
            for x, d in zip(xs, in_dims[0], strict=True)
        ]
        agents = current().vmap_agents
        saved = list(agents)
        agents.clear()  # the executor sees stacked tensors, not per-agent ones
        try:
            out = getattr(torch.ops.bluefog_fn, name)(moved, spec, step, *rest)
        finally:
            agents[:] = saved
        return out, [0] * len(out)

    return rule


torch.library.register_vmap("bluefog_fn::mix", _vmap_rule("mix"))
torch.library.register_vmap("bluefog_fn::collect", _vmap_rule("collect"))


# ----------------------------------------------------------------------------------- front ends


def _leaves(tree: Any, fn: str) -> tuple[list[torch.Tensor], Any, list[int], int]:
    leaves, spec = pytree.tree_flatten(tree)
    positions = [i for i, leaf in enumerate(leaves) if leaf is not None]
    for i in positions:
        if not isinstance(leaves[i], torch.Tensor):
            raise TypeError(f"{fn}: tree leaf {i} must be a torch.Tensor or None, got {type(leaves[i]).__name__}")
    return [leaves[i] for i in positions], spec, positions, len(leaves)


def _rebuild(outs: Sequence[torch.Tensor], spec: Any, positions: list[int], n: int) -> Any:
    leaves: list[Any] = [None] * n
    for p, t in zip(positions, outs, strict=True):
        leaves[p] = t
    return pytree.tree_unflatten(leaves, spec)


def call_mix(fn: str, tree: Any, step: int, topology: Any = None, **kwargs: Any) -> Any:
    """A differentiable op inside ``torch.compile``: one ``bluefog_fn::mix`` node."""
    tensors, spec, positions, n = _leaves(tree, fn)
    if not tensors:
        return tree
    outs = torch.ops.bluefog_fn.mix(tensors, spec_of(fn, topology, **kwargs), step, False)
    return _rebuild(outs, spec, positions, n)


def call_collect(fn: str, tree: Any, step: int = 0, topology: Any = None, **kwargs: Any) -> Any:
    """A non-differentiable op inside ``torch.compile``: one ``bluefog_fn::collect`` node."""
    tensors, spec, positions, n = _leaves(tree, fn)
    if not tensors:
        return tree if fn != "neighbor_gather" else {}
    index = spec_of(fn, topology, **kwargs)
    outs = torch.ops.bluefog_fn.collect(tensors, index, step)
    if fn != "neighbor_gather":
        return _rebuild(outs, spec, positions, n)
    sources = _gather_sources_of(index)
    k = len(tensors)
    return {src: _rebuild(outs[i * k : (i + 1) * k], spec, positions, n) for i, src in enumerate(sources)}


@torch._dynamo.assume_constant_result  # type: ignore[untyped-decorator]
def _gather_sources_of(index: int) -> tuple[int, ...]:
    return _gather_sources(_SPECS[index])


def _gather_sources(s: CallSpec) -> tuple[int, ...]:
    world = current()
    src = s.arg("src_weights")
    if src is not None:
        return tuple(sorted(src))
    return tuple(sorted(s.topology.at(s.arg("step_in_graph") or 0).in_neighbors(world.rank)))


def ready(value: Any) -> Handle[Any]:
    """The handle of an ``_async`` op inside ``torch.compile``: the compiled graph runs the op
    as one node where it is called, so the handle is complete at once (``wait()`` returns it)."""
    return Handle(lambda: value)
