"""Virtual communication topologies: static weighted graphs and periodic schedules of them.

``W[i, j]`` is the weight receiver ``i`` puts on sender ``j``'s value (rows are receivers);
an edge ``u → v`` means u sends to v. See :class:`Topology` and :class:`DynamicTopology`.

Example:
    >>> from bluefog_fn import topology as T
    >>> T.ring(4).in_neighbors(0)
    (1, 3)
    >>> T.one_peer_exponential_two(8).at(1).in_neighbors(0)
    (6,)
    >>> T.inner_outer_ring(8, local_size=4).at(0).in_neighbors(0)
    (4,)
"""

from __future__ import annotations

# Graph discovery is a collective, so it lives with the ops; it is listed here with the graphs.
from bluefog_fn.ops.infer import infer_destinations, infer_sources
from bluefog_fn.topology.builders import (
    exponential,
    exponential_two,
    from_matrix,
    from_networkx,
    fully_connected,
    hypercube,
    mesh_grid_2d,
    ring,
    star,
    symmetric_exponential,
)
from bluefog_fn.topology.drawing import draw
from bluefog_fn.topology.graph import AnyTopology, DynamicTopology, Topology
from bluefog_fn.topology.schedules import (
    base_graph,
    inner_outer_exponential_two,
    inner_outer_ring,
    machine_one_peer_exponential_two,
    one_peer,
    one_peer_exponential_two,
)

__all__ = [
    "AnyTopology",
    "DynamicTopology",
    "Topology",
    "base_graph",
    "draw",
    "exponential",
    "exponential_two",
    "from_matrix",
    "from_networkx",
    "fully_connected",
    "hypercube",
    "infer_destinations",
    "infer_sources",
    "inner_outer_exponential_two",
    "inner_outer_ring",
    "machine_one_peer_exponential_two",
    "mesh_grid_2d",
    "one_peer",
    "one_peer_exponential_two",
    "ring",
    "star",
    "symmetric_exponential",
]
