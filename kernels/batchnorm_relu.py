"""BatchNorm followed by ReLU, z = max(x̂ w + b, 0), for all tasks: forward, backward, value-and-tangent
forward and tangent backward, on batch or fixed statistics.

    batchnorm_relu_fwd(x, w, b, mean, var, eps, save_xhat)           -> (z, x̂, μ [T, C], r)
    batchnorm_relu_bwd(gz, z, xin, mean, r, w, batch, need_x, gw_out, gb_out)                -> gx
    batchnorm_relu_value_tangent_fwd(x, xd, w, b, wd, bd, mean, var, eps) -> (z, ż, x̂, x̂̇, a [T, C], r)
    batchnorm_relu_tangent_bwd(gz, gzd, z, x̂, x̂̇, a, r, w, wd, batch, need_x, gw_out, gwd_out, gb_out, gbd_out)
                                                                      -> (gx, ġx)

Conventions, grid and reductions as kernels/batchnorm.py (one program per (task, channel), looping
over its m = N·S values in blocks). The forward and both backwards are that module's kernels with
RELU set: the ReLU is applied on the store, and gradients w.r.t. z are masked by z > 0 as they are
loaded (ReLU's second derivative is 0, so ġz is only masked too). The value-and-tangent forward is
its own kernel: one pass of shifted sums (`_moments`) gives μ, r and a = mean(x̂ ẋ) = r mean((x − μ) ẋ);
a second pass writes z, ż = [y > 0] ẏ, x̂, x̂̇.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .batchnorm import (
    _act,
    _chan_arg,
    _chunk,
    _empty,
    _eps_split,
    _launch,
    _moments,
    _tangent_block,
    fake_fwd,
    fake_grads,
    launch_bwd,
    launch_fwd,
    launch_tangent_bwd,
)


@triton.jit
def _value_tangent_fwd_kernel(x_ptr, xd_ptr, z_ptr, zd_ptr, xh_ptr, xhd_ptr, a_ptr, r_ptr, w_ptr, b_ptr, wd_ptr,
                              bd_ptr, mu_ptr, var_ptr, N, C, S, eps_hi, eps_lo, w_st, w_sc, b_st, b_sc, wd_st,
                              wd_sc, bd_st, bd_sc, mu_st, mu_sc, var_st, var_sc,
                              BATCH: tl.constexpr, HAS_XD: tl.constexpr, STATS: tl.constexpr, HAS_W: tl.constexpr,
                              HAS_B: tl.constexpr, HAS_WD: tl.constexpr, HAS_BD: tl.constexpr,
                              WRITE_ZD: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = (pid // C).to(tl.int64)
    c = (pid % C).to(tl.int64)
    base = t * N * C * S + c * S
    mean_xd = 0.0
    cov = 0.0
    if BATCH:
        mean, var, mean_xd, cov = _moments(x_ptr, xd_ptr, base, N, C, S, STATS, ACC, BLOCK)
    else:
        mean = tl.load(mu_ptr + t * mu_st + c * mu_sc).to(ACC)
        var = tl.load(var_ptr + t * var_st + c * var_sc).to(ACC)
    r = 1.0 / tl.sqrt((var + eps_hi) + eps_lo)
    if BATCH:
        tl.store(r_ptr + t * C + c, r.to(r_ptr.dtype.element_ty))
    else:  # fixed statistics: r `[1, C]`, written by the first task's programs
        tl.store(r_ptr + c, r.to(r_ptr.dtype.element_ty), mask=t == 0)
    a = 0.0
    if STATS:
        a = cov * r
        tl.store(a_ptr + t * C + c, a.to(a_ptr.dtype.element_ty))
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + t * w_st + c * w_sc).to(ACC)
    b = 0.0
    if HAS_B:
        b = tl.load(b_ptr + t * b_st + c * b_sc).to(ACC)
    wd = 0.0
    if HAS_WD:
        wd = tl.load(wd_ptr + t * wd_st + c * wd_sc).to(ACC)
    bd = 0.0
    if HAS_BD:
        bd = tl.load(bd_ptr + t * bd_st + c * bd_sc).to(ACC)
    for start in range(0, N * S, BLOCK):
        offs, mask = _chunk(start, base, N, C, S, BLOCK)
        xh = (tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) - mean) * r
        tl.store(xh_ptr + offs, xh.to(xh_ptr.dtype.element_ty), mask=mask)
        y = xh * w + b
        tl.store(z_ptr + offs, tl.maximum(y, 0.0).to(z_ptr.dtype.element_ty), mask=mask)
        yd = _tangent_block(xh, xd_ptr, xhd_ptr, offs, mask, mean_xd, a, r, w, wd, bd, HAS_XD, BATCH, HAS_WD, HAS_BD,
                            ACC, BLOCK)
        if WRITE_ZD:
            tl.store(zd_ptr + offs, tl.where(y > 0, yd, 0.0).to(zd_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- ops


@torch.library.custom_op("fastmaml_triton::batchnorm_relu_fwd", mutates_args=())
def batchnorm_relu_fwd(x: torch.Tensor, w: Optional[torch.Tensor], b: Optional[torch.Tensor],
                       mean: Optional[torch.Tensor], var: Optional[torch.Tensor], eps: float, save_xhat: bool
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x `[T, N, C, S]` -> (z = max(x̂ w + b, 0), x̂ (if `save_xhat`), μ `[T, C]` (batch statistics), r `[T, C]`).

    Batch statistics when `mean`/`var` are None, else fixed statistics (r is then `[1, C]`)."""
    return launch_fwd(x, w, b, mean, var, eps, save_xhat, True)


