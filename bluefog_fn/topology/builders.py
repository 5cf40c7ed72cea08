"""Constructors of static topologies, with BlueFog's edge weights.

Every constructor returns a validated :class:`~bluefog_fn.topology.graph.Topology` whose mixing
matrix is row-stochastic (each receiver's weights sum to 1), accepts ``n = 1`` (a single agent
with no edges and self weight 1) and rejects ``n < 1`` or a non-integer ``n`` with a
``ValueError`` naming ``n`` and the value.

Conventions: "r receives from s" means the edge ``s → r`` and ``W[r, s] > 0``. *Uniform* weights
mean that receiver ``r`` with in-degree ``d`` puts ``1/(d + 1)`` on itself and on each
in-neighbour.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from bluefog_fn.topology.graph import (
    Topology,
    _fail,
    _require_int,
    _require_weight,
    _uniform,
)

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "exponential",
    "exponential_two",
    "from_matrix",
    "from_networkx",
    "fully_connected",
    "hypercube",
    "mesh_grid_2d",
    "ring",
    "star",
    "symmetric_exponential",
]


def _size(where: str, n: object) -> int:
    return _require_int(where, "n", n, minimum=1)


def ring(n: int, style: int = 0) -> Topology:
    """Ring: both directions (``style=0``, the default) or one direction (BlueFog's styles 1, 2).

    * ``style=0``: rank ``r`` receives from ``r − 1`` and ``r + 1`` (mod ``n``) with uniform
      weights ``W[r, r] = W[r, r ± 1] = 1/3`` for ``n >= 3``;
    * ``style=1`` ("left"): every rank sends to ``r − 1``, i.e. receives from ``r + 1``, and
      ``W[r, r] = W[r, r + 1] = 1/2``;
    * ``style=2`` ("right"): every rank sends to ``r + 1``, i.e. receives from ``r − 1``, and
      ``W[r, r] = W[r, r − 1] = 1/2``.

    These are the connect styles of BlueFog's ``RingGraph(size, connect_style)``. Every style
    is doubly stochastic. For ``n = 2`` the two neighbours coincide and all styles give the same
    graph (one neighbour, weights ``1/2``); ``n = 1`` has no edges.

    Args:
        n: Number of agents, an int ``>= 1``.
        style: ``0`` (both directions), ``1`` (send left) or ``2`` (send right).

    Raises:
        ValueError: if ``n`` is not an int ``>= 1`` or ``style`` is not one of 0, 1, 2.

    Example:
        >>> t = ring(4)
        >>> t.in_neighbors(0), t.self_weight(0)
        ((1, 3), 0.3333333333333333)
        >>> ring(4, style=1).in_neighbors(0), ring(4, style=2).in_neighbors(0)
        ((1,), (3,))
    """
    size = _size("ring", n)
    how: object = style  # typed int, but checked at run time like every argument
    if isinstance(how, bool) or not isinstance(how, numbers.Integral) or int(how) not in (0, 1, 2):
        _fail("ring", f"style must be 0 (both directions), 1 (left) or 2 (right), got {style!r}")
    deltas = {0: (-1, 1), 1: (1,), 2: (-1,)}[int(how)]  # receive from r + delta
    pairs = [((r + delta) % size, r) for r in range(size) for delta in deltas]
    return _uniform("ring", size, [(s, d) for s, d in pairs if s != d])


def star(n: int, center: int = 0) -> Topology:
    """Star around ``center`` with BlueFog's doubly stochastic weights.

    .. math::

        W_{cc} = 1/n, \\quad W_{\\ell\\ell} = 1 − 1/n, \\quad W_{c\\ell} = W_{\\ell c} = 1/n
        \\quad (\\ell \\ne c),

    so the centre averages everyone and each leaf moves ``1/n`` of the way to the centre.

    Args:
        n: Number of agents, an int ``>= 1``.
        center: The hub's rank, ``0 <= center < n``.

    Raises:
        ValueError: if ``n`` is not an int ``>= 1`` or ``center`` is out of range.

    Example:
        >>> t = star(4)
        >>> t.in_neighbors(0), t.in_neighbors(2), t.self_weight(2)
        ((1, 2, 3), (0,), 0.75)
    """
    size = _size("star", n)
    c = _require_int("star", "center", center, minimum=0)
    if c >= size:
        _fail("star", f"center must be an int in [0, n) = [0, {size}), got {c}")
    share = 1.0 / size
    edges = []
    for leaf in range(size):
        if leaf != c:
            edges.append((c, leaf, share))
            edges.append((leaf, c, share))
    selfs = [share if r == c else 1.0 - share for r in range(size)]
    return Topology._create("star", size, edges, selfs)


def mesh_grid_2d(n: int, shape: tuple[int, int] | None = None) -> Topology:
    """2-D grid (4-neighbourhood, no wraparound) with Metropolis–Hastings weights.

    Ranks are laid out row-major on an ``a × b`` grid; by default (BlueFog's choice) ``a`` is the
    largest divisor of ``n`` with ``a <= √n`` (a prime ``n`` gives a ``1 × n`` path). With
    ``d_i`` the number of grid neighbours of ``i``:

    .. math::

        W_{ij} = \\frac{1}{1 + \\max(d_i, d_j)} \\ (i \\sim j), \\qquad
        W_{ii} = 1 − \\sum_{j \\sim i} W_{ij},

    which is symmetric, hence doubly stochastic.

    Args:
        n: Number of agents, an int ``>= 1``.
        shape: Optional ``(rows, cols)`` with ``rows * cols == n`` (BlueFog's ``shape``).

    Raises:
        ValueError: if ``n`` is not an int ``>= 1`` or ``shape`` does not multiply to ``n``.

    Example:
        >>> t = mesh_grid_2d(6)  # 2 × 3 grid
        >>> t.recv_weights(0), t.self_weight(0)
        ({1: 0.25, 3: 0.3333333333333333}, 0.41666666666666674)
    """
    size = _size("mesh_grid_2d", n)
    if shape is None:
        rows = math.isqrt(size)
        while size % rows != 0:
            rows -= 1
        cols = size // rows
    else:
        if not isinstance(shape, Sequence) or len(shape) != 2:
            _fail("mesh_grid_2d", f"shape must be a (rows, cols) pair, got {shape!r}")
        rows = _require_int("mesh_grid_2d", "shape[0]", shape[0], minimum=1)
        cols = _require_int("mesh_grid_2d", "shape[1]", shape[1], minimum=1)
        if rows * cols != size:
            _fail("mesh_grid_2d", f"shape {shape!r} has {rows * cols} cells but n = {size}")
    neighbours: list[list[int]] = [[] for _ in range(size)]
    for r in range(size):
        row, col = divmod(r, cols)
        if col + 1 < cols:
            neighbours[r].append(r + 1)
            neighbours[r + 1].append(r)
        if row + 1 < rows:
            neighbours[r].append(r + cols)
            neighbours[r + cols].append(r)
    degree = [len(nb) for nb in neighbours]
    edges = [
        (j, i, 1.0 / (1 + max(degree[i], degree[j]))) for i in range(size) for j in neighbours[i]
    ]
    # Self weight = 1 − Σ incoming, which the factory computes with an exact (fsum) sum.
    return Topology._create("mesh_grid_2d", size, edges, None)


def fully_connected(n: int) -> Topology:
    """Complete graph: every rank receives from every other, all weights ``1/n``.

    ``W = 11ᵀ/n``: one step reaches the exact average (spectral gap 1).

    Args:
        n: Number of agents, an int ``>= 1``.

    Raises:
        ValueError: if ``n`` is not an int ``>= 1``.

    Example:
        >>> fully_connected(4).recv_weights(0)
        {1: 0.25, 2: 0.25, 3: 0.25}
    """
    size = _size("fully_connected", n)
    share = 1.0 / size
    edges = [(s, d, share) for s in range(size) for d in range(size) if s != d]
    return Topology._create("fully_connected", size, edges, [share] * size)


def _exponential(where: str, n: object, base: object) -> Topology:
    size = _size(where, n)
    b = _require_int(where, "base", base, minimum=2)
    offsets = []
    power = 1
    while power < size:
        offsets.append(power)
        power *= b
    pairs = [((r - off) % size, r) for r in range(size) for off in offsets]
    return _uniform(where, size, pairs)


def exponential_two(n: int) -> Topology:
    """Static exponential-2 graph: rank ``r`` receives from ``r − 2^i`` (mod ``n``), ``2^i < n``.

    Equivalently ``r`` sends to ``r + 1, r + 2, r + 4, …``; uniform weights
    ``1/(⌈log₂ n⌉ + 1)``. Regular, hence doubly stochastic.

    Args:
        n: Number of agents, an int ``>= 1``.

    Raises:
        ValueError: if ``n`` is not an int ``>= 1``.

    Example:
        >>> exponential_two(8).in_neighbors(0)
        (4, 6, 7)
    """
    return _exponential("exponential_two", n, 2)


def exponential(n: int, base: int) -> Topology:
    """Exponential-``base`` graph: rank ``r`` receives from ``r − base^i`` (mod n), ``base^i < n``.

    Uniform weights. ``exponential(n, 2) == exponential_two(n)``.

    Args:
        n: Number of agents, an int ``>= 1``.
        base: The base, an int ``>= 2``.

    Raises:
        ValueError: if ``n`` is not an int ``>= 1`` or ``base`` is not an int ``>= 2``.

    Example:
        >>> exponential(10, 3).in_neighbors(0)
        (1, 7, 9)
    """
    return _exponential("exponential", n, base)


def symmetric_exponential(n: int, base: int = 2) -> Topology:
    """Undirected exponential graph: rank ``r`` receives from ``r ± base^i`` (mod n), ``base^i < n``.

    The union of :func:`exponential` ``(n, base)`` and its reverse, without repeats
    (``r + base^i ≡ r − base^j`` is counted once); uniform weights. Symmetric, hence doubly
    stochastic.

    Differs from BlueFog's ``SymmetricExponentialGraph(size, base=4)`` in two ways: the default
    base is 2 here (pass ``base=4`` for BlueFog's), and BlueFog keeps only the offsets ``k`` whose
    distance around the ring, ``min(k, n − k)``, is a power of ``base`` — it drops ``± base^i``
    when ``n/2 < base^i < n`` and ``n − base^i`` is no power of ``base``. The two graphs are
    equal when no power of ``base`` lies strictly between ``n/2`` and ``n`` (e.g. ``n`` a power
    of ``base``), and for base 2 whenever ``n`` has at most two bits set; for ``n = 7`` this
    graph is complete while BlueFog's has degree 4.

    Args:
        n: Number of agents, an int ``>= 1``.
        base: The base, an int ``>= 2``.

    Raises:
        ValueError: if ``n`` is not an int ``>= 1`` or ``base`` is not an int ``>= 2``.

    Example:
        >>> symmetric_exponential(8).in_neighbors(0)
        (1, 2, 4, 6, 7)
        >>> symmetric_exponential(16, base=4).in_neighbors(0)
        (1, 4, 12, 15)
    """
    size = _size("symmetric_exponential", n)
    b = _require_int("symmetric_exponential", "base", base, minimum=2)
    pairs = []
    power = 1
    while power < size:
        for r in range(size):
            pairs.append(((r - power) % size, r))
            pairs.append(((r + power) % size, r))
        power *= b
    return _uniform("symmetric_exponential", size, [(s, d) for s, d in pairs if s != d])


def hypercube(n: int) -> Topology:
    """Hypercube on ``n = 2^d`` agents: rank ``r`` receives from ``r XOR 2^i`` for ``i < d``.

    Uniform weights ``1/(d + 1)``.

    Args:
        n: Number of agents, a power of two ``>= 1``.

    Raises:
        ValueError: if ``n`` is not a power of two.

    Example:
        >>> hypercube(8).in_neighbors(5), hypercube(8).self_weight(5)
        ((1, 4, 7), 0.25)
    """
    size = _size("hypercube", n)
    if size & (size - 1):
        _fail("hypercube", f"n must be a power of 2, got {size}")
    dims = size.bit_length() - 1
    pairs = [(r ^ (1 << i), r) for r in range(size) for i in range(dims)]
    return _uniform("hypercube", size, pairs)


def from_networkx(g: nx.Graph, *, allow_non_stochastic: bool = False) -> Topology:
    """Convert a networkx graph; an edge ``u → v`` means u sends to v (BlueFog's convention).

    Hence ``from_networkx(g).mixing_matrix()`` is the *transpose* of networkx's weighted
    adjacency ``nx.to_numpy_array(g)`` (whose rows are senders). Undirected graphs send along
    every edge both ways with the same weight.

    Weights:

    * If no edge carries a ``weight`` attribute and no node a ``self_weight`` attribute, weights
      are uniform: receiver ``i`` puts ``1/(d_in(i) + 1)`` on itself and each in-neighbour
      (self loops are then ignored).
    * Otherwise every non-loop edge must carry ``weight``; the self weight of ``i`` is the weight
      of its self loop, else its ``self_weight`` node attribute (which
      :meth:`Topology.to_networkx` writes), else ``1 − Σ`` of its incoming weights.

    Zero-weight edges are treated as absent.

    Args:
        g: A ``networkx.Graph`` or ``DiGraph`` (not a multigraph) whose nodes are exactly the
            integers ``0..n-1``.
        allow_non_stochastic: Do not require each receiver's weights to sum to 1.

    Raises:
        ValueError: on other node labels, missing or invalid weights, or a row that does not
            sum to 1 (the message names the receiver and the sum).

    Example:
        >>> import networkx as nx
        >>> t = from_networkx(nx.cycle_graph(4))
        >>> t == ring(4)
        True
        >>> from_networkx(t.to_networkx()) == t
        True
    """
    import networkx as nx  # deferred: only conversions need networkx

    where = "from_networkx"
    if not isinstance(g, nx.Graph):
        _fail(where, f"g must be a networkx Graph or DiGraph, got {type(g).__name__}")
    if g.is_multigraph():
        _fail(where, "g must not be a multigraph (parallel edges have no single weight)")
    nodes = list(g.nodes)
    size = len(nodes)
    if size < 1:
        _fail(where, "g has no nodes; n must be an int >= 1, got 0")
    for node in nodes:
        if (
            isinstance(node, bool)
            or not isinstance(node, numbers.Integral)
            or not 0 <= int(node) < size
        ):
            _fail(where, f"nodes must be the integers 0..{size - 1}, found node {node!r}")

    raw_edges: list[tuple[int, int, dict[str, Any]]] = [
        (int(u), int(v), data) for u, v, data in g.edges(data=True)
    ]
    directed = bool(g.is_directed())
    weighted = any("weight" in data for _, _, data in raw_edges) or any(
        "self_weight" in data for _, data in g.nodes(data=True)
    )

    if not weighted:
        pairs: list[tuple[int, int]] = []
        for u, v, _ in raw_edges:
            if u != v:
                pairs.append((u, v))
                if not directed:
                    pairs.append((v, u))
        return _uniform(where, size, pairs)

    edges: list[tuple[int, int, float]] = []
    loops: dict[int, float] = {}
    for u, v, data in raw_edges:
        if "weight" not in data:
            _fail(
                where,
                f"edge {(u, v)} has no 'weight' attribute while other edges or nodes carry "
                "weights; give every edge a weight or none",
            )
        weight = _require_weight(where, f"weight of edge {(u, v)}", data["weight"])
        if u == v:
            loops[u] = weight
            continue
        edges.append((u, v, weight))
        if not directed:
            edges.append((v, u, weight))

    incoming = [0.0] * size
    terms: list[list[float]] = [[] for _ in range(size)]
    for _, v, weight in edges:
        terms[v].append(weight)
    for r in range(size):
        incoming[r] = math.fsum(terms[r])

    selfs: list[float] = []
    for r in range(size):
        attr = g.nodes[r].get("self_weight")
        attr_w = None if attr is None else _require_weight(where, f"self_weight of node {r}", attr)
        if r in loops:
            if attr_w is not None and attr_w != loops[r]:
                _fail(
                    where,
                    f"node {r} has a self loop of weight {loops[r]!r} and a different "
                    f"self_weight attribute {attr_w!r}",
                )
            selfs.append(loops[r])
        elif attr_w is not None:
            selfs.append(attr_w)
        else:
            rest = 1.0 - incoming[r]
            if rest < -1e-9:
                _fail(
                    where,
                    f"receiver {r}'s incoming weights sum to {incoming[r]!r} > 1 and it has no "
                    "self weight that could make them sum to 1",
                )
            selfs.append(max(rest, 0.0))
    return Topology._create(where, size, edges, selfs, allow_non_stochastic=allow_non_stochastic)


def from_matrix(
    w: torch.Tensor | np.ndarray[Any, Any] | Sequence[Sequence[float]],
    *,
    allow_non_stochastic: bool = False,
) -> Topology:
    """Build a topology from its mixing matrix ``W`` (rows are receivers).

    ``W[i, j]`` is the weight receiver ``i`` puts on sender ``j``: a nonzero off-diagonal entry
    becomes the edge ``j → i``, the diagonal gives the self weights. So
    ``from_matrix(t.mixing_matrix()) == t`` for every topology ``t``.

    Each row must sum to 1 within ``1e-9``, or within ``2·n·eps`` of the input's dtype when that
    is coarser (a float32 matrix of thirds is accepted as it stands; its weights are kept as
    given, not renormalised).

    Args:
        w: A square matrix: torch tensor, NumPy array or nested list of real numbers.
        allow_non_stochastic: Do not require each row to sum to 1.

    Raises:
        ValueError: if ``w`` is not a square real matrix, holds a NaN, infinite or negative
            entry (the message names the entry), or a row does not sum to 1 (the message names
            the receiver and its sum).

    Example:
        >>> t = from_matrix([[0.5, 0.5], [0.25, 0.75]])
        >>> t.edges
        ((0, 1, 0.25), (1, 0, 0.5))
        >>> t.is_doubly_stochastic()
        False
    """
    where = "from_matrix"
    # Rows must sum to 1 to the precision of the input: a float32 matrix of thirds is off by
    # ~1e-8, which is float32's rounding, not a user error.
    input_eps = 0.0
    if isinstance(w, torch.Tensor):
        if w.is_complex():
            _fail(where, f"w must be real, got a tensor of dtype {w.dtype}")
        if w.is_floating_point():
            input_eps = torch.finfo(w.dtype).eps
        array = w.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            raw = np.asarray(w)
        except (TypeError, ValueError) as err:  # ragged nested lists
            _fail(where, f"w must be a square matrix of real numbers ({err})")
        if np.iscomplexobj(raw):
            _fail(where, "w must be real, got complex entries")
        if np.issubdtype(raw.dtype, np.floating):
            input_eps = float(np.finfo(raw.dtype).eps)
        try:
            array = raw.astype(np.float64)
        except (TypeError, ValueError) as err:  # e.g. strings
            _fail(where, f"w must be a square matrix of real numbers ({err})")
    if array.ndim != 2 or array.shape[0] != array.shape[1] or array.shape[0] < 1:
        _fail(where, f"w must be a non-empty square 2-D matrix, got shape {tuple(array.shape)}")
    size = int(array.shape[0])
    bad = ~np.isfinite(array) | (array < 0.0)
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        _fail(
            where,
            f"w[{i}, {j}] = {float(array[i, j])!r} (receiver {i}'s weight on sender {j}); "
            "weights must be finite and >= 0",
        )
    rows, cols = np.nonzero(array)
    edges = [
        (int(j), int(i), float(array[i, j])) for i, j in zip(rows, cols, strict=True) if i != j
    ]
    selfs = [float(x) for x in np.diagonal(array)]
    return Topology._create(
        where,
        size,
        edges,
        selfs,
        allow_non_stochastic=allow_non_stochastic,
        row_sum_tol=max(1e-9, 2.0 * size * input_eps),
    )
