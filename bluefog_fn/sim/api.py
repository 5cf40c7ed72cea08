"""``bf.simulate(n)``, ``bf.sim.vmap`` and helpers to build and split per-agent data."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch.utils import _pytree as pytree

from .. import world as _world
from ..plan_cache import DEFAULT_MAXSIZE, PlanCache
from .stacked import current_agents, pop_agents, push_agents

F = TypeVar("F", bound=Callable[..., Any])


def _check_n(fn: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or int(n) < 1:
        raise ValueError(f"{fn}: n must be an int >= 1 (the number of simulated agents), got {n!r}")
    return int(n)


class simulate(contextlib.ContextDecorator):  # used like a function: bf.simulate(n)
    """A world of ``n`` simulated agents in this process; a context manager and a decorator.

    Inside it ``bf.size() == n`` and every op takes trees whose leaves carry a leading agent
    dimension of length ``n``; the result, row ``i``, is what the MPI backend returns on rank ``i``
    of an ``n``-process world, bitwise for ``neighbor_mean`` in float32/float64 (see
    ``docs/performance.md``).  Plans are traced and cached as on MPI, one per agent, in this
    world's own plan cache.  ``bf.rank()`` stays 0 here: per-agent code run by
    :func:`bluefog_fn.sim.vmap` gets its agent from :func:`bluefog_fn.sim.agent_index`.

    One ``simulate`` object keeps one world: used as a decorator, every call of the function
    enters the same world, so plans traced by one call are reused by the next.  Worlds nest
    (inner ``simulate`` wins) and can be entered inside an MPI world (the simulator then runs on
    each rank independently).

    Args:
        n: the number of agents, an int >= 1.
        local_size: agents per simulated machine (default ``n``: one machine), for
            ``bf.hierarchical_neighbor_mean``; must divide ``n``.  Machines are blocks of
            consecutive agents, as ``BLUEFOG_FN_RANKS_PER_MACHINE`` makes them on MPI.

    Raises:
        ValueError: if ``n`` is not an int >= 1 or ``local_size`` does not divide it.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> with bf.simulate(4):
        ...     x = torch.arange(4.0, dtype=torch.float64).unsqueeze(1)   # agent i holds [i]
        ...     bf.size(), bf.neighbor_mean(x, bf.topology.ring(4)).squeeze(1).tolist()
        (4, [1.3333333333333333, 1.0, 2.0, 1.6666666666666665])
    """

    def __init__(self, n: int, *, local_size: int | None = None) -> None:
        self.n = _check_n("simulate", n)
        local: object = self.n if local_size is None else local_size
        if isinstance(local, bool) or not isinstance(local, numbers.Integral) or not 1 <= int(local) <= self.n or self.n % int(local):
            raise ValueError(f"simulate: local_size must be an int that divides n = {self.n}, got {local_size!r}")
        self.local_size: int = int(local)
        self._world: _world.World | None = None

    @property
    def world(self) -> _world.World:
        """The simulated world (created on first use, then kept)."""
        if self._world is None:
            from .executor import (
                SimExecutor,  # deferred: it imports the ops, which import this module
            )

            n, local = self.n, self.local_size
            # One plan per agent per call pattern: a cache sized for one MPI rank would thrash.
            self._world = _world.World(
                backend="sim", rank=0, size=n, local_rank=0, local_size=local, machine_rank=0,
                machine_size=n // local, executor=SimExecutor(), plans=PlanCache(DEFAULT_MAXSIZE * n),
            )
        return self._world

    def __enter__(self) -> simulate:
        _world.push(self.world)
        return self

    def __exit__(self, *exc: object) -> None:
        _world.pop(self.world)

    def __repr__(self) -> str:
        return f"simulate({self.n})" if self.local_size == self.n else f"simulate({self.n}, local_size={self.local_size})"


def _require_sim(fn: str) -> int:
    world = _world.current()
    if world.backend != "sim":
        raise RuntimeError(f"{fn} must run inside bf.simulate(n)")
    return world.size


def vmap(
    fn: F,
    in_dims: int | tuple[Any, ...] | None = 0,
    out_dims: Any = 0,
    *,
    randomness: str = "error",
) -> F:
    """Run ``fn``, written for one agent (one MPI rank), on all simulated agents at once.

    ``bf.sim.vmap(fn)(*stacked_args)`` is ``torch.func.vmap(fn)`` over the agent dimension, with
    the ops made to work across agents: inside ``fn`` a call such as
    ``bf.neighbor_mean(params, topo, step)`` takes one agent's tree and returns its mixed tree,
    and the simulator executes it once for all agents.  So the same ``fn`` runs unchanged under
    ``bfrun -np n`` on per-rank data and here on stacked data, with results equal row by row.

    ``torch.func.grad`` works inside ``fn``; gradients flow through ``neighbor_mean`` as on MPI
    (multiplication by Wᵀ, i.e. each agent gets ``Σ_k W[k, i] g_k``), and through ``global_mean``.
    Regular autograd (``loss.backward()`` on the stacked result) works as well.

    Inside ``fn``:

    * ``bf.sim.agent_index()`` is the agent's index as a 0-d int64 tensor (``bf.rank()`` cannot
      be a Python int per agent; it stays 0);
    * per-call weights must be plain Python values: one for all agents or a list of n (one per
      agent), never tensors computed inside ``fn``;
    * keyword arguments reach every agent unchanged (they are not mapped);
    * ``neighbor_gather`` is not available (its keys differ between agents);
    * randomness follows ``torch.func.vmap``'s ``randomness`` (default ``"error"``): pass
      per-agent random data in, stacked, built with :func:`generators` for reproducibility.

    Args:
        fn: a function of per-agent trees.
        in_dims: as for ``torch.func.vmap``: where each argument's agent dimension is (``None``:
            the argument is shared by all agents).
        out_dims: as for ``torch.func.vmap``.
        randomness: as for ``torch.func.vmap``.

    Returns:
        A function of stacked arguments returning stacked results.

    Raises:
        RuntimeError: when called outside ``bf.simulate(n)``.
        ValueError: when an argument's agent dimension is not of length n (names the argument
            and the leaf).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> def step(x):                                 # one agent's code
        ...     return bf.neighbor_mean(x, bf.topology.ring(4)) + bf.sim.agent_index()
        >>> with bf.simulate(4):
        ...     bf.sim.vmap(step)(torch.zeros(4, 2)).tolist()
        [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        n = _require_sim("bf.sim.vmap")
        dims = _arg_dims(in_dims, len(args))
        for k, (arg, dim) in enumerate(zip(args, dims, strict=True)):
            _check_agent_dim(arg, dim, n, k)

        def per_agent(agent: torch.Tensor, *xs: Any) -> Any:
            push_agents(agent)
            try:
                return fn(*xs, **kwargs)
            finally:
                pop_agents()

        mapped = torch.func.vmap(per_agent, in_dims=(0, *dims), out_dims=out_dims, randomness=randomness)
        # On the data's device, so that arithmetic with agent_index() needs no transfer.
        first = next((x for x in pytree.tree_leaves(args) if isinstance(x, torch.Tensor)), None)
        return mapped(torch.arange(n, device=first.device if first is not None else None), *args)

    return wrapper  # type: ignore[return-value]


def _arg_dims(in_dims: int | tuple[Any, ...] | None, count: int) -> tuple[Any, ...]:
    if in_dims is None or isinstance(in_dims, int):
        return (in_dims,) * count
    if isinstance(in_dims, (tuple, list)):
        if len(in_dims) != count:
            raise ValueError(f"bf.sim.vmap: in_dims has {len(in_dims)} entries but the function got {count} arguments")
        return tuple(in_dims)
    raise TypeError(f"bf.sim.vmap: in_dims must be an int, None or a tuple, got {type(in_dims).__name__}")


def _check_agent_dim(arg: Any, dim: Any, n: int, k: int) -> None:
    if not isinstance(dim, int):
        return  # None, or a per-leaf pytree of dims that torch.func.vmap checks itself
    for path, leaf in pytree.tree_flatten_with_path(arg)[0]:
        if isinstance(leaf, torch.Tensor):
            d = dim if dim >= 0 else dim + leaf.dim()
            if not 0 <= d < leaf.dim() or leaf.shape[d] != n:
                raise ValueError(
                    f"bf.sim.vmap: argument {k} leaf {pytree.keystr(path) or '<root>'} has shape "
                    f"{tuple(leaf.shape)}; its dim {dim} must be the agent dimension, of length {n}"
                )


def agent_index() -> torch.Tensor:
    """The current agent's index inside :func:`vmap`: a 0-d int64 tensor, batched over agents.

    The simulator's stand-in for ``bf.rank()`` in per-agent code: use it in tensor arithmetic
    (``x + agent_index()``, ``torch.where(agent_index() == 0, a, b)``, indexing a stacked table
    with ``table[agent_index()]``), not as a Python int.

    Raises:
        RuntimeError: outside ``bf.sim.vmap``.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> with bf.simulate(3):
        ...     bf.sim.vmap(lambda x: x * bf.sim.agent_index())(torch.ones(3)).tolist()
        [0.0, 1.0, 2.0]
    """
    agents = current_agents()
    if agents is None:
        raise RuntimeError("bf.sim.agent_index() is only defined inside a function run by bf.sim.vmap")
    return agents


# ---------------------------------------------------------------------------------------------
# Per-agent data


def stack(trees: Sequence[Any]) -> Any:
    """Stack n per-agent trees (same structure and shapes) into one tree with a leading agent dim.

    ``None`` leaves must be ``None`` for every agent and stay ``None``.

    Raises:
        ValueError: naming the agent and the key path where a tree differs from agent 0's.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.sim.stack([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])["w"].shape
        torch.Size([2, 2])
    """
    if isinstance(trees, (str, bytes)) or not isinstance(trees, Sequence) or not trees:
        raise ValueError(f"stack: trees must be a non-empty list of per-agent trees, got {trees!r:.60}")
    flats = [pytree.tree_flatten_with_path(t) for t in trees]
    ref_leaves, spec = flats[0]
    for i, (leaves, s) in enumerate(flats[1:], start=1):
        if s != spec:
            raise ValueError(f"stack: agent {i}'s tree structure differs from agent 0's ({s} vs {spec})")
        for (path, a), (_, b) in zip(ref_leaves, leaves, strict=True):
            where = pytree.keystr(path) or "<root>"
            if (a is None) != (b is None):
                raise ValueError(f"stack: leaf {where} is None for one of agents 0 and {i} but not the other")
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.shape != b.shape or a.dtype != b.dtype):
                raise ValueError(
                    f"stack: leaf {where} is {a.dtype} {tuple(a.shape)} for agent 0 but "
                    f"{b.dtype} {tuple(b.shape)} for agent {i}"
                )
    out: list[torch.Tensor | None] = []
    for k, (path, leaf) in enumerate(ref_leaves):
        if leaf is None:
            out.append(None)
        elif isinstance(leaf, torch.Tensor):
            out.append(torch.stack([f[0][k][1] for f in flats]))
        else:
            raise TypeError(f"stack: leaf {pytree.keystr(path) or '<root>'} must be a tensor or None, got {type(leaf).__name__}")
    return pytree.tree_unflatten(out, spec)


