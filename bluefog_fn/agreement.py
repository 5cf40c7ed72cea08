"""Agreement: ranks check that they are making the same call before any data moves.

Runs once per call pattern (see :class:`~bluefog_fn.plan_cache.AgreedSet`): every rank publishes
a small description of its call, every rank checks all of them with the same code, so a mismatch
raises the same :class:`~bluefog_fn.MismatchError` everywhere instead of a deadlock.

After a pattern is agreed, point-to-point calls are checked by their peers only: :func:`agree`
numbers every call (:class:`~bluefog_fn.call_order.CallOrder`), the number travels with each
message, and a receiver that sees another call's number raises (see ``backend/mpi.py``,
``CallWire``).  So a per-call graph (``dst_weights``) costs no collective either: a pattern with
a per-call graph is agreed once per tree signature, and a graph the peers do not share shows up
as a message of the wrong call (or a message nobody received) within one call.

Collectives carry no call number, and MPI pairs them by order alone: two ranks making different
collectives pair them anyway (wrong data, a crash or a hang).  So every collective step starts
with a *call check* (:class:`CallCheck`): one int64 MAX allreduce of
``[fingerprint, -fingerprint, needs_agreement]`` that every rank makes whatever it knows.  The
fingerprint hashes the call's pattern and its number; max ≠ −max(−fingerprint) means the ranks
are making different calls, and every rank raises the same error after one exchange of
descriptions (which names each rank's call).  ``needs_agreement`` from any rank makes every rank
run the agreement, so "agree first" or "straight to data" is decided collectively.  A global op
(:func:`check_global`) makes the check on every call; a point-to-point op only before its
agreement, so that an agreement never pairs with another rank's global op.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np

from .backend.errors import CallMismatchError, MismatchError
from .backend.transport import Pending, Transport
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


def describe_call(plan: CommPlan | None, dim0_free: bool = False, op: str = "barrier") -> dict[str, Any]:
    """What a rank publishes about its call in an agreement (``plan=None``: a call of ``op``
    that moves no tree, such as ``barrier``)."""
    if plan is None:
        return {"op": op, "leaves": (), "step": None, "topology": None, "root": None, "sends": (), "recvs": ()}
    return {
        "op": plan.op,
        "leaves": _describe_leaves(plan, dim0_free),
        "step": plan.step,
        "topology": plan.topology,
        "root": plan.root,
        "sends": tuple(d for d, _ in plan.sends),
        "recvs": tuple(s for s, _ in plan.recvs),
    }


def number_call(
    world: World, transport: Transport, fn: str, step: int | None = None, graph: object = None, *, messages: bool = True
) -> int:
    """The next call number, after probing once for evidence that the ranks already diverged
    (``messages=False``: a global op, whose call no peer sends point-to-point messages for)."""
    call = world.calls.begin(fn, step, graph)
    try:
        transport.begin_call(call, world.calls.floor(), messages)
    except CallMismatchError as exc:
        raise explain(world.calls, world.rank, fn, exc) from None
    return call


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
    call = number_call(world, transport, fn, step, graph)
    key = agreement_key(plan, per_call_graph)
    if key is not None and key in world.agreed:
        return call
    # The pattern is the op alone: the agreement that always follows compares the rest.
    at = "" if step is None else f"step {step}, "
    CallCheck(
        world, transport, fn, call, key, lambda: describe_call(plan, dim0_free), pattern=(fn,), step=step,
        what=f"{fn} ({at}agreement)",
    ).settle()
    return call


def check_global(
    world: World, transport: Transport, fn: str, plan: CommPlan | None, *, dim0_free: bool = False
) -> CallCheck | None:
    """Number a global op's call and post its call check (``None`` in a world of one).

    ``plan=None``: a call that moves no tree (``barrier``, the rank lists of ``infer_sources``).

    Example (a world of one makes no check):
        >>> import bluefog_fn as bf
        >>> from bluefog_fn.world import current
        >>> world = current()
        >>> check_global(world, world.executor.transport, "barrier", None) is None
        True
    """
    if world.size == 1:
        return None
    call = number_call(world, transport, fn, messages=False)
    key = (fn,) if plan is None else agreement_key(plan, False)
    return CallCheck(world, transport, fn, call, key, lambda: describe_call(plan, dim0_free, fn))


_FINGERPRINT_MASK = (1 << 62) - 1  # non-negative, and its negation fits in int64
_CALL_MIX = 0x9E3779B97F4A7C15  # spreads consecutive call numbers over all bits


@functools.lru_cache(maxsize=4096)
def pattern_fingerprint(pattern: Any) -> int:
    """A 62-bit hash of ``pattern`` (its repr), equal on every rank (``hash`` is salted per process).

    Example:
        >>> pattern_fingerprint(("barrier",)) == pattern_fingerprint(("barrier",))
        True
    """
    digest = hashlib.blake2b(repr(pattern).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _FINGERPRINT_MASK


def call_fingerprint(pattern: int, call: int) -> int:
    """``pattern``'s fingerprint made specific to call number ``call``."""
    return (pattern ^ (call * _CALL_MIX)) & _FINGERPRINT_MASK


