"""Per-task mean losses: value and gradient w.r.t. the output, and the gradient's tangent.

Conventions (every reference): T tasks lead every tensor. A weight is per task (`[T, *shape]`, fast
weights) or common to all tasks (`[*shape]`: step 0 or a shared, not adapted, parameter); its direction
(`wd`, from the tangent u) is per task `[T, *shape]` or None (zero: a shared parameter). A tangent `xd` of
None is zero. Weight gradients are always per task `[T, *shape]`. Dotted names are tangents: `yd` = ẏ,
`gyd` = ġy (the tangent of the gradient w.r.t. y).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..registry import register

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


# ---------------------------------------------------------------- losses (per-task mean)


@register("mse_grad", "torch")
def mse_grad(out: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """out, y `[T, N, *]` -> (loss `[T]` = mean (out − y)², ∂loss/∂out = 2 (out − y) / M)."""
    T = out.shape[0]
    diff = (out - y).view(T, -1)
    M = diff.shape[1]
    loss = torch.linalg.vecdot(diff, diff) / M
    return loss, diff.mul_(2.0 / M).view_as(out)


@register("mse_grad_tangent", "torch")
def mse_grad_tangent(outd: Tensor) -> Tensor:
    """ġ = 2 ȯut / M, M = elements per task."""
    return outd * (2.0 * outd.shape[0] / outd.numel())


@register("cross_entropy_grad", "torch")
def cross_entropy_grad(z: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Logits z `[T, N, C]`, classes y `[T, N]` int64 -> (loss `[T]`, ∂loss/∂z = (p − onehot)/N, p)."""
    N = z.shape[1]
    logp = torch.log_softmax(z, -1)
    picked = logp.gather(-1, y.unsqueeze(-1))
    loss = picked.sum((1, 2)).neg_().div_(N)
    p = logp.exp_()
    g = p.clone()
    g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(picked, -1.0))
    return loss, g.div_(N), p


@register("cross_entropy_grad_tangent", "torch")
def cross_entropy_grad_tangent(p: Tensor, zd: Tensor) -> Tensor:
    """ġz = p ⊙ (ż − ⟨p, ż⟩) / N `[T, N, C]`."""
    dot = (p * zd).sum(-1, keepdim=True)
    return (zd - dot).mul_(p).div_(zd.shape[1])