def unstack(tree: Any, n: int | None = None) -> list[Any]:
    """Split a stacked tree into n per-agent trees (views), the inverse of :func:`stack`.

    Args:
        tree: a tree whose tensor leaves have a leading agent dimension.
        n: the number of agents; default: ``bf.size()`` inside ``bf.simulate``, else the first
            leaf's leading dimension.

    Raises:
        ValueError: naming the leaf whose leading dimension is not n.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> [t["w"].tolist() for t in bf.sim.unstack({"w": torch.arange(4.0).view(2, 2)})]
        [[0.0, 1.0], [2.0, 3.0]]
    """
    with_path, spec = pytree.tree_flatten_with_path(tree)
    tensors = [(p, x) for p, x in with_path if isinstance(x, torch.Tensor)]
    if n is None:
        world = _world.current()
        n = world.size if world.backend == "sim" else (tensors[0][1].shape[0] if tensors and tensors[0][1].dim() else 1)
    n = _check_n("unstack", n)
    for path, leaf in with_path:
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            raise TypeError(f"unstack: leaf {pytree.keystr(path) or '<root>'} must be a tensor or None, got {type(leaf).__name__}")
        if isinstance(leaf, torch.Tensor) and (leaf.dim() == 0 or leaf.shape[0] != n):
            raise ValueError(
                f"unstack: leaf {pytree.keystr(path) or '<root>'} has shape {tuple(leaf.shape)}, "
                f"expected a leading agent dimension of length {n}"
            )
    return [pytree.tree_unflatten([None if x is None else x[i] for _, x in with_path], spec) for i in range(n)]


