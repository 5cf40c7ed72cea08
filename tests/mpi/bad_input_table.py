"""The table of public functions and the bad values each argument must reject.

One :class:`Entry` per public callable: how to call it, a set of valid arguments, and for each
argument a hypothesis strategy of bad values.  Each bad value carries the text its error message
must show (the value's repr, its type, its dtype or device).  ``tests/test_bad_input.py`` (one
process) and ``tests/mpi/test_bad_input_mpi.py`` (every rank) run the same table.

To cover a new function, add an ``Entry`` to :func:`entries` (the test ids are ``name-argument``);
reuse the strategies below (``STEP``, ``rank_outside(n)``, ``weight_bad()``, ``tree_bad(...)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T


@dataclass(frozen=True)
class Bad:
    """A bad value and the text its error message must contain."""

    value: Any
    shows: str

    def __repr__(self) -> str:  # hypothesis prints this for a failing example
        return f"Bad({self.value!r}, shows={self.shows!r})"


def shows(value: Any) -> str:
    """What a message should show of ``value``: its repr for plain values, else its type."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)[:24]
    if isinstance(value, torch.Tensor):
        return str(value.dtype)
    return type(value).__name__


def typed(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Bad]:
    """Values of a wrong type: the message must show the type's name."""
    return strategy.map(lambda v: Bad(v, type(v).__name__))


def bad(strategy: st.SearchStrategy[Any], show: Callable[[Any], str] = shows) -> st.SearchStrategy[Bad]:
    return strategy.map(lambda v: Bad(v, show(v)))


def fixed(*pairs: tuple[Any, str]) -> st.SearchStrategy[Bad]:
    """Hand-picked bad values with what each message must show."""
    return st.sampled_from([Bad(v, s) for v, s in pairs])


# --------------------------------------------------------------------------- reusable strategies

NON_INT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(min_size=1, max_size=3),
    st.none(),
    st.booleans(),
    st.builds(object),
)
STEP = bad(st.one_of(st.integers(min_value=-(10**9), max_value=-1), NON_INT))
NOT_A_BOOL = bad(st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.none(), st.floats(allow_nan=False)))


def rank_outside(n: int) -> st.SearchStrategy[Any]:
    """Values that are not ranks of a world of ``n``: out of range, or not ints at all."""
    return st.one_of(st.integers(min_value=-(10**6), max_value=-1), st.integers(min_value=n, max_value=n + 10**6), NON_INT)


def weight_bad() -> st.SearchStrategy[Bad]:
    """Mixing weights that are not finite non-negative numbers."""
    return bad(
        st.one_of(
            st.sampled_from([math.nan, math.inf, -math.inf]),
            st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False, min_value=-1e9),
            st.text(min_size=1, max_size=3),
            st.builds(object),
        )
    )


def tree_bad(*, floating: bool) -> st.SearchStrategy[Bad]:
    """Trees an op must refuse: non-tensor leaves, mixed devices, (mixing ops) integer dtypes."""
    leaf = st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.builds(object), st.floats(allow_nan=False))
    options = [
        leaf.map(lambda v: Bad(v, type(v).__name__)),
        leaf.map(lambda v: Bad({"w": torch.ones(2), "x": [v]}, type(v).__name__)),
        st.just(Bad({"a": torch.ones(2), "b": torch.ones(2, device="meta")}, "meta")),
    ]
    if floating:
        options.append(
            st.sampled_from([torch.int64, torch.int32, torch.bool, torch.uint8, torch.complex64]).map(
                lambda d: Bad({"w": torch.ones(3).to(d)}, str(d))
            )
        )
    return st.one_of(*options)


def out_bad() -> st.SearchStrategy[Bad]:
    """``out`` trees the result of a mixing op of ``_tree()`` cannot be written into."""
    def like(w: torch.Tensor) -> dict[str, Any]:
        return {"w": w, "b": [torch.zeros(2, dtype=torch.float64)], "n": None}

    return st.sampled_from([
        Bad({"w": torch.zeros(2, 3)}, "structure"),
        Bad(like(torch.zeros(3, 2)), "(3, 2)"),
        Bad(like(torch.zeros(2, 3, dtype=torch.float64)), "torch.float64"),
        Bad(like(torch.zeros(2, 3, device="meta")), "meta"),
        Bad(like(torch.zeros(2, 3, requires_grad=True)), "requires grad"),
        Bad(7, "int"),
    ])


