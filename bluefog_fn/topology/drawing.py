"""Pictures of topologies: ``bf.topology.draw`` (networkx + matplotlib, the ``plot`` extra).

matplotlib is imported only when a picture is drawn, and only through its object-oriented API
(a ``Figure`` with an Agg canvas), so drawing never changes the caller's pyplot state or backend.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from bluefog_fn.topology.graph import DynamicTopology, Topology, _require_step

if TYPE_CHECKING:
    from os import PathLike

MISSING = (
    "bf.topology.draw needs matplotlib, which is not installed; install the plotting extra: "
    "pip install 'bluefog-fn[plot]'"
)


def _figure_class() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(MISSING) from e
    return Figure, FigureCanvasAgg


def _layout(n: int) -> dict[int, tuple[float, float]]:
    """Ranks on a circle, rank 0 at the top, increasing clockwise (as rings are usually drawn)."""
    if n == 1:
        return {0: (0.0, 0.0)}
    return {r: (math.sin(2 * math.pi * r / n), math.cos(2 * math.pi * r / n)) for r in range(n)}


def draw(topology: Topology | DynamicTopology, path: str | PathLike[str] | None = None, step: int = 0) -> Any:
    """Draw the graph of ``topology.at(step)``: ranks on a circle, an arrow per sender → receiver.

    Arrow widths grow with the receiver's weight on that edge; nodes show their rank (up to 64
    ranks); the title gives the size, the step (for dynamic topologies) and the spectral gap.

    Args:
        topology: a static or dynamic ``bf.topology`` graph.
        path: if given, the picture is saved there (the format follows the suffix: ``.png``,
            ``.svg``, ``.pdf``...).
        step: which graph of a dynamic topology to draw.

    Returns:
        The ``matplotlib.figure.Figure`` (shown inline by notebooks).

    Raises:
        ImportError: matplotlib is missing (install ``bluefog-fn[plot]``).

    Example:
        >>> import bluefog_fn as bf
        >>> fig = bf.topology.draw(bf.topology.exponential_two(8))
        >>> fig.axes[0].get_title().startswith("8 ranks")
        True
    """
    if not isinstance(topology, (Topology, DynamicTopology)):
        raise TypeError(f"topology.draw: topology must be a bf.topology graph, got {type(topology).__name__}")
    step = _require_step("topology.draw", step)
    graph = topology.at(step)
    Figure, Canvas = _figure_class()
    import networkx as nx

    n = graph.size
    g = graph.to_networkx()
    pos = _layout(n)
    side = min(9.0, 3.0 + 0.25 * n)
    fig = Figure(figsize=(side, side))
    Canvas(fig)
    ax = fig.add_subplot(1, 1, 1)
    node_size = max(120.0, 900.0 - 12.0 * n)
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=node_size, node_color="#4c72b0")
    if n <= 64:
        labels = {r: str(r) for r in range(n)}
        nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_color="white", font_size=9)
    edges = list(g.edges(data="weight"))
    if edges:
        top = max(w for _, _, w in edges) or 1.0
        nx.draw_networkx_edges(
            g, pos, ax=ax, edgelist=[(u, v) for u, v, _ in edges],
            width=[0.6 + 2.4 * w / top for _, _, w in edges], arrows=True, arrowsize=10,
            node_size=node_size, connectionstyle="arc3,rad=0.08", edge_color="#555555",
        )
    title = f"{n} ranks"
    if isinstance(topology, DynamicTopology):
        title += f", {topology.name} step {step} of period {topology.period}"
    title += f", spectral gap {graph.spectral_gap():.3f}"
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    ax.set_aspect("equal")
    ax.margins(0.08)
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig
