"""Fused reverse-sweep step for all tasks: v − H(α ⊙ v) and the α-gradient −Σ_t g ⊙ v.

One program per block of BLOCK parameters loops over the T tasks in order, so the reduction over
tasks is deterministic; a scalar α's gradient adds the per-block partial sums in block order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_alpha, check_like, check_matrix, unit_inner_stride

BLOCK = 512


@triton.jit
def _adjoint_kernel(v_ptr, hu_ptr, g_ptr, out_ptr, dalpha_ptr, partial_ptr, T, P, rs_v, rs_hu, rs_g,
                    HAS_HU: tl.constexpr, LR_GRAD: tl.constexpr, PER_PARAM: tl.constexpr,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    pb = tl.program_id(0)
    offs = pb * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    acc = tl.zeros([BLOCK], dtype=ACC)
    v_row, hu_row, g_row, out_row = v_ptr + offs, hu_ptr + offs, g_ptr + offs, out_ptr + offs
    for _ in range(0, T):  # row pointers advance by the row strides: 64-bit, no index overflow
        v = tl.load(v_row, mask=mask, other=0).to(ACC)
        if HAS_HU:
            hu = tl.load(hu_row, mask=mask, other=0).to(ACC)
            tl.store(out_row, (v - hu).to(out_ptr.dtype.element_ty), mask=mask)
        if LR_GRAD:
            g = tl.load(g_row, mask=mask, other=0).to(ACC)
            acc += g * v
        v_row += rs_v
        hu_row += rs_hu
        g_row += rs_g
        out_row += P
    if LR_GRAD:
        if PER_PARAM:
            tl.store(dalpha_ptr + offs, (-acc).to(dalpha_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(partial_ptr + pb, tl.sum(acc, axis=0))


def _launch(v, hu: Optional[torch.Tensor], g, alpha, lr_grad: bool):
    T, P = v.shape
    out = torch.empty((T, P), dtype=v.dtype, device=v.device) if hu is not None else None
    d_alpha = torch.zeros(alpha.shape, dtype=v.dtype, device=v.device) if lr_grad else None
    if P == 0:
        return out, d_alpha
    blocks = triton.cdiv(P, BLOCK)
    acc_torch = torch.float64 if v.dtype == torch.float64 else torch.float32
    partial = torch.empty(blocks, dtype=acc_torch, device=v.device) if lr_grad and alpha.dim() == 0 else None
    _adjoint_kernel[(blocks,)](
        v, hu if hu is not None else v, g, out if out is not None else v,
        d_alpha if d_alpha is not None else v, partial if partial is not None else v,
        T, P, v.stride(0), hu.stride(0) if hu is not None else 0, g.stride(0),
        HAS_HU=hu is not None, LR_GRAD=lr_grad, PER_PARAM=alpha.dim() == 1,
        ACC=acc_dtype(v.dtype), BLOCK=BLOCK)
    if partial is not None:
        d_alpha.copy_(-partial.sum())
    return out, d_alpha


@torch.library.custom_op("fastmaml_triton::adjoint_update", mutates_args=())
def adjoint_update(v: torch.Tensor, hu: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor,
                   lr_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """v, hu, g `[T, P]`, α `[]` or `[P]` -> (v − hu `[T, P]`, −Σ_t g ⊙ v shaped like α, or `[0]`)."""
    check_matrix(v, "v")
    check_like(hu, "hu", v, "v")
    check_like(g, "g", v, "v")
    check_alpha(alpha, v)
    out, d_alpha = _launch(unit_inner_stride(v), unit_inner_stride(hu), unit_inner_stride(g), alpha, lr_grad)
    return out, (d_alpha if lr_grad else v.new_empty(0))


@adjoint_update.register_fake
def _(v, hu, g, alpha, lr_grad):
    return v.new_empty(v.shape), (alpha.new_empty(alpha.shape) if lr_grad else v.new_empty(0))


@torch.library.custom_op("fastmaml_triton::alpha_grad", mutates_args=())
def alpha_grad(g: torch.Tensor, v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """g, v `[T, P]`, α `[]` or `[P]` -> −Σ_t g ⊙ v shaped like α (the first-order reverse step)."""
    check_matrix(g, "g")
    check_like(v, "v", g, "g")
    check_alpha(alpha, g)
    return _launch(unit_inner_stride(v), None, unit_inner_stride(g), alpha, True)[1]


@alpha_grad.register_fake
def _(g, v, alpha):
    return alpha.new_empty(alpha.shape)
