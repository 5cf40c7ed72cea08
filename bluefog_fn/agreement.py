"""First-call agreement: ranks check that they are making the same call before any data moves.

Runs once per call pattern (see :class:`~bluefog_fn.plan_cache.AgreedSet`): every rank publishes
a small description of its call, every rank checks all of them with the same code, so a mismatch
raises the same :class:`~bluefog_fn.MismatchError` everywhere instead of a deadlock.

After a pattern is agreed, calls are checked by their peers only: :func:`agree` numbers every
call (:class:`~bluefog_fn.call_order.CallOrder`), the number travels with each message, and a
receiver that sees another call's number raises (see ``backend/mpi.py``, ``CallWire``).  So a
per-call graph (``dst_weights``) costs no collective either: a pattern with a per-call graph is
agreed once per tree signature, and a graph the peers do not share shows up as a message of the
wrong call (or a message nobody received) within one call.
"""

from __future__ import annotations

from typing import Any

from .backend.errors import CallMismatchError, MismatchError
from .backend.transport import Transport
from .call_order import explain
from .plan import CommPlan
from .world import World


def _describe_leaves(plan: CommPlan, dim0_free: bool) -> tuple[Any, ...]:
    out = []
    for g in plan.layout.groups:
        for s in g.slots:
            shape = s.shape[1:] if dim0_free and s.shape else s.shape
            out.append((s.leaf, s.path, str(g.dtype), shape))
    return tuple(sorted(out))


def agreement_key(plan: CommPlan, per_call_graph: bool) -> Any:
    """What all ranks share about a correct call; ``None`` means "agree on every call"."""
    if per_call_graph:
        return None
    return (plan.op, plan.signature, plan.topology, plan.step, plan.root)


def agree(
    world: World, transport: Transport, fn: str, plan: CommPlan, *, per_call_graph: bool = False, dim0_free: bool = False,
    step: int | None = None,
    graph: object = None,
) -> int | None:
    """Check that every rank calls ``fn`` compatibly with ``plan`` (once per call pattern).

    Returns the call's number (``None`` in a world of one), which its messages carry; ``step``
    and a per-call ``graph`` only name the call in error messages.
    ``per_call_graph``: agree on every call (windows, whose creation is rare and collective);
    neighbour ops with ``dst_weights`` need not — their peers check each call.
    """
    if world.size == 1:
        return None
    call = world.calls.begin(fn, step, graph)
    try:
        transport.begin_call(call, world.calls.floor())
    except CallMismatchError as exc:
        raise explain(world.calls, world.rank, fn, exc) from None
    key = agreement_key(plan, per_call_graph)
    if key is not None and key in world.agreed:
        return call
    mine = {
        "op": plan.op,
        "leaves": _describe_leaves(plan, dim0_free),
        "step": plan.step,
        "topology": plan.topology,
        "root": plan.root,
        "sends": tuple(d for d, _ in plan.sends),
        "recvs": tuple(s for s, _ in plan.recvs),
    }
    at = "" if step is None else f"step {step}, "
    everyone = transport.allgather_object(mine, f"{fn} ({at}agreement)")
    _check(fn, everyone)
    if key is not None:
        world.agreed.add(key)
    return call


def _check(fn: str, everyone: list[dict[str, Any]]) -> None:
    ref = everyone[0]
    for r, info in enumerate(everyone[1:], start=1):
        if info["op"] != ref["op"]:
            raise MismatchError(f"{fn}: rank 0 called {ref['op']} but rank {r} called {info['op']}")
        if info["leaves"] != ref["leaves"]:
            raise MismatchError(f"{fn}: {_leaf_difference(ref['leaves'], info['leaves'], r)}")
        if info["topology"] != ref["topology"]:
            raise MismatchError(
                f"{fn}: rank 0 and rank {r} use different graphs (fingerprints {ref['topology']} and "
                f"{info['topology']}); pass the same topology and step on every rank"
            )
        for key in ("step", "root"):
            if info[key] != ref[key]:
                raise MismatchError(f"{fn}: rank 0 passed {key}={ref[key]} but rank {r} passed {key}={info[key]}")
    for r, info in enumerate(everyone):
        for d in info["sends"]:
            if r not in everyone[d]["recvs"]:
                raise MismatchError(
                    f"{fn}: rank {r} sends to rank {d} but rank {d} does not receive from rank {r} "
                    f"(rank {d} receives from {list(everyone[d]['recvs'])}); check dst_weights/"
                    "src_weights, the topology and step"
                )
        for s in info["recvs"]:
            if r not in everyone[s]["sends"]:
                raise MismatchError(
                    f"{fn}: rank {r} receives from rank {s} but rank {s} does not send to rank {r} "
                    f"(rank {s} sends to {list(everyone[s]['sends'])}); check dst_weights/"
                    "src_weights, the topology and step"
                )


def _leaf_difference(a: tuple[Any, ...], b: tuple[Any, ...], r: int) -> str:
    if len(a) != len(b):
        return f"rank 0 passes a tree with {len(a)} tensor leaves but rank {r} passes {len(b)}"
    for x, y in zip(a, b, strict=True):
        if x != y:
            return (
                f"tree leaf {x[1]} is {x[2]} of shape {x[3]} on rank 0 but {y[2]} of shape "
                f"{y[3]} at {y[1]} on rank {r}"
            )
    return f"rank 0 and rank {r} pass different trees"
