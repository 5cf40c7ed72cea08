"""Tracing: from a call's abstract signature to a cached :class:`~bluefog_fn.plan.CommPlan`."""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

from .plan import (
    CommPlan,
    build_layout,
    canonical_dst_weights,
    canonical_self_weight,
    canonical_src_weights,
    digest,
    make_tag,
)
from .topology import DynamicTopology, Topology
from .tree import Flat
from .world import World

AnyTopology = Topology | DynamicTopology


def check_step(fn: str, step: object) -> int:
    """``step`` must be a non-negative int (numpy/torch integer scalars are accepted, floats not)."""
    if isinstance(step, bool):
        raise TypeError(f"{fn}: step must be an int >= 0, got bool {step!r}")
    try:
        value: int = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{fn}: step must be an int >= 0, got {type(step).__name__} {step!r:.60}") from None
    if value < 0:
        raise ValueError(f"{fn}: step must be an int >= 0, got {step!r}")
    return value


def graph_at(fn: str, topology: object, step: int, size: int) -> Topology:
    """The static graph of ``topology`` at ``step``, checked against the world size."""
    if not isinstance(topology, (Topology, DynamicTopology)):
        raise TypeError(
            f"{fn}: topology must be a bf.topology Topology or DynamicTopology, got "
            f"{type(topology).__name__} {topology!r:.60}"
        )
    if topology.size != size:
        raise ValueError(f"{fn}: topology has size {topology.size} but the world has {size} ranks")
    return topology.at(step)


def mixing_weights(
    fn: str,
    graph: Topology | None,
    rank: int,
    size: int,
    self_weight: float | None,
    src_weights: Mapping[int, float] | None,
    dst_weights: Mapping[int, float] | Sequence[int] | None,
) -> tuple[float, tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
    """``(self_weight, recvs, sends)`` of one rank, following BlueFog's override rules.

    * no override: the graph's weights; this rank sends to its out-neighbours unscaled;
    * ``self_weight`` alone: replaces the graph's self weight;
    * ``src_weights`` (with ``self_weight``) alone: reweights the graph's in-neighbours; an
      in-neighbour left out gets weight 0 (its message still arrives: the graph says it sends);
    * ``dst_weights`` (with ``self_weight`` and ``src_weights``): a per-call graph — send to the
      ``dst_weights`` ranks scaled by their values, receive from the ``src_weights`` ranks.
    """
    sw = canonical_self_weight(fn, self_weight)
    src = canonical_src_weights(fn, src_weights, size, rank)
    dst = canonical_dst_weights(fn, dst_weights, size, rank)
    if src is not None and sw is None:
        raise ValueError(f"{fn}: self_weight is required when src_weights is given (got self_weight=None)")
    if dst is not None:
        if src is None:
            raise ValueError(
                f"{fn}: dst_weights={dict(dst)} needs src_weights (and self_weight): a per-call "
                "graph must say what each rank receives"
            )
        assert sw is not None
        return sw, src, dst
    if graph is None:
        raise ValueError(f"{fn}: topology is None; pass a topology or both src_weights and dst_weights")
    return graph_weights(fn, graph, rank, sw, src)


def graph_weights(
    fn: str,
    graph: Topology,
    node: int,
    self_weight: float | None,
    src: tuple[tuple[int, float], ...] | None,
    *,
    node_word: str = "rank",
    src_arg: str = "src_weights",
    dst_arg: str = "dst_weights",
) -> tuple[float, tuple[tuple[int, float], ...], tuple[tuple[int, float], ...]]:
    """``(self_weight, recvs, sends)`` of ``node`` on ``graph``, with BlueFog's reweighting:
    ``src`` (canonical ``(node, weight)`` pairs) reweights the in-neighbours, one left out gets
    weight 0 and a node that is not an in-neighbour is an error naming ``src_arg``.  Shared by
    rank graphs and machine graphs (``node_word``/``*_arg`` only change the error's words)."""
    sends = tuple((d, 1.0) for d in graph.out_neighbors(node))
    in_weights = graph.recv_weights(node)
    if src is None:
        recvs = tuple(sorted(in_weights.items()))
    else:
        extra = sorted(set(dict(src)) - set(in_weights))
        if extra:
            raise ValueError(
                f"{fn}: {src_arg} names {node_word}(s) {extra} that are not in-neighbours of {node_word} {node} "
                f"(in-neighbours: {sorted(in_weights)}); pass {dst_arg} to change the graph"
            )
        given = dict(src)
        recvs = tuple((j, given.get(j, 0.0)) for j in sorted(in_weights))
    return (graph.self_weight(node) if self_weight is None else self_weight), recvs, sends


def _shared_key(flat: Flat) -> tuple[Any, ...]:
    """What every rank's tree must share: structure, shapes, dtypes (devices may differ)."""
    return (flat.spec, tuple((tuple(t.shape), t.dtype) for t in flat.tensors))


def _dim0_free_key(flat: Flat) -> tuple[Any, ...]:
    """:func:`_shared_key` without first dimensions (the number of dimensions stays)."""
    return (flat.spec, tuple((len(m.shape), m.shape[1:], m.dtype) for m in flat.metas))


def trace_mix(
    world: World,
    op: str,
    flat: Flat,
    topology: AnyTopology | None,
    step: int,
    rank: int,
    self_weight: float | None = None,
    src_weights: Mapping[int, float] | None = None,
    dst_weights: Mapping[int, float] | Sequence[int] | None = None,
    *,
    dim0_free: bool = False,
) -> CommPlan:
    """The (cached) plan of a neighbour op on ``rank``.

    ``dim0_free``: the signature (hence the tag and the agreement key) ignores first dimensions
    (``neighbor_gather`` lets them differ between ranks); the layout is still this rank's own.
    """
    graph = None if topology is None and dst_weights is not None else graph_at(op, topology, step, world.size)
    fingerprint = graph.fingerprint if graph is not None and dst_weights is None else None
    if self_weight is None and src_weights is None and dst_weights is None:
        # The common case: everything the plan depends on is in the graph's fingerprint, so a
        # cache hit needs no weight resolution at all.
        key: tuple[Any, ...] = (op, rank, flat.key, fingerprint)
        resolved = None
    else:
        resolved = mixing_weights(op, graph, rank, world.size, self_weight, src_weights, dst_weights)
        key = (op, rank, flat.key, fingerprint, *resolved)

    def build() -> CommPlan:
        sw, recvs, sends = resolved or mixing_weights(op, graph, rank, world.size, None, None, None)
        layout = build_layout(flat.metas)
        sig = digest(op, _dim0_free_key(flat) if dim0_free else _shared_key(flat))
        return CommPlan(
            op=op,
            rank=rank,
            size=world.size,
            layout=layout,
            self_weight=sw,
            recvs=recvs,
            sends=sends,
            step=step % topology.period if topology is not None and topology.period > 1 else None,
            topology=fingerprint,
            tag=make_tag(sig, fingerprint),
            signature=sig,
        )

    plan: CommPlan = world.plans.lookup(key, build)
    return plan


def trace_collective(
    world: World, op: str, flat: Flat, rank: int, root: int | None = None, *, dim0_free: bool = False
) -> CommPlan:
    """The (cached) plan of a global op (``global_*``, ``broadcast``, ``allgather``).

    ``dim0_free``: the signature ignores first dimensions (``allgather`` lets them differ).
    """
    key = (op, rank, flat.key, root)

    def build() -> CommPlan:
        shared = (flat.spec, tuple((m.shape[1:], m.dtype) for m in flat.metas)) if dim0_free else _shared_key(flat)
        sig = digest(op, shared, root)
        return CommPlan(
            op=op, rank=rank, size=world.size, layout=build_layout(flat.metas), root=root,
            tag=make_tag(sig), signature=sig,
        )

    plan: CommPlan = world.plans.lookup(key, build)
    return plan