def window_tree_bad() -> st.SearchStrategy[Bad]:
    """Trees a window refuses: as ``tree_bad``, with bool/complex leaves (integers are fine)."""
    return st.one_of(
        tree_bad(floating=False),
        st.sampled_from([torch.bool, torch.complex64]).map(lambda d: Bad({"w": torch.ones(3).to(d)}, str(d))),
    )


def topology_bad(n: int) -> st.SearchStrategy[Bad]:
    """Not a topology, or one of another size."""
    return st.one_of(
        bad(st.one_of(st.text(min_size=1, max_size=3), st.integers(), st.builds(object), st.just([[1.0]]))),
        st.integers(min_value=n + 1, max_value=n + 4).flatmap(
            lambda m: st.sampled_from([T.ring(m), T.one_peer_exponential_two(m)]).map(lambda t: Bad(t, str(m)))
        ),
    )


def src_bad(n: int, me: int) -> st.SearchStrategy[Bad]:
    """``src_weights`` naming unknown ranks, non-finite weights, or of the wrong type."""
    others = [r for r in range(n) if r != me]
    options = [
        rank_outside(n).map(lambda k: Bad({k: 0.5}, shows(k))),
        typed(st.one_of(st.lists(st.integers(0, 3), min_size=1, max_size=2), st.text(min_size=1, max_size=2), st.integers())),
    ]
    if others:
        options.append(weight_bad().map(lambda b: Bad({others[0]: b.value}, b.shows)))
    return st.one_of(*options)


def dst_bad(n: int, me: int) -> st.SearchStrategy[Bad]:
    """``dst_weights`` naming unknown ranks, non-finite weights, or of the wrong type."""
    others = [r for r in range(n) if r != me]
    options = [
        rank_outside(n).map(lambda k: Bad([k], shows(k))),
        rank_outside(n).map(lambda k: Bad({k: 1.0}, shows(k))),
        typed(st.one_of(st.text(min_size=1, max_size=2), st.integers(), st.floats(allow_nan=False))),
    ]
    if others:
        options.append(weight_bad().map(lambda b: Bad({others[0]: b.value}, b.shows)))
    return st.one_of(*options)


def lr_bad() -> st.SearchStrategy[Bad]:
    return bad(
        st.one_of(
            st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 0]),
            st.floats(max_value=-1e-9, min_value=-1e9, allow_nan=False),
            st.text(min_size=1, max_size=3),
            st.booleans(),
        )
    )


def int_at_least(low: int) -> st.SearchStrategy[Bad]:
    return bad(st.one_of(st.integers(min_value=-(10**6), max_value=low - 1), st.floats(allow_nan=True), st.text(min_size=1, max_size=2), st.booleans()))


def fraction_bad() -> st.SearchStrategy[Bad]:
    """Not a number in [0, 1)."""
    return bad(st.one_of(st.floats(min_value=1.0, max_value=1e9), st.floats(max_value=-1e-9, min_value=-1e9), st.sampled_from([math.nan, math.inf]), st.text(min_size=1, max_size=2)))


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Entry:
    """One public callable.

    Attributes:
        name: test id, e.g. ``"neighbor_mean"`` or ``"Window.put"``.
        says: the function name the message must contain (``"atc"`` for ``atc(...).step``).
        call: runs the function on a dict of arguments.
        good: valid arguments, given the shared fixtures (``ctx["window"]``, ...).
        bad: argument name -> strategy of :class:`Bad` values.
        collective: whether a good call communicates (the MPI suite calls it on every rank).
        arg_names: where the message names an argument differently from its parameter name.
    """

    name: str
    says: str
    call: Callable[[dict[str, Any]], Any]
    good: Callable[[dict[str, Any]], dict[str, Any]]
    bad: Mapping[str, st.SearchStrategy[Bad]]
    collective: bool = True  # False: purely local (constructors, queries); nothing to agree on
    arg_names: Mapping[str, str] = field(default_factory=dict)  # argument -> text in the message

    def __repr__(self) -> str:
        return f"Entry({self.name})"


def _method(name: str) -> Callable[[dict[str, Any]], Any]:
    def call(args: dict[str, Any]) -> Any:
        rest = {k: v for k, v in args.items() if k != "self"}
        return getattr(args["self"], name)(**rest)

    return call


def _tree() -> dict[str, Any]:
    return {"w": torch.arange(6.0).reshape(2, 3), "b": [torch.ones(2, dtype=torch.float64)], "n": None}


