"""The documentation's figures and tables, computed by the library at build time.

Every picture is drawn from a real ``bf.topology`` value (its graph and its mixing matrix), so
the docs cannot show a topology the code does not build.  Rendering uses matplotlib's Agg
backend: no display needed.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import networkx as nx
import torch
from matplotlib.figure import Figure

from bluefog_fn import topology as T

# The static topologies shown side by side on the concepts page (n = 8 reads best).
STATIC: tuple[tuple[str, Callable[[], T.Topology], int | None], ...] = (
    ("ring(8)", lambda: T.ring(8), None),
    ("star(8)", lambda: T.star(8), None),
    ("mesh_grid_2d(9)", lambda: T.mesh_grid_2d(9), 3),
    ("exponential_two(8)", lambda: T.exponential_two(8), None),
    ("hypercube(8)", lambda: T.hypercube(8), None),
    ("fully_connected(8)", lambda: T.fully_connected(8), None),
)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _draw_graph(ax: plt.Axes, topology: T.Topology, title: str, grid: int | None = None) -> None:
    g = topology.to_networkx()
    g.remove_edges_from(list(nx.selfloop_edges(g)))
    if grid is None:
        pos = nx.circular_layout(sorted(g.nodes))
    else:  # a mesh reads best on its grid: rank r at row r // grid, column r % grid
        pos = {r: (r % grid, -(r // grid)) for r in g.nodes}
    nx.draw_networkx_nodes(g, pos, ax=ax, node_size=260, node_color="#4a7fb5")
    nx.draw_networkx_labels(g, pos, ax=ax, font_size=8, font_color="white")
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=9, width=0.8,
                           connectionstyle="arc3,rad=0.08", node_size=260, edge_color="#555555")
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()


def static_topologies() -> bytes:
    """Six static topologies: an arrow u → v means u sends to v."""
    fig, axes = plt.subplots(2, 3, figsize=(10, 6.6))
    for ax, (title, build, grid) in zip(axes.flat, STATIC, strict=True):
        _draw_graph(ax, build(), title, grid)
    return _png(fig)


def one_peer_schedule() -> bytes:
    """The one-peer exponential-2 graph of 8 agents at steps 0, 1, 2 (period 3)."""
    topo = T.one_peer_exponential_two(8)
    fig, axes = plt.subplots(1, topo.period, figsize=(3.4 * topo.period, 3.5))
    for step, ax in enumerate(axes):
        _draw_graph(ax, topo.at(step), f"one_peer_exponential_two(8).at({step})")
    return _png(fig)


def mixing_matrices() -> bytes:
    """``W`` of ring(8) and exponential_two(8): rows are receivers, columns senders."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.8))
    for ax, (title, topo) in zip(axes, (("ring(8)", T.ring(8)), ("exponential_two(8)", T.exponential_two(8))), strict=True):
        w = topo.mixing_matrix().numpy()
        image = ax.imshow(w, cmap="Blues", vmin=0.0, vmax=float(w.max()))
        ax.set_title(f"W of {title}", fontsize=10)
        ax.set_xlabel("sender j")
        ax.set_ylabel("receiver i")
        ax.set_xticks(range(8))
        ax.set_yticks(range(8))
        fig.colorbar(image, ax=ax, fraction=0.046)
    return _png(fig)


def consensus_curves(sizes: tuple[int, ...] = (64, 48), steps: int = 40) -> bytes:
    """‖Xₖ − x̄‖ / ‖X₀ − x̄‖ for average consensus ``Xₖ₊₁ = W(k) Xₖ``, one panel per n."""
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 3.8), sharey=True)
    for ax, n in zip(axes, sizes, strict=True):
        x0 = torch.randn(n, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        start = float((x0 - x0.mean()).norm())
        for name, topo in (
            (f"ring({n})", T.ring(n)),
            (f"exponential_two({n})", T.exponential_two(n)),
            (f"one_peer_exponential_two({n})", T.one_peer_exponential_two(n)),
            (f"base_graph({n}, k=1)", T.base_graph(n, 1)),
        ):
            x, errors = x0.clone(), []
            for k in range(steps):
                x = topo.at(k).mixing_matrix() @ x
                errors.append(max(float((x - x0.mean()).norm()) / start, 1e-17))
            ax.semilogy(range(1, steps + 1), errors, label=name)
        ax.set_title(f"{n} agents", fontsize=10)
        ax.set_xlabel("step k")
        ax.set_ylim(1e-17, 2)
        ax.legend(fontsize=7)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("relative distance to the average")
    return _png(fig)


FIGURES: dict[str, Callable[[], bytes]] = {
    "figures/static_topologies.png": static_topologies,
    "figures/one_peer_exponential_two.png": one_peer_schedule,
    "figures/mixing_matrices.png": mixing_matrices,
    "figures/consensus.png": consensus_curves,
}


def spectral_gap_table(n: int = 64) -> str:
    """A Markdown table of degree, doubly-stochasticity and spectral gap for n agents."""
    rows = [
        ("ring", T.ring(n)),
        ("star", T.star(n)),
        ("mesh_grid_2d", T.mesh_grid_2d(n)),
        ("exponential_two", T.exponential_two(n)),
        ("symmetric_exponential", T.symmetric_exponential(n)),
        ("hypercube", T.hypercube(n)),
        ("fully_connected", T.fully_connected(n)),
    ]
    lines = [
        f"| topology (n = {n}) | max in-degree | doubly stochastic | spectral gap 1 − ρ |",
        "|---|---|---|---|",
    ]
    for name, topo in rows:
        degree = max(len(topo.in_neighbors(r)) for r in range(n))
        lines.append(f"| `{name}({n})` | {degree} | {'yes' if topo.is_doubly_stochastic() else 'no'} "
                     f"| {topo.spectral_gap():.4f} |")
    return "\n".join(lines)
