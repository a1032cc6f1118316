"""The "cpp" backend: C++ CPU (and, in a CUDA build, CUDA) kernels of the step ops and of the whole-inner-loop
MLP op from `csrc/`, and the C++ CPU kernels of the conv-net block tail (BatchNorm + ReLU + max-pool; CPU only).

The extension is compiled/loaded lazily by `fastmaml.build` the first time the backend's
availability is asked for (e.g. by `resolve("auto", device)`); a failed build makes the backend
unavailable with the reason, so `auto` falls back and `backend="cpp"` raises `BackendUnavailable`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import build
from . import layers
from .layers import per_task_channels
from .mlp_step import MlpStepResult
from .registry import register, register_backend


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastmaml::{op}", key)


def availability(device: torch.device) -> Tuple[bool, str]:
    ok, why = build.load()
    if not ok:
        return False, why
    if device.type == "cpu":
        return True, why
    if device.type == "cuda":
        if _has_kernel("inner_update", "CUDA"):
            return True, why + " with CUDA kernels"
        return False, "the C++ extension was built without CUDA (no CUDA_HOME or a CPU build of torch)"
    return False, f"no C++ kernels for device type {device.type!r}"


register_backend("cpp", availability)


# on CUDA the reference's elementwise ops were faster (H200, op bench: 0.32–1.07×): "auto" uses
# these kernels on the CPU only (an explicit backend="cpp" still runs them on CUDA)
_CPU_AUTO = dict(auto=("cpu",),
                 why_not_auto="mostly slower than the reference's elementwise ops on an H200 (0.32–1.07×)")


@register("inner_update", "cpp", **_CPU_AUTO)
def inner_update(phi: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """φ − α ⊙ g `[T, P]` (φ may be a `[P]` vector expanded over tasks)."""
    return torch.ops.fastmaml.inner_update(phi, g, alpha)


@register("adjoint_update", "cpp", **_CPU_AUTO)
def adjoint_update(v: torch.Tensor, hu: Optional[torch.Tensor], g: torch.Tensor, alpha: torch.Tensor,
                   lr_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(v − hu `[T, P]`, −Σ_t g ⊙ v reduced to α's shape or None); hu None: first order, v passes."""
    if hu is None:
        return v, (torch.ops.fastmaml.alpha_grad(g, v, alpha) if lr_grad else None)
    out, d_alpha = torch.ops.fastmaml.adjoint_update(v, hu, g, alpha, lr_grad)
    return out, (d_alpha if lr_grad else None)


@register("bn_relu_maxpool_train_fwd", "cpp", devices=("cpu",))
def bn_relu_maxpool_train_fwd(x, w, b, eps: float, k: int):
    """BatchNorm (batch statistics) + ReLU + k×k max-pool in one pass, as the reference in ops/layers.py."""
    return torch.ops.fastmaml.bn_relu_maxpool_fwd(x, per_task_channels(w, "w", x, 1.0),
                                                  per_task_channels(b, "b", x, 0.0), eps, k)


@register("bn_relu_maxpool_train_bwd", "cpp", devices=("cpu",))
def bn_relu_maxpool_train_bwd(gz, z, idx, x, mean, r, w, eps: float, k: int, need_x: bool, gw_out, gb_out):
    """Backward of `bn_relu_maxpool_train_fwd`, as the reference in ops/layers.py."""
    w = per_task_channels(w, "w", x, 1.0)
    gx, gw, gb = torch.ops.fastmaml.bn_relu_maxpool_bwd(gz, z, idx, x, mean, r, w, need_x)
    if gw_out is not None:
        gw_out.copy_(gw)
    if gb_out is not None:
        gb_out.copy_(gb)
    return gx if need_x else None


@register("bn_relu_maxpool_tangent_fwd", "cpp", devices=("cpu",))
def bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, bd, eps: float, k: int):
    """The forward and its tangent in one pass, as the reference in ops/layers.py (which runs when ẋ or ẇ
    is zero, e.g. the first adapted layer or shared BatchNorm weights)."""
    if xd is None or wd is None:
        return layers.bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, bd, eps, k)
    w, b, bd = (per_task_channels(v, name, x, fill)
                for v, name, fill in ((w, "w", 1.0), (b, "b", 0.0), (bd, "bd", 0.0)))
    return torch.ops.fastmaml.bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, bd, eps, k)


@register("bn_relu_maxpool_tangent_bwd", "cpp", devices=("cpu",))
def bn_relu_maxpool_tangent_bwd(gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd, k: int, need_x: bool, gw_out,
                                gwd_out, gb_out, gbd_out):
    """The backward and its tangent in two passes, as the reference in ops/layers.py."""
    if xd is None or wd is None:
        return layers.bn_relu_maxpool_tangent_bwd(gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd, k, need_x,
                                                  gw_out, gwd_out, gb_out, gbd_out)
    w = per_task_channels(w, "w", x, 1.0)
    gx, gxd, gw, gwd, gb, gbd = torch.ops.fastmaml.bn_relu_maxpool_tangent_bwd(gz, gzd, z, idx, x, xd, mean, r, a,
                                                                               dmean, w, wd, need_x)
    for out, value in ((gw_out, gw), (gwd_out, gwd), (gb_out, gb), (gbd_out, gbd)):
        if out is not None:
            out.copy_(value)
    return (gx, gxd) if need_x else (None, None)


@register("mlp_meta_step", "cpp")
def mlp_meta_step(plan, theta, sx, sy, qx, qy, alphas, order: str, lr_grad, need_before: bool):
    """The whole-inner-loop MLP kernel (csrc/mlp_inner_loop.h), as the reference in ops/mlp_reference.py
    (`ops/mlp_step.py` checks `kernel_runs` first). It computes the query loss at θ in any case; returned
    only with `need_before`, like the reference's."""
    K, P = len(alphas), theta.shape[-1]
    alpha = torch.stack([a.expand(P) for a in alphas]) if K else theta.new_zeros(0, P)
    q_after, grad, d_alpha, q_before, s_before = torch.ops.fastmaml.mlp_meta_step(
        theta, list(plan.sizes), sx, sy, qx, qy, alpha, order != "first", any(lr_grad), plan.activation)
    d_alphas = [None if not lr_grad[j] else d_alpha[j].sum() if a.dim() == 0 else d_alpha[j]
                for j, a in enumerate(alphas)]
    return MlpStepResult(q_after, grad, d_alphas, q_before if need_before else None, s_before if K else None)
