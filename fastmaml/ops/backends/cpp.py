"""The "cpp" backend: C++ CPU (and, in a CUDA build, CUDA) kernels of the step ops and of the whole-inner-loop
MLP op from `csrc/`, the C++ CPU kernels of the conv-net block tail (BatchNorm + ReLU + max-pool; CPU only) and
of BatchNorm + leaky ReLU (`batchnorm_act_*`: ResNet-12's BatchNorm + LeakyReLU and plain BatchNorm; CPU only).
Each registration declares where it runs (devices, dtypes, a `supports` predicate over its arguments); the
registry runs the reference wherever a kernel does not apply.

The extension is compiled/loaded lazily by `fastmaml.build` the first time the backend's
availability is asked for (e.g. by `resolve("auto", device)`); a failed build makes the backend
unavailable with the reason, so `auto` falls back and `backend="cpp"` raises `BackendUnavailable`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ... import build
from ..mlp import MAX_CUDA_WIDTH, MlpStepResult
from ..reference.block_tail import per_task_channels, with_tangents, with_tangents_bwd
from ..registry import register, register_backend

KERNEL_DTYPES = (torch.float32, torch.float64)
STEP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


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


# "auto" uses the step kernels on the CPU only: on CUDA the reference's elementwise ops measured faster
# (the op bench of benchmarks/gpu_check.sh; numbers in benchmarks/RESULTS.md). backend="cpp" still runs them.
_CPU_AUTO = dict(
    auto=("cpu",),
    dtypes=STEP_DTYPES,
    why_not_auto="slower than the reference's elementwise ops on a GPU (benchmarks/RESULTS.md)",
)


@register("inner_update", "cpp", **_CPU_AUTO)
def inner_update(phi: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """φ − α ⊙ g `[T, P]` (φ may be a `[P]` vector expanded over tasks)."""
    return torch.ops.fastmaml.inner_update(phi, g, alpha)


@register("adjoint_update", "cpp", **_CPU_AUTO)
def adjoint_update(
    v: torch.Tensor, hu: Optional[torch.Tensor], g: torch.Tensor, alpha: torch.Tensor, lr_grad: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(v − hu `[T, P]`, −Σ_t g ⊙ v reduced to α's shape or None); hu None: first order, v passes."""
    if hu is None:
        return v, (torch.ops.fastmaml.alpha_grad(g, v, alpha) if lr_grad else None)
    out, d_alpha = torch.ops.fastmaml.adjoint_update(v, hu, g, alpha, lr_grad)
    return out, (d_alpha if lr_grad else None)


@register("bn_relu_maxpool_train_fwd", "cpp", devices=("cpu",), dtypes=KERNEL_DTYPES)
def bn_relu_maxpool_train_fwd(x, w, b, eps: float, k: int):
    """BatchNorm (batch statistics) + ReLU + k×k max-pool in one pass, as the reference in
    ops/reference/block_tail.py."""
    return torch.ops.fastmaml.bn_relu_maxpool_fwd(
        x, per_task_channels(w, "w", x, 1.0), per_task_channels(b, "b", x, 0.0), eps, k
    )


@register("bn_relu_maxpool_train_bwd", "cpp", devices=("cpu",), dtypes=KERNEL_DTYPES)
def bn_relu_maxpool_train_bwd(gz, z, idx, x, mean, r, w, eps: float, k: int, need_x: bool, gw_out, gb_out):
    """Backward of `bn_relu_maxpool_train_fwd`, as the reference in ops/reference/block_tail.py."""
    w = per_task_channels(w, "w", x, 1.0)
    gx, gw, gb = torch.ops.fastmaml.bn_relu_maxpool_bwd(gz, z, idx, x, mean, r, w, need_x)
    if gw_out is not None:
        gw_out.copy_(gw)
    if gb_out is not None:
        gb_out.copy_(gb)
    return gx if need_x else None


def _contiguous(x, k) -> Optional[str]:
    return None if x.is_contiguous() else "channels-last x: PyTorch's channels-last max-pool"


@register(
    "relu_maxpool_fwd",
    "cpp",
    devices=("cpu",),
    dtypes=KERNEL_DTYPES,
    supports=_contiguous,
    limits="float32/float64, contiguous (NCHW) x",
)
def relu_maxpool_fwd(x, k: int):
    """ReLU + k×k max-pool in one pass, as the reference in ops/reference/block_tail.py."""
    return torch.ops.fastmaml.relu_maxpool_fwd(x, k)


@register(
    "bn_relu_maxpool_tangent_fwd",
    "cpp",
    devices=("cpu",),
    dtypes=KERNEL_DTYPES,
    supports=with_tangents,
    limits="float32/float64 with both tangents",
)
def bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, bd, eps: float, k: int):
    """The forward and its tangent in one pass, as the reference in ops/reference/block_tail.py."""
    w, b, bd = (
        per_task_channels(v, name, x, fill) for v, name, fill in ((w, "w", 1.0), (b, "b", 0.0), (bd, "bd", 0.0))
    )
    return torch.ops.fastmaml.bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, bd, eps, k)