class Ragged:
    """Per-agent trees whose leaves may differ in their first dimension; see :func:`ragged`."""

    __slots__ = ("trees",)

    def __init__(self, trees: Sequence[Any]) -> None:
        if isinstance(trees, (str, bytes)) or not isinstance(trees, Sequence):
            raise TypeError(f"bf.sim.ragged: trees must be a list of per-agent trees, got {type(trees).__name__}")
        self.trees = tuple(trees)

    def __repr__(self) -> str:
        return f"bf.sim.ragged(<{len(self.trees)} per-agent trees>)"


def ragged(trees: Sequence[Any]) -> Ragged:
    """Mark a list of n per-agent trees as one simulated value whose leaves' first dims may differ.

    A stacked leaf ``(n, d, …)`` gives every agent the same ``d``; MPI ranks may pass leaves of
    different lengths to :func:`bluefog_fn.neighbor_gather` (BlueFog's ``neighbor_allgather``
    allows it). Inside :func:`simulate`, ``bf.neighbor_gather(bf.sim.ragged(trees), topology,
    step)`` takes agent ``i``'s tree as ``trees[i]`` (no agent dimension) and returns, as for a
    stacked tree, a list of n dicts ``{source: source's tree}``. The trees must share structure,
    dtypes and every dimension but the first.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> with bf.simulate(2):
        ...     out = bf.neighbor_gather(bf.sim.ragged([torch.zeros(1), torch.ones(3)]), bf.topology.ring(2))
        >>> out[0][1].tolist(), out[1][0].tolist()
        ([1.0, 1.0, 1.0], [0.0])
    """
    return Ragged(trees)


