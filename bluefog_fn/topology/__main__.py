"""``python -m bluefog_fn.topology NAME N``: a topology's mixing matrix, spectral gap and degrees.

    python -m bluefog_fn.topology ring 8
    python -m bluefog_fn.topology exponential 16 --arg base=3 --png exp.png
    python -m bluefog_fn.topology one_peer_exponential_two 8 --step 2 --png step2.png
    python -m bluefog_fn.topology --list

NAME is any public constructor of ``bf.topology`` whose first argument is the number of agents
(or of machines);
``--arg KEY=VALUE`` passes its other arguments (integers).  ``--png`` also draws it
(:func:`bluefog_fn.topology.draw`, needs matplotlib).
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

import bluefog_fn.topology as topology_module
from bluefog_fn.topology.graph import DynamicTopology, Topology


def constructors() -> dict[str, Callable[..., Any]]:
    """The public constructors of ``bf.topology`` taking the number of agents (or machines) first."""
    found: dict[str, Callable[..., Any]] = {}
    for name in topology_module.__all__:
        obj = getattr(topology_module, name)
        if not inspect.isfunction(obj):
            continue
        params = list(inspect.signature(obj).parameters)
        if params and params[0] in ("n", "n_machines"):
            found[name] = obj
    return found


def _kwargs(pairs: Sequence[str]) -> dict[str, int]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--arg takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = int(value)
        except ValueError:
            raise SystemExit(f"--arg {key}: the value must be an integer, got {value!r}") from None
    return out


def describe(topology: Topology | DynamicTopology, step: int = 0) -> str:
    """The text the command prints: mixing matrix, spectral gap and degrees of ``topology.at(step)``.

    Example:
        >>> from bluefog_fn.topology import ring
        >>> print(describe(ring(3)).splitlines()[-2])
        in-degrees:  [2, 2, 2]
    """
    graph = topology.at(step)
    n = graph.size
    lines = [repr(topology) if isinstance(topology, Topology) else f"{topology!r}, step {step}"]
    w = graph.mixing_matrix()
    lines.append("mixing matrix W (row i: the weights receiver i puts on each sender):")
    width = max(len(f"{float(x):.4g}") for x in w.reshape(-1)) if n else 1
    for i in range(n):
        lines.append("  " + " ".join(f"{float(x):>{width}.4g}" for x in w[i]))
    lines.append(f"spectral gap: {graph.spectral_gap():.6g}")
    lines.append(f"doubly stochastic: {graph.is_doubly_stochastic()}")
    ins = [len(graph.in_neighbors(r)) for r in range(n)]
    outs = [len(graph.out_neighbors(r)) for r in range(n)]
    lines.append(f"in-degrees:  {ins}")
    lines.append(f"out-degrees: {outs}")
    if isinstance(topology, DynamicTopology):
        lines.append(f"period: {topology.period} (this is step {step}; --step picks another)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bluefog_fn.topology``; returns the exit status."""
    known = constructors()
    parser = argparse.ArgumentParser(
        prog="python -m bluefog_fn.topology", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("name", nargs="?", help="a constructor of bf.topology (see --list)")
    parser.add_argument("n", nargs="?", type=int, help="number of agents")
    parser.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE", help="another argument of the constructor")
    parser.add_argument("--step", type=int, default=0, help="the step of a dynamic topology (default 0)")
    parser.add_argument("--png", metavar="PATH", help="also draw the graph into this picture")
    parser.add_argument("--list", action="store_true", help="list the constructors")
    args = parser.parse_args(argv)
    if args.list:
        for name, fn in known.items():
            sys.stdout.write(f"{name}{inspect.signature(fn)}\n")
        return 0
    if args.name is None or args.n is None:
        parser.error("NAME and N are required (or --list)")
    if args.name not in known:
        parser.error(f"unknown topology {args.name!r}; choose one of: {', '.join(known)}")
    try:
        topo = known[args.name](args.n, **_kwargs(args.arg))
        text = describe(topo, args.step)
    except (TypeError, ValueError) as e:
        sys.stderr.write(f"python -m bluefog_fn.topology: {e}\n")
        return 2
    sys.stdout.write(text + "\n")
    if args.png:
        from bluefog_fn.topology.drawing import draw

        try:
            draw(topo, args.png, step=args.step)
        except ImportError as e:
            sys.stderr.write(f"python -m bluefog_fn.topology: {e}\n")
            return 1
        sys.stdout.write(f"drawn to {args.png}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
