"""The executor of ``bf.simulate(n)``: every op runs for all n agents at once (see :mod:`.ops`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch.utils import _pytree as pytree

from ..executors.base import Executor, WindowEngine
from ..ops.handle import Handle
from ..tracing import AnyTopology
from ..tree import Flat, flatten
from ..world import World
from . import ops
from .stacked import in_vmap

if TYPE_CHECKING:
    import torch

    from ..ops.window import Window
    from ..topology import Topology


class SimExecutor(Executor):
    """Leaves carry a leading agent dimension of length n; results equal n MPI ranks', stacked."""

    kind = "sim"

    def __repr__(self) -> str:
        return "SimExecutor()"

    def agents(self, world: World) -> range:
        return range(world.size)

    def agent_shape(self, world: World) -> tuple[int, ...]:
        return (world.size,)

    def agent_view(self, world: World, flat: Flat, fn: str) -> Flat:
        return flat if in_vmap() else ops.strip_agent_dim(flat, world.size, fn)

    def one_agent(self, world: World, tree: Any) -> Any:
        return pytree.tree_map(lambda x: None if x is None else x[0].clone(), tree)

    def neighbor_mean(
        self, world: World, flat: Flat, topology: AnyTopology | None, step: int,
        self_weight: Any, src_weights: Any, dst_weights: Any, *, adjoint: bool = False, sync: bool = False,
        out: Sequence[torch.Tensor] | None = None,
    ) -> Handle[Any]:
        handle = ops.neighbor_mean_sim(world, flat, topology, step, self_weight, src_weights, dst_weights, adjoint=adjoint)
        if out is None:
            return handle

        def written() -> Any:
            for target, value in zip(out, flatten(handle.wait(), "neighbor_mean").tensors, strict=True):
                target.copy_(value)
            return flat.unflatten(list(out))

        return Handle(written, handle.done)

    def neighbor_gather(
        self, world: World, tree: Any, topology: AnyTopology | None, step: int, src_weights: Any, dst_weights: Any,
    ) -> Handle[Any]:
        return ops.neighbor_gather_sim(world, tree, topology, step, src_weights, dst_weights)

    def reduce(self, world: World, fn: str, flat: Flat, mean: bool) -> Handle[Any]:
        return ops.global_reduce_sim(world, flat, fn, mean)

    def broadcast(self, world: World, flat: Flat, root: int) -> Handle[Any]:
        return ops.broadcast_sim(world, flat, root)

    def allgather(self, world: World, flat: Flat) -> Handle[Any]:
        return ops.allgather_sim(world, flat)

    def barrier(self, world: World) -> Handle[None]:
        return Handle(lambda: None)  # agents run in lockstep: nothing to wait for

    def staged(
        self, world: World, fn: str, flat: Flat, *, graph: Topology | None = None,
        topology: AnyTopology | None = None, step: int = 0, self_weight: Any = None,
        src_machine_weights: Any = None, dst_machine_weights: Any = None, adjoint: bool = False,
    ) -> Handle[Any]:
        return ops.staged_sim(
            world, fn, flat, graph=graph, topology=topology, step=step, self_weight=self_weight,
            src_machine_weights=src_machine_weights, dst_machine_weights=dst_machine_weights, adjoint=adjoint,
        )

    def infer(self, world: World, fn: str, arg: str, ranks: Any) -> Any:
        from ..ops.infer import simulated_infer

        return simulated_infer(fn, arg, ranks, world.size)

    def close(self) -> None:
        pass  # the simulated world holds only memory

    def open_window(self, world: World, window: Window, flat: Flat) -> WindowEngine:
        if in_vmap():
            raise RuntimeError(
                "Window: windows are not available inside bf.sim.vmap; use stacked trees in bf.simulate"
            )
        from .window import SimWindow

        return SimWindow(window, flat)
