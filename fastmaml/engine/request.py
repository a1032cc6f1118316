"""What an engine is asked (`MetaStepRequest`, validated by the API) and what it returns (`MetaGrad`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
from torch import nn

from ..batchnorm import NormPlan
from ..layout import ParamLayout
from ..losses import Loss
from ..ops import OpTable
from ..precision import Precision
from ..tasks import TaskBatch
from .sweeps import Implicit


@dataclass
class MetaStepRequest:
    """One meta-step, validated.

    theta_a `[Pa]`, theta_s `[Ps]` (detached), alphas: K tensors α_j (0-dim or `[Pa]`, detached),
    lr_grad: per step, whether ∂L/∂α_j is wanted; weights: MAML++ step weights (K floats) or None;
    shared_grad: whether the shared parameters need their meta-gradient; ops: the op table of the call;
    labels_checked: the caller checked the class indices against the model's outputs (a captured CUDA graph
    cannot read them back); precision: the policy of fastmaml/precision.py, or None (PyTorch's settings).
    """

    model: nn.Module
    layout: ParamLayout
    loss: Loss
    batch: TaskBatch
    theta_a: torch.Tensor
    theta_s: torch.Tensor
    alphas: List[torch.Tensor]
    lr_grad: List[bool]
    order: str
    ops: OpTable
    norm: NormPlan
    implicit: Optional[Implicit] = None
    weights: Optional[List[float]] = None
    shared_grad: bool = False
    check_finite: bool = True
    evaluate_before: bool = True
    task_chunk: Optional[int] = None
    labels_checked: bool = False
    precision: Optional[Precision] = None

    @property
    def steps(self) -> int:
        return len(self.alphas)


class MetaGrad(NamedTuple):
    """An engine's answer: the meta-gradient of mean_t L_query_t (flat, no autograd history) and the losses.

    d_a `[Pa]`, d_s `[Ps]` or None, d_alphas: per step ∂L/∂α_j shaped like α_j (None where not asked);
    per-task `[T]` losses and accuracies (None where not computed); meta_loss: the scalar differentiated;
    recorded: per step 0..K the BatchNorm batch statistics (MAML++ per-step statistics); in "batch" mode with
    running statistics to update, [step 0's] (the support sets' at θ) where the engine kept them; or None."""

    d_a: torch.Tensor
    d_s: Optional[torch.Tensor]
    d_alphas: List[Optional[torch.Tensor]]
    meta_loss: torch.Tensor
    query_loss_after: torch.Tensor
    support_loss_before: Optional[torch.Tensor]
    query_loss_before: Optional[torch.Tensor] = None
    accuracy_after: Optional[torch.Tensor] = None
    accuracy_before: Optional[torch.Tensor] = None
    recorded: Optional[list] = None