def per_agent(fn: Callable[[int], Any], n: int | None = None) -> Any:
    """``stack([fn(0), fn(1), …, fn(n − 1)])``: per-agent data built by the code an MPI rank runs.

    Under MPI, rank r builds ``fn(bf.rank())``; in the simulator ``per_agent(fn)`` builds all of
    them, so both see the same data.  ``n`` defaults to ``bf.size()``.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.sim.per_agent(lambda r: torch.full((2,), float(r)), 3).tolist()
        [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]
    """
    count = _world.current().size if n is None else _check_n("per_agent", n)
    return stack([fn(r) for r in range(count)])


def agent_seed(seed: int, agent: int) -> int:
    """A 63-bit seed for ``agent``'s random stream, a pure function of ``(seed, agent)``.

    Use ``torch.Generator().manual_seed(agent_seed(seed, bf.rank()))`` on MPI and
    :func:`generators` in the simulator to draw the same numbers.

    Example:
        >>> agent_seed(0, 1) == agent_seed(0, 1) != agent_seed(0, 2)
        True
    """
    checked: tuple[tuple[str, object], ...] = (("seed", seed), ("agent", agent))
    for name, v in checked:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) < 0:
            raise ValueError(f"agent_seed: {name} must be an int >= 0, got {v!r}")
    digest = hashlib.blake2b(f"bluefog_fn.sim/{int(seed)}/{int(agent)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generators(seed: int, n: int | None = None, device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One independent, reproducible ``torch.Generator`` per agent (see :func:`agent_seed`).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> gens = bf.sim.generators(0, 2)
        >>> x = bf.sim.stack([torch.randn(3, generator=g) for g in gens])
        >>> torch.equal(x[1], torch.randn(3, generator=torch.Generator().manual_seed(bf.sim.agent_seed(0, 1))))
        True
    """
    count = _world.current().size if n is None else _check_n("generators", n)
    return [torch.Generator(device=device).manual_seed(agent_seed(seed, r)) for r in range(count)]


def shard(tree: Any, n: int | None = None) -> Any:
    """Split every leaf's dim 0 into n equal contiguous shards, stacked: ``(N, …) → (n, N // n, …)``.

    Agent ``r`` gets rows ``[r·N//n, (r+1)·N//n)``; the last ``N mod n`` rows are dropped (like
    ``DistributedSampler(drop_last=True)``).  On MPI, ``shard(tree, bf.size())`` indexed by
    ``bf.rank()`` is the same shard.  ``n`` defaults to ``bf.size()``.

    Raises:
        ValueError: naming the leaf that has fewer than n rows.

    Example:
        >>> import torch, bluefog_fn as bf
        >>> bf.sim.shard(torch.arange(7), 3).tolist()
        [[0, 1], [2, 3], [4, 5]]
    """
    count = _world.current().size if n is None else _check_n("shard", n)
    with_path, spec = pytree.tree_flatten_with_path(tree)
    out: list[torch.Tensor | None] = []
    for path, leaf in with_path:
        if leaf is None:
            out.append(None)
            continue
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0 or leaf.shape[0] < count:
            raise ValueError(
                f"shard: leaf {pytree.keystr(path) or '<root>'} must be a tensor with at least {count} "
                f"rows, got {type(leaf).__name__} {tuple(getattr(leaf, 'shape', ()))}"
            )
        rows = leaf.shape[0] // count
        out.append(leaf[: rows * count].reshape(count, rows, *leaf.shape[1:]))
    return pytree.tree_unflatten(out, spec)
