"""The whole-inner-loop MLP op `mlp_meta_step`: all K inner steps, the query loss and the exact reverse
sweep of an `nn.Sequential` of Linear layers with ReLU or Tanh between them under MSE, in one op. Backends:
"torch" (ops/mlp_reference.py: all tasks batched, straight-line GEMMs) and "cpp" (csrc/mlp_inner_loop.h: one
task per thread on CPU, one thread block per task on CUDA with the weights in shared memory).

    plan = mlp_plan(model, layout, loss)        # None if the model is not such an MLP (see why_not)
    out = mlp_meta_step(plan, theta, sx, sy, qx, qy, alphas, order="second", lr_grad=[...], backend="auto")

It computes exactly what `meta_step` computes on the general engines (same math, same order modes; the C++
kernel's "checkpoint" keeps φ_j and g_j per task, the reference's replays steps like the fused engine).
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
    query_loss_before: Optional[torch.Tensor]  # [T] (None when not asked for, from the reference)
    support_loss_before: Optional[torch.Tensor]  # [T] (None with K = 0, from the reference)


def why_not(model: nn.Module, layout, loss) -> Optional[str]:
    """None if the op can run `model` with `loss`, else the reason it cannot."""
    if getattr(loss, "name", None) != "mse":
        return f"loss {getattr(loss, 'name', loss)!r} (the MLP op does MSE only)"
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
    """Whether the C++ op has a kernel for `device` (and the widths fit the CUDA kernel's design)."""
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


def kernel_runs(plan: MlpPlan, theta: torch.Tensor) -> bool:
    """Whether the C++/CUDA kernel takes these arguments (float32/float64, and the widths on CUDA)."""
    return theta.dtype in (torch.float32, torch.float64) and supports_device(plan, theta.device)[0]


def mlp_meta_step(plan: MlpPlan, theta: torch.Tensor, sx, sy, qx, qy, alphas: Sequence[torch.Tensor], *,
                  order: str = "second", lr_grad: Sequence[bool] = (), backend: Optional[str] = "auto",
                  need_before: bool = True) -> MlpStepResult:
    """θ `[P]`, sx `[T, Ns, d0]`, sy `[T, Ns, dL]`, qx/qy likewise, alphas: K tensors (0-dim or `[P]`).

    Returns per-task losses, the meta-gradient `[P]` of mean_t L_query_t, and ∂/∂α_j for the steps
    with `lr_grad[j]` (reduced to α_j's shape). backend as in `meta_step`; where the "cpp" kernel does not
    take the arguments (`kernel_runs`), the reference runs. need_before: also the query loss at θ (the
    C++ kernel always computes it).
    """
    from .registry import reference, resolve

    if order not in ("second", "checkpoint", "first"):
        raise ValueError(f"order: expected 'second', 'checkpoint' or 'first', got {order!r}")
    K = len(alphas)
    lr_grad = list(lr_grad) or [False] * K
    if len(lr_grad) != K:
        raise ValueError(f"lr_grad: expected {K} flags (one per step), got {len(lr_grad)}")
    table = resolve(backend, theta.device)
    fn = table.mlp_meta_step
    if table.chosen["mlp_meta_step"][0] == "cpp" and not kernel_runs(plan, theta):
        fn = reference("mlp_meta_step")
    return fn(plan, theta.detach(), sx, sy, qx, qy, [a.detach() for a in alphas], order, lr_grad, need_before)


def try_meta_step(model: nn.Module, layout, loss, batch, theta: torch.Tensor, alphas: Sequence[torch.Tensor], *,
                  order: str, backend: Optional[str], lr_grad: Sequence[bool], need_before: bool = True,
                  task_chunk: Optional[int] = None) -> Optional[MlpStepResult]:
    """The op's result for `meta_step`, or None when it does not apply (then the general path runs).

    Applies when `order` is "second", "checkpoint" or "first", the model is an MLP the op runs (see
    `why_not`) and x, y are `[T, N, d0]`, `[T, N, dL]` floating point. θ: the adapted flat `[P]`. Tasks
    run in chunks like the general path (`task_chunk`, else `inner_loop.TASK_STATE_BYTES` of per-task
    state per chunk).
    """
    from ..inner_loop import TASK_STATE_BYTES, task_chunks

    if order not in ("second", "checkpoint", "first"):
        return None
    sx, sy, qx, qy = batch
    if sx.dim() != 3 or qx.dim() != 3 or sy.dim() != 3 or qy.dim() != 3 or not sx.is_floating_point():
        return None
    plan = mlp_plan(model, layout, loss)
    if plan is None:
        return None
    d0, dL = plan.sizes[0], plan.sizes[-1]
    if (sx.shape[2] != d0 or qx.shape[2] != d0 or sy.shape != (*sx.shape[:2], dL)
            or qy.shape != (*qx.shape[:2], dL)):
        return None  # the general path raises the precise error
    T, K = sx.shape[0], len(alphas)
    # per task: φ_j and g_j of every step, and the activations of every step's support pass and the query's
    per_task = theta.element_size() * (2 * (K + 1) * theta.numel()
                                       + 2 * (K * sx.shape[1] + qx.shape[1]) * sum(plan.sizes))
    chunks = task_chunks(T, per_task, TASK_STATE_BYTES.get(sx.device.type, TASK_STATE_BYTES["cpu"]), task_chunk)
    if len(chunks) == 1:
        return mlp_meta_step(plan, theta, sx, sy, qx, qy, alphas, order=order, lr_grad=lr_grad, backend=backend,
                             need_before=need_before)
    parts = [mlp_meta_step(plan, theta, *(t[sl] for t in batch), alphas, order=order, lr_grad=lr_grad,
                           backend=backend, need_before=need_before) for sl in chunks]
    weights = [(sl.stop - sl.start) / T for sl in chunks]  # each part is a mean over its own tasks

    def cat(field):
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return MlpStepResult(cat("query_loss_after"), sum(p.grad * w for p, w in zip(parts, weights)),
                         [None if d[0] is None else sum(x * w for x, w in zip(d, weights))
                          for d in zip(*(p.d_alphas for p in parts))],
                         cat("query_loss_before"), cat("support_loss_before"))