@register(
    "bn_relu_maxpool_tangent_bwd",
    "cpp",
    devices=("cpu",),
    dtypes=KERNEL_DTYPES,
    supports=with_tangents_bwd,
    limits="float32/float64 with both tangents",
)
def bn_relu_maxpool_tangent_bwd(
    gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd, k: int, need_x: bool, gw_out, gwd_out, gb_out, gbd_out
):
    """The backward and its tangent in two passes, as the reference in ops/reference/block_tail.py."""
    w = per_task_channels(w, "w", x, 1.0)
    gx, gxd, gw, gwd, gb, gbd = torch.ops.fastmaml.bn_relu_maxpool_tangent_bwd(
        gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd, need_x
    )
    for out, value in ((gw_out, gw), (gwd_out, gwd), (gb_out, gb), (gbd_out, gbd)):
        if out is not None:
            out.copy_(value)
    return (gx, gxd) if need_x else (None, None)


def _bn_act_takes(x, tensors, slope) -> Optional[str]:
    """What the BatchNorm + activation kernels take besides the dtype: activations `[T, N, C, S]` with values
    in every (task, channel), slope >= 0 (z keeps y's sign), no input that records a graph."""
    if x.dim() != 4:
        return f"activations of shape {tuple(x.shape)}, not [T, N, C, S]"
    if x.shape[1] * x.shape[3] == 0 and x.shape[0] * x.shape[2] > 0:
        return "no values per task and channel"
    if not 0.0 <= slope < float("inf"):
        return f"slope {slope}"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)):
        return "inputs that require grad (the kernels have no autograd formula)"
    return None


_BN_ACT = dict(devices=("cpu",), dtypes=KERNEL_DTYPES, limits="float32/float64 [T, N, C, S], slope >= 0")


def _write(outs_and_values) -> None:
    for out, value in outs_and_values:
        if out is not None:
            out.copy_(value)


@register(
    "batchnorm_act_train_fwd", "cpp", supports=lambda x, w, b, eps, slope: _bn_act_takes(x, (w, b), slope), **_BN_ACT
)
def batchnorm_act_train_fwd(x, w, b, eps: float, slope: float):
    """BatchNorm (batch statistics) + leaky ReLU, one read of x for the statistics and one pass for z, as the
    reference in ops/reference/batchnorm.py."""
    return torch.ops.fastmaml.bn_act_fwd(
        x, per_task_channels(w, "w", x, 1.0), per_task_channels(b, "b", x, 0.0), eps, slope
    )


@register(
    "batchnorm_act_train_bwd",
    "cpp",
    supports=lambda gz, z, x, mean, r, w, eps, slope, *rest: _bn_act_takes(x, (gz, z, w), slope),
    **_BN_ACT,
)
def batchnorm_act_train_bwd(gz, z, x, mean, r, w, eps: float, slope: float, need_x: bool, gw_out, gb_out):
    """Backward of `batchnorm_act_train_fwd` in two passes (one without gx), as the reference in
    ops/reference/batchnorm.py."""
    gx, gw, gb = torch.ops.fastmaml.bn_act_bwd(gz, z, x, mean, r, per_task_channels(w, "w", x, 1.0), slope, need_x)
    _write(((gw_out, gw), (gb_out, gb)))
    return gx if need_x else None


@register(
    "batchnorm_act_value_tangent_fwd",
    "cpp",
    supports=lambda x, xd, w, b, wd, bd, eps, slope: _bn_act_takes(x, (xd, w, b, wd, bd), slope),
    **_BN_ACT,
)
def batchnorm_act_value_tangent_fwd(x, xd, w, b, wd, bd, eps: float, slope: float):
    """The forward (bit for bit `batchnorm_act_train_fwd`'s) and its tangent in two passes, as the reference in
    ops/reference/batchnorm.py."""
    w, b = per_task_channels(w, "w", x, 1.0), per_task_channels(b, "b", x, 0.0)
    if xd is None and wd is None and bd is None:
        z, mean, r = torch.ops.fastmaml.bn_act_fwd(x, w, b, eps, slope)
        zeros = x.new_zeros(mean.shape)
        return z, None, mean, r, zeros, zeros
    wd, bd = per_task_channels(wd, "wd", x, 0.0), per_task_channels(bd, "bd", x, 0.0)
    return torch.ops.fastmaml.bn_act_tangent_fwd(x, xd, w, b, wd, bd, eps, slope)


@register(
    "batchnorm_act_tangent_bwd",
    "cpp",
    supports=lambda gz, gzd, z, x, xd, mean, r, a, dmean, w, wd, slope, *rest: _bn_act_takes(
        x, (gz, gzd, z, xd, w, wd), slope
    ),
    **_BN_ACT,
)
def batchnorm_act_tangent_bwd(
    gz, gzd, z, x, xd, mean, r, a, dmean, w, wd, slope: float, need_x: bool, gw_out, gwd_out, gb_out, gbd_out
):
    """The backward and its tangent in two passes (one without gx), as the reference in ops/reference/batchnorm.py."""
    w, wd = per_task_channels(w, "w", x, 1.0), per_task_channels(wd, "wd", x, 0.0)
    gx, gxd, gw, gwd, gb, gbd = torch.ops.fastmaml.bn_act_tangent_bwd(
        gz, gzd, z, x, xd, mean, r, a, dmean, w, wd, slope, need_x
    )
    _write(((gw_out, gw), (gwd_out, gwd), (gb_out, gb), (gbd_out, gbd)))
    return (gx, gxd) if need_x else (None, None)