class CallCheck:
    """One call's check collective, in flight: posted at creation, settled once.

    ``settle`` waits for the header; if the ranks' fingerprints differ or any rank needs the
    agreement, every rank exchanges descriptions (``info()``) and raises the same error or
    records the pattern agreed; then it runs the call's ``post`` (which posts the call's data
    collectives).  A global op *holds* its check with the transport (:meth:`hold`): an ``_async``
    form returns at once, and the transport settles it before it posts any other data collective
    (so every rank posts them in call order; checks have a communicator of their own) or while
    this rank waits.
    """

    __slots__ = ("_error", "_pending", "_settled", "call", "fn", "header", "info", "key", "post", "step", "transport", "world")

    def __init__(
        self, world: World, transport: Transport, fn: str, call: int, key: Any, info: Callable[[], dict[str, Any]],
        *, pattern: Any = None, step: int | None = None, what: str | None = None,
    ) -> None:
        self.world, self.transport, self.fn, self.call, self.key, self.info, self.step = (
            world, transport, fn, call, key, info, step
        )
        fingerprint = call_fingerprint(pattern_fingerprint(key if pattern is None else pattern), call)
        needs = key is None or key not in world.agreed
        self.header = np.array([fingerprint, -fingerprint, int(needs)], dtype=np.int64)
        self.post: Callable[[], None] | None = None
        self._settled = False
        self._error: BaseException | None = None
        # Named as the op itself: a rank that never arrives "did not enter global_mean".
        self._pending: Pending = transport.allreduce_max(self.header, what or fn)

    def _at(self) -> str:
        return "" if self.step is None else f"step {self.step}, "

    def hold(self, post: Callable[[], None]) -> None:
        """Run ``post`` once the check passed; leave the settling to the transport or :meth:`posted`."""
        self.post = post
        self.transport.hold(self)

    def ready(self) -> bool:
        """Whether :meth:`settle` would find the header in (it may still agree: one exchange)."""
        return self._settled or self._pending.done()

    def posted(self) -> None:
        """Settle this call (every call held before it first): afterwards its data is posted."""
        self.transport.settle()
        self.settle()

    def poll(self) -> bool:
        """Never waits for the header: whether the data is posted (posting it if the header is
        in) or the check failed (so that ``wait`` raises at once)."""
        if not self._settled:
            if not self._pending.done():
                return False
            with contextlib.suppress(Exception):  # kept: the handle's wait raises it
                self.posted()
        return True

    def settle(self) -> None:
        """Wait for the header, check it, agree if needed, post the data (once; a failure is
        raised again by every later call)."""
        if self._settled:
            if self._error is not None:
                raise self._error
            return
        self._settled = True
        try:
            self._pending.wait()
            fingerprint, negated, needs = self.header.tolist()
            diverged = fingerprint != -negated
            if diverged or needs:
                mine = {**self.info(), "call": self.call, "what": self.world.calls.describe(self.call) or self.fn}
                everyone = self.transport.allgather_object(mine, f"{self.fn} ({self._at()}agreement)")
                _check_calls(self.fn, everyone, diverged)
                if self.key is not None:
                    self.world.agreed.add(self.key)
            if self.post is not None:
                self.post()
        except BaseException as exc:
            self._error = exc
            raise


def _check_calls(fn: str, everyone: list[dict[str, Any]], diverged: bool) -> None:
    """Raise the same error on every rank if the descriptions (or, ``diverged``, the calls) differ."""
    calls = "; the ranks' calls: " + ", ".join(f"rank {r}: call #{info['call']} {info['what']}" for r, info in enumerate(everyone))
    try:
        _check(fn, everyone)
    except MismatchError as exc:
        raise MismatchError(f"{exc}{calls if diverged else ''}") from None
    if not diverged:
        return
    ref = everyone[0]
    for r, info in enumerate(everyone[1:], start=1):
        if info["call"] != ref["call"]:
            raise MismatchError(
                f"{fn}: rank 0 is at its call #{ref['call']} but rank {r} is at its call #{info['call']} "
                f"(a rank skipped or added a call){calls}"
            )
    raise MismatchError(f"{fn}: the ranks are making different calls{calls}")


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
