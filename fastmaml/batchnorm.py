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
"""
from __future__ import annotations

from typing import List, Optional, Tuple

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


class NormPlan:
    """For one meta_step/adapt call: the statistics of inner step j (j = steps is the query pass)."""

    def __init__(self, model: nn.Module, mode: str):
        if mode not in BN_MODES:
            raise ValueError(f"batch_norm: unknown mode {mode!r}; expected one of {BN_MODES}")
        self.mode = mode
        self.layers = [m for _, m in bn_layers(model)]
        self.record = mode == "per_step" and model.training
        if mode == "frozen":
            for name, m in bn_layers(model):
                if m.running_mean is None:
                    raise ValueError(
                        f"batch_norm='frozen': layer {name!r} has no running statistics "
                        "(track_running_stats=False); expected BatchNorm layers that track them")
        if mode == "per_step":
            for name, m in bn_layers(model):
                if not hasattr(m, "step_running_mean"):
                    raise ValueError(
                        f"batch_norm='per_step': layer {name!r} has no per-step statistics; call "
                        "fastmaml.add_per_step_stats(model, steps) once before training")

    @property
    def uses_batch_stats(self) -> bool:
        return self.mode == "batch" or self.record

    def stats(self, j: int) -> Optional[Stats]:
        """None (batch statistics) or the fixed (mean, var) of every BatchNorm layer for step j."""
        if self.uses_batch_stats or not self.layers:
            return None
        if self.mode == "frozen":
            return [(m.running_mean, m.running_var) for m in self.layers]
        return [(m.step_running_mean[min(j, len(m.step_running_mean) - 1)],
                 m.step_running_var[min(j, len(m.step_running_var) - 1)]) for m in self.layers]

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
                    "with the number of training steps")
            momentum = 0.1 if m.momentum is None else m.momentum
            unbiased = var.mean(0) * (n / max(n - 1, 1))
            m.step_running_mean[j].lerp_(mean.mean(0).to(m.step_running_mean.dtype), momentum)
            m.step_running_var[j].lerp_(unbiased.to(m.step_running_var.dtype), momentum)
