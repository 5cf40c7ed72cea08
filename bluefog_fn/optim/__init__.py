"""Optimizers in optax style: ``init(params) -> state``, ``step(params, grads, state, step)``.

Local optimizers (:func:`sgd`, :func:`adam`) move one agent along its own gradient; the
decentralized algorithms (:func:`dsgd`/:func:`awc`, :func:`atc`, :func:`gradient_tracking`,
:func:`exact_diffusion`) add neighbour averaging over a topology, :func:`push_sum` and
:func:`push_diging` push mass through one-sided windows (directed graphs), :func:`allreduce` is
the centralised baseline.  :class:`DecentralizedOptimizer` wraps a ``torch.optim`` optimizer
for ``nn.Module`` users.

Example:
    >>> import torch, bluefog_fn as bf
    >>> opt = bf.optim.gradient_tracking(bf.optim.sgd(0.1), bf.topology.ring(bf.size()))
    >>> params = {"w": torch.zeros(3)}
    >>> state = opt.init(params)
    >>> for k in range(3):
    ...     grads = {"w": params["w"] - 1.0}          # f(w) = ½‖w − 1‖²
    ...     params, state = opt.step(params, grads, state, k)
    >>> [round(v, 3) for v in params["w"].tolist()]
    [0.271, 0.271, 0.271]
"""

from __future__ import annotations

import torch

from .algorithms import (
    AllreduceState,
    AtcState,
    AwcState,
    ExactDiffusionState,
    GradientTrackingState,
    allreduce,
    atc,
    awc,
    dsgd,
    exact_diffusion,
    gradient_tracking,
)
from .base import (
    InitFn,
    ScalarOrSchedule,
    Schedule,
    StepFn,
    Transformation,
    constant_schedule,
    cosine_decay_schedule,
    exponential_decay,
)
from .decentralized_optimizer import DecentralizedOptimizer
from .local import AdamState, SgdState, adam, sgd
from .module import (
    allreduce_parameters,
    broadcast_optimizer_state,
    broadcast_parameters,
)
from .push_sum import PushDigingState, PushSumState, push_diging, push_sum

# States are checkpointed with torch.save; torch.load's default weights_only unpickler only
# rebuilds classes it was told are safe.
torch.serialization.add_safe_globals(
    [AdamState, AllreduceState, AtcState, AwcState, ExactDiffusionState, GradientTrackingState, SgdState]
)

__all__ = [
    "AdamState",
    "AllreduceState",
    "AtcState",
    "AwcState",
    "DecentralizedOptimizer",
    "ExactDiffusionState",
    "GradientTrackingState",
    "InitFn",
    "PushDigingState",
    "PushSumState",
    "ScalarOrSchedule",
    "Schedule",
    "SgdState",
    "StepFn",
    "Transformation",
    "adam",
    "allreduce",
    "allreduce_parameters",
    "atc",
    "awc",
    "broadcast_optimizer_state",
    "broadcast_parameters",
    "constant_schedule",
    "cosine_decay_schedule",
    "dsgd",
    "exact_diffusion",
    "exponential_decay",
    "gradient_tracking",
    "push_diging",
    "push_sum",
    "sgd",
]
