""":class:`DecentralizedOptimizer`: a ``torch.optim`` optimizer whose ``step()`` also communicates.

The styles follow BlueFog's optimizer wrappers; each is one line of arithmetic over the
module's trainable parameters ``x``, their gradients ``g`` and the wrapped optimizer's
in-place step ``L``.  The exchanges are the public ops (``neighbor_mean_async``,
``global_mean_async``, ``hierarchical_neighbor_mean_async``, :class:`~bluefog_fn.Window`),
run per bucket of parameters (:mod:`bluefog_fn.optim.buckets`).  The buckets are the same
with and without ``overlap``; overlap only moves the *start* of a bucket's exchange earlier
(into backward), so both give the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from .. import timeline
from ..backend.errors import MismatchError
from ..ops import (
    barrier,
    global_mean_async,
    hierarchical_neighbor_mean_async,
    neighbor_mean_async,
    shared_tree,
)
from ..ops.handle import Handle
from ..ops.window import Window
from ..world import current
from .algorithms import Mixing
from .base import AnyTopology, check_number, fail
from .buckets import BucketHooks, form_buckets
from .module import _process_world

Style = Literal["atc", "awc", "gradient_allreduce", "allreduce", "push_sum", "win_put", "pull_get", "hierarchical"]
STYLES: tuple[str, ...] = ("atc", "awc", "gradient_allreduce", "allreduce", "push_sum", "win_put", "pull_get", "hierarchical")
# Exchanges started from gradient hooks: they need only what backward has produced.
_HOOKED = ("awc", "gradient_allreduce")
# One window over every parameter: no buckets.
_WINDOWED = ("push_sum", "win_put", "pull_get")


def _phases(span: timeline.Span | None) -> Callable[[str], None]:
    """``span.phase``, or a no-op without a timeline."""
    return span.phase if span is not None else _no_phase


def _no_phase(name: str) -> None:
    return None


def _record_forward(module: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
    """Hooks that record each ``module(...)`` call as a ``forward`` activity on the timeline."""
    forward = timeline.activity("forward", module=type(module).__name__)  # a stack: calls may nest

    def before(_module: nn.Module, _args: Any) -> None:
        forward.__enter__()

    def after(_module: nn.Module, _args: Any, _out: Any) -> None:
        forward.__exit__()

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


class DecentralizedOptimizer:
    """Wraps a ``torch.optim`` optimizer so that ``step()`` also averages over the ranks.

    With ``x`` the module's trainable parameters, ``g`` their gradients and ``L(x)`` the
    wrapped optimizer's step, on a communicating step (see ``communicate_every``):

    * ``"atc"`` (adapt-then-combine): ``x ← W · L(x)`` (:func:`bluefog_fn.neighbor_mean`);
    * ``"awc"`` (adapt-with-combine): ``x ← W x + (L(x) − x)``;
    * ``"gradient_allreduce"``: ``g ← mean_r g_r``, then ``x ← L(x)`` — what DDP does
      (a parameter without a gradient counts zeros in the mean and then has one; ``.grad``
      becomes the mean, a new tensor, rather than being overwritten in place);
    * ``"allreduce"``: ``x ← mean_r L(x)_r`` (:func:`bluefog_fn.global_mean` of the parameters);
    * ``"push_sum"``: push-sum over a :class:`bluefog_fn.Window`, as
      :func:`bluefog_fn.optim.push_sum`: ``u ← A · L(u)``, ``w ← A w``, ``x = u / w`` with the
      column-stochastic shares ``A`` of ``topology.at(round)`` (directed graphs welcome);
    * ``"win_put"``: ``L(x)`` is put into the out-neighbours' window slots, then
      ``x ← w_ii L(x)_i + Σ_j w_ij L(x)_j`` from the slots (BlueFog's
      ``DistributedWinPutOptimizer``; with a barrier after the puts, so it equals ``W · L(x)``);
    * ``"pull_get"``: ``L(x)`` becomes this rank's window value, each rank gets its
      in-neighbours' values into its slots, then ``x ← w_ii L(x)_i + Σ_j w_ij L(x)_j`` (BlueFog's
      ``DistributedPullGetOptimizer``; with barriers around the gets, so it equals ``W · L(x)``;
      ``dst_weights`` has no use in a pull and is ignored);
    * ``"hierarchical"``: ``x ← (W_M ⊗ I_L)(I_M ⊗ 11ᵀ/L) L(x)``
      (:func:`bluefog_fn.hierarchical_neighbor_mean`); ``topology`` is then the *machine*
      topology over ``bf.machine_size()`` machines.

    ``W`` comes from ``topology.at(round)`` with ``round = k // communicate_every``.  Iteration
    ``k`` communicates when ``k + 1`` is a multiple of ``communicate_every`` (otherwise it is the
    local step alone) and, for the neighbour styles, averages globally instead when it is a
    multiple of ``global_every``.  Buffers (e.g. batch-norm statistics) are not averaged, as in
    BlueFog; frozen parameters (``requires_grad=False``) are left alone.

    BlueFog's per-step knobs are attributes, read by every following communicating step until
    changed: ``self_weight``, ``src_weights`` and ``dst_weights`` (``None``: the topology's).
    They are passed to ``neighbor_mean`` (atc, awc), to the window's ``put``/``update``
    (win_put; pull_get gets from the ranks of ``src_weights``) and, as machine weights, to
    ``hierarchical_neighbor_mean``; global averages and push-sum ignore them.  Every rank must
    set them consistently, as with the ops.

    ``force_barrier`` (BlueFog's attribute; ``True`` by default here) applies to the window
    styles: with it, their steps are separated by barriers and equal the formulas above.  Set to
    ``False`` (BlueFog's default for win_put and pull_get), a step waits for no other rank: it
    combines whatever its neighbours last put (win_put, whose slots start with the neighbours'
    initial values), hold now (pull_get) or pushed so far (push_sum, which still conserves the
    mass), so results depend on timing and ranks may even make different numbers of steps.  It
    may be changed between steps, on every rank alike.

    **Overlap.** The parameters are split into buckets of at most ``bucket_cap_mb`` megabytes
    in reverse registration order (as DDP), and each bucket is exchanged with the ``_async``
    op.  With ``overlap=True``, for ``awc`` and ``gradient_allreduce`` a bucket's exchange
    starts from a gradient hook (``register_post_accumulate_grad_hook``) as soon as every
    gradient of the bucket has been accumulated, so it runs while backward computes the
    earlier layers; ``step()`` waits only for what is still in flight.  For ``atc``,
    ``allreduce`` and ``hierarchical`` the exchange needs ``L(x)``, which a generic
    ``torch.optim`` computes for all parameters at once in ``step()``: there every bucket is
    started right after the local step and they are waited for in order, so the later buckets'
    messages travel while the earlier ones are combined.  ``push_sum``, ``win_put`` and
    ``pull_get`` move one window and ignore ``overlap``.  The results do not depend on
    ``overlap``: the same buckets carry the same values either way.  Exchanges always start in bucket order (a
    bucket completed by backward before an earlier one waits for it), so every rank issues the
    same ops in the same order whatever order its hooks fire in.  A parameter used twice in a
    forward pass fires its hook once, after accumulation; a second ``backward()`` before
    ``step()`` finishes the exchanges in flight and starts them again with the accumulated
    gradients; to accumulate gradients over micro-batches without paying an exchange for each,
    run all but the last backward inside :meth:`no_sync`.  If a rank skips ``backward()``, its
    buckets start in ``step()``, in bucket order, with its gradients as they are (``None``
    counts as zeros); a rank that never calls ``step()`` makes the others fail after
    ``BLUEFOG_FN_TIMEOUT``.

    **Where atc keeps the parameters.** For ``"atc"`` on CPU the optimizer owns the memory of
    the trainable parameters: two :func:`bluefog_fn.shared_tree` buffers per bucket (peers on
    this machine read them in place; private memory elsewhere).  A communicating step combines
    the buffer the parameters are in into the other one (``neighbor_mean(..., out=)``) and points
    the parameters at it (``p.data``; the ``Parameter`` objects stay), so a step writes nothing
    but its result.  Hold the parameters, not their ``.data`` or a ``state_dict()`` taken
    earlier, across steps; a parameter whose ``.data`` you replace is copied back into the
    optimizer's buffer at the next step, and ``free()`` (or ``bf.shutdown()``) moves the
    parameters back into private memory.

    Args:
        optimizer: a ``torch.optim.Optimizer`` over (a subset of) the module's parameters.
        module: the ``nn.Module`` whose trainable parameters are averaged.
        topology: a static or dynamic ``bf.topology`` graph of ``bf.size()`` ranks
            (``"hierarchical"``: of ``bf.machine_size()`` machines; unused by the allreduce styles
            but checked).
        style: one of ``"atc"``, ``"awc"``, ``"gradient_allreduce"``, ``"allreduce"``,
            ``"push_sum"``, ``"win_put"``, ``"pull_get"``, ``"hierarchical"``.
        communicate_every: communicate only every ``k``-th step (local steps in between).
        global_every: for atc/awc/hierarchical, every ``m``-th step average globally instead.
        overlap: start exchanges from gradient hooks where the style allows (see above).
        bucket_cap_mb: the largest bucket, in megabytes (a larger parameter is a bucket alone).

    Example:
        >>> import torch, bluefog_fn as bf
        >>> model = torch.nn.Linear(2, 1)
        >>> _ = bf.broadcast_parameters(model, root=0)
        >>> opt = bf.optim.DecentralizedOptimizer(
        ...     torch.optim.SGD(model.parameters(), lr=0.1), model, bf.topology.ring(bf.size()))
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> opt.step()
        >>> opt.zero_grad()
        >>> opt.steps
        1

    Reference:
        Ying et al., "BlueFog: Make Decentralized Algorithms Practical for Optimization and Deep
        Learning", arXiv:2111.04287, 2021.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        module: nn.Module,
        topology: AnyTopology,
        *,
        style: Style = "atc",
        communicate_every: int = 1,
        global_every: int | None = None,
        overlap: bool = True,
        bucket_cap_mb: float = 25.0,
    ) -> None:
        fn = "DecentralizedOptimizer"
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"{fn}: module must be a torch.nn.Module, got {type(module).__name__}")
        if style not in STYLES:
            raise fail(fn, f"style must be one of {', '.join(map(repr, STYLES))}, got {style!r}")
        if not isinstance(overlap, bool):
            raise TypeError(f"{fn}: overlap must be a bool, got {type(overlap).__name__} {overlap!r}")
        cap = check_number(fn, "bucket_cap_mb", bucket_cap_mb)
        if cap <= 0:
            raise fail(fn, f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        self._mixing = Mixing.checked(fn, topology, communicate_every, global_every)
        _process_world(fn)
        world = current()
        expected = world.machine_size if style == "hierarchical" else world.size
        if topology.size != expected:
            what = "bf.machine_size()" if style == "hierarchical" else "bf.size()"
            raise fail(fn, f"topology has {topology.size} nodes but {what} is {expected}")
        params = [p for p in module.parameters() if p.requires_grad]
        for p in params:
            if not p.is_floating_point():
                raise TypeError(f"{fn}: module parameter of dtype {p.dtype} cannot be averaged")
        self.optimizer = optimizer
        self.module = module
        self.style: Style = style
        self.overlap = overlap
        self.bucket_cap_mb = cap
        self.self_weight: float | None = None
        self.src_weights: Any = None
        self.dst_weights: Any = None
        self.force_barrier = True
        self._params = params
        self._steps = 0
        self._buckets = form_buckets(params, int(cap * 2**20))
        # awc: per bucket, the pre-step values it sends; allocated once (a fresh 45 MB copy per
        # step costs its page faults again every time), rewritten only after the last exchange
        # that read them was waited for.
        self._before: dict[int, list[torch.Tensor]] = {}
        self._hooks: BucketHooks | None = None
        self._no_sync_depth = 0
        if overlap and style in _HOOKED:
            self._hooks = BucketHooks(params, self._buckets, self._start_hooked, self._communicates_now)
        # atc: each bucket's parameters live in one of two buffers (bf.shared_tree: peers on
        # this machine read them in place); a communicating step combines the one they are in
        # into the other and points the parameters at it, so nothing is written but the result.
        self._homes: list[list[list[torch.Tensor]] | None] | None = None
        if style == "atc" and all(p.device.type == "cpu" for p in params):
            self._homes = [self._make_home(idx) for idx in self._buckets]
            world.on_close(self._leave_homes)
        # With a timeline, the module's forward passes are activities next to the step's op.
        self._forward_hooks = _record_forward(module) if timeline.enabled() else []
        self._window: Window | None = None
        self._numerator: list[torch.Tensor] = []
        self._weight = torch.ones((), dtype=torch.float64)
        if style in _WINDOWED:
            with torch.no_grad():
                self._numerator = [p.detach().clone() for p in params]
            tree: Any = (self._numerator, self._weight) if style == "push_sum" else self._numerator
            self._window = Window(tree, topology)  # collective
            if style == "win_put":
                # The slots start with the senders' values, not zeros (BlueFog's win_create): a
                # step without barriers may combine a slot before its sender's first put.
                self._window.put(tree, dict.fromkeys(self._window.out_neighbors(world.rank), 1.0))
                barrier()

    # ------------------------------------------------------------------------ properties

    @property
    def steps(self) -> int:
        """Number of ``step()`` calls so far: the iteration index of the next one."""
        return self._steps

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's parameter groups (to change the learning rate, say)."""
        return self.optimizer.param_groups

    @property
    def buckets(self) -> list[list[str]]:
        """The parameter names of each bucket, in the order their exchanges are issued."""
        names = {id(p): n for n, p in self.module.named_parameters()}
        return [[names.get(id(self._params[i]), str(i)) for i in b] for b in self._buckets]

    @property
    def push_sum_weight(self) -> torch.Tensor:
        """``"push_sum"``: this rank's push-sum weight ``w`` (``Σ_r w_r = bf.size()``)."""
        return self._weight.clone()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (delegates to the wrapped optimizer)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradient accumulation: the backwards inside this block start no exchange.

        Their gradients only accumulate in ``.grad``; the first ``backward()`` after the block
        (or ``step()``, if there is none) exchanges the accumulated gradients as usual.  So
        ``k - 1`` backwards inside the block, one outside and ``step()`` give the parameters of
        one backward over the sum of the ``k`` losses followed by ``step()``, for every style,
        at the cost of one exchange instead of ``k``.  (Bit for bit whenever autograd's sums
        of the micro-batch gradients are: here they are added in the order the backwards ran,
        by one backward over the summed loss in an order of autograd's choosing.)

        It matters for ``overlap=True`` with ``"awc"`` and ``"gradient_allreduce"``, whose
        hooks start exchanges during backward; for the other styles, and without overlap,
        backward never communicates and the block changes nothing, so a training loop can use
        it whatever the style.  ``step()`` inside the block still communicates: as with DDP,
        ``no_sync()`` concerns backward only, and here ``step()`` is where every exchange is
        completed, so the block can only postpone communication, never skip it (skipping it
        would let the ranks' models drift apart without a word; ``communicate_every`` is the
        way to take local steps).  No gradient is left out: a backward inside the block after
        one outside it in the same step makes the exchanges already started be sent again,
        with the accumulated gradients.  Blocks nest (exchanges resume when the outermost one
        is left) and are left cleanly by an exception.

        Every rank must run the same backwards inside the block, as every rank makes the same
        calls.  Ranks that disagree (with overlap, one sending every micro-batch and one only
        the sum) would pair exchanges of different micro-batches, so every awc and
        gradient_allreduce exchange also says whether its rank held gradients back, and a rank
        whose peers say otherwise raises :class:`bluefog_fn.MismatchError` when it waits for
        that exchange (in ``step()``, or in the ``backward()`` that sends again): all of them,
        for gradient_allreduce; those with a disagreeing in-neighbour, for awc (the others then
        fail in their next exchange, within ``BLUEFOG_FN_TIMEOUT``; under ``bfrun`` the first
        error ends the job).

        Example:
            >>> import torch, bluefog_fn as bf
            >>> model = torch.nn.Linear(2, 1)
            >>> opt = bf.optim.DecentralizedOptimizer(
            ...     torch.optim.SGD(model.parameters(), lr=0.1), model, bf.topology.ring(bf.size()),
            ...     style="gradient_allreduce")
            >>> micro_batches = [torch.ones(1, 2), 2 * torch.ones(1, 2), 3 * torch.ones(1, 2)]
            >>> with opt.no_sync():
            ...     for x in micro_batches[:-1]:
            ...         model(x).sum().backward()  # accumulates, sends nothing
            >>> model(micro_batches[-1]).sum().backward()  # exchanges the sum of all three
            >>> model.weight.grad.tolist()
            [[6.0, 6.0]]
            >>> opt.step()
            >>> opt.zero_grad()
        """
        self._no_sync_depth += 1
        self._pause_hooks()
        try:
            yield
        finally:
            self._no_sync_depth -= 1
            self._pause_hooks()

    def _pause_hooks(self) -> None:
        if self._hooks is not None:
            self._hooks.paused = self._no_sync_depth > 0

    # ------------------------------------------------------------------------ the exchanges

    def _communicates(self, k: int) -> bool:
        return (k + 1) % self._mixing.communicate_every == 0

    def _communicates_now(self) -> bool:
        return self._communicates(self._steps)

    def _is_global(self, k: int) -> bool:
        g = self._mixing.global_every
        return g is not None and (k + 1) % g == 0

    def _make_home(self, idx: list[int]) -> list[list[torch.Tensor]] | None:
        """The two buffers of one bucket's parameters, which are moved into the first
        (collective: every rank builds the same buckets); None where shared memory is full."""
        with torch.no_grad():
            values = [self._params[i].detach() for i in idx]
            try:
                home = [shared_tree(values), shared_tree(values)]
            except MemoryError:  # the same answer on every rank of the machine
                return None
            for i, leaf in zip(idx, home[0], strict=True):
                self._params[i].data = leaf
        return home

    def _check_homes(self) -> list[list[list[torch.Tensor]] | None]:
        """The buckets' buffers, after moving back in any parameter whose ``.data`` was replaced."""
        homes = self._homes
        assert homes is not None
        with torch.no_grad():
            for idx, home in zip(self._buckets, homes, strict=True):
                if home is None:
                    continue
                for i, leaf in zip(idx, home[0], strict=True):
                    p = self._params[i]
                    if p.data_ptr() != leaf.data_ptr():
                        if p.shape != leaf.shape or p.dtype != leaf.dtype:
                            raise fail("DecentralizedOptimizer.step", f"parameter {i} became {tuple(p.shape)} "
                                       f"{p.dtype}; it was {tuple(leaf.shape)} {leaf.dtype} when the optimizer was made")
                        leaf.copy_(p)
                        p.data = leaf
        return homes

    def _leave_homes(self) -> None:
        """Move the parameters into private memory (the shared buffers go with the world)."""
        if self._homes is None:
            return
        with torch.no_grad():
            for p in self._params:
                p.data = p.data.clone()
        self._homes = None

    def _exchange(self, tensors: list[torch.Tensor], k: int, out: list[torch.Tensor] | None = None) -> Handle[Any]:
        """Start this style's averaging of ``tensors`` for iteration ``k`` (a communicating one);
        ``out``: where a neighbour average is written (see ``neighbor_mean``)."""
        style = self.style
        rnd = k // self._mixing.communicate_every
        topo = self._mixing.topology
        if style in ("gradient_allreduce", "allreduce") or self._is_global(k):
            return global_mean_async(tensors)
        if style == "hierarchical":
            return hierarchical_neighbor_mean_async(
                tensors, topo, rnd, self_weight=self.self_weight,
                src_machine_weights=self.src_weights, dst_machine_weights=self.dst_weights,
            )
        return neighbor_mean_async(
            tensors, topo, rnd, self_weight=self.self_weight, src_weights=self.src_weights,
            dst_weights=self.dst_weights, out=out,
        )

    def _grads(self, b: int) -> list[torch.Tensor]:
        out = []
        for i in self._buckets[b]:
            p = self._params[i]
            out.append(p.grad.detach() if p.grad is not None else torch.zeros_like(p))
        return out

    def _start_hooked(self, b: int) -> Handle[Any]:
        """The exchange of bucket ``b`` that can start once its gradients are there."""
        k = self._steps
        sent = self._grads(b) if self.style == "gradient_allreduce" else self._copy_before(b)
        # With hooks, how many exchanges a rank makes per step depends on no_sync(), so ranks
        # that disagree about it would pair exchanges of different micro-batches (collectives
        # match by order alone).  Each exchange carries the pair [1, held] (held: no_sync()
        # held back gradients of this step) in the bucket's dtype: averaged, it comes back as
        # [s, s * held] exactly when every rank that weighs in agrees, s the sum of the weights.
        # Also without hooks (held is then 0), so that overlap on and off move the same buffers.
        # Exact in float32/64 (a sum of weights times 0 or 1); a bfloat16 mean over more than
        # 256 ranks could round a disagreement away.
        held = 1.0 if self._hooks is not None and self._hooks.deferred else 0.0
        flag = torch.tensor([1.0, held], dtype=sent[0].dtype, device=sent[0].device)
        handle = self._exchange([*sent, flag], k)

        def finish() -> list[torch.Tensor]:
            out: list[torch.Tensor] = handle.wait()
            total, got = out[-1].tolist()
            if got != total * held:
                raise MismatchError(
                    f"DecentralizedOptimizer: ranks disagree about no_sync() at step {k}: this rank "
                    f"{'held back' if held else 'did not hold back'} gradients with no_sync() but a "
                    "rank it averages with did the opposite; every rank must run the same backward() "
                    "calls inside no_sync()"
                )
            return out[:-1]

        return Handle(finish, handle.done)

    def _copy_before(self, b: int) -> list[torch.Tensor]:
        """awc: bucket ``b``'s parameters before the local step, into buffers reused every step."""
        before = self._before.get(b)
        if before is None:
            before = self._before[b] = [torch.empty_like(self._params[i]) for i in self._buckets[b]]
        with torch.no_grad():
            # A copy: the local step updates the parameters in place while the messages travel.
            for x0, i in zip(before, self._buckets[b], strict=True):
                x0.copy_(self._params[i])
        return before

    def _hooked_handles(self) -> list[tuple[int, Handle[Any]]]:
        if self._hooks is not None:
            return self._hooks.pending()
        return [(b, self._start_hooked(b)) for b in range(len(self._buckets))]

    # ------------------------------------------------------------------------ step

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One local step of the wrapped optimizer plus the style's averaging; returns the closure's loss.

        With a timeline (``bfrun --timeline``) the step is an op ``DecentralizedOptimizer.step``
        whose phases say where its time went: ``local step`` (the wrapped optimizer), ``wait``
        (for exchanges still in flight), ``combine``, ``send`` (starting exchanges) or ``window``.
        """
        k = self._steps
        with timeline.op("DecentralizedOptimizer.step", style=self.style, step=k,
                         communicates=self._communicates(k)) as span:
            loss = self._step(closure, k, _phases(span))
        self._steps = k + 1
        return loss

    def _step(self, closure: Callable[[], float] | None, k: int, phase: Callable[[str], None]) -> float | None:
        if self.style in _WINDOWED:
            return self._step_window(closure, k, phase)
        if not self._communicates(k):
            if self._hooks is not None:
                self._hooks.reset()
            loss = self.optimizer.step(closure)
            phase("local step")
        elif self.style == "gradient_allreduce":
            if closure is not None:
                raise fail("DecentralizedOptimizer.step", "style 'gradient_allreduce' averages the gradients of "
                           "the last backward(); pass no closure")
            handles = self._hooked_handles()
            with torch.no_grad():
                for b, h in handles:
                    for i, m in zip(self._buckets[b], h.wait(), strict=True):
                        # The mean is a fresh tensor nobody else holds: it becomes the gradient
                        # (as after zero_grad(set_to_none=True)) instead of being copied into it.
                        self._params[i].grad = m
            phase("wait")
            loss = self.optimizer.step()
            phase("local step")
        elif self.style == "awc":
            # With hooks, a closure's backward fires them, so their handles are collected after it.
            early = self._hooked_handles() if self._hooks is None or closure is None else []
            loss = self.optimizer.step(closure)
            phase("local step")
            handles = early or self._hooked_handles()
            with torch.no_grad():
                for b, h in handles:
                    for i, x0, m in zip(self._buckets[b], self._before[b], h.wait(), strict=True):
                        # (L(x) − x) + W x in place: the same bits as m + (p − x0), no temporaries.
                        self._params[i].sub_(x0).add_(m)
            phase("combine")
        else:  # atc, allreduce, hierarchical: combine the adapted parameters
            loss = self.optimizer.step(closure)
            phase("local step")
            homes = self._check_homes() if self._homes is not None and not self._is_global(k) else None
            started: list[tuple[int, Handle[Any], list[list[torch.Tensor]] | None]] = []
            for b, idx in enumerate(self._buckets):
                home = None if homes is None else homes[b]
                if home is None:
                    started.append((b, self._exchange([self._params[i].detach() for i in idx], k), home))
                else:  # the result is written into the other buffer
                    started.append((b, self._exchange(home[0], k, out=home[1]), home))
            phase("send")
            with torch.no_grad():
                for b, h, home in started:
                    if home is None:
                        for i, m in zip(self._buckets[b], h.wait(), strict=True):
                            self._params[i].copy_(m)
                        continue
                    h.wait()
                    for i, leaf in zip(self._buckets[b], home[1], strict=True):
                        self._params[i].data = leaf
                    home.reverse()
            phase("wait")  # each bucket's wait, then its copy back or swap
        return loss

    def _step_window(self, closure: Callable[[], float] | None, k: int, phase: Callable[[str], None]) -> float | None:
        params, window = self._params, self._window
        assert window is not None
        rnd = k // self._mixing.communicate_every
        with torch.no_grad():
            if self.style == "push_sum":
                # The local step moves the numerator u (gradients were taken at x = u / w).
                for p, u in zip(params, self._numerator, strict=True):
                    p.copy_(u)
        loss = self.optimizer.step(closure)
        phase("local step")
        with torch.no_grad():
            if self.style != "push_sum":
                # The window copies what it is given, and the parameters change only after the
                # window is done with them, so they are passed as they are.
                adapted = [p.detach() for p in params]
            else:  # the numerator is kept apart from the parameters, which become u / w
                adapted = [p.detach().clone() for p in params]
            if not self._communicates(k):
                if self.style == "push_sum":
                    self._numerator = adapted
                    for p, u in zip(params, adapted, strict=True):
                        p.copy_(u / self._weight.to(u.dtype))
                return loss
            if self.style == "push_sum":
                share = window.uniform_share(rnd)
                pushed = ([u * share.to(u.dtype) for u in adapted], self._weight * share)
                window.accumulate(pushed, step=rnd)
                self._barrier()
                numerator, weight = window.collect(pushed, step=rnd)
                self._barrier()
                self._numerator, self._weight = list(numerator), weight
                for p, u in zip(params, self._numerator, strict=True):
                    p.copy_(u / weight.to(u.dtype))
            elif self.style == "pull_get":
                # The own value becomes L(x) (an update that reads no slot), then every rank pulls.
                window.update(adapted, self_weight=1.0, src_weights={}, step=rnd)
                self._barrier()  # every rank's value is L(x) before anyone reads it
                sources = None if self.src_weights is None else dict.fromkeys(self.src_weights, 1.0)
                window.get(sources, step=rnd)
                self._barrier()  # every read is done before the update below changes the values read
                mixed = window.update(self_weight=self.self_weight, src_weights=self.src_weights, step=rnd)
                for p, m in zip(params, mixed, strict=True):
                    p.copy_(m)
            else:
                window.put(adapted, self.dst_weights, step=rnd)
                self._barrier()  # every put has landed before anyone combines
                mixed = window.update(
                    adapted, self_weight=self.self_weight, src_weights=self.src_weights, step=rnd
                )
                self._barrier()  # nobody puts the next step's values into a slot still being read
                for p, m in zip(params, mixed, strict=True):
                    p.copy_(m)
        phase("window")
        return loss

    def _barrier(self) -> None:
        if self.force_barrier:
            barrier()

    # ------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state and the step count (the dynamic topology's position).

        ``"push_sum"`` adds the numerator ``u`` and weight ``w``.  Works with
        :func:`bluefog_fn.checkpoint.save`.
        """
        state: dict[str, Any] = {"optimizer": self.optimizer.state_dict(), "steps": self._steps}
        if self.style == "push_sum":
            state["numerator"] = [u.clone() for u in self._numerator]
            state["weight"] = self._weight.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (the module's parameters are restored separately)."""
        fn = "DecentralizedOptimizer.load_state_dict"
        keys = {"optimizer", "steps"} | ({"numerator", "weight"} if self.style == "push_sum" else set())
        if not isinstance(state, dict) or set(state) != keys:
            raise fail(fn, f"state must be a dict from state_dict() of a style={self.style!r} optimizer "
                       f"(keys {sorted(keys)})")
        if self.style == "push_sum":
            num = state["numerator"]
            if len(num) != len(self._params) or any(u.shape != p.shape for u, p in zip(num, self._params, strict=True)):
                raise fail(fn, "state['numerator'] does not match the module's trainable parameters")
        self.optimizer.load_state_dict(state["optimizer"])
        self._steps = int(state["steps"])
        if self.style == "push_sum":
            self._numerator = [u.detach().clone().to(p.dtype) for u, p in zip(state["numerator"], self._params, strict=True)]
            self._weight = state["weight"].detach().clone().to(torch.float64)
        if self.style in ("win_put", "pull_get"):
            with torch.no_grad():
                self._numerator = [p.detach().clone() for p in self._params]

    def free(self) -> None:
        """Release the window of ``"push_sum"``/``"win_put"``/``"pull_get"`` (collective) and the gradient hooks."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        for hook in self._forward_hooks:
            hook.remove()
        self._forward_hooks = []
        self._leave_homes()
        if self._window is not None:
            self._window.free()
            self._window = None

    def __repr__(self) -> str:
        return (
            f"DecentralizedOptimizer({type(self.optimizer).__name__}, style={self.style!r}, "
            f"topology={self._mixing.topology!r}, communicate_every={self._mixing.communicate_every}, "
            f"global_every={self._mixing.global_every}, overlap={self.overlap})"
        )
