"""The world: who this process is, which transport it talks through, and its plan cache.

This module holds the library's only mutable global: :data:`_CONTEXT`, the stack of active
worlds.  ``bf.init`` pushes the process world; ``bf.simulate(n)`` pushes a simulated world on top
and pops it on exit.  Nothing imports MPI until a world that needs it is created.

Environment variables:

* ``BLUEFOG_FN_TIMEOUT`` — seconds a rank waits for a peer before raising
  :class:`~bluefog_fn.CommTimeoutError` (default 60); it bounds every wait of the library,
  the shutdown at interpreter exit included (see :mod:`bluefog_fn.failure`).
* ``BLUEFOG_FN_INIT_TIMEOUT`` — seconds the world's creation waits for every rank to arrive
  (ranks start unevenly: imports, data loading); default the larger of 60 and
  ``BLUEFOG_FN_TIMEOUT``.
* ``BLUEFOG_FN_RANKS_PER_MACHINE`` — pretend every K consecutive ranks share one machine, so
  hierarchical features can be exercised on a single host (``size`` must be a multiple of K).
* ``BLUEFOG_FN_SHM`` — the same-host shared-memory transport: ``auto`` (default: trees of at
  least 32 MiB), ``1`` (every size), ``0`` (off); ``BLUEFOG_FN_SHM_MAX_MB`` bounds the shared
  buffers one rank allocates (default 4096).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .call_order import CallOrder
from .execute import Resources
from .log import get_logger
from .plan_cache import AgreedSet, PlanCache
from .timeline import Timeline, from_env

if TYPE_CHECKING:
    from .executors.base import Executor
    from .executors.exchanges import Exchanges

BackendName = Literal["auto", "local", "mpi"]

_MPI_ENV_KEYS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


@dataclass
class World:
    """One communication world (a process world, or a simulated world of ``size`` agents)."""

    backend: str
    rank: int
    size: int
    local_rank: int
    local_size: int
    machine_rank: int
    machine_size: int
    # How ops run here (one executor per kind of world: process or simulated).
    executor: Executor
    plans: PlanCache = field(default_factory=PlanCache)
    # Call patterns every rank has agreed on, so agreement runs once per pattern.
    agreed: AgreedSet = field(default_factory=AgreedSet)
    # Numbers this rank's communicating calls; messages carry the number (see call_order.py).
    calls: CallOrder = field(default_factory=CallOrder)
    # Op events for ``bfrun --timeline``; None (the default) costs one attribute check per op.
    timeline: Timeline | None = None
    # Inside ``bf.sim.vmap``: the stack of agent-index tensors (per-agent mode when non-empty).
    vmap_agents: list[Any] = field(default_factory=list)
    # Reusable memory: pooled host buffers and pinned staging (bounded; see backend/buffers.py).
    resources: Resources = field(default_factory=Resources)
    # A simulated world's cache of stacked executors (owned by bluefog_fn.sim).
    sim_executors: Any = None
    # Why the machines are not homogeneous blocks of consecutive ranks (None: they are); the
    # hierarchical ops refuse to run otherwise.  The same on every rank (computed from all ranks).
    homogeneity: str | None = None
    # Called (weakly: a collected owner is skipped) before the world closes, to move tensors
    # out of memory that closes with it (see World.on_close).
    closing: list[Any] = field(default_factory=list)

    def on_close(self, method: Any) -> None:
        """Call the bound ``method`` before this world closes, if its object is still alive.

        For objects holding tensors in memory the world owns (``bf.shared_tree`` regions), so
        they can move them out before it is unmapped.
        """
        # Collected owners' entries go here, so the list stays as long as the live owners.
        self.closing = [ref for ref in self.closing if ref() is not None]
        self.closing.append(weakref.WeakMethod(method))



class _Context:
    def __init__(self) -> None:
        self.stack: list[World] = []


_CONTEXT = _Context()


def _timeout(name: str = "BLUEFOG_FN_TIMEOUT", default: float = 60.0) -> float:
    raw = os.environ.get(name, "")
    if raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def _ranks_per_machine(size: int) -> int | None:
    raw = os.environ.get("BLUEFOG_FN_RANKS_PER_MACHINE")
    if raw is None or raw == "":
        return None
    try:
        k = int(raw)
    except ValueError:
        raise ValueError(f"BLUEFOG_FN_RANKS_PER_MACHINE must be an integer, got {raw!r}") from None
    if k < 1 or size % k:
        raise ValueError(
            f"BLUEFOG_FN_RANKS_PER_MACHINE={k} must be >= 1 and divide the world size {size}"
        )
    return k


def _under_mpiexec() -> bool:
    return any(key in os.environ for key in _MPI_ENV_KEYS)


def _make_local() -> World:
    from .backend.local import LocalTransport
    from .executors.process import ProcessExecutor

    executor = ProcessExecutor("local", LocalTransport())
    return World("local", 0, 1, 0, 1, 0, 1, executor, timeline=from_env(0, 1, merge_on_close=True))


def _make_mpi(shm: bool | None = None) -> World:
    from . import failure

    timeout = _timeout()
    init_timeout = _timeout("BLUEFOG_FN_INIT_TIMEOUT", max(60.0, timeout))
    with failure.startup_deadline(init_timeout):
        from .backend import mpi  # deferred: importing mpi4py initializes MPI

        comm = mpi.world_comm()
    if comm.Get_size() > 1:
        # Before the first collective: a rank failing from here on takes the job down with it.
        failure.install(comm.Get_rank(), mpi.abort_world, at_exit=_shutdown_at_exit)
    transport = mpi.MpiTransport(comm, timeout, init_timeout)
    rank, size = transport.rank, transport.size
    k = _ranks_per_machine(size)
    if k is None:
        local_rank, local_size, machine_rank, machine_size = mpi.node_layout(transport.comm, init_timeout)
    else:
        local_rank, local_size, machine_rank, machine_size = rank % k, k, rank // k, size // k
    from .executors.process import ProcessExecutor
    from .hierarchy import homogeneity_problem

    layouts = transport.allgather_object((local_rank, local_size, machine_rank))
    exchanges = _exchanges(transport, machine_rank, timeout, shm)
    world = World(
        "mpi", rank, size, local_rank, local_size, machine_rank, machine_size,
        ProcessExecutor("mpi", transport, exchanges),
        timeline=from_env(rank, size), homogeneity=homogeneity_problem(layouts),
    )
    _warn_about(world, transport.thread_level, local_size if k is None else None)
    return world


def _exchanges(transport: Any, machine: int, timeout: float, shm: bool | None) -> Exchanges:
    """The process world's exchanges: MPI, plus same-host shared memory unless turned off.

    Every rank must ask for the same policy (``bf.init(shm=...)``, ``BLUEFOG_FN_SHM``,
    ``BLUEFOG_FN_SHM_MAX_MB``): a writer and its readers must pick the same path.
    """
    from .backend.shared_memory import SharedChannel
    from .executors.exchanges import Exchanges, SharedMemoryPolicy

    policy = SharedMemoryPolicy.from_env(shm)
    everyone = transport.allgather_object(policy, "init (the same-host shared memory policy)")
    differ = [r for r, p in enumerate(everyone) if p != everyone[0]]
    if differ:
        raise ValueError(
            f"init: ranks {differ} ask for another same-host shared-memory policy than rank 0 ({everyone[0]}), "
            f"e.g. {everyone[differ[0]]}; set BLUEFOG_FN_SHM / BLUEFOG_FN_SHM_MAX_MB and bf.init(shm=...) "
            "alike on every rank"
        )
    if not policy.enabled or transport.size == 1:
        return Exchanges(transport, None, policy)
    memory = transport.host_memory(machine)
    if len(memory.members) < 2:
        return Exchanges(transport, None, policy)
    channel = SharedChannel(
        memory, timeout, policy.max_bytes, probe=transport.probe_divergence, notify=transport.notify_mismatch,
        departed=transport.departed,
    )
    transport.on_idle(channel.drain)  # a rank waiting on MPI never holds buffers its peers need
    transport.on_collective_wait(channel.refuse_transfers)  # a peer's transfer of a global op's call
    return Exchanges(transport, channel, policy)


def _cpu_count() -> int:
    # The machine's cores, not this process's affinity: a launcher binding each rank to its own
    # core (``-bind-to core``) would otherwise make every rank look oversubscribed.
    return os.cpu_count() or 1


def _warn_about(world: World, thread_level: str, ranks_here: int | None) -> None:
    """Log what a user of this world must know (once per machine or once per job)."""
    log = get_logger("world")
    log.info(
        "world: rank %d of %d (machine %d of %d, local rank %d of %d), MPI thread level %s",
        world.rank, world.size, world.machine_rank, world.machine_size, world.local_rank, world.local_size,
        thread_level, extra={"rank": world.rank},
    )
    cpus = _cpu_count()
    if ranks_here is not None and ranks_here > cpus and world.local_rank == 0:
        log.warning(
            "%d ranks run on this machine, which has %d CPU core(s) for them: oversubscribed. Waits "
            "yield the core, so results are right, but every rank runs slower and timings mislead",
            ranks_here, cpus, extra={"rank": world.rank},
        )
    if thread_level == "multiple" and world.rank == 0:
        log.warning(
            "MPI was initialized with MPI_THREAD_MULTIPLE (mpi4py's default: mpi4py.MPI was imported "
            "before bluefog_fn); polled waits can be hundreds of times slower. Import bluefog_fn "
            "first, or set mpi4py.rc.thread_level = 'serialized' before importing mpi4py.MPI",
            extra={"rank": world.rank},
        )


def init(backend: BackendName = "auto", *, shm: bool | None = None) -> None:
    """Start the process world; idempotent.

    Args:
        backend: ``"mpi"`` (the MPI world; the process must run under ``mpiexec``/``bfrun`` for
            more than one rank), ``"local"`` (a world of one) or ``"auto"`` (MPI when launched by
            mpiexec, else local).
        shm: the same-host shared-memory transport for ranks of one machine: ``None`` (the
            default: ``BLUEFOG_FN_SHM``, else on for trees of at least 32 MiB), ``True`` (every
            size), ``False`` (off: MPI only).  Every rank must pass the same.

    Example:
        >>> import bluefog_fn as bf
        >>> bf.init()
        >>> bf.size() >= 1
        True
    """
    if backend not in ("auto", "local", "mpi"):
        raise ValueError(f"init: backend must be 'auto', 'local' or 'mpi', got {backend!r}")
    if shm is not None and not isinstance(shm, bool):
        raise TypeError(f"init: shm must be None, True or False, got {type(shm).__name__} {shm!r}")
    process = _process_world()
    if process is not None:
        if backend != "auto" and process.backend != backend:
            raise ValueError(
                f"init: the world is already initialized with backend {process.backend!r}; "
                f"call bf.shutdown() before init(backend={backend!r})"
            )
        return
    if backend == "mpi" or (backend == "auto" and _under_mpiexec()):
        world = _make_mpi(shm)
    else:
        world = _make_local()
    _CONTEXT.stack.insert(0, world)


def shutdown() -> None:
    """Tear the process world down (its plan cache and private communicator go with it).

    With more than one rank this is where a rank leaves the job: it waits until every rank has
    left (at most ``BLUEFOG_FN_TIMEOUT`` seconds, else :class:`~bluefog_fn.CommTimeoutError`
    naming the ranks that did not).  Runs by itself at interpreter exit.

    Example:
        >>> import bluefog_fn as bf
        >>> bf.shutdown()
        >>> bf.size() >= 1  # the next op starts a new world
        True
    """
    process = _process_world()
    if process is None:
        return
    if _CONTEXT.stack[-1] is not process:
        raise RuntimeError("shutdown: cannot shut down inside bf.simulate(...)")
    _close(process)


def _close(process: World) -> None:
    _CONTEXT.stack.clear()  # first: a failing close leaves no half-closed world behind
    try:
        for ref in process.closing:
            method = ref()
            if method is not None:
                method()
        process.closing.clear()
        process.executor.close()
    finally:
        if process.timeline is not None:
            process.timeline.close()


def _shutdown_at_exit() -> None:
    # The program may exit from inside bf.simulate(...): the process world closes all the same.
    process = _process_world()
    if process is not None:
        _close(process)


def _process_world() -> World | None:
    return _CONTEXT.stack[0] if _CONTEXT.stack and _CONTEXT.stack[0].backend != "sim" else None


def current() -> World:
    """The innermost active world, initializing the process world on first use."""
    if not _CONTEXT.stack:
        init()
    return _CONTEXT.stack[-1]


def push(world: World) -> None:
    """Make ``world`` current (used by ``bf.simulate``)."""
    current()  # the process world always sits at the bottom of the stack
    _CONTEXT.stack.append(world)


def pop(world: World) -> None:
    """Undo :func:`push`."""
    if not _CONTEXT.stack or _CONTEXT.stack[-1] is not world:
        raise RuntimeError("bf.simulate contexts must be exited in the reverse order of entry")
    _CONTEXT.stack.pop()


def rank() -> int:
    """This process's rank in the current world (0 in a world of one).

    Example:
        >>> import bluefog_fn as bf
        >>> 0 <= bf.rank() < bf.size()
        True
    """
    return current().rank


def size() -> int:
    """Number of ranks (or simulated agents) in the current world.

    Example:
        >>> import bluefog_fn as bf
        >>> bf.size() >= 1
        True
    """
    return current().size


def local_rank() -> int:
    """Rank among the processes on this machine."""
    return current().local_rank


def local_size() -> int:
    """Number of processes on this machine."""
    return current().local_size


def machine_rank() -> int:
    """Index of this machine (machines are numbered by their lowest world rank)."""
    return current().machine_rank


def machine_size() -> int:
    """Number of machines in the world."""
    return current().machine_size


def is_homogeneous() -> bool:
    """True when every machine runs the same number of ranks and holds consecutive ranks.

    BlueFog's ``is_homogeneous``; the hierarchical ops (``local_mean``,
    ``hierarchical_neighbor_mean``) need it and raise a ``ValueError`` saying why otherwise.
    Always true for ``BLUEFOG_FN_RANKS_PER_MACHINE`` and in ``bf.simulate``.

    Example:
        >>> import bluefog_fn as bf
        >>> bf.is_homogeneous()
        True
    """
    return current().homogeneity is None
