"""Fused MSE loss and gradient for all tasks, one program per task looping over its M elements:

    mse_grad(out [T, N, *], y [T, N, *]) -> (loss [T] = mean (out − y)², ∂loss/∂out = 2 (out − y) / M)

The torch reference is `fastmaml.ops.layers.mse_grad`.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_device

BLOCK = 1024


@triton.jit
def _mse_grad_kernel(out_ptr, y_ptr, g_ptr, loss_ptr, M, ACC: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for start in range(0, M, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < M
        d = tl.load(out_ptr + t * M + offs, mask=mask, other=0).to(ACC) - \
            tl.load(y_ptr + t * M + offs, mask=mask, other=0).to(ACC)
        acc += d * d
        tl.store(g_ptr + t * M + offs, ((d + d) / M).to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + t, (tl.sum(acc, axis=0) / M).to(loss_ptr.dtype.element_ty))


@torch.library.custom_op("fastmaml_triton::mse_grad", mutates_args=())
def mse_grad(out: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """out, y `[T, N, *]` (equal shapes) -> (loss `[T]`, ∂loss/∂out shaped like out)."""
    if out.dim() < 2 or not out.is_floating_point():
        raise ValueError(f"out: expected a floating-point [T, N, ...] tensor, got {out.dtype} {tuple(out.shape)}")
    if y.shape != out.shape or y.dtype != out.dtype:
        raise ValueError(f"y: expected {out.dtype} {tuple(out.shape)} (as out), got {y.dtype} {tuple(y.shape)}")
    check_device(out, "out")
    T = out.shape[0]
    out_c, y_c = out.contiguous(), y.contiguous()
    M = out_c.numel() // T if T else 0
    g = torch.empty_like(out_c)
    loss = torch.empty(T, dtype=out.dtype, device=out.device)
    if T and M:
        _mse_grad_kernel[(T,)](out_c, y_c, g, loss, M, ACC=acc_dtype(out.dtype), BLOCK=BLOCK)
    return loss, g


@mse_grad.register_fake
def _(out, y):
    return out.new_empty(out.shape[0]), torch.empty_like(out)