@batchnorm_relu_fwd.register_fake
def _(x, w, b, mean, var, eps, save_xhat):
    return fake_fwd(x, mean, save_xhat)


@torch.library.custom_op("fastmaml_triton::batchnorm_relu_bwd", mutates_args=("gw_out", "gb_out"))
def batchnorm_relu_bwd(gz: torch.Tensor, z: torch.Tensor, xin: torch.Tensor, mean: Optional[torch.Tensor],
                       r: torch.Tensor, w: Optional[torch.Tensor], batch: bool, need_x: bool,
                       gw_out: Optional[torch.Tensor], gb_out: Optional[torch.Tensor]) -> torch.Tensor:
    """gz, z `[T, N, C, S]`; xin is x̂, or x when `mean` (`[T, C]`, with r) is given. With gy = [z > 0] gz,
    writes Σ gy x̂ into `gw_out`, Σ gy into `gb_out` `[T, C]`; returns gx (empty unless `need_x`)."""
    return launch_bwd(gz, z, xin, mean, r, w, batch, need_x, gw_out, gb_out)


@batchnorm_relu_bwd.register_fake
def _(gz, z, xin, mean, r, w, batch, need_x, gw_out, gb_out):
    return fake_grads(xin, need_x, 1)[0]


@torch.library.custom_op("fastmaml_triton::batchnorm_relu_value_tangent_fwd", mutates_args=())
def batchnorm_relu_value_tangent_fwd(x: torch.Tensor, xd: Optional[torch.Tensor], w: Optional[torch.Tensor],
                                     b: Optional[torch.Tensor], wd: Optional[torch.Tensor],
                                     bd: Optional[torch.Tensor], mean: Optional[torch.Tensor],
                                     var: Optional[torch.Tensor], eps: float
                                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor, torch.Tensor]:
    """(z, ż, x̂, x̂̇, a `[T, C]`, r `[T|1, C]`) of x `[T, N, C, S]` and its tangent: ż = [z > 0] ẏ with
    ẏ = x̂̇ w + x̂ ẇ + ḃ, x̂̇ = P(ẋ) (batch statistics) or r ẋ, a = mean(x̂ ẋ).

    Empty outputs: ż without any of ẋ, ẇ, ḃ; x̂̇ and a without ẋ; a with fixed statistics."""
    x = _act(x, "x")
    if (mean is None) != (var is None):
        raise ValueError("mean, var: give both (fixed statistics) or neither (batch statistics)")
    has_xd, batch = xd is not None, mean is None
    if has_xd:
        xd = _act(xd, "xd", x)
    T, N, C, S = x.shape
    w_, b_, wd_, bd_ = (_chan_arg(v, n, x) for v, n in ((w, "w"), (b, "b"), (wd, "wd"), (bd, "bd")))
    mu_, var_ = _chan_arg(mean, "mean", x), _chan_arg(var, "var", x)
    write_zd = has_xd or wd is not None or bd is not None
    z, xhat = torch.empty_like(x), torch.empty_like(x)
    zd = torch.empty_like(x) if write_zd else _empty(x)
    xhd = torch.empty_like(x) if has_xd else _empty(x)
    a = x.new_empty(T, C) if has_xd and batch else _empty(x)
    r = x.new_empty(T if batch else 1, C)
    if x.numel():
        grid, cfg = _launch(x)
        _value_tangent_fwd_kernel[grid](
            x, xd if has_xd else x, z, zd, xhat, xhd, a, r, w_[0], b_[0], wd_[0], bd_[0], mu_[0], var_[0], N, C, S,
            *_eps_split(eps), *w_[1:], *b_[1:], *wd_[1:], *bd_[1:], *mu_[1:], *var_[1:], BATCH=batch, HAS_XD=has_xd,
            STATS=has_xd and batch, HAS_W=w is not None, HAS_B=b is not None, HAS_WD=wd is not None,
            HAS_BD=bd is not None, WRITE_ZD=write_zd, **cfg)
    return z, zd, xhat, xhd, a, r


