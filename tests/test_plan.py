"""The planner: layouts, segments, weight rules, plan caching — pure Python, no MPI."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bluefog_fn as bf
from bluefog_fn import topology as T
from bluefog_fn.plan import SEGMENT_MIN_BYTES, build_layout
from bluefog_fn.sim.executor import SimExecutor
from bluefog_fn.tracing import check_step, mixing_weights, trace_mix
from bluefog_fn.tree import flatten
from bluefog_fn.world import World

dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64])
shapes = st.lists(st.integers(0, 300), min_size=0, max_size=3).map(tuple)


@settings(max_examples=60)
@given(leaves=st.lists(st.tuples(shapes, dtypes), min_size=0, max_size=12), min_bytes=st.sampled_from([1, 64, 4096, SEGMENT_MIN_BYTES]))
def test_layout_covers_every_element_once(leaves: list[tuple[tuple[int, ...], torch.dtype]], min_bytes: int) -> None:
    tree = [torch.zeros(s, dtype=d) for s, d in leaves]
    layout = build_layout(flatten(tree, "t").metas, min_bytes)
    seen = set()
    for g in layout.groups:
        offset = 0
        for s in g.slots:
            assert tree[s.leaf].dtype == g.dtype
            assert s.offset == offset and s.numel == tree[s.leaf].numel()
            offset += s.numel
            seen.add(s.leaf)
        assert offset == g.numel
        # Segments tile the non-empty part of the buffer in order, without overlap.
        covered = [(seg.start, seg.stop) for seg in g.segments]
        assert covered == sorted(covered)
        assert sum(b - a for a, b in covered) == g.numel
        for seg in g.segments:
            big = [g.slots[k] for k in seg.slots if g.slots[k].numel * tree[g.slots[k].leaf].element_size() >= min_bytes]
            assert len(seg.slots) == 1 or not big, "a large leaf must travel alone"
            assert seg.packed == (len(seg.slots) > 1)
    assert seen == set(range(len(tree)))
    assert layout.nbytes == sum(t.numel() * t.element_size() for t in tree)


def test_layout_groups_dtypes_in_first_appearance_order() -> None:
    tree = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3), "c": torch.zeros(1, dtype=torch.float64)}
    layout = build_layout(flatten(tree, "t").metas)
    assert [g.dtype for g in layout.groups] == [torch.float64, torch.float32]
    assert [s.path for s in layout.groups[0].slots] == ["['a']", "['c']"]


def test_plan_is_frozen_printable_and_reports_bytes() -> None:
    # A detached world of 4 ranks: tracing needs only the world's size and plan cache.
    world = World("sim", 0, 4, 0, 4, 0, 1, SimExecutor())
    tree = {"w": torch.zeros(10, 10), "b": torch.zeros(10, dtype=torch.float64)}
    plan = trace_mix(world, "neighbor_mean", flatten(tree, "t"), T.ring(4), 0, 1)
    assert plan.recvs == ((0, pytest.approx(1 / 3)), (2, pytest.approx(1 / 3)))
    assert [d for d, _ in plan.sends] == [0, 2]
    assert plan.bytes_sent == 2 * (400 + 80)
    assert "neighbor_mean rank 1/4" in str(plan)
    with pytest.raises(AttributeError):
        plan.rank = 3  # type: ignore[misc]
    back = plan.reversed()
    assert back.sends == plan.recvs and back.recvs == plan.sends and back.reversed().sends == plan.sends
    assert trace_mix(world, "neighbor_mean", flatten(tree, "t"), T.ring(4), 0, 1) is plan


def test_mixing_weights_override_rules() -> None:
    g = T.ring(4).at(0)
    assert mixing_weights("f", g, 1, 4, None, None, None) == (pytest.approx(1 / 3), ((0, pytest.approx(1 / 3)), (2, pytest.approx(1 / 3))), ((0, 1.0), (2, 1.0)))
    # src_weights reweights in-neighbours; a missing one gets 0 but is still received.
    assert mixing_weights("f", g, 1, 4, 0.5, {0: 0.5}, None) == (0.5, ((0, 0.5), (2, 0.0)), ((0, 1.0), (2, 1.0)))
    # dst_weights: a per-call graph.
    assert mixing_weights("f", None, 1, 4, 0.5, {3: 0.5}, [2]) == (0.5, ((3, 0.5),), ((2, 1.0),))
    assert mixing_weights("f", None, 1, 4, 0.5, {3: 0.5}, {2: 0.25}) == (0.5, ((3, 0.5),), ((2, 0.25),))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"self_weight": None, "src_weights": {0: 0.5}}, ValueError, "self_weight is required"),
        ({"self_weight": 0.5, "src_weights": {3: 0.5}}, ValueError, r"rank\(s\) \[3\] that are not in-neighbours of rank 1"),
        ({"self_weight": 0.5, "src_weights": {7: 0.5}}, ValueError, "src_weights has rank 7 but the world has 4 ranks"),
        ({"self_weight": 0.5, "src_weights": {1: 0.5}}, ValueError, "names rank 1, this rank itself"),
        ({"self_weight": float("nan")}, ValueError, r"self_weight\['self'\] must be finite and >= 0, got nan"),
        ({"self_weight": -0.1}, ValueError, "must be finite and >= 0, got -0.1"),
        ({"self_weight": 0.5, "src_weights": {0: 0.5}, "dst_weights": [2, 2]}, ValueError, "must not repeat a rank"),
        ({"dst_weights": [2]}, ValueError, "needs src_weights"),
        ({"self_weight": 0.5, "src_weights": [0]}, TypeError, "src_weights must be a dict"),
        ({"self_weight": 0.5, "src_weights": {0: "x"}}, TypeError, r"src_weights\[0\] must be a real number"),
    ],
)
def test_mixing_weights_errors_name_argument_and_value(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    args = {"self_weight": None, "src_weights": None, "dst_weights": None, **kwargs}
    with pytest.raises(error, match=match):
        mixing_weights("neighbor_mean", T.ring(4).at(0), 1, 4, args["self_weight"], args["src_weights"], args["dst_weights"])  # type: ignore[arg-type]


@pytest.mark.parametrize("step", [-1, 1.5, "3", None, True])
def test_step_must_be_a_non_negative_int(step: object) -> None:
    with pytest.raises((ValueError, TypeError), match="neighbor_mean: step must be an int >= 0"):
        check_step("neighbor_mean", step)


def test_neighbor_mean_rejects_bad_input_before_sending() -> None:
    x = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match=f"topology has size 5 but the world has {bf.size()} ranks"):
        bf.neighbor_mean(x, T.ring(5) if bf.size() != 5 else T.ring(6))
    with pytest.raises(TypeError, match=r"tree leaf \['w'\] has dtype torch.int64"):
        bf.neighbor_mean({"w": torch.ones(2, dtype=torch.int64)}, T.ring(bf.size()))
    with pytest.raises(TypeError, match=r"tree leaf at \['w'\]\[1\] must be a torch.Tensor or None, got str"):
        bf.neighbor_mean({"w": [torch.ones(1), "oops"]}, T.ring(bf.size()))
    with pytest.raises(TypeError, match=r"topology must be a bf\.topology"):
        bf.neighbor_mean(x, "ring")  # type: ignore[arg-type]


def test_plan_cache_is_bounded_and_counts() -> None:
    from bluefog_fn.plan_cache import PlanCache

    cache = PlanCache(maxsize=2)
    built = []
    for key in ["a", "b", "a", "c", "b"]:
        cache.lookup(key, lambda k=key: built.append(k) or k)
    info = cache.info()
    assert (info.hits, info.misses, info.size, info.maxsize) == (1, 4, 2, 2)
    assert built == ["a", "b", "c", "b"]
    with pytest.raises(ValueError, match="maxsize must be >= 1, got 0"):
        PlanCache(0)


def test_same_signature_never_traces_twice() -> None:
    bf.plan_cache_clear()
    topo = T.ring(bf.size())
    for _ in range(5):
        bf.neighbor_mean({"w": torch.ones(3)}, topo)
    info = bf.plan_cache_info()
    assert (info.misses, info.hits) == (1, 4)
    bf.neighbor_mean({"w": torch.ones(4)}, topo)  # a new shape is a new signature
    assert bf.plan_cache_info().misses == 2
