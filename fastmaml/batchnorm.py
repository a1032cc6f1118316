"""BatchNorm in the inner loop: which statistics normalize each inner step.

Modes (`batch_norm=` of `meta_step` / `adapt`):
- "batch" (default, MAML): every forward normalizes with the batch statistics of the current
  support or query set of each task (transductive); running statistics are neither read nor updated.
- "frozen": every forward normalizes with each layer's `running_mean` / `running_var`, held fixed
  (BatchNorm becomes an affine map); nothing is updated.
- "per_step" (MAML++ BNRS): each inner step j (and the query pass, step K) has its own running
  statistics, stored as buffers `step_running_mean` / `step_running_var` `[S, C]` that
  `add_per_step_stats(model, steps)` adds to every BatchNorm layer (so they are in `state_dict`).
  With `model.training`, normalization uses batch statistics (the exact MAML gradient) and the step
  statistics are updated (momentum as the layer's, mean over tasks of each task's batch statistics);
  in eval mode, step j normalizes with the statistics of step min(j, S − 1), so evaluation may run
  more inner steps than training did.

Running statistics in "batch" mode (`update_running_stats=True` of `meta_step` / `adapt`, the default): the
inner loop never reads them, but a user who calls `model.eval()` after meta-training normalizes with them.
So each call gives every BatchNorm layer in training mode that tracks them one update from the support
sets at θ, as a train-mode forward would (`NormPlan.update_running`): with T tasks, the mean over tasks of
the statistics a train-mode forward of each task's support set would leave, starting from the same ones.
The update is linear in the batch statistics, so task chunks and data-parallel shares (averaged weighted by
task count) give the same result.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Tuple

import torch
from torch import nn

BN_MODES = ("batch", "frozen", "per_step")
Stats = List[Tuple[torch.Tensor, torch.Tensor]]  # per BatchNorm layer: (mean [C], biased var [C])
# per layer: (mean [T, C], biased var [T, C], count), or None for a layer the forward does not call
BatchStats = List[Optional[Tuple[torch.Tensor, torch.Tensor, int]]]


def bn_layers(model: nn.Module) -> List[Tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def add_per_step_stats(model: nn.Module, steps: int) -> nn.Module:
    """Gives every BatchNorm layer per-step running statistics (MAML++ "BNRS", `batch_norm="per_step"`).

    Args:
        model: a model with BatchNorm layers.
        steps: the number of inner steps in training (one more row holds the query pass's statistics).

    Returns:
        `model`, each BatchNorm layer with buffers `step_running_mean` (zeros) and `step_running_var`
        (ones) `[steps + 1, C]` (saved in its `state_dict`).

    Raises:
        ValueError: a bad `steps`, or a model without BatchNorm layers.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps: expected a non-negative int, got {steps!r}")
    layers = bn_layers(model)
    if not layers:
        raise ValueError("model: has no BatchNorm layer; per-step statistics need at least one")
    for _, m in layers:
        p = next(m.parameters(), None)
        dtype = m.running_mean.dtype if m.running_mean is not None else (p.dtype if p is not None else None)
        device = p.device if p is not None else None
        m.register_buffer("step_running_mean", torch.zeros(steps + 1, m.num_features, dtype=dtype, device=device))
        m.register_buffer("step_running_var", torch.ones(steps + 1, m.num_features, dtype=dtype, device=device))
    return model


STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked", "step_running_mean", "step_running_var")


class NormPlan:
    """For one meta_step/adapt call: the statistics of inner step j (j = steps is the query pass).

    buffers: {buffer name in `model`: tensor} replacing the layers' own statistics for this call
    (fastmaml.func); names other than the BatchNorm statistics are ignored here."""

    def __init__(self, model: nn.Module, mode: str, buffers: Optional[Mapping[str, torch.Tensor]] = None):
        if mode not in BN_MODES:
            raise ValueError(f"batch_norm: unknown mode {mode!r}; expected one of {BN_MODES}")
        self.mode = mode
        named = bn_layers(model)
        self.layers = [m for _, m in named]
        buffers = buffers or {}
        self._bound = [
            {k: buffers[f"{n}.{k}" if n else k] for k in STAT_BUFFERS if (f"{n}.{k}" if n else k) in buffers}
            for n, _ in named
        ]
        self.record = mode == "per_step" and model.training
        if mode == "frozen":
            for name, m in bn_layers(model):
                if m.running_mean is None:
                    raise ValueError(
                        f"batch_norm='frozen': layer {name!r} has no running statistics "
                        "(track_running_stats=False); expected BatchNorm layers that track them"
                    )
        if mode == "per_step":
            for name, m in bn_layers(model):
                if not hasattr(m, "step_running_mean"):
                    raise ValueError(
                        f"batch_norm='per_step': layer {name!r} has no per-step statistics; call "
                        "fastmaml.add_per_step_stats(model, steps) once before training"
                    )

    @classmethod
    def of_layers(cls, mode: str, layers: List[nn.Module], record: bool) -> "NormPlan":
        """The plan of a call whose model was checked when its `MetaStep` was built: `mode` and `layers` (the
        BatchNorm layers in module order) as a `NormPlan(model, mode)` found them, `record` its `record`."""
        plan = cls.__new__(cls)
        plan.mode, plan.layers, plan.record = mode, layers, record
        plan._bound = [{} for _ in layers]
        return plan

    @property
    def uses_batch_stats(self) -> bool:
        return self.mode == "batch" or self.record

    def _buffer(self, i: int, name: str) -> torch.Tensor:
        return self._bound[i].get(name, getattr(self.layers[i], name, None))

    def stats(self, j: int) -> Optional[Stats]:
        """None (batch statistics) or the fixed (mean, var) of every BatchNorm layer for step j."""
        if self.uses_batch_stats or not self.layers:
            return None
        if self.mode == "frozen":
            return [(self._buffer(i, "running_mean"), self._buffer(i, "running_var")) for i in range(len(self.layers))]
        out = []
        for i in range(len(self.layers)):
            mean, var = self._buffer(i, "step_running_mean"), self._buffer(i, "step_running_var")
            out.append((mean[min(j, len(mean) - 1)], var[min(j, len(var) - 1)]))
        return out

    @property
    def updates_running_stats(self) -> bool:
        """Whether `update_running` changes anything: mode "batch" and a layer in training mode that tracks
        running statistics."""
        return self.mode == "batch" and any(m.training and m.running_mean is not None for m in self.layers)

    @torch.no_grad()
    def update_running(self, batch_stats: BatchStats) -> None:
        """One train-mode update of the running statistics of every layer in training mode that tracks them,
        from per-task batch statistics (see `BatchStats`): `num_batches_tracked` + 1, then with the layer's
        momentum m (None: 1 / num_batches_tracked, a cumulative average) running ← (1 − m) running + m s, s the
        mean over tasks of the batch mean and of the unbiased batch variance (what T train-mode forwards, each
        on one task's batch from the same statistics, leave on average)."""
        for m, stats in zip(self.layers, batch_stats):
            if stats is None or not m.training or m.running_mean is None:
                continue
            mean, var, n = stats
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.add_(1)
            factor = m.momentum if m.momentum is not None else 1.0 / float(m.num_batches_tracked)
            unbiased = var.mean(0) * (n / max(n - 1, 1))
            m.running_mean.lerp_(mean.mean(0).to(m.running_mean.dtype), factor)
            m.running_var.lerp_(unbiased.to(m.running_var.dtype), factor)

    @torch.no_grad()
    def update(self, j: int, batch_stats: BatchStats) -> None:
        """Momentum update of step j's statistics from per-task batch statistics (see `BatchStats`;
        count: values per channel per task, for the unbiased variance that nn.BatchNorm keeps).
        A layer with momentum=None uses 0.1; a layer the forward does not call (None) is left as it is."""
        for m, stats in zip(self.layers, batch_stats):
            if stats is None:
                continue
            mean, var, n = stats
            if j >= len(m.step_running_mean):
                raise ValueError(
                    f"batch_norm='per_step': training ran inner step {j} but the layers keep statistics "
                    f"for {len(m.step_running_mean) - 1} steps; call add_per_step_stats(model, steps) "
                    "with the number of training steps"
                )
            momentum = 0.1 if m.momentum is None else m.momentum
            unbiased = var.mean(0) * (n / max(n - 1, 1))
            m.step_running_mean[j].lerp_(mean.mean(0).to(m.step_running_mean.dtype), momentum)
            m.step_running_var[j].lerp_(unbiased.to(m.step_running_var.dtype), momentum)
