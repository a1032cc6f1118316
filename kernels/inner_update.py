"""Fused inner SGD step for all tasks: φ − α ⊙ g over `[T, P]`, α a 0-dim tensor or `[P]`.

One launch, grid (T, ⌈P / BLOCK⌉); φ may be a `[P]` vector expanded over tasks (row stride 0).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_alpha, check_like, check_matrix, unit_inner_stride

BLOCK = 1024


@triton.jit
def _inner_update_kernel(phi_ptr, g_ptr, alpha_ptr, out_ptr, P, rs_phi, rs_g,
                         PER_PARAM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    phi = tl.load(phi_ptr + t * rs_phi + offs, mask=mask, other=0).to(ACC)
    g = tl.load(g_ptr + t * rs_g + offs, mask=mask, other=0).to(ACC)
    if PER_PARAM:
        a = tl.load(alpha_ptr + offs, mask=mask, other=0).to(ACC)
    else:
        a = tl.load(alpha_ptr).to(ACC)
    tl.store(out_ptr + t * P + offs, (phi - a * g).to(out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("fastmaml_triton::inner_update", mutates_args=())
def inner_update(phi: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """φ `[T, P]`, g `[T, P]`, α `[]` or `[P]` -> φ − α ⊙ g `[T, P]`."""
    check_matrix(phi, "phi")
    check_like(g, "g", phi, "phi")
    check_alpha(alpha, phi)
    phi, g, alpha = unit_inner_stride(phi), unit_inner_stride(g), alpha.contiguous()
    T, P = phi.shape
    out = torch.empty((T, P), dtype=phi.dtype, device=phi.device)
    if T * P:
        _inner_update_kernel[(T, triton.cdiv(P, BLOCK))](
            phi, g, alpha, out, P, phi.stride(0), g.stride(0),
            PER_PARAM=alpha.dim() == 1, ACC=acc_dtype(phi.dtype), BLOCK=BLOCK)
    return out


@inner_update.register_fake
def _(phi, g, alpha):
    return phi.new_empty(phi.shape)
