"""The whole-inner-loop MLP kernel (`torch.ops.fastmaml.mlp_meta_step`, csrc/mlp_inner_loop.h):
all K inner steps, the query loss and the exact reverse sweep of an `nn.Sequential` of Linear
layers with ReLU or Tanh between them under MSE, in one op: one task per thread on CPU, one
thread block per task on CUDA (weights in shared memory), no per-step launches.

    plan = mlp_plan(model, layout, loss)        # None if the model is not such an MLP (see why_not)
    out = mlp_meta_step(plan, theta, sx, sy, qx, qy, alphas, order="second", lr_grad=[...])

It computes exactly what `meta_step` computes with the step ops (same math, same order modes:
"checkpoint" recomputes nothing extra here, its tape is only φ_j and g_j per task).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

ACTIVATIONS = {nn.ReLU: 0, nn.Tanh: 1}
MAX_LAYERS = 8
MAX_CUDA_WIDTH = 256


@dataclass(frozen=True)
class MlpPlan:
    sizes: Tuple[int, ...]  # d0, d1, ..., dL
    activation: int  # 0 ReLU, 1 Tanh


class MlpStepResult(NamedTuple):
    query_loss_after: torch.Tensor  # [T]
    grad: torch.Tensor  # [P] d(mean_t query loss)/dθ
    d_alphas: List[Optional[torch.Tensor]]  # per step, shaped like α_j (None where not asked)
    query_loss_before: torch.Tensor  # [T]
    support_loss_before: torch.Tensor  # [T]


def why_not(model: nn.Module, layout, loss) -> Optional[str]:
    """None if the kernel can run `model` with `loss`, else the reason it cannot."""
    if getattr(loss, "name", None) != "mse":
        return f"loss {getattr(loss, 'name', loss)!r} (the MLP kernel does MSE only)"
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return "the model is not an nn.Sequential"
    if layout.shared.size:
        return "some parameters are not adapted (inner_params)"
    mods = list(model)
    linears, acts = mods[0::2], mods[1::2]
    if len(mods) % 2 == 0 or len(linears) > MAX_LAYERS:
        return f"expected Linear, act, Linear, ..., Linear with at most {MAX_LAYERS} Linear layers"
    if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
        return "expected nn.Linear layers with bias at even positions"
    kinds = {type(m) for m in acts}
    if len(kinds) > 1 or not kinds <= set(ACTIVATIONS):
        return "expected one activation type (ReLU or Tanh) between the Linear layers"
    names = tuple(f"{i}.{w}" for i in range(0, len(mods), 2) for w in ("weight", "bias"))
    if layout.adapted.names != names:
        return "the adapted parameters are not in nn.Linear order"
    if any(a.out_features != b.in_features for a, b in zip(linears, linears[1:])):
        return "consecutive Linear layers do not chain"
    return None


def mlp_plan(model: nn.Module, layout, loss) -> Optional[MlpPlan]:
    if why_not(model, layout, loss) is not None:
        return None
    linears = list(model)[0::2]
    acts = list(model)[1::2]
    sizes = tuple([linears[0].in_features] + [m.out_features for m in linears])
    return MlpPlan(sizes, ACTIVATIONS[type(acts[0])] if acts else 0)


def supports_device(plan: MlpPlan, device: torch.device) -> Tuple[bool, str]:
    """Whether the op has a kernel for `device` (and the widths fit the CUDA kernel's design)."""
    from .cpp import availability, _has_kernel

    ok, why = availability(device)
    if not ok:
        return False, why
    if device.type == "cuda":
        if not _has_kernel("mlp_meta_step", "CUDA"):
            return False, "the extension has no CUDA MLP kernel"
        if max(plan.sizes[1:]) > MAX_CUDA_WIDTH:
            return False, f"a layer is wider than {MAX_CUDA_WIDTH}"
    return True, why


def mlp_meta_step(plan: MlpPlan, theta: torch.Tensor, sx, sy, qx, qy, alphas: Sequence[torch.Tensor], *,
                  order: str = "second", lr_grad: Sequence[bool] = ()) -> MlpStepResult:
    """θ `[P]`, sx `[T, Ns, d0]`, sy `[T, Ns, dL]`, qx/qy likewise, alphas: K tensors (0-dim or `[P]`).

    Returns per-task losses, the meta-gradient `[P]` of mean_t L_query_t, and ∂/∂α_j for the steps
    with `lr_grad[j]` (reduced to α_j's shape).
    """
    if order not in ("second", "checkpoint", "first"):
        raise ValueError(f"order: expected 'second', 'checkpoint' or 'first', got {order!r}")
    K, P = len(alphas), theta.shape[-1]
    lr_grad = list(lr_grad) or [False] * K
    if len(lr_grad) != K:
        raise ValueError(f"lr_grad: expected {K} flags (one per step), got {len(lr_grad)}")
    alpha = (torch.stack([a.detach().expand(P) for a in alphas]) if K
             else theta.new_zeros(0, P))
    q_after, grad, d_alpha, q_before, s_before = torch.ops.fastmaml.mlp_meta_step(
        theta.detach(), list(plan.sizes), sx, sy, qx, qy, alpha, order != "first", any(lr_grad),
        plan.activation)
    d_alphas: List[Optional[torch.Tensor]] = []
    for j, a in enumerate(alphas):
        if not lr_grad[j]:
            d_alphas.append(None)
        else:
            d_alphas.append(d_alpha[j].sum() if a.dim() == 0 else d_alpha[j])
    return MlpStepResult(q_after, grad, d_alphas, q_before, s_before)


def try_meta_step(model: nn.Module, layout, loss, batch, alphas: Sequence[torch.Tensor], *, order: str,
                  backend: Optional[str], lr_grad: Sequence[bool]) -> Optional[MlpStepResult]:
    """The kernel's result for `meta_step`, or None when it does not apply (then run the general path).

    Applies when `order` is "second", "checkpoint" or "first", the backend asked for (argument or $FASTMAML_BACKEND) is "auto" or "cpp", the model is
    an MLP the kernel runs (see `why_not`), its dtype is float32/float64 and the "cpp" backend has the
    kernel for the device. batch: (sx, sy, qx, qy) with x `[T, N, d0]` and y `[T, N, dL]`.
    """
    from .registry import requested_backend

    if order not in ("second", "checkpoint", "first") or requested_backend(backend) not in ("auto", "cpp"):
        return None
    sx, sy, qx, qy = batch
    if sx.dim() != 3 or qx.dim() != 3 or sy.dim() != 3 or qy.dim() != 3:
        return None
    if sx.dtype not in (torch.float32, torch.float64):
        return None
    plan = mlp_plan(model, layout, loss)
    if plan is None:
        return None
    d0, dL = plan.sizes[0], plan.sizes[-1]
    if (sx.shape[2] != d0 or qx.shape[2] != d0 or sy.shape != (*sx.shape[:2], dL)
            or qy.shape != (*qx.shape[:2], dL)):
        return None  # the general path raises the precise error
    if not supports_device(plan, sx.device)[0]:
        return None
    with torch.no_grad():
        theta, _ = layout.theta()
    return mlp_meta_step(plan, theta, sx, sy, qx, qy, alphas, order=order, lr_grad=lr_grad)
