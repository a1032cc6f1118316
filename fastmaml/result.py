"""`MetaResult`: what one meta-step measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MetaResult:
    """What one `meta_step` measured. Per-task tensors are `[T]`, detached.

    Attributes:
        meta_loss: the mean over tasks of the query loss after adaptation (what was differentiated); with
            `step_weights`, of Σ_j w_j × the query loss after step j.
        query_loss_after: the query loss after adaptation `[T]`.
        query_loss_before: the query loss at θ `[T]` (None with `evaluate_before=False`).
        support_loss_before: the support loss at θ `[T]` (None when steps=0).
        accuracy_before: the query accuracy at θ `[T]`, for classification losses (else None).
        accuracy_after: the query accuracy after adaptation `[T]`, for classification losses (else None).
    """

    meta_loss: torch.Tensor
    query_loss_after: torch.Tensor
    query_loss_before: Optional[torch.Tensor] = None
    support_loss_before: Optional[torch.Tensor] = None
    accuracy_before: Optional[torch.Tensor] = None
    accuracy_after: Optional[torch.Tensor] = None

    def summary(self) -> dict:
        """Means over tasks as plain floats (for logging)."""
        out = {}
        for name, value in vars(self).items():
            if value is not None:
                out[name] = float(value.float().mean())
        return out

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v:.4g}" for k, v in self.summary().items())
        return f"MetaResult({items})"
