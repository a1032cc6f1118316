"""Plain-PyTorch reference implementations of the inner-loop step ops (the oracle for every kernel).

Shapes: fast weights / gradients / adjoints `[T, P]`; α a 0-dim tensor or `[P]`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..registry import register


@register("inner_update", "torch")
def inner_update(phi: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """φ_{j+1} = φ_j − α ⊙ g_j for all tasks: `[T, P]`."""
    return torch.addcmul(phi, alpha, g, value=-1.0)


@register("adjoint_update", "torch")
def adjoint_update(
    v: torch.Tensor, hu: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, lr_grad: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One reverse step: returns (v − H(α⊙v) `[T, P]`, ∂L/∂α_j = −Σ_t g ⊙ v reduced to α's shape, or None).

    `hu` is H_j (α_j ⊙ v) `[T, P]` (None in first-order mode, where v passes through).
    """
    d_alpha = None
    if lr_grad:
        prod = (g * v).sum(0)
        d_alpha = -(prod.sum() if alpha.dim() == 0 else prod)
    return (v if hu is None else v - hu), d_alpha