def _mlp_kernel_takes(plan, theta, sx, sy, qx, qy, alphas, order, *rest):
    """The kernel keeps every step per task, so "checkpoint" (memory flat in K) runs the reference; on
    CUDA one thread block holds a layer, up to `MAX_CUDA_WIDTH` wide."""
    if theta.dtype not in KERNEL_DTYPES:
        return f"dtype {theta.dtype}"
    if order == "checkpoint":
        return "order='checkpoint'"
    if theta.device.type == "cuda":
        if not _has_kernel("mlp_meta_step", "CUDA"):
            return "the extension has no CUDA MLP kernel"
        if max(plan.sizes[1:]) > MAX_CUDA_WIDTH:
            return f"a layer wider than {MAX_CUDA_WIDTH}"
    return None


@register(
    "mlp_meta_step",
    "cpp",
    supports=_mlp_kernel_takes,
    limits=f"float32/float64, orders second and first, CUDA layers up to {MAX_CUDA_WIDTH} wide",
)
def mlp_meta_step(plan, theta, sx, sy, qx, qy, alphas, order: str, lr_grad, need_before: bool):
    """The whole-inner-loop MLP kernel (csrc/mlp_cpu.h on CPU, csrc/mlp_inner_loop.h on CUDA), as the
    reference in ops/reference/mlp.py; the query loss at θ is computed only with `need_before`."""
    K, P = len(alphas), theta.shape[-1]
    if isinstance(alphas, torch.Tensor):
        alpha = alphas
    else:
        alpha = torch.stack([a.expand(P) for a in alphas]) if K else theta.new_zeros(0, P)
    q_after, grad, d_alpha, q_before, s_before = torch.ops.fastmaml.mlp_meta_step(
        theta, list(plan.sizes), sx, sy, qx, qy, alpha, order != "first", any(lr_grad), plan.activation, need_before
    )
    d_alphas = [None if not lr_grad[j] else d_alpha[j].sum() if alphas[j].dim() == 0 else d_alpha[j] for j in range(K)]
    return MlpStepResult(q_after, grad, d_alphas, q_before if need_before else None, s_before if K else None)


@register("conv_bn_relu_maxpool_fwd", "cpp", devices=("cpu",), dtypes=KERNEL_DTYPES)
def conv_bn_relu_maxpool_fwd(x, cw, cb, w, b, eps: float, k: int, stride, padding, dilation):
    """A first conv block (conv2d + BatchNorm + ReLU + max-pool) without its conv output, as the reference in
    ops/reference/block_tail.py."""
    return torch.ops.fastmaml.conv_bn_relu_maxpool_fwd(x, cw, cb, w, b, eps, k, stride, padding, dilation)


@register("conv_bn_relu_maxpool_bwd", "cpp", devices=("cpu",), dtypes=KERNEL_DTYPES)
def conv_bn_relu_maxpool_bwd(gz, z, idx, x, cw, cb, w, pmean, pcov, eps: float, k: int, stride, padding, dilation):
    """Backward of `conv_bn_relu_maxpool_fwd`, as the reference in ops/reference/block_tail.py."""
    return torch.ops.fastmaml.conv_bn_relu_maxpool_bwd(
        gz, z, idx, x, cw, cb, w, pmean, pcov, eps, k, stride, padding, dilation
    )


@register("conv_bn_relu_maxpool_tangent_fwd", "cpp", devices=("cpu",), dtypes=KERNEL_DTYPES)
def conv_bn_relu_maxpool_tangent_fwd(x, cw, cb, w, b, dcw, dcb, dw, db, eps: float, k: int, stride, padding, dilation):
    """The first block with its tangent, as the reference in ops/reference/block_tail.py."""
    return torch.ops.fastmaml.conv_bn_relu_maxpool_tangent_fwd(
        x, cw, cb, w, b, dcw, dcb, dw, db, eps, k, stride, padding, dilation
    )


@register("conv_bn_relu_maxpool_tangent_bwd", "cpp", devices=("cpu",), dtypes=KERNEL_DTYPES)
def conv_bn_relu_maxpool_tangent_bwd(
    gz, gzd, z, idx, x, cw, cb, w, dcw, dw, pmean, pcov, eps: float, k: int, stride, padding, dilation
):
    """Its backward and the backward's tangent, as the reference in ops/reference/block_tail.py."""
    return torch.ops.fastmaml.conv_bn_relu_maxpool_tangent_bwd(
        gz, gzd, z, idx, x, cw, cb, w, dcw, dw, pmean, pcov, eps, k, stride, padding, dilation
    )
