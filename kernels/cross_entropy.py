"""Fused softmax cross-entropy for all tasks, one program per example row (t, n):

    cross_entropy_grad(z [T, N, C], y [T, N])  -> (loss [T], ∂loss/∂z = (p − onehot(y)) / N, p = softmax(z))
    cross_entropy_grad_tangent(p, ż [T, N, C]) -> ġz = p ⊙ (ż − ⟨p, ż⟩) / N

The torch references are `fastmaml.ops.layers.cross_entropy_grad` / `..._tangent`. The loss is the
mean over a task's N rows of −log p[y]; per-row terms are summed over rows in torch (deterministic).
Precondition (not checked here, to avoid a device sync per call): 0 <= y < C.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_device


@triton.jit
def _ce_grad_kernel(z_ptr, y_ptr, g_ptr, p_ptr, row_loss_ptr, C, N,
                    ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    z = tl.load(z_ptr + row * C + cols, mask=mask, other=-float("inf")).to(ACC)
    zmax = tl.max(z, axis=0)
    e = tl.where(mask, tl.exp(z - zmax), 0.0)
    s = tl.sum(e, axis=0)
    p = e / s
    y = tl.load(y_ptr + row)
    onehot = tl.where(cols == y, 1.0, 0.0).to(ACC)
    z_y = tl.sum(tl.where(cols == y, z, 0.0), axis=0)
    tl.store(row_loss_ptr + row, ((zmax + tl.log(s) - z_y) / N).to(row_loss_ptr.dtype.element_ty))
    tl.store(p_ptr + row * C + cols, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(g_ptr + row * C + cols, ((p - onehot) / N).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_tangent_kernel(p_ptr, zd_ptr, out_ptr, C, N, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    p = tl.load(p_ptr + row * C + cols, mask=mask, other=0).to(ACC)
    zd = tl.load(zd_ptr + row * C + cols, mask=mask, other=0).to(ACC)
    dot = tl.sum(p * zd, axis=0)
    tl.store(out_ptr + row * C + cols, (p * (zd - dot) / N).to(out_ptr.dtype.element_ty), mask=mask)


def _check_logits(z: torch.Tensor, name: str) -> None:
    if z.dim() != 3 or not z.is_floating_point():
        raise ValueError(f"{name}: expected floating-point logits [T, N, C], got {z.dtype} {tuple(z.shape)}")
    check_device(z, name)


@torch.library.custom_op("fastmaml_triton::cross_entropy_grad", mutates_args=())
def cross_entropy_grad(z: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z `[T, N, C]`, y `[T, N]` int64 -> (loss `[T]`, ∂loss/∂z `[T, N, C]`, softmax p `[T, N, C]`)."""
    _check_logits(z, "z")
    if y.shape != z.shape[:2] or y.dtype != torch.int64:
        raise ValueError(f"y: expected int64 class indices of shape {tuple(z.shape[:2])}, got {y.dtype} "
                         f"{tuple(y.shape)}")
    T, N, C = z.shape
    z, y = z.contiguous(), y.contiguous()
    g, p = torch.empty_like(z), torch.empty_like(z)
    row_loss = torch.empty(T, N, dtype=z.dtype, device=z.device)
    if T * N:
        _ce_grad_kernel[(T * N,)](z, y, g, p, row_loss, C, N, ACC=acc_dtype(z.dtype),
                                  BLOCK_C=triton.next_power_of_2(C))
    return row_loss.sum(1), g, p


@cross_entropy_grad.register_fake
def _(z, y):
    return z.new_empty(z.shape[0]), torch.empty_like(z), torch.empty_like(z)


@torch.library.custom_op("fastmaml_triton::cross_entropy_grad_tangent", mutates_args=())
def cross_entropy_grad_tangent(p: torch.Tensor, zd: torch.Tensor) -> torch.Tensor:
    """p, ż `[T, N, C]` -> ġz = p ⊙ (ż − ⟨p, ż⟩) / N."""
    _check_logits(p, "p")
    if zd.shape != p.shape or zd.dtype != p.dtype:
        raise ValueError(f"zd: expected {p.dtype} {tuple(p.shape)} (as p), got {zd.dtype} {tuple(zd.shape)}")
    T, N, C = p.shape
    p, zd = p.contiguous(), zd.contiguous()
    out = torch.empty_like(p)
    if T * N:
        _ce_tangent_kernel[(T * N,)](p, zd, out, C, N, ACC=acc_dtype(p.dtype), BLOCK_C=triton.next_power_of_2(C))
    return out


@cross_entropy_grad_tangent.register_fake
def _(p, zd):
    return torch.empty_like(p)