@batchnorm_relu_value_tangent_fwd.register_fake
def _(x, xd, w, b, wd, bd, mean, var, eps):
    T, _, C, _ = x.shape
    has_xd, batch = xd is not None, mean is None
    return (torch.empty_like(x), torch.empty_like(x) if has_xd or wd is not None or bd is not None else _empty(x),
            torch.empty_like(x), torch.empty_like(x) if has_xd else _empty(x),
            x.new_empty(T, C) if has_xd and batch else _empty(x), x.new_empty(T if batch else 1, C))


@torch.library.custom_op("fastmaml_triton::batchnorm_relu_tangent_bwd",
                         mutates_args=("gw_out", "gwd_out", "gb_out", "gbd_out"))
def batchnorm_relu_tangent_bwd(gz: torch.Tensor, gzd: torch.Tensor, z: torch.Tensor, xhat: torch.Tensor,
                               xhd: Optional[torch.Tensor], a: Optional[torch.Tensor], r: torch.Tensor,
                               w: Optional[torch.Tensor], wd: Optional[torch.Tensor], batch: bool, need_x: bool,
                               gw_out: Optional[torch.Tensor], gwd_out: Optional[torch.Tensor],
                               gb_out: Optional[torch.Tensor], gbd_out: Optional[torch.Tensor]
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """With gy = [z > 0] gz, ġy = [z > 0] ġz: writes Σ gy x̂, Σ(ġy x̂ + gy x̂̇), Σ gy, Σ ġy into the given
    `[T, C]` outputs; returns (gx, ġx) `[T, N, C, S]` (empty unless `need_x`)."""
    return launch_tangent_bwd(gz, gzd, z, xhat, xhd, a, r, w, wd, batch, need_x, gw_out, gwd_out, gb_out, gbd_out)


@batchnorm_relu_tangent_bwd.register_fake
def _(gz, gzd, z, xhat, xhd, a, r, w, wd, batch, need_x, gw_out, gwd_out, gb_out, gbd_out):
    return fake_grads(xhat, need_x, 2)
