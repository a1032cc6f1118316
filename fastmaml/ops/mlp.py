"""The contract of the whole-inner-loop MLP op `mlp_meta_step`: all K inner steps, the query loss and the
exact reverse sweep of an MLP (Linear layers with one activation, ReLU or Tanh, between them) under MSE, in
one op. Backends: "torch" (ops/reference/mlp.py: all tasks batched, straight-line GEMMs) and "cpp"
(csrc/mlp_cpu.h: one task per thread on CPU; csrc/mlp_inner_loop.h: one thread block per task on CUDA).

    ops.mlp_meta_step(plan, theta, sx, sy, qx, qy, alphas, order, lr_grad, need_before) -> MlpStepResult

theta `[P]` in nn.Linear order (W1 `[d1, d0]`, b1, ..., WL, bL); sx `[T, Ns, d0]`, sy `[T, Ns, dL]`, qx and
qy likewise; alphas: K tensors (0-dim or `[P]`), or their rows `[K, P]` as one tensor; order "second",
"checkpoint" or "first"; lr_grad: K flags (∂/∂α_j wanted); need_before: also the query loss at θ. Which models
it runs is the engine's business (fastmaml/engine/mlp.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

import torch

ACTIVATIONS = ("relu", "tanh")  # `MlpPlan.activation` indexes this
MAX_LAYERS = 8
MAX_CUDA_WIDTH = 256


@dataclass(frozen=True)
class MlpPlan:
    sizes: Tuple[int, ...]  # d0, d1, ..., dL
    activation: int  # index into ACTIVATIONS: 0 ReLU, 1 Tanh


class MlpStepResult(NamedTuple):
    query_loss_after: torch.Tensor  # [T]
    grad: torch.Tensor  # [P] d(mean_t query loss)/dθ
    d_alphas: List[Optional[torch.Tensor]]  # per step, shaped like α_j (None where not asked)
    query_loss_before: Optional[torch.Tensor]  # [T] (None when not asked for, from the reference)
    support_loss_before: Optional[torch.Tensor]  # [T] (None with K = 0, from the reference)
