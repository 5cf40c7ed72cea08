"""The seam between ops and engines: one :class:`Executor` per kind of world.

An op validates its arguments, then hands the flattened tree to ``world.executor``, which traces
the call into (cached) plans and runs them.  No op knows which world it runs in:

* :class:`~bluefog_fn.executors.process.ProcessExecutor` — a process world (``"mpi"``, or
  ``"local"``: a world of one), over a :class:`~bluefog_fn.backend.transport.Transport`;
* :class:`~bluefog_fn.sim.executor.SimExecutor` — ``bf.simulate(n)``: every agent in this
  process, leaves stacked along a leading agent dimension.

Besides the ops, an executor says how values are represented in its world (:attr:`agents`,
:attr:`agent_shape`, :meth:`agent_view`, :meth:`one_agent`), which is all the front end needs
to build per-agent quantities (push-sum weights, window shares) without asking what kind of
world it is in.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from ..ops.handle import Handle
    from ..ops.window import Window, WindowSnapshot
    from ..topology import Topology
    from ..tracing import AnyTopology
    from ..tree import Flat
    from ..world import World


class _Miss:
    def __repr__(self) -> str:
        return "MISS"


#: What :meth:`Executor.neighbor_mean_lean` returns when it does not serve the call.
MISS: Any = _Miss()


class WindowEngine(ABC):
    """The memory behind one :class:`~bluefog_fn.ops.window.Window`, after its arguments are
    resolved: one-sided MPI memory, or every agent's slots in this process."""

    @abstractmethod
    def push(self, fn: str, flat: Flat, dst_weights: Any, step: int, accumulate: bool) -> Handle[None]: ...

    @abstractmethod
    def get(self, fn: str, src_weights: Any, step: int) -> Handle[None]: ...

    @abstractmethod
    def update(self, fn: str, flat: Flat | None, self_weight: Any, src_weights: Any, reset: bool, step: int) -> Any: ...

    @abstractmethod
    def snapshot(self, fn: str, signature: str) -> WindowSnapshot: ...

    @abstractmethod
    def restore(self, fn: str, snapshot: WindowSnapshot) -> None: ...

    @abstractmethod
    def mutex_acquire(self, ranks: tuple[int, ...], what: str) -> None: ...

    @abstractmethod
    def mutex_release(self, ranks: tuple[int, ...], what: str) -> None: ...

    @abstractmethod
    def free(self, fn: str) -> None: ...


class Executor(ABC):
    """Runs every op of one kind of world (see the module docstring)."""

    #: ``"mpi"``, ``"local"`` or ``"sim"``: the world's ``backend`` name.
    kind: str

    # ------------------------------------------------------------------ representation

    @abstractmethod
    def agents(self, world: World) -> range | tuple[int, ...]:
        """The ranks whose values this process holds (its own, or every simulated agent's)."""

    @abstractmethod
    def agent_shape(self, world: World) -> tuple[int, ...]:
        """Leading dimensions of a per-agent value here: ``()``, or ``(n,)`` when stacked."""

    @abstractmethod
    def agent_view(self, world: World, flat: Flat, fn: str) -> Flat:
        """``flat`` as one agent sees it (what plans are traced from)."""

    @abstractmethod
    def one_agent(self, world: World, tree: Any) -> Any:
        """One agent's copy of a value every agent holds equally (e.g. a global mean)."""

    # ------------------------------------------------------------------ ops

    def shared_tree(self, world: World, flat: Flat) -> Any:
        """``bf.shared_tree``: a copy of the tree that peers on this machine can read in place
        (here: an ordinary copy; a process world with the same-host transport overrides it)."""
        return flat.unflatten([t.detach().clone() for t in flat.tensors])

    def neighbor_mean_lean(self, world: World, tree: Any, topology: Any, step: Any) -> Any:
        """A plain synchronous ``neighbor_mean`` (no weight overrides) served by a prepared
        executor, or :data:`MISS` when the call must take the regular path (validate →
        :meth:`neighbor_mean`).  Never raises for bad input: it only recognises calls seen before."""
        return MISS

    @abstractmethod
    def neighbor_mean(
        self, world: World, flat: Flat, topology: AnyTopology | None, step: int,
        self_weight: Any, src_weights: Any, dst_weights: Any, *, adjoint: bool = False, sync: bool = False,
        out: Sequence[torch.Tensor] | None = None,
    ) -> Handle[Any]:
        """``W x`` (``adjoint``: ``Wᵀ x``, the gradient's exchange, not itself recorded by autograd).

        ``sync``: the caller waits on the handle at once (an executor may then fuse posting
        and combining); results are the same either way.  ``out``: leaves (validated by the op:
        ``flat``'s shapes and dtypes, memory disjoint from it, nothing to differentiate) that
        receive the result; the handle's tree then has them as its leaves."""

    @abstractmethod
    def neighbor_gather(
        self, world: World, tree: Any, topology: AnyTopology | None, step: int, src_weights: Any, dst_weights: Any,
    ) -> Handle[Any]: ...

    @abstractmethod
    def reduce(self, world: World, fn: str, flat: Flat, mean: bool) -> Handle[Any]: ...

    @abstractmethod
    def broadcast(self, world: World, flat: Flat, root: int) -> Handle[Any]: ...

    @abstractmethod
    def allgather(self, world: World, flat: Flat) -> Handle[Any]: ...

    @abstractmethod
    def barrier(self, world: World) -> Handle[None]: ...

    @abstractmethod
    def staged(
        self, world: World, fn: str, flat: Flat, *, graph: Topology | None = None,
        topology: AnyTopology | None = None, step: int = 0, self_weight: Any = None,
        src_machine_weights: Any = None, dst_machine_weights: Any = None, adjoint: bool = False,
    ) -> Handle[Any]:
        """``local_mean`` (``fn == "local_mean"``) or ``hierarchical_neighbor_mean``
        (``adjoint``: the reversed pipeline, not itself recorded by autograd)."""

    @abstractmethod
    def infer(self, world: World, fn: str, arg: str, ranks: Any) -> Any:
        """``infer_sources`` / ``infer_destinations``: every rank's lists inverted."""

    @abstractmethod
    def open_window(self, world: World, window: Window, flat: Flat) -> WindowEngine:
        """Create the memory of ``window`` (collective on a process world)."""

    # ------------------------------------------------------------------ lifetime

    @abstractmethod
    def close(self) -> None:
        """Release what the executor holds (the transport of a process world)."""

    def clear(self) -> None:  # noqa: B027  (optional: executors without caches keep nothing)
        """Drop prepared executors (``bf.plan_cache_clear``)."""


SrcWeights = Mapping[int, float]
DstWeights = Mapping[int, float] | Sequence[int]
