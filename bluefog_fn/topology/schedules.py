"""Dynamic (time-varying) topologies: periodic schedules of sparse static graphs.

Each constructor returns a :class:`~bluefog_fn.topology.graph.DynamicTopology`, whose graph at
step ``t`` is a pure function of ``t`` (``graphs[t mod period]``). The point of these schedules
is cost: every agent exchanges with one (or ``k``) peers per step, yet the product of one
period's mixing matrices averages exactly (or, for the one-peer exponential graph on a
non-power-of-two ``n``, approximately).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from bluefog_fn.topology.graph import DynamicTopology, Topology, _fail, _require_int

__all__ = [
    "base_graph",
    "inner_outer_exponential_two",
    "inner_outer_ring",
    "machine_one_peer_exponential_two",
    "one_peer",
    "one_peer_exponential_two",
]

# ``one_peer`` stores one graph per step of its period (the lcm of the out-degrees), which an
# irregular graph can make huge; past this many steps the schedule is refused, not built.
MAX_ONE_PEER_PERIOD = 10_000


def one_peer_exponential_two(n: int) -> DynamicTopology:
    """One-peer exponential-2 graph: at step ``t`` each rank talks to exactly one peer.

    With ``τ = ⌈log₂ n⌉`` (the period; 1 for ``n = 1``) and ``k = t mod τ``, rank ``r`` sends to
    ``(r + 2^k) mod n`` and receives from ``(r − 2^k) mod n``, with weights ``½`` on itself and
    ``½`` on the received value:

    .. math:: W^{(k)} = \\tfrac12 (I + P^{2^k}), \\qquad (P x)_r = x_{r-1 \\bmod n}.

    Every step is doubly stochastic. When ``n`` is a power of two the product over one period is
    exactly ``11ᵀ/n`` (also in float64: all entries are dyadic), so ``τ`` steps reach the exact
    average; otherwise the product only contracts towards it. For ``n = 1`` the single graph has
    no edges; for ``n = 2`` the period is 1 and the two ranks swap halves every step.

    Args:
        n: Number of agents, an int ``>= 1``.

    Raises:
        ValueError: if ``n`` is not an int ``>= 1``.

    Example:
        >>> d = one_peer_exponential_two(8)
        >>> d.period
        3
        >>> [d.at(t).out_neighbors(0) for t in range(4)]
        [(1,), (2,), (4,), (1,)]
    """
    size = _require_int("one_peer_exponential_two", "n", n, minimum=1)
    period = max(1, (size - 1).bit_length())  # ⌈log₂ n⌉ for n >= 2
    graphs = []
    for k in range(period):
        if size == 1:
            graphs.append(Topology._create("one_peer_exponential_two", 1, [], [1.0]))
            continue
        shift = 1 << k
        edges = [(r, (r + shift) % size, 0.5) for r in range(size)]
        graphs.append(Topology._create("one_peer_exponential_two", size, edges, [0.5] * size))
    return DynamicTopology(graphs, name=f"one_peer_exponential_two({size})")


def _one_peer_step(where: str, size: int, sends: Sequence[int | None]) -> Topology:
    """One step in which rank ``r`` sends to ``sends[r]`` (or to nobody for ``None``).

    Weights are BlueFog's for its one-peer schedules: a receiver averages uniformly over
    itself and what it received, ``1/(d + 1)`` each for ``d`` messages.
    """
    senders: list[list[int]] = [[] for _ in range(size)]
    for src, dst in enumerate(sends):
        if dst is not None:
            senders[dst].append(src)
    edges = [(src, dst, 1.0 / (len(senders[dst]) + 1)) for dst in range(size) for src in senders[dst]]
    return Topology._create(where, size, edges, [1.0 / (len(s) + 1) for s in senders])


def one_peer(topology: Topology) -> DynamicTopology:
    """BlueFog's one-peer schedule over a static graph: each rank sends to one out-neighbour per step.

    Rank ``r``'s out-neighbours are ordered clockwise from ``r`` — by ``(j − r) mod n`` — and at
    step ``t`` it sends to the ``(t mod d_r)``-th of its ``d_r`` out-neighbours (ranks without
    out-neighbours send nothing). A receiver of ``m`` messages at step ``t`` weights itself
    and each of them ``1/(m + 1)`` (BlueFog's uniform ``self + received`` average); the base
    graph's own weights are not used. The period is the lcm of the non-zero out-degrees.

    Every step is row-stochastic with positive self weights. It is doubly stochastic exactly
    when, at that step, every rank receives as many messages as it sends (a permutation) — for
    regular circulant graphs such as :func:`~bluefog_fn.topology.exponential_two` or a ring; a
    star's hub receives from every leaf at once, so there it is not. This is BlueFog's
    ``GetDynamicOnePeerSendRecvRanks(topo, rank)`` as a pure function of the step.

    Args:
        topology: A static :class:`~bluefog_fn.topology.Topology`.

    Raises:
        TypeError: if ``topology`` is not a static ``Topology``.
        ValueError: if the period would exceed ``MAX_ONE_PEER_PERIOD`` (10 000) steps.

    Example:
        >>> from bluefog_fn.topology import exponential_two
        >>> d = one_peer(exponential_two(8))
        >>> d.period, [d.at(t).out_neighbors(0) for t in range(4)]
        (3, [(1,), (2,), (4,), (1,)])
        >>> d.at(1).recv_weights(0), d.at(1).self_weight(0)
        ({6: 0.5}, 0.5)
    """
    where = "one_peer"
    if not isinstance(topology, Topology):
        raise TypeError(f"{where}: topology must be a static bf.topology Topology, got {type(topology).__name__}")
    size = topology.size
    # Clockwise from r: the offset (j − r) mod n orders the out-neighbours.
    order = [sorted(topology.out_neighbors(r), key=lambda j: (j - r) % size) for r in range(size)]
    period = 1
    for targets in order:
        if targets:
            period = math.lcm(period, len(targets))
    if period > MAX_ONE_PEER_PERIOD:
        _fail(
            where,
            f"the schedule's period, the lcm of the out-degrees {sorted({len(o) for o in order})}, "
            f"is {period} > {MAX_ONE_PEER_PERIOD} steps; make the out-degrees more uniform",
        )
    graphs = [
        _one_peer_step(where, size, [o[t % len(o)] if o else None for o in order]) for t in range(period)
    ]
    return DynamicTopology(graphs, name=f"one_peer({topology!r})")


def machine_one_peer_exponential_two(n_machines: int) -> DynamicTopology:
    """The machine graph of BlueFog's hierarchical default: one-peer exponential-2 over machines.

    At step ``t`` machine ``m`` sends to ``(m + 2^k) mod M`` and receives from ``(m − 2^k) mod M``
    with ``k = t mod ⌈log₂ M⌉``, weights ``½`` on itself and ``½`` on the received value — BlueFog's
    ``GetExp2DynamicSendRecvMachineRanks`` as a pure function of the step. The graphs are those
    of :func:`one_peer_exponential_two` ``(n_machines)`` (so the two compare equal); this name
    says what it is for: the ``machine_topology`` of
    :func:`bluefog_fn.hierarchical_neighbor_mean`. ``n_machines = 1`` gives one edgeless graph.

    Args:
        n_machines: Number of machines ``M``, an int ``>= 1`` (``bf.machine_size()``).

    Raises:
        ValueError: if ``n_machines`` is not an int ``>= 1``.

    Example:
        >>> d = machine_one_peer_exponential_two(4)
        >>> d.period, [d.at(t).in_neighbors(0) for t in range(2)]
        (2, [(3,), (2,)])
    """
    size = _require_int("machine_one_peer_exponential_two", "n_machines", n_machines, minimum=1)
    graphs = one_peer_exponential_two(size).graphs
    return DynamicTopology(graphs, name=f"machine_one_peer_exponential_two({size})")


def _machines(where: str, n: object, local_size: object) -> tuple[int, int]:
    size = _require_int(where, "n", n, minimum=1)
    local = _require_int(where, "local_size", local_size, minimum=1)
    if size % local:
        _fail(where, f"n = {size} is not a multiple of local_size = {local} (machines must be equal)")
    if local == 2:
        # The inner ring of the one other local rank is empty, so local rank 0 and 1 would
        # never exchange: the schedule would not average (BlueFog refuses it too).
        _fail(
            where,
            "local_size = 2 leaves no inner ring (ranks 2m and 2m + 1 would never mix); use "
            "bf.hierarchical_neighbor_mean or one_peer(...) instead",
        )
    return size, local


def _inner_outer(
    where: str,
    name: str,
    size: int,
    local: int,
    period: int,
    outer_shift: Callable[[int], int],
    inner_shift: Callable[[int], int],
) -> DynamicTopology:
    """Steps where local rank ``t mod L`` of every machine talks across machines, the rest inside.

    Machine ``m``'s outgoing rank sends to the same local rank of machine ``m + outer_shift(t)``.
    The other ``L − 1`` local ranks form a cycle that skips the outgoing one (position ``p`` of
    local rank ``l`` is ``(l − out − 1) mod L``) and each sends ``inner_shift(t)`` positions ahead.
    A shift of zero (one machine, or a cycle of one) leaves those ranks idle for the step.
    """
    machines = size // local
    graphs = []
    for t in range(period):
        out = t % local
        sends: list[int | None] = [None] * size
        outer = outer_shift(t) % machines
        inner = inner_shift(t) % (local - 1) if local > 1 else 0
        for m in range(machines):
            if outer:
                sends[m * local + out] = ((m + outer) % machines) * local + out
            if inner:
                for p in range(local - 1):
                    src = (out + 1 + p) % local
                    dst = (out + 1 + (p + inner) % (local - 1)) % local
                    sends[m * local + src] = m * local + dst
        graphs.append(_one_peer_step(where, size, sends))
    return DynamicTopology(graphs, name=name)


def _floor_log2(x: int) -> int:
    return x.bit_length() - 1


def inner_outer_ring(n: int, local_size: int) -> DynamicTopology:
    """BlueFog's inner-ring / outer-ring schedule for ``n / local_size`` machines of ``local_size`` ranks.

    Ranks ``m·L … m·L + L − 1`` form machine ``m`` (``L = local_size``, ``M = n / L``). At step
    ``t``, local rank ``o = t mod L`` of every machine sends to local rank ``o`` of machine
    ``m + 1 (mod M)`` — one message per machine crosses machines — while the other ``L − 1``
    local ranks pass their value one step around an inner ring that skips ``o``. Everyone
    receives exactly one message and weights it and itself ``½``, so every step is a
    permutation average, doubly stochastic; the period is ``L``. BlueFog's
    ``GetInnerOuterRingDynamicSendRecvRanks`` as a pure function of the step.

    Edge cases BlueFog rejects: with one machine (``n = L``) the outgoing rank idles for the
    step; with ``local_size = 1`` every rank is outgoing (a one-directional ring of machines).
    ``local_size = 2`` is refused: no inner ring, so the schedule would not average.

    Args:
        n: Number of ranks, an int ``>= 1``.
        local_size: Ranks per machine, an int ``>= 1`` and ``!= 2`` dividing ``n``.

    Raises:
        ValueError: on a bad ``n`` or ``local_size``, or ``local_size`` not dividing ``n``.

    Example:
        >>> d = inner_outer_ring(8, 4)
        >>> d.period, d.at(0).out_neighbors(0), d.at(0).out_neighbors(1), d.at(0).out_neighbors(3)
        (4, (4,), (2,), (1,))
    """
    where = "inner_outer_ring"
    size, local = _machines(where, n, local_size)
    return _inner_outer(
        where, f"inner_outer_ring({size}, {local})", size, local, local, lambda t: 1, lambda t: 1
    )


def inner_outer_exponential_two(n: int, local_size: int) -> DynamicTopology:
    """BlueFog's inner/outer exponential-2 schedule: :func:`inner_outer_ring` with doubling hops.

    As in :func:`inner_outer_ring`, at step ``t`` local rank ``o = t mod L`` of every machine
    talks across machines and the other ``L − 1`` form an inner cycle that skips ``o``; but the
    outgoing rank of machine ``m`` sends to machine ``m + 2^(t mod (a + 1))`` with
    ``a = ⌊log₂(M − 1)⌋``, and inner ranks send ``2^(t mod (b + 1))`` places ahead on the inner
    cycle, ``b = ⌊log₂(L − 2)⌋`` (``a = 0`` for ``M <= 2``, ``b = 0`` for ``L <= 3``). Weights ``½``
    on itself and the one received value: every step is doubly stochastic. The period is
    ``lcm(L, a + 1, b + 1)``. BlueFog's ``GetInnerOuterExpo2DynamicSendRecvRanks`` as a pure
    function of the step — including its quirk that a local rank may only ever cross machines
    at some of the distances (e.g. ``M = 16, L = 4``: local rank 1 always hops 2 machines).

    Edge cases as in :func:`inner_outer_ring` (one machine, ``local_size`` 1; 2 is refused).

    Args:
        n: Number of ranks, an int ``>= 1``.
        local_size: Ranks per machine, an int ``>= 1`` and ``!= 2`` dividing ``n``.

    Raises:
        ValueError: on a bad ``n`` or ``local_size``, or ``local_size`` not dividing ``n``.

    Example:
        >>> d = inner_outer_exponential_two(20, 5)
        >>> d.period, [d.at(t).out_neighbors(0) for t in (0, 5, 10)]
        (10, [(5,), (10,), (5,)])
    """
    where = "inner_outer_exponential_two"
    size, local = _machines(where, n, local_size)
    machines = size // local
    a = _floor_log2(machines - 1) if machines > 2 else 0
    b = _floor_log2(local - 2) if local > 3 else 0
    period = math.lcm(local, a + 1, b + 1)
    return _inner_outer(
        where,
        f"inner_outer_exponential_two({size}, {local})",
        size,
        local,
        period,
        lambda t: 1 << (t % (a + 1)),
        lambda t: 1 << (t % (b + 1)),
    )


# --------------------------------------------------------------------------- Base-(k+1) graph


class _Step:
    """One step's weights under construction: each node is given weights at most once."""

    __slots__ = ("edges", "selfs", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.edges: dict[tuple[int, int], float] = {}  # (src, dst) -> weight dst puts on src
        self.selfs: dict[int, float] = {}

    def claim(self, node: int, weight: float) -> None:
        # The construction guarantees that the parts of one step touch disjoint nodes; a
        # violation would silently break the row sums, so fail loudly instead.
        if node in self.selfs:
            raise RuntimeError(f"base_graph: internal error, node {node} used twice in one step")
        self.selfs[node] = weight

    def clique(self, members: Sequence[int]) -> None:
        """Exact average among ``members``: everyone puts ``1/|members|`` on everyone."""
        if len(members) < 2:
            return
        share = 1.0 / len(members)
        for a in members:
            self.claim(a, share)
            for b in members:
                if a != b:
                    self.edges[(b, a)] = share

    def link(self, a: int, b: int, weight: float) -> None:
        """Symmetric edge ``a ↔ b`` of ``weight`` (self weights are set by the caller)."""
        self.edges[(a, b)] = weight
        self.edges[(b, a)] = weight

    def merge(self, other: _Step) -> None:
        for node, weight in other.selfs.items():
            self.claim(node, weight)
        self.edges.update(other.edges)

    def build(self) -> Topology:
        # Nodes left out of every part of this step keep their value (self weight 1).
        selfs = [self.selfs.get(r, 1.0) for r in range(self.size)]
        edges = [(src, dst, w) for (src, dst), w in self.edges.items()]
        return Topology._create("base_graph", self.size, edges, selfs)


def _smooth_factors(m: int, k: int) -> list[int] | None:
    """Factor ``m`` greedily (largest first) into factors in ``[2, k + 1]``, smallest first.

    Returns ``None`` when ``m`` has a prime factor above ``k + 1`` and ``[]`` for ``m = 1``.
    """
    factors: list[int] = []
    rest = m
    for f in range(k + 1, 1, -1):
        while rest % f == 0:
            factors.append(f)
            rest //= f
    if rest != 1:
        return None
    factors.reverse()
    return factors


def _hyper_hypercube(nodes: Sequence[int], k: int) -> list[list[list[int]]]:
    """The k-peer hyper-hypercube on ``nodes``: a list of steps, each a list of cliques.

    With ``|nodes| = f_1 f_2 ⋯ f_L`` (every ``f_l ∈ [2, k+1]``), write a node's local index in
    mixed radix ``(d_1, …, d_L)``. Step ``l`` averages exactly within each clique of the
    ``f_l`` nodes that differ only in digit ``d_l`` (degree ``f_l − 1 <= k``). After step ``l``
    every node holds the mean over digits ``1..l``, so after ``L`` steps the exact mean. A single
    node gives one step with no cliques (an identity step, as in the reference construction).
    """
    m = len(nodes)
    factors = _smooth_factors(m, k)
    if factors is None:
        raise RuntimeError(f"base_graph: internal error, {m} is not {k + 1}-smooth")
    if not factors:
        return [[]]
    steps: list[list[list[int]]] = []
    stride = 1
    for f in factors:
        cliques = [
            [nodes[u + d * stride] for d in range(f)] for u in range(m) if (u // stride) % f == 0
        ]
        steps.append(cliques)
        stride *= f
    return steps


def _cliques_step(size: int, cliques: Iterable[Sequence[int]]) -> _Step:
    step = _Step(size)
    for members in cliques:
        step.clique(members)
    return step


def _digits(m: int, base: int) -> list[tuple[int, int]]:
    """Nonzero digits of ``m`` in ``base`` as ``(a_l, p_l)``, most significant first."""
    out: list[tuple[int, int]] = []
    power, exp = 1, 0
    while power * base <= m:
        power *= base
        exp += 1
    rest = m
    while rest:
        a, rest = divmod(rest, power)
        if a:
            out.append((a, exp))
        power //= base
        exp -= 1
    return out


def _simple_base(nodes: Sequence[int], k: int, size: int) -> list[_Step]:
    """The simple Base-(k+1) graph on ``nodes`` (Takezawa et al. 2023).

    If ``|nodes|`` is (k+1)-smooth it is the k-peer hyper-hypercube. Otherwise write
    ``m = Σ_l a_l (k+1)^{p_l}`` (base-(k+1) digits, ``p_0 > p_1 > …``, ``1 <= a_l <= k``) and cut
    the nodes into consecutive groups ``V_l`` of ``a_l (k+1)^{p_l}`` nodes, each further cut into
    ``a_l`` subgroups of ``(k+1)^{p_l}`` nodes. Then:

    1. Every ``V_l`` averages internally with its hyper-hypercube (shorter ones repeat).
    2. For ``s = 0, 1, …``: every node of ``V_{>s}`` links to one node of each subgroup of
       ``V_s`` (``a_s <= k`` peers; there are enough since ``|V_{>s}| < (k+1)^{p_s}``) with
       weight ``n_s / (N_s a_s)``, ``N_s = |V_s| + |V_{>s}|``. Afterwards ``V_{>s}`` holds
       ``(1 − n_s/N_s) μ_{>s} + (n_s/N_s) μ_s``, whose ``N_{s+1}``-weighted mean is the global
       mean, so the recursion carries on with ``V_{>s}``. The unpaired nodes of ``V_s`` average
       in cliques of ``k + 1`` (they hold equal values, so this is harmless and it is what the
       reference does), and from the next step on ``V_s`` re-averages with the hyper-hypercube
       on its subgroups, which restores a uniform value (each subgroup lost the same mass).

    The length is ``2 p_0 + 1 + [a_0 >= 2]``.
    """
    m = len(nodes)
    if _smooth_factors(m, k) is not None:
        return [_cliques_step(size, cl) for cl in _hyper_hypercube(nodes, k)]

    base = k + 1
    groups: list[list[int]] = []
    subgroups: list[list[list[int]]] = []
    start = 0
    for a, p in _digits(m, base):
        width = base**p
        groups.append(list(nodes[start : start + a * width]))
        subgroups.append(
            [list(nodes[start + q * width : start + (q + 1) * width]) for q in range(a)]
        )
        start += a * width
    count = len(groups)
    sizes = [len(g) for g in groups]
    whole = [_hyper_hypercube(g, k) for g in groups]
    # Every subgroup of V_l has the same size, hence the same number of steps.
    parts = [[_hyper_hypercube(sub, k) for sub in subs] for subs in subgroups]

    steps: list[_Step] = []
    phase_one = len(whole[0])  # V_0 is the largest group, so its cube is the longest
    for t in range(phase_one):
        steps.append(_cliques_step(size, (c for cube in whole for c in cube[t % len(cube)])))

    done = [0] * count  # re-averaging steps each group has taken since its pairing step
    s = 0
    while True:
        step = _Step(size)
        unpaired: list[list[int]] = [list(sub) for sub in subgroups[s]] if s < count - 1 else []
        for g in reversed(range(count)):
            if g > s:
                frac = sizes[s] / sum(sizes[s:])
                a_s = len(subgroups[s])
                for i in groups[g]:
                    for pool in unpaired:
                        j = pool.pop()
                        step.link(i, j, frac / a_s)
                        step.claim(j, 1.0 - frac / a_s)
                    step.claim(i, 1.0 - frac)
            elif g == s and g != count - 1:
                rest = [j for pool in unpaired for j in pool]
                for first in range(0, len(rest), base):
                    step.clique(rest[first : first + base])
            else:
                if sizes[g] < base:
                    cliques = whole[g][done[g] % len(whole[g])]
                else:
                    period = len(parts[g][0])
                    cliques = [c for sub in parts[g] for c in sub[done[g] % period]]
                for members in cliques:
                    step.clique(members)
                done[g] += 1
        steps.append(step)
        s += 1
        if done[0] == len(parts[0][0]):
            return steps


def _smooth_part(n: int, k: int) -> int:
    """The largest divisor of ``n`` whose prime factors are all ``<= k + 1``."""
    part, rest = 1, n
    for f in range(2, k + 2):
        while rest % f == 0:
            rest //= f
            part *= f
    return part


def _hhc_length(m: int, k: int) -> int:
    factors = _smooth_factors(m, k)
    return max(1, len(factors)) if factors is not None else -1


def _simple_base_length(m: int, k: int) -> int:
    if _smooth_factors(m, k) is not None:
        return _hhc_length(m, k)
    a0, p0 = _digits(m, k + 1)[0]
    return 2 * p0 + 1 + (1 if a0 >= 2 else 0)


def base_graph(n: int, k: int = 1) -> DynamicTopology:
    """Base-(k+1) graph (Takezawa, Sato, Niwa, Yamada, NeurIPS 2023): exact average for any n.

    A finite sequence of graphs in which every agent exchanges with at most ``k`` peers per step
    and whose mixing matrices multiply to the exact average:

    .. math:: W^{(τ-1)} ⋯ W^{(1)} W^{(0)} = \\tfrac1n 11ᵀ \\quad \\text{for every } n \\ge 1.

    Every step is symmetric (doubly stochastic) with positive self weights. Construction (the
    paper's, matrix for matrix as in the authors' reference code): let ``p`` be the largest divisor of ``n`` with all prime factors
    ``<= k + 1`` and ``q = n / p``. Either run the *simple* Base-(k+1) graph on all ``n`` nodes,
    or run it on each of the ``p`` consecutive blocks of ``q`` nodes in parallel and then the
    k-peer hyper-hypercube across the ``q`` strided groups ``{j, j + q, …}`` of ``p`` nodes;
    whichever is shorter (ties go to the second). The simple graph is the k-peer
    hyper-hypercube when ``n`` is (k+1)-smooth and otherwise works digit by digit on the
    base-(k+1) expansion of ``n`` (see the module's ``_simple_base``).

    Period: with ``H(m)`` the number of factors in the greedy (largest first) factorisation of
    a (k+1)-smooth ``m`` into factors from ``{2, …, k+1}`` (``H(1) = 1``), and
    ``S(m) = H(m)`` for smooth ``m``, else ``2⌊log_{k+1} m⌋ + 1 + [leading base-(k+1) digit of
    m >= 2]``, the period is ``S(n)`` if ``S(n) < S(q) + H(p)``, else ``S(q) + H(p)``; it is at
    most ``2 log_{k+1} n + 2``. For ``n = (k+1)^d`` it is ``d`` (a one-peer hypercube for
    ``k = 1``); ``n = 1`` gives one edgeless graph.

    Args:
        n: Number of agents, an int ``>= 1``.
        k: Maximum number of peers per agent per step, an int ``>= 1``.

    Raises:
        ValueError: if ``n`` is not an int ``>= 1`` or ``k`` is not an int ``>= 1``.

    Example:
        >>> import torch
        >>> d = base_graph(6, k=1)
        >>> d.period, max(len(d.at(t).in_neighbors(r)) for t in range(d.period) for r in range(6))
        (4, 1)
        >>> prod = torch.eye(6, dtype=torch.float64)
        >>> for t in range(d.period):
        ...     prod = d.mixing_matrix(t) @ prod
        >>> torch.allclose(prod, torch.full((6, 6), 1 / 6, dtype=torch.float64), atol=1e-12)
        True
    """
    size = _require_int("base_graph", "n", n, minimum=1)
    peers = _require_int("base_graph", "k", k, minimum=1)
    name = f"base_graph({size}, {peers})"
    if size == 1:
        return DynamicTopology([Topology._create("base_graph", 1, [], [1.0])], name=name)

    p = _smooth_part(size, peers)
    q = size // p
    direct = _simple_base_length(size, peers)
    split = _simple_base_length(q, peers) + _hhc_length(p, peers)
    expected = direct if direct < split else split
    if direct < split:
        steps = _simple_base(range(size), peers, size)
    else:
        blocks = [_simple_base(range(b * q, (b + 1) * q), peers, size) for b in range(p)]
        steps = []
        for t in range(len(blocks[0])):
            merged = _Step(size)
            for block in blocks:
                merged.merge(block[t])
            steps.append(merged)
        strided = [_hyper_hypercube(range(j, size, q), peers) for j in range(q)]
        for t in range(len(strided[0])):
            steps.append(_cliques_step(size, (c for cube in strided for c in cube[t])))
    if len(steps) != expected:  # the documented period formula is part of the contract
        raise RuntimeError(
            f"base_graph: internal error, built {len(steps)} steps for n={size}, k={peers}, "
            f"expected {expected}"
        )
    return DynamicTopology([step.build() for step in steps], name=name)