def entries(n: int, me: int) -> list[Entry]:
    """Every public callable of the table for a world of ``n`` ranks seen from rank ``me``."""
    ring = T.ring(n)
    tree = _tree
    mix_bad = {"tree": tree_bad(floating=True), "topology": topology_bad(n), "step": STEP, "out": out_bad()}
    weights_bad = {"self_weight": weight_bad(), "src_weights": src_bad(n, me), "dst_weights": dst_bad(n, me)}
    out = [
        Entry("neighbor_mean", "neighbor_mean", lambda a: bf.neighbor_mean(**a),
              lambda c: {"tree": tree(), "topology": ring, "step": 0}, mix_bad),
        Entry("neighbor_mean_weights", "neighbor_mean", lambda a: bf.neighbor_mean(**a),
              lambda c: {"tree": tree(), "topology": ring, "self_weight": 0.5,
                         "src_weights": {r: 0.5 / max(1, n - 1) for r in range(n) if r != me},
                         "dst_weights": [r for r in range(n) if r != me]}, weights_bad),
        Entry("neighbor_mean_async", "neighbor_mean", lambda a: bf.neighbor_mean_async(**a).wait(),
              lambda c: {"tree": tree(), "topology": ring, "step": 0}, mix_bad),
        Entry("neighbor_gather", "neighbor_gather", lambda a: bf.neighbor_gather(**a),
              lambda c: {"tree": tree(), "topology": ring, "step": 0},
              {"tree": tree_bad(floating=False), "topology": topology_bad(n), "step": STEP}),
        Entry("hierarchical_neighbor_mean", "hierarchical_neighbor_mean", lambda a: bf.hierarchical_neighbor_mean(**a),
              lambda c: {"tree": tree(), "machine_topology": T.ring(bf.machine_size()), "step": 0},
              {"tree": tree_bad(floating=True), "step": STEP,
               "machine_topology": typed(st.one_of(st.text(min_size=1, max_size=3), st.integers()))}),
        Entry("local_mean", "local_mean", lambda a: bf.local_mean(**a), lambda c: {"tree": tree()},
              {"tree": tree_bad(floating=True)}),
        Entry("local_mean_async", "local_mean", lambda a: bf.local_mean_async(**a).wait(), lambda c: {"tree": tree()},
              {"tree": tree_bad(floating=True)}),
        Entry("global_mean", "global_mean", lambda a: bf.global_mean(**a), lambda c: {"tree": tree()},
              {"tree": tree_bad(floating=True)}),
        Entry("global_sum_async", "global_sum", lambda a: bf.global_sum_async(**a).wait(), lambda c: {"tree": tree()},
              {"tree": st.one_of(tree_bad(floating=False), st.just(Bad({"w": torch.ones(2, dtype=torch.bool)}, "torch.bool")))}),
        Entry("broadcast", "broadcast", lambda a: bf.broadcast(**a), lambda c: {"tree": tree(), "root": 0},
              {"tree": tree_bad(floating=False), "root": bad(rank_outside(n))}),
        Entry("broadcast_async", "broadcast", lambda a: bf.broadcast_async(**a).wait(), lambda c: {"tree": tree(), "root": 0},
              {"root": bad(rank_outside(n))}),
        Entry("allgather", "allgather", lambda a: bf.allgather(**a), lambda c: {"tree": tree()},
              {"tree": st.one_of(tree_bad(floating=False), st.just(Bad({"s": torch.tensor(1.0)}, "0-d")))}),
        Entry("broadcast_parameters", "broadcast_parameters", lambda a: bf.broadcast_parameters(**a),
              lambda c: {"params": tree(), "root": 0}, {"root": bad(rank_outside(n))}),
        Entry("allreduce_parameters", "allreduce_parameters", lambda a: bf.allreduce_parameters(**a),
              lambda c: {"params": tree()},
              {"params": st.one_of(tree_bad(floating=False), st.just(Bad({"w": torch.ones(2, dtype=torch.int64)}, "torch.int64")))}),
        Entry("topology.infer_sources", "infer_sources", lambda a: T.infer_sources(**a),
              lambda c: {"dst_ranks": [(me + 1) % n] if n > 1 else []},
              {"dst_ranks": st.one_of(rank_outside(n).map(lambda k: Bad([k], shows(k))), typed(st.one_of(st.text(min_size=1, max_size=2), st.integers())))}),
        Entry("topology.infer_destinations", "infer_destinations", lambda a: T.infer_destinations(**a),
              lambda c: {"src_ranks": [(me - 1) % n] if n > 1 else []},
              {"src_ranks": rank_outside(n).map(lambda k: Bad([k], shows(k)))}),
        Entry("trace", "trace", lambda a: bf.trace(**a), lambda c: {"op": bf.neighbor_mean, "tree": tree(), "topology": ring},
              {"op": bad(st.one_of(st.text(min_size=1, max_size=4), st.integers())), "step": STEP}, collective=False),
        Entry("simulate", "simulate", lambda a: bf.simulate(**a), lambda c: {"n": 2},
              {"n": int_at_least(1)}, collective=False),
        Entry("init", "init", lambda a: bf.init(**a), lambda c: {"backend": "auto"},
              {"backend": bad(st.one_of(st.text(min_size=1, max_size=4).filter(lambda s: s not in ("auto", "local", "mpi")), st.integers())),
               "shm": bad(st.one_of(st.integers(), st.text(min_size=1, max_size=3), st.floats(allow_nan=False)))},
              collective=False),
        Entry("shared_tree", "shared_tree", lambda a: bf.shared_tree(**a), lambda c: {"tree": tree()},
              {"tree": tree_bad(floating=False)}),
        # ---- one-sided windows (ctx["window"] is a live Window over _tree() on the ring)
        Entry("Window", "Window", lambda a: bf.Window(**a), lambda c: {"tree": tree(), "topology": ring},
              {"tree": window_tree_bad(), "topology": topology_bad(n)}),
        Entry("Window.put", "Window.put", _method("put"), lambda c: {"self": c["window"], "tree": tree(), "step": 0},
              {"tree": st.one_of(window_tree_bad(), st.just(Bad({"w": torch.ones(3)}, "(3,)"))),
               "dst_weights": dst_bad(n, me), "step": STEP}),
        Entry("Window.accumulate", "Window.accumulate", _method("accumulate"),
              lambda c: {"self": c["window"], "tree": tree(), "step": 0},
              {"tree": window_tree_bad(), "dst_weights": dst_bad(n, me), "step": STEP}),
        Entry("Window.get", "Window.get", _method("get"), lambda c: {"self": c["window"], "step": 0},
              {"src_weights": src_bad(n, me), "step": STEP}),
        Entry("Window.update", "Window.update", _method("update"), lambda c: {"self": c["window"], "step": 0},
              {"self_weight": weight_bad(), "reset": NOT_A_BOOL, "step": STEP}),
        Entry("Window.collect", "Window.collect", _method("collect"), lambda c: {"self": c["window"], "step": 0},
              {"step": STEP, "tree": window_tree_bad()}),
        Entry("Window.uniform_share", "Window.uniform_share", _method("uniform_share"),
              lambda c: {"self": c["window"], "step": 0}, {"step": STEP}, collective=False),
        # ---- checkpoints
        Entry("checkpoint.save", "checkpoint.save", lambda a: bf.checkpoint.save(**a),
              lambda c: {"path": str(c["tmp"] / "ok.{rank}.pt"), "obj": tree()},
              {"path": bad(st.one_of(st.integers(), st.none(), st.binary(min_size=1, max_size=3), st.just("")))}, collective=False),
        Entry("checkpoint.load", "checkpoint.load", lambda a: bf.checkpoint.load(**a),
              lambda c: {"path": str(c["saved"])},
              {"path": bad(st.one_of(st.integers(), st.none(), st.binary(min_size=1, max_size=3)))}, collective=False),
        Entry("checkpoint.consensus", "checkpoint.consensus", lambda a: bf.checkpoint.consensus(**a),
              lambda c: {"tree": tree()}, {"tree": tree_bad(floating=False)}),
    ]
    # ---- topologies (constructors: nothing is sent)
    sizes = int_at_least(1)
    for name in ("ring", "star", "mesh_grid_2d", "fully_connected", "exponential_two", "symmetric_exponential",
                 "hypercube", "one_peer_exponential_two", "base_graph"):
        out.append(Entry(f"topology.{name}", name, (lambda f: lambda a: f(**a))(getattr(T, name)),
                         lambda c: {"n": 4}, {"n": sizes}, collective=False))
    out += [
        Entry("topology.exponential", "exponential", lambda a: T.exponential(**a), lambda c: {"n": 4, "base": 3},
              {"n": sizes, "base": int_at_least(2)}, collective=False),
        Entry("topology.ring_style", "ring", lambda a: T.ring(**a), lambda c: {"n": 4, "style": 1},
              {"style": bad(st.one_of(st.integers(min_value=3), st.integers(max_value=-1), st.text(min_size=1, max_size=2)))}, collective=False),
        Entry("topology.symmetric_exponential_base", "symmetric_exponential", lambda a: T.symmetric_exponential(**a),
              lambda c: {"n": 4, "base": 2}, {"base": int_at_least(2)}, collective=False),
        Entry("topology.inner_outer_ring", "inner_outer_ring", lambda a: T.inner_outer_ring(**a),
              lambda c: {"n": 6, "local_size": 3}, {"n": sizes, "local_size": int_at_least(1)}, collective=False),
        Entry("topology.inner_outer_exponential_two", "inner_outer_exponential_two", lambda a: T.inner_outer_exponential_two(**a),
              lambda c: {"n": 6, "local_size": 3}, {"n": sizes, "local_size": int_at_least(1)}, collective=False),
        Entry("topology.machine_one_peer_exponential_two", "machine_one_peer_exponential_two",
              lambda a: T.machine_one_peer_exponential_two(**a), lambda c: {"n_machines": 3}, {"n_machines": sizes}, collective=False),
        Entry("topology.one_peer", "one_peer", lambda a: T.one_peer(**a), lambda c: {"topology": T.ring(4)},
              {"topology": st.one_of(typed(st.one_of(st.integers(), st.text(min_size=1, max_size=2))),
                                     st.just(Bad(T.one_peer_exponential_two(4), "DynamicTopology")))}, collective=False),
        Entry("topology.star_center", "star", lambda a: T.star(**a), lambda c: {"n": 4, "center": 0},
              {"center": bad(rank_outside(4))}, collective=False),
        Entry("topology.base_graph_k", "base_graph", lambda a: T.base_graph(**a), lambda c: {"n": 4, "k": 1},
              {"k": int_at_least(1)}, collective=False),
        Entry("topology.from_matrix", "from_matrix", lambda a: T.from_matrix(**a), lambda c: {"w": [[0.5, 0.5], [0.5, 0.5]]},
              {"w": fixed(([[math.nan]], "nan"), ([[1.5, -0.5], [0.5, 0.5]], "-0.5"), ([[1.0, 0.0]], "(1, 2)"),
                          ("ab", "str"), ([], "(0,)"), ([[math.inf, 0.0], [0.0, 1.0]], "inf"))}, collective=False),
        Entry("topology.from_networkx", "from_networkx", lambda a: T.from_networkx(**a),
              lambda c: {"g": T.ring(3).to_networkx()}, {"g": typed(st.one_of(st.integers(), st.text(min_size=1, max_size=2), st.none()))},
              collective=False),
        Entry("topology.draw", "topology.draw", lambda a: T.draw(**a), lambda c: {"topology": T.one_peer_exponential_two(4), "step": 1},
              {"topology": typed(st.one_of(st.integers(), st.text(min_size=1, max_size=2), st.none())), "step": STEP},
              collective=False),
    ]
    for method in ("in_neighbors", "out_neighbors", "self_weight", "recv_weights"):
        out.append(Entry(f"Topology.{method}", method, (lambda m: lambda a: getattr(a["self"], m)(a["rank"]))(method),
                         lambda c: {"self": T.ring(4), "rank": 0}, {"rank": bad(rank_outside(4))}, collective=False))
    for topo_name, topo in (("Topology", T.ring(4)), ("DynamicTopology", T.one_peer_exponential_two(4))):
        out.append(Entry(f"{topo_name}.at", "at", (lambda t: lambda a: t.at(a["step"]))(topo), lambda c: {"step": 0},
                         {"step": STEP}, collective=False))
    # ---- optimizers: construction checks (nothing is sent) ...
    lr_only = {"lr": lr_bad()}
    out += [
        Entry("optim.sgd", "sgd", lambda a: bf.optim.sgd(**a), lambda c: {"lr": 0.1, "momentum": 0.5},
              {**lr_only, "momentum": fraction_bad()}, collective=False),
        Entry("optim.adam", "adam", lambda a: bf.optim.adam(**a), lambda c: {"lr": 0.1, "eps": 1e-8},
              {**lr_only, "eps": lr_bad(), "betas": fixed(((1.5, 0.9), "1.5"), ((0.9, math.nan), "nan"), ("ab", "'ab'"))},
              collective=False),
        Entry("optim.constant_schedule", "constant_schedule", lambda a: bf.optim.constant_schedule(**a),
              lambda c: {"value": 0.1}, {"value": bad(st.one_of(st.floats(max_value=-1e-9, min_value=-1e9), st.sampled_from([math.nan, math.inf]), st.text(min_size=1, max_size=2)))},
              collective=False),
        Entry("optim.exponential_decay", "exponential_decay", lambda a: bf.optim.exponential_decay(**a),
              lambda c: {"init_value": 1.0, "decay_rate": 0.5, "transition_steps": 2},
              {"init_value": lr_bad(), "decay_rate": bad(st.one_of(st.floats(min_value=1.0001, max_value=1e9), st.floats(max_value=0.0, min_value=-1e9), st.just(math.nan))),
               "transition_steps": int_at_least(1)}, collective=False),
        Entry("optim.cosine_decay_schedule", "cosine_decay_schedule", lambda a: bf.optim.cosine_decay_schedule(**a),
              lambda c: {"init_value": 1.0, "decay_steps": 10}, {"init_value": lr_bad(), "decay_steps": int_at_least(1)},
              collective=False),
    ]
    for name in ("dsgd", "awc", "atc", "gradient_tracking", "exact_diffusion"):
        local_steps = name != "exact_diffusion"  # exact diffusion communicates every step
        out.append(Entry(f"optim.{name}", name, (lambda f: lambda a: f(**a))(getattr(bf.optim, name)),
                         lambda c: {"optimizer": 0.1, "topology": ring},
                         {"optimizer": typed(st.one_of(st.text(min_size=1, max_size=2), st.none())),
                          "topology": bad(st.one_of(st.text(min_size=1, max_size=2), st.integers(), st.none())),
                          **({"communicate_every": int_at_least(1), "global_every": int_at_least(1)} if local_steps else {})},
                         collective=False))
    for name in ("push_sum", "push_diging"):
        out.append(Entry(f"optim.{name}", name, (lambda f: lambda a: f(**a))(getattr(bf.optim, name)),
                         lambda c: {"optimizer": 0.1, "topology": ring},
                         {"optimizer": bad(st.one_of(st.text(min_size=1, max_size=2), st.none())),
                          "topology": bad(st.one_of(st.text(min_size=1, max_size=2), st.integers())),
                          "synchronous": NOT_A_BOOL}, collective=False))
    out.append(Entry("optim.allreduce", "allreduce", lambda a: bf.optim.allreduce(**a), lambda c: {"optimizer": 0.1},
                     {"optimizer": bad(st.one_of(st.text(min_size=1, max_size=2), st.none()))}, collective=False))
    # ... and their steps (which communicate): ctx["opt"] is gradient_tracking on the ring.
    grads_bad = fixed(({"w": torch.ones(5)}, "(5,)"), ({"v": torch.ones(3)}, "'v'"), ({"w": "a"}, "str"), ([torch.ones(3)], "list"))
    params_bad = typed(st.one_of(st.integers(), st.text(min_size=1, max_size=2), st.builds(object)))
    out.append(Entry("optim.step", "gradient_tracking", lambda a: a["self"].step(a["params"], a["grads"], a["state"], a["step"]),
                     lambda c: {"self": c["opt"], "params": c["params"], "grads": c["params"], "state": c["state"], "step": 0},
                     {"step": STEP, "grads": grads_bad, "params": params_bad,
                      "state": typed(st.one_of(st.none(), st.integers(), st.just(()), st.builds(lambda: bf.optim.SgdState(())))),
                      }, arg_names={"params": "params", "state": "state"}))
    out += [
        Entry("optim.DecentralizedOptimizer", "DecentralizedOptimizer", lambda a: bf.optim.DecentralizedOptimizer(**a),
              lambda c: {"optimizer": c["torch_opt"], "module": c["module"], "topology": ring, "style": "atc"},
              {"optimizer": typed(st.one_of(st.integers(), st.none(), st.text(min_size=1, max_size=2))),
               "module": typed(st.one_of(st.integers(), st.none(), st.text(min_size=1, max_size=2))),
               "topology": typed(st.one_of(st.text(min_size=1, max_size=2), st.integers())),
               "style": bad(st.text(min_size=1, max_size=4).filter(lambda s: s not in ("atc", "awc"))),
               "communicate_every": int_at_least(1)}, collective=False),
        Entry("optim.broadcast_optimizer_state", "broadcast_optimizer_state", lambda a: bf.optim.broadcast_optimizer_state(**a),
              lambda c: {"optimizer": c["torch_opt"], "root": 0},
              {"optimizer": typed(st.one_of(st.integers(), st.none(), st.text(min_size=1, max_size=2)))}),
    ]
    return out
