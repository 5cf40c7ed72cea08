"""Topology value types: a static weighted graph and a periodic schedule of them.

A :class:`Topology` is an immutable, hashable value: the number of agents, a sorted tuple of
weighted directed edges ``(src, dst, weight)`` (``src`` sends to ``dst``; the receiver ``dst``
puts ``weight`` on ``src``'s value) and every agent's self weight. One neighbour-averaging step
over it is ``x_i ← w_ii · x_i + Σ_{j → i} w_ij · x_j``, i.e. ``x ← W x`` with the mixing matrix

    W[i, j] = weight receiver i puts on sender j's value   (rows are receivers),
    W[i, i] = self weight of i.

A :class:`DynamicTopology` is a periodic sequence of static topologies; the graph used at step
``t`` is a pure function of ``t`` (``t mod period``), never a stateful generator, so every rank
that is handed the same ``step`` agrees on the graph without communicating.

Both carry a ``fingerprint``: a hex digest that is identical across processes and machines for
equal graphs, which is what plans are keyed on and what ranks compare to detect a mismatch.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias

import numpy as np
import torch

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["AnyTopology", "DynamicTopology", "Topology"]

# Receivers' weights must sum to 1 within this tolerance (row stochasticity). It is loose enough
# for weights typed as decimals (0.1 + 0.2 + 0.7) and tight enough to catch real mistakes.
_ROW_SUM_TOL = 1e-9

# Spectral quantities closer than this to 0 or 1 are snapped: float64 eigenvalue solvers return a
# repeated eigenvalue 1 (disconnected graph) as 1 ± 1e-15 and an exact 0 as ~1e-17, and reporting
# those as a gap of 1e-15 or 0.99999999999999989 would be noise, not information.
_EIG_TOL = 1e-10

# Domain tags make the digests of different kinds of values disjoint and let the encoding evolve.
_TOPOLOGY_TAG = b"bluefog_fn.topology.Topology/v1"
_DYNAMIC_TAG = b"bluefog_fn.topology.DynamicTopology/v1"


def _fail(where: str, message: str) -> NoReturn:
    raise ValueError(f"{where}: {message}")


def _require_int(where: str, name: str, value: object, *, minimum: int) -> int:
    """Return ``value`` as a Python int, or raise ``ValueError`` naming ``name`` and the value.

    ``bool`` is rejected even though it is an ``int`` subclass: ``ring(True)`` is a bug, not a
    request for one agent. NumPy/torch integer scalars are accepted (they are ``Integral``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(where, f"{name} must be an int >= {minimum}, got {value!r}")
    as_int = int(value)
    if as_int < minimum:
        _fail(where, f"{name} must be an int >= {minimum}, got {as_int}")
    return as_int


def _require_weight(where: str, what: str, value: object) -> float:
    """Return ``value`` as a float after checking it is a finite, non-negative real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(where, f"{what} must be a real number, got {value!r}")
    weight = float(value)
    if not math.isfinite(weight) or weight < 0.0:
        _fail(where, f"{what} must be finite and >= 0, got {weight!r}")
    # ``+ 0.0`` turns -0.0 into 0.0 so that equal graphs have byte-identical fingerprints.
    return weight + 0.0


def _require_step(where: str, step: object) -> int:
    return _require_int(where, "step", step, minimum=0)


def _build_fingerprint(
    size: int, edges: tuple[tuple[int, int, float], ...], self_weights: tuple[float, ...]
) -> str:
    # Fixed-width little-endian integers and IEEE-754 doubles: exact, and the same bytes on every
    # platform and in every process (unlike ``hash()``, which is salted per process for str).
    digest = hashlib.blake2b(_TOPOLOGY_TAG, digest_size=16)
    digest.update(struct.pack("<qq", size, len(edges)))
    for src, dst, weight in edges:
        digest.update(struct.pack("<qqd", src, dst, weight))
    digest.update(struct.pack(f"<{size}d", *self_weights))
    return digest.hexdigest()


class _FrozenValue:
    """Value semantics shared by both topology types: immutable after construction, equal and
    hashed by fingerprint (subclasses set ``_fingerprint`` with ``object.__setattr__``)."""

    __slots__ = ()
    _fingerprint: str

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._fingerprint == other._fingerprint

    def __hash__(self) -> int:
        return hash(self._fingerprint)


class Topology(_FrozenValue):
    """A static, weighted, directed communication graph over ``size`` agents.

    An edge ``(src, dst, weight)`` means *src sends its value to dst* and the receiver ``dst``
    gives it ``weight``. One averaging step is ``x ← W x`` with

    .. math::

        W_{ij} = \\text{weight receiver } i \\text{ puts on sender } j, \\qquad
        W_{ii} = \\text{self weight of } i, \\qquad \\sum_j W_{ij} = 1 .

    The value is immutable and hashable; equality and hashing go through :attr:`fingerprint`,
    so two independently built equal graphs are interchangeable as dictionary keys and on
    different ranks.

    Edges whose weight is exactly ``0`` are treated as absent (dropped at construction): a
    zero-weight message would cost a send and contribute nothing. This is the one place where
    the stored edge list differs from the one given.

    Args:
        size: Number of agents ``n >= 1``.
        edges: Iterable of ``(src, dst, weight)`` with ``0 <= src, dst < size``, ``src != dst``,
            each ordered pair at most once and ``weight`` finite and ``>= 0``.
        self_weights: Sequence of ``size`` finite, non-negative self weights, or ``None`` to give
            every receiver ``1 − Σ`` of its incoming weights (which must then be at most 1).
        allow_non_stochastic: Skip the check that every receiver's weights (self + incoming)
            sum to 1 within ``1e-9`` (for push-sum style column-stochastic graphs).

    Raises:
        ValueError: naming the argument, the edge or receiver, and the offending value.

    Example:
        >>> t = Topology(3, [(0, 1, 0.5), (1, 2, 0.5), (2, 0, 0.5)], [0.5, 0.5, 0.5])
        >>> t.in_neighbors(1), t.out_neighbors(1)
        ((0,), (2,))
        >>> t.mixing_matrix()[1].tolist()
        [0.5, 0.5, 0.0]
        >>> t.at(5) is t, t.period
        (True, 1)
    """

    __slots__ = (
        "__weakref__",
        "_edges",
        "_fingerprint",
        "_in",
        "_matrix",
        "_out",
        "_self_weights",
        "_size",
    )

    _size: int
    _edges: tuple[tuple[int, int, float], ...]
    _self_weights: tuple[float, ...]
    _fingerprint: str
    _in: tuple[tuple[tuple[int, float], ...], ...]
    _out: tuple[tuple[tuple[int, float], ...], ...]
    _matrix: torch.Tensor | None

    def __init__(
        self,
        size: int,
        edges: Iterable[tuple[int, int, float]],
        self_weights: Sequence[float] | None = None,
        *,
        allow_non_stochastic: bool = False,
    ) -> None:
        self._init("Topology", size, edges, self_weights, allow_non_stochastic)

    @classmethod
    def from_edges(
        cls,
        size: int,
        edges: Iterable[tuple[int, int, float]],
        self_weights: Sequence[float] | None = None,
        *,
        allow_non_stochastic: bool = False,
    ) -> Topology:
        """Build a validated topology from a weighted edge list (the canonical factory).

        Args:
            size: Number of agents ``n >= 1``.
            edges: ``(src, dst, weight)`` triples: ``src`` sends to ``dst``, which puts
                ``weight`` on ``src``'s value. Zero-weight edges are dropped.
            self_weights: ``size`` self weights, or ``None`` for ``1 − Σ incoming`` per receiver.
            allow_non_stochastic: Do not require each receiver's weights to sum to 1.

        Returns:
            The canonical (sorted, validated) topology.

        Raises:
            ValueError: on a bad size, rank, self edge, duplicate edge, weight, or row sum.

        Example:
            >>> t = Topology.from_edges(2, [(0, 1, 0.25), (1, 0, 0.5)], [0.5, 0.75])
            >>> t.recv_weights(1), t.self_weight(1)
            ({0: 0.25}, 0.75)
        """
        topo = cls.__new__(cls)
        topo._init("Topology.from_edges", size, edges, self_weights, allow_non_stochastic)
        return topo

    @classmethod
    def _create(
        cls,
        where: str,
        size: int,
        edges: Iterable[tuple[int, int, float]],
        self_weights: Sequence[float] | None = None,
        *,
        allow_non_stochastic: bool = False,
        row_sum_tol: float = _ROW_SUM_TOL,
    ) -> Topology:
        """Like :meth:`from_edges`, but errors are prefixed with the public caller's name.

        ``row_sum_tol`` lets ``from_matrix`` accept a float32 matrix to float32 precision.
        """
        topo = cls.__new__(cls)
        topo._init(where, size, edges, self_weights, allow_non_stochastic, row_sum_tol)
        return topo

    def _init(
        self,
        where: str,
        size: object,
        edges: Iterable[tuple[int, int, float]],
        self_weights: Sequence[float] | None,
        allow_non_stochastic: bool,
        row_sum_tol: float = _ROW_SUM_TOL,
    ) -> None:
        n = _require_int(where, "size", size, minimum=1)
        canonical: dict[tuple[int, int], float] = {}
        for item in edges:
            if not isinstance(item, Sequence) or len(item) != 3:
                _fail(where, f"each edge must be a (src, dst, weight) triple, got {item!r}")
            src_raw, dst_raw, weight_raw = item
            src = _require_int(where, f"edge {item!r}: src", src_raw, minimum=0)
            dst = _require_int(where, f"edge {item!r}: dst", dst_raw, minimum=0)
            if src >= n or dst >= n:
                _fail(where, f"edge {(src, dst)} has a rank out of range for size {n}")
            if src == dst:
                _fail(
                    where,
                    f"edge {(src, dst)} is a self edge; give self weights in self_weights",
                )
            weight = _require_weight(where, f"weight of edge {(src, dst)}", weight_raw)
            if (src, dst) in canonical:
                _fail(where, f"edge {(src, dst)} is given more than once")
            canonical[(src, dst)] = weight

        sorted_edges = tuple(
            (src, dst, weight) for (src, dst), weight in sorted(canonical.items()) if weight > 0.0
        )
        incoming: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        outgoing: list[list[tuple[int, float]]] = [[] for _ in range(n)]
        # Edges are sorted by (src, dst), so appending keeps ``outgoing`` sorted by dst and
        # ``incoming`` sorted by src without a second sort.
        for src, dst, weight in sorted_edges:
            incoming[dst].append((src, weight))
            outgoing[src].append((dst, weight))

        if self_weights is None:
            selfs = []
            for rank in range(n):
                rest = 1.0 - math.fsum(w for _, w in incoming[rank])
                if rest < -row_sum_tol:
                    _fail(
                        where,
                        f"receiver {rank}'s incoming weights sum to {1.0 - rest!r} > 1, so no "
                        "non-negative self weight makes them sum to 1",
                    )
                selfs.append(max(rest, 0.0) + 0.0)
        else:
            if isinstance(self_weights, (str, bytes)) or not isinstance(self_weights, Sequence):
                _fail(where, f"self_weights must be a sequence of {n} floats, got {self_weights!r}")
            if len(self_weights) != n:
                _fail(
                    where,
                    f"self_weights has {len(self_weights)} entries, expected size = {n}",
                )
            selfs = [
                _require_weight(where, f"self weight of rank {rank}", value)
                for rank, value in enumerate(self_weights)
            ]

        if not allow_non_stochastic:
            for rank in range(n):
                total = math.fsum([selfs[rank], *(w for _, w in incoming[rank])])
                if abs(total - 1.0) > row_sum_tol:
                    _fail(
                        where,
                        f"receiver {rank}'s weights sum to {total!r}, expected 1 "
                        "(self weight + incoming edge weights; pass allow_non_stochastic=True "
                        "for a non-row-stochastic graph)",
                    )

        set_ = object.__setattr__
        set_(self, "_size", n)
        set_(self, "_edges", sorted_edges)
        set_(self, "_self_weights", tuple(selfs))
        set_(self, "_in", tuple(tuple(row) for row in incoming))
        set_(self, "_out", tuple(tuple(row) for row in outgoing))
        set_(self, "_fingerprint", _build_fingerprint(n, sorted_edges, tuple(selfs)))
        set_(self, "_matrix", None)

    # ------------------------------------------------------------------ value semantics

    def __repr__(self) -> str:
        return (
            f"Topology(size={self._size}, edges={len(self._edges)}, "
            f"fingerprint={self._fingerprint[:8]})"
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Pickle as the canonical data; the slots plus the blocked __setattr__ defeat the default
        # protocol. The data was validated when built, so restoring skips the row-sum check.
        return (_restore_topology, (self._size, self._edges, self._self_weights))

    # ------------------------------------------------------------------ schedule protocol

    @property
    def size(self) -> int:
        """Number of agents."""
        return self._size

    @property
    def period(self) -> int:
        """Always 1: a static topology is the same graph at every step."""
        return 1

    def at(self, step: int) -> Topology:
        """Return the graph used at ``step``: a static topology returns itself.

        Args:
            step: The iteration number, an int ``>= 0``.

        Raises:
            ValueError: if ``step`` is not an int ``>= 0``.

        Example:
            >>> from bluefog_fn.topology import ring
            >>> t = ring(4)
            >>> t.at(10) is t
            True
        """
        _require_step("Topology.at", step)
        return self

    @property
    def fingerprint(self) -> str:
        """Stable hex digest (BLAKE2b-128) of size, sorted edges and self weights.

        Weights enter as exact IEEE-754 bytes, so the digest is identical in every process and
        on every machine for equal graphs and differs when any weight differs in any bit.
        """
        return self._fingerprint

    # ------------------------------------------------------------------ raw data

    @property
    def edges(self) -> tuple[tuple[int, int, float], ...]:
        """Sorted ``(src, dst, weight)`` triples: src sends to dst, dst weights it by weight."""
        return self._edges

    @property
    def self_weights(self) -> tuple[float, ...]:
        """Every agent's self weight ``W[i, i]``, in rank order."""
        return self._self_weights

    def mixing_matrix(self) -> torch.Tensor:
        """Return the ``size × size`` float64 mixing matrix ``W`` (rows are receivers).

        ``W[i, j]`` is the weight receiver ``i`` puts on sender ``j``'s value and ``W[i, i]`` is
        ``i``'s self weight, so one averaging step is ``x ← W x``. The matrix is built once and
        cached; each call returns a fresh copy, so callers may modify it freely.

        Example:
            >>> from bluefog_fn.topology import ring
            >>> ring(3).mixing_matrix().sum(dim=1).tolist()
            [1.0, 1.0, 1.0]
        """
        cached = self._matrix
        if cached is None:
            n = self._size
            cached = torch.zeros((n, n), dtype=torch.float64)
            idx = torch.arange(n)
            cached[idx, idx] = torch.tensor(self._self_weights, dtype=torch.float64)
            if self._edges:
                src = torch.tensor([e[0] for e in self._edges], dtype=torch.long)
                dst = torch.tensor([e[1] for e in self._edges], dtype=torch.long)
                val = torch.tensor([e[2] for e in self._edges], dtype=torch.float64)
                cached[dst, src] = val
            object.__setattr__(self, "_matrix", cached)
        return cached.clone()

    def _numpy_matrix(self) -> np.ndarray[Any, np.dtype[np.float64]]:
        w = np.zeros((self._size, self._size), dtype=np.float64)
        np.fill_diagonal(w, self._self_weights)
        for src, dst, weight in self._edges:
            w[dst, src] = weight
        return w

    # ------------------------------------------------------------------ per-rank views

    def _check_rank(self, where: str, rank: object) -> int:
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            _fail(where, f"rank must be an int, got {rank!r}")
        r = int(rank)
        if not 0 <= r < self._size:
            _fail(where, f"rank {r} is out of range for a topology of size {self._size}")
        return r

    def in_neighbors(self, rank: int) -> tuple[int, ...]:
        """Ranks that send to ``rank`` (``j`` with ``W[rank, j] > 0``, ``j != rank``), sorted.

        Example:
            >>> from bluefog_fn.topology import ring
            >>> ring(4).in_neighbors(0)
            (1, 3)
        """
        r = self._check_rank("in_neighbors", rank)
        return tuple(src for src, _ in self._in[r])

    def out_neighbors(self, rank: int) -> tuple[int, ...]:
        """Ranks that ``rank`` sends to (``i`` with ``W[i, rank] > 0``, ``i != rank``), sorted.

        Example:
            >>> from bluefog_fn.topology import exponential_two
            >>> exponential_two(8).out_neighbors(0)
            (1, 2, 4)
        """
        r = self._check_rank("out_neighbors", rank)
        return tuple(dst for dst, _ in self._out[r])

    def self_weight(self, rank: int) -> float:
        """The weight ``W[rank, rank]`` that ``rank`` puts on its own value.

        Example:
            >>> from bluefog_fn.topology import star
            >>> star(4).self_weight(0), star(4).self_weight(1)
            (0.25, 0.75)
        """
        r = self._check_rank("self_weight", rank)
        return self._self_weights[r]

    def recv_weights(self, rank: int) -> dict[int, float]:
        """``{in-neighbour j: W[rank, j]}``, ordered by ``j``: what ``rank`` puts on each sender.

        Example:
            >>> from bluefog_fn.topology import ring
            >>> ring(4).recv_weights(0)
            {1: 0.3333333333333333, 3: 0.3333333333333333}
        """
        r = self._check_rank("recv_weights", rank)
        return dict(self._in[r])

    def send_weights(self, rank: int) -> dict[int, float]:
        """``{out-neighbour i: W[i, rank]}``, ordered by ``i``: what each receiver puts on ``rank``.

        Example:
            >>> from bluefog_fn.topology import star
            >>> star(3).send_weights(0)
            {1: 0.3333333333333333, 2: 0.3333333333333333}
        """
        r = self._check_rank("send_weights", rank)
        return dict(self._out[r])

    # ------------------------------------------------------------------ graph properties

    def spectral_gap(self) -> float:
        """Return ``1 − ρ``, ρ the largest modulus among W's eigenvalues other than the one at 1.

        Exactly one eigenvalue (the one closest to 1) is removed before taking the maximum
        modulus, so a repeated eigenvalue 1 — a graph with two or more closed components, e.g.
        a disconnected one — gives ``ρ = 1`` and a gap of ``0``. For a row-stochastic ``W`` the
        gap lies in ``[0, 1]``; it is positive exactly when ``W`` is primitive (one closed
        strongly connected class, aperiodic — every built-in topology has positive self
        weights, hence aperiodic), and for a doubly stochastic ``W`` that means exactly when the
        graph is strongly connected. It is ``1`` when ``W = 11ᵀ/n`` (fully connected) and, by
        convention, ``1`` for a single agent. A non-stochastic ``W`` may give a negative gap.

        Values within ``1e-10`` of 0 or of 1 are snapped to exactly 0 or 1: float64 eigenvalue
        solvers return a repeated eigenvalue 1 as ``1 ± 1e-15`` and a zero as ``~1e-17``.

        Example:
            >>> from bluefog_fn.topology import fully_connected, ring
            >>> fully_connected(5).spectral_gap()
            1.0
            >>> round(ring(4).spectral_gap(), 6)
            0.666667
        """
        if self._size == 1:
            return 1.0
        w = self._numpy_matrix()
        # The symmetric solver is both faster and more accurate; use it when it applies.
        eig: np.ndarray[Any, Any] = (
            np.linalg.eigvalsh(w) if np.array_equal(w, w.T) else np.linalg.eigvals(w)
        )
        rest = np.delete(eig, int(np.argmin(np.abs(eig - 1.0))))
        rho = float(np.max(np.abs(rest)))
        if rho < _EIG_TOL:
            return 1.0
        gap = 1.0 - rho
        if abs(gap) < _EIG_TOL:
            return 0.0
        return gap

    def is_doubly_stochastic(self, tol: float = 1e-12) -> bool:
        """Whether every row and every column of ``W`` sums to 1 within ``tol``.

        A doubly stochastic ``W`` preserves the average: ``1ᵀ W x = 1ᵀ x``.

        Example:
            >>> from bluefog_fn.topology import ring, star
            >>> ring(5).is_doubly_stochastic(), star(5).is_doubly_stochastic()
            (True, True)
        """
        col_terms: list[list[float]] = [[w] for w in self._self_weights]
        for src, _, weight in self._edges:
            col_terms[src].append(weight)
        for rank in range(self._size):
            row = math.fsum([self._self_weights[rank], *(w for _, w in self._in[rank])])
            col = math.fsum(col_terms[rank])
            if abs(row - 1.0) > tol or abs(col - 1.0) > tol:
                return False
        return True

    def is_strongly_connected(self) -> bool:
        """Whether every agent's value reaches every other agent along directed edges.

        Example:
            >>> from bluefog_fn.topology import from_matrix, ring
            >>> ring(6).is_strongly_connected()
            True
            >>> from_matrix([[1.0, 0.0], [0.0, 1.0]]).is_strongly_connected()
            False
        """
        # Rank 0 reaches everyone forwards and everyone reaches rank 0 (backwards search).
        return self._reaches_all(self._out) and self._reaches_all(self._in)

    def _reaches_all(self, adjacency: tuple[tuple[tuple[int, float], ...], ...]) -> bool:
        seen = [False] * self._size
        seen[0] = True
        frontier = [0]
        count = 1
        while frontier:
            node = frontier.pop()
            for nxt, _ in adjacency[node]:
                if not seen[nxt]:
                    seen[nxt] = True
                    count += 1
                    frontier.append(nxt)
        return count == self._size

    def is_regular(self) -> bool:
        """Whether all in-degrees are equal and all out-degrees are equal.

        Example:
            >>> from bluefog_fn.topology import ring, star
            >>> ring(5).is_regular(), star(5).is_regular()
            (True, False)
        """
        return (
            len({len(row) for row in self._in}) == 1 and len({len(row) for row in self._out}) == 1
        )

    # ------------------------------------------------------------------ conversions

    def to_networkx(self) -> nx.DiGraph:
        """Return a ``networkx.DiGraph``: nodes ``0..n-1``, an edge ``u → v`` when u sends to v.

        Each edge carries its ``weight``; self weights are stored as the node attribute
        ``self_weight`` rather than as self loops, so that the graph's structure has no
        spurious loops. :func:`~bluefog_fn.topology.from_networkx` reads either form back,
        so ``from_networkx(t.to_networkx()) == t``.

        Example:
            >>> from bluefog_fn.topology import ring
            >>> g = ring(4).to_networkx()
            >>> sorted(g.successors(0)), g.nodes[0]["self_weight"]
            ([1, 3], 0.3333333333333333)
        """
        import networkx as nx  # deferred: only conversions need networkx

        graph = nx.DiGraph()
        for rank, weight in enumerate(self._self_weights):
            graph.add_node(rank, self_weight=weight)
        graph.add_weighted_edges_from(self._edges)
        return graph

    def with_uniform_weights(self) -> Topology:
        """Same edges, every receiver weighting itself and each in-neighbour ``1/(d_in + 1)``.

        Example:
            >>> from bluefog_fn.topology import star
            >>> t = star(3).with_uniform_weights()
            >>> t.self_weight(0), t.self_weight(1)
            (0.3333333333333333, 0.5)
        """
        pairs = [(src, dst) for src, dst, _ in self._edges]
        return _uniform("Topology.with_uniform_weights", self._size, pairs)


def _uniform(where: str, size: int, pairs: Iterable[tuple[int, int]]) -> Topology:
    """Topology where receiver i puts ``1/(d_in(i) + 1)`` on itself and each in-neighbour."""
    unique = sorted(set(pairs))
    in_degree = [0] * size
    for _, dst in unique:
        in_degree[dst] += 1
    edges = [(src, dst, 1.0 / (in_degree[dst] + 1)) for src, dst in unique]
    selfs = [1.0 / (d + 1) for d in in_degree]
    return Topology._create(where, size, edges, selfs)


def _restore_topology(
    size: int, edges: tuple[tuple[int, int, float], ...], self_weights: tuple[float, ...]
) -> Topology:
    return Topology._create(
        "Topology (unpickle)", size, edges, self_weights, allow_non_stochastic=True
    )


class DynamicTopology(_FrozenValue):
    """A time-varying topology: a periodic sequence of static :class:`Topology` graphs.

    The graph used at step ``t`` is ``graphs[t mod period]`` — a pure function of ``t``, so
    every rank handed the same ``step`` agrees on it, and plans traced for one period are reused
    for all later ones. The graphs are stored eagerly (one period), so ``at`` is a tuple lookup.

    Over one period, states evolve as ``x ← W_{p−1} ⋯ W_1 W_0 x``.

    Equality and hashing go through :attr:`fingerprint`, which covers the size and the period's
    graphs but not ``name`` (a label for humans; two schedules of identical graphs are the same
    schedule).

    Args:
        graphs: The period's static topologies, in step order; all of the same size, at least one.
        name: A human-readable label, e.g. ``"one_peer_exponential_two(8)"``.

    Raises:
        ValueError: if ``graphs`` is empty, holds a non-``Topology``, or mixes sizes.

    Example:
        >>> from bluefog_fn.topology import ring, fully_connected
        >>> d = DynamicTopology([ring(4), fully_connected(4)], name="alternate")
        >>> d.period, d.at(3) == fully_connected(4), d.at(4) == ring(4)
        (2, True, True)
    """

    __slots__ = ("__weakref__", "_fingerprint", "_graphs", "_name", "_size")

    _graphs: tuple[Topology, ...]
    _name: str
    _size: int
    _fingerprint: str

    def __init__(self, graphs: Iterable[Topology], *, name: str = "dynamic") -> None:
        where = "DynamicTopology"
        seq = tuple(graphs)
        if not seq:
            _fail(where, "graphs must hold at least one Topology, got none")
        for index, graph in enumerate(seq):
            if not isinstance(graph, Topology):
                _fail(where, f"graphs[{index}] must be a Topology, got {graph!r}")
        size = seq[0].size
        for index, graph in enumerate(seq):
            if graph.size != size:
                _fail(
                    where,
                    f"graphs[{index}] has size {graph.size} but graphs[0] has size {size}",
                )
        if not isinstance(name, str):
            _fail(where, f"name must be a str, got {name!r}")
        digest = hashlib.blake2b(_DYNAMIC_TAG, digest_size=16)
        digest.update(struct.pack("<qq", size, len(seq)))
        for graph in seq:
            digest.update(bytes.fromhex(graph.fingerprint))
        set_ = object.__setattr__
        set_(self, "_graphs", seq)
        set_(self, "_name", name)
        set_(self, "_size", size)
        set_(self, "_fingerprint", digest.hexdigest())

    def __repr__(self) -> str:
        return (
            f"DynamicTopology(name={self._name!r}, size={self._size}, period={self.period}, "
            f"fingerprint={self._fingerprint[:8]})"
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (_restore_dynamic, (self._graphs, self._name))

    @property
    def size(self) -> int:
        """Number of agents."""
        return self._size

    @property
    def period(self) -> int:
        """Number of distinct steps before the schedule repeats (``>= 1``)."""
        return len(self._graphs)

    @property
    def name(self) -> str:
        """Human-readable label (not part of the identity)."""
        return self._name

    @property
    def graphs(self) -> tuple[Topology, ...]:
        """The period's static graphs in step order: ``at(t) is graphs[t % period]``."""
        return self._graphs

    @property
    def fingerprint(self) -> str:
        """Stable hex digest over the size and the fingerprints of the period's graphs."""
        return self._fingerprint

    def at(self, step: int) -> Topology:
        """Return the static graph used at ``step`` (``graphs[step mod period]``).

        Args:
            step: The iteration number, an int ``>= 0``.

        Raises:
            ValueError: if ``step`` is not an int ``>= 0``.

        Example:
            >>> from bluefog_fn.topology import one_peer_exponential_two
            >>> d = one_peer_exponential_two(8)
            >>> d.at(1).in_neighbors(0), d.at(3).in_neighbors(0)
            ((6,), (7,))
        """
        s = _require_step("DynamicTopology.at", step)
        return self._graphs[s % len(self._graphs)]

    def mixing_matrix(self, step: int) -> torch.Tensor:
        """The float64 mixing matrix of the graph at ``step``; shorthand for ``at(step).mixing_matrix()``.

        Example:
            >>> from bluefog_fn.topology import one_peer_exponential_two
            >>> one_peer_exponential_two(2).mixing_matrix(0).tolist()
            [[0.5, 0.5], [0.5, 0.5]]
        """
        s = _require_step("DynamicTopology.mixing_matrix", step)
        return self._graphs[s % len(self._graphs)].mixing_matrix()


def _restore_dynamic(graphs: tuple[Topology, ...], name: str) -> DynamicTopology:
    return DynamicTopology(graphs, name=name)


AnyTopology: TypeAlias = Topology | DynamicTopology
"""Either kind of topology; both expose ``size``, ``period``, ``at(step)`` and ``fingerprint``."""
