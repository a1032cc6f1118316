"""BatchNorm for all tasks, on batch statistics or on fixed statistics: forward, backward, tangent
forward (R-op) and tangent backward, one program per (task, channel) looping over its m = N·S values.

    batchnorm_fwd(x, w, b, mean, var, eps, save_xhat)       -> (y, x̂, μ [T, C], r)
    batchnorm_bwd(gy, xin, mean, r, w, batch, need_x, gw_out, gb_out)              -> gx
    batchnorm_tangent_fwd(xd, x̂, r, w, wd, bd, batch)      -> (ẏ, x̂̇, a [T, C])
    batchnorm_tangent_bwd(gy, gyd, x̂, x̂̇, a, r, w, wd, batch, need_x, gw_out, gwd_out, gb_out, gbd_out)
                                                            -> (gx, ġx)

Activations `[T, N, C, S]`; a per-channel tensor (w, b, directions, statistics, r, a) is `[C]`,
`[T|1, C]` or `[T|1, 1, C, 1]` with any strides (row stride 0 when common to all tasks). Gradients
`[T, C]` are written into the given output views (any strides). Outputs that do not apply come back
as empty tensors. The math and the torch references are in `fastmaml/ops/layers.py`
(x̂ = (x − μ) r, r = 1/sqrt(var + eps); statistics per task and channel over (N, S)).

Reductions: each program sums over its channel in blocks of BLOCK lanes (per-lane partial sums,
reduced once at the end), then a second pass writes the elementwise outputs. Batch statistics use
sums shifted by the channel's first value (`_moments`: one pass, no cancellation for large means).

The forward, backward and tangent backward kernels take a RELU flag for BatchNorm followed by ReLU
(kernels/batchnorm_relu.py, which launches them through `launch_fwd`, `launch_bwd`,
`launch_tangent_bwd`): the forward stores max(y, 0), the backwards mask the incoming gradients by z > 0.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED, acc_dtype, check_device

MAX_BLOCK = 1024


@triton.jit
def _chunk(start, base, N, C, S, BLOCK: tl.constexpr):
    """Offsets and mask of values start..start+BLOCK of a (task, channel) whose first value is at base."""
    i = start + tl.arange(0, BLOCK)
    n = i // S
    return base + (n.to(tl.int64) * C) * S + (i - n * S), i < N * S


@triton.jit
def _moments(x_ptr, xd_ptr, base, N, C, S, TANGENT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(mean, biased variance) of the (task, channel) whose first value is at base, from sums shifted by
    that value (one pass, no cancellation for large means); with TANGENT also (mean ẋ, mean((x − mean) ẋ)),
    else zeros."""
    shift = tl.load(x_ptr + base).to(ACC)
    s1 = tl.zeros([BLOCK], ACC)     # Σ d, d = x − shift
    s2 = tl.zeros([BLOCK], ACC)     # Σ d²
    s_xd = tl.zeros([BLOCK], ACC)   # Σ ẋ
    s_dxd = tl.zeros([BLOCK], ACC)  # Σ d ẋ
    for start in range(0, N * S, BLOCK):
        offs, mask = _chunk(start, base, N, C, S, BLOCK)
        d = tl.where(mask, tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) - shift, 0.0)
        s1 += d
        s2 += d * d
        if TANGENT:
            xd = tl.load(xd_ptr + offs, mask=mask, other=0).to(ACC)
            s_xd += xd
            s_dxd += d * xd
    m1 = tl.sum(s1, axis=0) / (N * S)
    var = tl.maximum(tl.sum(s2, axis=0) / (N * S) - m1 * m1, 0.0)
    mean_xd = tl.sum(s_xd, axis=0) / (N * S)
    return shift + m1, var, mean_xd, tl.sum(s_dxd, axis=0) / (N * S) - m1 * mean_xd


@triton.jit
def _grad(g_ptr, z_ptr, offs, mask, RELU: tl.constexpr, ACC: tl.constexpr):
    """A block of a gradient w.r.t. the output; with RELU, the gradient w.r.t. the ReLU output z masked
    by z > 0 (the gradient w.r.t. BatchNorm's output)."""
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(ACC)
    if RELU:
        g = tl.where(tl.load(z_ptr + offs, mask=mask, other=0) > 0, g, 0.0)
    return g


@triton.jit
def _fwd_kernel(x_ptr, y_ptr, xh_ptr, mu_out_ptr, r_out_ptr, w_ptr, b_ptr, mu_ptr, var_ptr,
                N, C, S, eps_hi, eps_lo, w_st, w_sc, b_st, b_sc, mu_st, mu_sc, var_st, var_sc,
                BATCH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, SAVE_XHAT: tl.constexpr,
                RELU: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = (pid // C).to(tl.int64)
    c = (pid % C).to(tl.int64)
    base = t * N * C * S + c * S
    if BATCH:
        mean, var, _, _ = _moments(x_ptr, x_ptr, base, N, C, S, False, ACC, BLOCK)
    else:
        mean = tl.load(mu_ptr + t * mu_st + c * mu_sc).to(ACC)
        var = tl.load(var_ptr + t * var_st + c * var_sc).to(ACC)
    r = 1.0 / tl.sqrt((var + eps_hi) + eps_lo)  # eps in two float32 halves: exact enough for float64
    if BATCH:
        tl.store(mu_out_ptr + t * C + c, mean.to(mu_out_ptr.dtype.element_ty))
        tl.store(r_out_ptr + t * C + c, r.to(r_out_ptr.dtype.element_ty))
    else:  # fixed statistics: r `[1, C]`, written by the first task's programs
        tl.store(r_out_ptr + c, r.to(r_out_ptr.dtype.element_ty), mask=t == 0)
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + t * w_st + c * w_sc).to(ACC)
    b = 0.0
    if HAS_B:
        b = tl.load(b_ptr + t * b_st + c * b_sc).to(ACC)
    for start in range(0, N * S, BLOCK):
        offs, mask = _chunk(start, base, N, C, S, BLOCK)
        xh = (tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) - mean) * r
        if SAVE_XHAT:
            tl.store(xh_ptr + offs, xh.to(xh_ptr.dtype.element_ty), mask=mask)
        y = xh * w + b
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(gy_ptr, z_ptr, xin_ptr, mu_ptr, r_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr,
                N, C, S, mu_st, mu_sc, r_st, r_sc, w_st, w_sc, gw_st, gw_sc, gb_st, gb_sc,
                FROM_X: tl.constexpr, BATCH: tl.constexpr, HAS_W: tl.constexpr, NEED_X: tl.constexpr,
                HAS_GW: tl.constexpr, HAS_GB: tl.constexpr, REDUCE: tl.constexpr, RELU: tl.constexpr,
                ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = (pid // C).to(tl.int64)
    c = (pid % C).to(tl.int64)
    base = t * N * C * S + c * S
    r = tl.load(r_ptr + t * r_st + c * r_sc).to(ACC)
    mean = 0.0
    if FROM_X:
        mean = tl.load(mu_ptr + t * mu_st + c * mu_sc).to(ACC)
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + t * w_st + c * w_sc).to(ACC)
    if REDUCE:
        s_gy = tl.zeros([BLOCK], ACC)
        s_gyx = tl.zeros([BLOCK], ACC)
        for start in range(0, N * S, BLOCK):
            offs, mask = _chunk(start, base, N, C, S, BLOCK)
            gy = _grad(gy_ptr, z_ptr, offs, mask, RELU, ACC)
            xh = tl.load(xin_ptr + offs, mask=mask, other=0).to(ACC)
            if FROM_X:
                xh = tl.where(mask, (xh - mean) * r, 0.0)
            s_gy += gy
            s_gyx += gy * xh
        sum_gy = tl.sum(s_gy, axis=0)
        sum_gyx = tl.sum(s_gyx, axis=0)
        if HAS_GW:
            tl.store(gw_ptr + t * gw_st + c * gw_sc, sum_gyx.to(gw_ptr.dtype.element_ty))
        if HAS_GB:
            tl.store(gb_ptr + t * gb_st + c * gb_sc, sum_gy.to(gb_ptr.dtype.element_ty))
    if NEED_X:
        if BATCH:  # means over the channel of gx̂ = gy w and of x̂ gx̂
            m1 = w * sum_gy / (N * S)
            m2 = w * sum_gyx / (N * S)
        for start in range(0, N * S, BLOCK):
            offs, mask = _chunk(start, base, N, C, S, BLOCK)
            gxh = _grad(gy_ptr, z_ptr, offs, mask, RELU, ACC) * w
            if BATCH:
                xh = tl.load(xin_ptr + offs, mask=mask, other=0).to(ACC)
                if FROM_X:
                    xh = (xh - mean) * r
                gxh = gxh - m1 - xh * m2
            tl.store(gx_ptr + offs, (gxh * r).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tangent_block(xh, xd_ptr, xhd_ptr, offs, mask, mean_xd, a, r, w, wd, bd, HAS_XD: tl.constexpr,
                   BATCH: tl.constexpr, HAS_WD: tl.constexpr, HAS_BD: tl.constexpr, ACC: tl.constexpr,
                   BLOCK: tl.constexpr):
    """ẏ = x̂̇ w + x̂ ẇ + ḃ of one block, storing x̂̇ = (ẋ − mean ẋ − x̂ a) r (batch statistics) or ẋ r."""
    if HAS_XD:
        xd = tl.load(xd_ptr + offs, mask=mask, other=0).to(ACC)
        if BATCH:
            xhd = (xd - mean_xd - xh * a) * r
        else:
            xhd = xd * r
        tl.store(xhd_ptr + offs, xhd.to(xhd_ptr.dtype.element_ty), mask=mask)
        yd = xhd * w
    else:
        yd = tl.zeros([BLOCK], ACC)
    if HAS_WD:
        yd += xh * wd
    if HAS_BD:
        yd += bd
    return yd


@triton.jit
def _tangent_fwd_kernel(xd_ptr, xh_ptr, r_ptr, w_ptr, wd_ptr, bd_ptr, yd_ptr, xhd_ptr, a_ptr,
                        N, C, S, r_st, r_sc, w_st, w_sc, wd_st, wd_sc, bd_st, bd_sc,
                        HAS_XD: tl.constexpr, BATCH: tl.constexpr, HAS_W: tl.constexpr, HAS_WD: tl.constexpr,
                        HAS_BD: tl.constexpr, WRITE_YD: tl.constexpr, STATS: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = (pid // C).to(tl.int64)
    c = (pid % C).to(tl.int64)
    base = t * N * C * S + c * S
    r = tl.load(r_ptr + t * r_st + c * r_sc).to(ACC)
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + t * w_st + c * w_sc).to(ACC)
    wd = 0.0
    if HAS_WD:
        wd = tl.load(wd_ptr + t * wd_st + c * wd_sc).to(ACC)
    bd = 0.0
    if HAS_BD:
        bd = tl.load(bd_ptr + t * bd_st + c * bd_sc).to(ACC)
    mean_xd = 0.0
    a = 0.0
    if STATS:
        s_xd = tl.zeros([BLOCK], ACC)
        s_xxd = tl.zeros([BLOCK], ACC)
        for start in range(0, N * S, BLOCK):
            offs, mask = _chunk(start, base, N, C, S, BLOCK)
            xd = tl.load(xd_ptr + offs, mask=mask, other=0).to(ACC)
            s_xd += xd
            s_xxd += xd * tl.load(xh_ptr + offs, mask=mask, other=0).to(ACC)
        mean_xd = tl.sum(s_xd, axis=0) / (N * S)
        a = tl.sum(s_xxd, axis=0) / (N * S)
        tl.store(a_ptr + t * C + c, a.to(a_ptr.dtype.element_ty))
    for start in range(0, N * S, BLOCK):
        offs, mask = _chunk(start, base, N, C, S, BLOCK)
        xh = tl.load(xh_ptr + offs, mask=mask, other=0).to(ACC)
        yd = _tangent_block(xh, xd_ptr, xhd_ptr, offs, mask, mean_xd, a, r, w, wd, bd, HAS_XD, BATCH, HAS_WD, HAS_BD,
                            ACC, BLOCK)
        if WRITE_YD:
            tl.store(yd_ptr + offs, yd.to(yd_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tangent_bwd_kernel(gy_ptr, gyd_ptr, z_ptr, xh_ptr, xhd_ptr, a_ptr, r_ptr, w_ptr, wd_ptr, gx_ptr, gxd_ptr,
                        gw_ptr, gwd_ptr, gb_ptr, gbd_ptr, N, C, S, a_st, a_sc, r_st, r_sc, w_st, w_sc,
                        wd_st, wd_sc, gw_st, gw_sc, gwd_st, gwd_sc, gb_st, gb_sc, gbd_st, gbd_sc,
                        HAS_XHD: tl.constexpr, HAS_A: tl.constexpr, BATCH: tl.constexpr, HAS_W: tl.constexpr,
                        HAS_WD: tl.constexpr, NEED_X: tl.constexpr, HAS_GW: tl.constexpr, HAS_GWD: tl.constexpr,
                        HAS_GB: tl.constexpr, HAS_GBD: tl.constexpr, REDUCE: tl.constexpr, RELU: tl.constexpr,
                        ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = (pid // C).to(tl.int64)
    c = (pid % C).to(tl.int64)
    base = t * N * C * S + c * S
    r = tl.load(r_ptr + t * r_st + c * r_sc).to(ACC)
    w = 1.0
    if HAS_W:
        w = tl.load(w_ptr + t * w_st + c * w_sc).to(ACC)
    wd = 0.0
    if HAS_WD:
        wd = tl.load(wd_ptr + t * wd_st + c * wd_sc).to(ACC)
    a = 0.0
    if HAS_A:
        a = tl.load(a_ptr + t * a_st + c * a_sc).to(ACC)
    if REDUCE:
        s_gy = tl.zeros([BLOCK], ACC)      # Σ gy
        s_gyx = tl.zeros([BLOCK], ACC)     # Σ gy x̂
        s_gyd = tl.zeros([BLOCK], ACC)     # Σ ġy
        s_gydx = tl.zeros([BLOCK], ACC)    # Σ ġy x̂
        s_gyxd = tl.zeros([BLOCK], ACC)    # Σ gy x̂̇
        for start in range(0, N * S, BLOCK):
            offs, mask = _chunk(start, base, N, C, S, BLOCK)
            gy = _grad(gy_ptr, z_ptr, offs, mask, RELU, ACC)
            gyd = _grad(gyd_ptr, z_ptr, offs, mask, RELU, ACC)
            xh = tl.load(xh_ptr + offs, mask=mask, other=0).to(ACC)
            s_gy += gy
            s_gyx += gy * xh
            s_gyd += gyd
            s_gydx += gyd * xh
            if HAS_XHD:
                s_gyxd += gy * tl.load(xhd_ptr + offs, mask=mask, other=0).to(ACC)
        sum_gy = tl.sum(s_gy, axis=0)
        sum_gyx = tl.sum(s_gyx, axis=0)
        sum_gyd = tl.sum(s_gyd, axis=0)
        sum_gydx = tl.sum(s_gydx, axis=0)
        sum_gyxd = tl.sum(s_gyxd, axis=0)
        if HAS_GW:
            tl.store(gw_ptr + t * gw_st + c * gw_sc, sum_gyx.to(gw_ptr.dtype.element_ty))
        if HAS_GWD:
            tl.store(gwd_ptr + t * gwd_st + c * gwd_sc, (sum_gydx + sum_gyxd).to(gwd_ptr.dtype.element_ty))
        if HAS_GB:
            tl.store(gb_ptr + t * gb_st + c * gb_sc, sum_gy.to(gb_ptr.dtype.element_ty))
        if HAS_GBD:
            tl.store(gbd_ptr + t * gbd_st + c * gbd_sc, sum_gyd.to(gbd_ptr.dtype.element_ty))
    if NEED_X:
        if BATCH:  # means over the channel of gx̂ = gy w, x̂ gx̂, ġx̂ = ġy w + gy ẇ, x̂ ġx̂ + x̂̇ gx̂
            m1 = w * sum_gy / (N * S)
            m2 = w * sum_gyx / (N * S)
            m1d = (w * sum_gyd + wd * sum_gy) / (N * S)
            m2d = (w * (sum_gydx + sum_gyxd) + wd * sum_gyx) / (N * S)
        for start in range(0, N * S, BLOCK):
            offs, mask = _chunk(start, base, N, C, S, BLOCK)
            gy = _grad(gy_ptr, z_ptr, offs, mask, RELU, ACC)
            gxh = gy * w
            gxhd = _grad(gyd_ptr, z_ptr, offs, mask, RELU, ACC) * w + gy * wd
            if BATCH:
                xh = tl.load(xh_ptr + offs, mask=mask, other=0).to(ACC)
                gx = (gxh - m1 - xh * m2) * r
                inner = gxhd - m1d - xh * m2d
                if HAS_XHD:
                    inner = inner - tl.load(xhd_ptr + offs, mask=mask, other=0).to(ACC) * m2
                gxd = inner * r - gx * (r * a)
            else:
                gx = gxh * r
                gxd = gxhd * r
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            tl.store(gxd_ptr + offs, gxd.to(gxd_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launch helpers

Channel = Tuple[torch.Tensor, int, int]


def _act(t: torch.Tensor, name: str, ref: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A `[T, N, C, S]` activation (like `ref`), made contiguous."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if ref is None:
        if t.dim() != 4 or t.dtype not in SUPPORTED:
            raise ValueError(f"{name}: expected a floating-point [T, N, C, S] tensor, got {t.dtype} {tuple(t.shape)}")
        check_device(t, name)
    elif t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name}: expected {ref.dtype} {tuple(ref.shape)} on {ref.device}, got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")
    return t.contiguous()


def _chan_arg(v: Optional[torch.Tensor], name: str, x: torch.Tensor) -> Channel:
    """A per-channel tensor `[C]`, `[T|1, C]` or `[T|1, 1, C, 1]` -> (tensor, task stride, channel stride);
    None -> (x, 0, 0) (a placeholder the kernel does not read)."""
    if v is None:
        return x, 0, 0
    T, C = x.shape[0], x.shape[2]
    if v.dim() == 4 and v.shape[1] == 1 and v.shape[3] == 1:
        v = v[:, 0, :, 0]
    elif v.dim() == 1:
        v = v[None]
    if v.dim() != 2 or v.shape[1] != C or v.shape[0] not in (1, T):
        raise ValueError(f"{name}: expected a per-channel tensor [{C}], [{T}, {C}] or [{T}, 1, {C}, 1], got shape "
                         f"{tuple(v.shape)}")
    if v.dtype != x.dtype or v.device != x.device:
        raise ValueError(f"{name}: expected {x.dtype} on {x.device}, got {v.dtype} on {v.device}")
    return v, (v.stride(0) if v.shape[0] > 1 else 0), v.stride(1)


def _out_arg(v: Optional[torch.Tensor], name: str, x: torch.Tensor) -> Channel:
    """A gradient output view `[T, C]` (any strides) -> (tensor, strides); None -> placeholder."""
    if v is None:
        return x, 0, 0
    shape = (x.shape[0], x.shape[2])
    if v.shape != shape or v.dtype != x.dtype or v.device != x.device:
        raise ValueError(f"{name}: expected a {x.dtype} output of shape {shape} on {x.device}, got {v.dtype} "
                         f"{tuple(v.shape)} on {v.device}")
    return v, v.stride(0), v.stride(1)


def _launch(x: torch.Tensor) -> Tuple[tuple, dict]:
    """Grid (one program per task and channel) and compile-time sizes for `[T, N, C, S]`."""
    T, N, C, S = x.shape
    block = min(max(triton.next_power_of_2(N * S), 16), MAX_BLOCK)
    return (T * C,), dict(ACC=acc_dtype(x.dtype), BLOCK=block)


def _empty(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0)


# ---------------------------------------------------------------- launches (shared with kernels/batchnorm_relu.py)


def _eps_split(eps: float) -> Tuple[float, float]:
    """eps as two float32 halves (hi, lo), hi + lo exact in float64."""
    hi = float(torch.tensor(eps, dtype=torch.float32))
    return hi, eps - hi


def launch_fwd(x, w, b, mean, var, eps: float, save_xhat: bool, relu: bool):
    """(y, x̂, μ, r) of `batchnorm_fwd`; y = max(x̂ w + b, 0) when `relu`."""
    x = _act(x, "x")
    if (mean is None) != (var is None):
        raise ValueError("mean, var: give both (fixed statistics) or neither (batch statistics)")
    batch = mean is None
    T, N, C, S = x.shape
    w_, b_ = _chan_arg(w, "w", x), _chan_arg(b, "b", x)
    mu_, var_ = _chan_arg(mean, "mean", x), _chan_arg(var, "var", x)
    y = torch.empty_like(x)
    xhat = torch.empty_like(x) if save_xhat else _empty(x)
    mu = x.new_empty(T, C) if batch else _empty(x)
    r = x.new_empty(T if batch else 1, C)
    if x.numel():
        grid, cfg = _launch(x)
        _fwd_kernel[grid](x, y, xhat, mu, r, w_[0], b_[0], mu_[0], var_[0], N, C, S, *_eps_split(eps),
                          *w_[1:], *b_[1:], *mu_[1:], *var_[1:], BATCH=batch, HAS_W=w is not None,
                          HAS_B=b is not None, SAVE_XHAT=save_xhat, RELU=relu, **cfg)
    return y, xhat, mu, r


def fake_fwd(x, mean, save_xhat):
    T, _, C, _ = x.shape
    return (torch.empty_like(x), torch.empty_like(x) if save_xhat else _empty(x),
            x.new_empty(T, C) if mean is None else _empty(x), x.new_empty(T if mean is None else 1, C))


def launch_bwd(gy, z, xin, mean, r, w, batch: bool, need_x: bool, gw_out, gb_out) -> torch.Tensor:
    """gx of `batchnorm_bwd`; with z (the ReLU output), gy is the gradient w.r.t. z, masked by z > 0."""
    xin = _act(xin, "xin")
    gy = _act(gy, "gy", xin)
    if z is not None:
        z = _act(z, "z", xin)
    T, N, C, S = xin.shape
    mu_, r_, w_ = _chan_arg(mean, "mean", xin), _chan_arg(r, "r", xin), _chan_arg(w, "w", xin)
    gw_, gb_ = _out_arg(gw_out, "gw_out", xin), _out_arg(gb_out, "gb_out", xin)
    gx = torch.empty_like(xin) if need_x else _empty(xin)
    reduce = gw_out is not None or gb_out is not None or (batch and need_x)
    if xin.numel():
        grid, cfg = _launch(xin)
        _bwd_kernel[grid](gy, gy if z is None else z, xin, mu_[0], r_[0], w_[0], gx, gw_[0], gb_[0], N, C, S,
                          *mu_[1:], *r_[1:], *w_[1:], *gw_[1:], *gb_[1:], FROM_X=mean is not None, BATCH=batch,
                          HAS_W=w is not None, NEED_X=need_x, HAS_GW=gw_out is not None, HAS_GB=gb_out is not None,
                          REDUCE=reduce, RELU=z is not None, **cfg)
    return gx


def launch_tangent_bwd(gy, gyd, z, xhat, xhd, a, r, w, wd, batch: bool, need_x: bool, gw_out, gwd_out, gb_out,
                       gbd_out) -> Tuple[torch.Tensor, torch.Tensor]:
    """(gx, ġx) of `batchnorm_tangent_bwd`; with z (the ReLU output), gy and ġy are w.r.t. z, masked by z > 0."""
    xhat = _act(xhat, "xhat")
    gy, gyd = _act(gy, "gy", xhat), _act(gyd, "gyd", xhat)
    if z is not None:
        z = _act(z, "z", xhat)
    if xhd is not None:
        xhd = _act(xhd, "xhd", xhat)
    T, N, C, S = xhat.shape
    a_, r_ = _chan_arg(a, "a", xhat), _chan_arg(r, "r", xhat)
    w_, wd_ = _chan_arg(w, "w", xhat), _chan_arg(wd, "wd", xhat)
    named = {"gw_out": gw_out, "gwd_out": gwd_out, "gb_out": gb_out, "gbd_out": gbd_out}
    outs = [_out_arg(o, n, xhat) for n, o in named.items()]
    gx = torch.empty_like(xhat) if need_x else _empty(xhat)
    gxd = torch.empty_like(xhat) if need_x else _empty(xhat)
    reduce = any(o is not None for o in named.values()) or (batch and need_x)
    if xhat.numel():
        grid, cfg = _launch(xhat)
        _tangent_bwd_kernel[grid](
            gy, gyd, xhat if z is None else z, xhat, xhat if xhd is None else xhd, a_[0], r_[0], w_[0], wd_[0], gx,
            gxd, *(o[0] for o in outs), N, C, S, *a_[1:], *r_[1:], *w_[1:], *wd_[1:],
            *(s for o in outs for s in o[1:]), HAS_XHD=xhd is not None, HAS_A=a is not None, BATCH=batch,
            HAS_W=w is not None, HAS_WD=wd is not None, NEED_X=need_x, HAS_GW=gw_out is not None,
            HAS_GWD=gwd_out is not None, HAS_GB=gb_out is not None, HAS_GBD=gbd_out is not None, REDUCE=reduce,
            RELU=z is not None, **cfg)
    return gx, gxd


def fake_grads(xhat, need_x: bool, k: int) -> tuple:
    """k gradients like `xhat` (empty unless `need_x`)."""
    return tuple(torch.empty_like(xhat) if need_x else _empty(xhat) for _ in range(k))


# ---------------------------------------------------------------- ops


@torch.library.custom_op("fastmaml_triton::batchnorm_fwd", mutates_args=())
def batchnorm_fwd(x: torch.Tensor, w: Optional[torch.Tensor], b: Optional[torch.Tensor], mean: Optional[torch.Tensor],
                  var: Optional[torch.Tensor], eps: float, save_xhat: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x `[T, N, C, S]` -> (y = x̂ w + b, x̂ (if `save_xhat`), μ `[T, C]` (batch statistics), r `[T, C]`).

    Batch statistics when `mean`/`var` are None, else fixed statistics (r is then `[1, C]`)."""
    return launch_fwd(x, w, b, mean, var, eps, save_xhat, False)


@batchnorm_fwd.register_fake
def _(x, w, b, mean, var, eps, save_xhat):
    return fake_fwd(x, mean, save_xhat)


@torch.library.custom_op("fastmaml_triton::batchnorm_bwd", mutates_args=("gw_out", "gb_out"))
def batchnorm_bwd(gy: torch.Tensor, xin: torch.Tensor, mean: Optional[torch.Tensor], r: torch.Tensor,
                  w: Optional[torch.Tensor], batch: bool, need_x: bool, gw_out: Optional[torch.Tensor],
                  gb_out: Optional[torch.Tensor]) -> torch.Tensor:
    """gy `[T, N, C, S]`; xin is x̂, or x when `mean` (`[T, C]`, with r) is given. Writes Σ gy x̂ into
    `gw_out`, Σ gy into `gb_out` `[T, C]`; returns gx `[T, N, C, S]` (empty unless `need_x`)."""
    return launch_bwd(gy, None, xin, mean, r, w, batch, need_x, gw_out, gb_out)


@batchnorm_bwd.register_fake
def _(gy, xin, mean, r, w, batch, need_x, gw_out, gb_out):
    return fake_grads(xin, need_x, 1)[0]


def _yd_is_xhd(xd, w, wd, bd) -> bool:
    """ẏ = x̂̇ exactly (no affine part, no direction): then only x̂̇ is written."""
    return xd is not None and w is None and wd is None and bd is None


@torch.library.custom_op("fastmaml_triton::batchnorm_tangent_fwd", mutates_args=())
def batchnorm_tangent_fwd(xd: Optional[torch.Tensor], xhat: torch.Tensor, r: torch.Tensor, w: Optional[torch.Tensor],
                          wd: Optional[torch.Tensor], bd: Optional[torch.Tensor], batch: bool
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ẏ, x̂̇, a `[T, C]`): x̂̇ = P(ẋ) or r ẋ, ẏ = x̂̇ w + x̂ ẇ + ḃ, a = mean(x̂ ẋ) (batch statistics).

    Empty outputs: x̂̇ and a without ẋ, a with fixed statistics, ẏ when it equals x̂̇ (`_yd_is_xhd`)."""
    xhat = _act(xhat, "xhat")
    has_xd = xd is not None
    if has_xd:
        xd = _act(xd, "xd", xhat)
    T, N, C, S = xhat.shape
    r_, w_ = _chan_arg(r, "r", xhat), _chan_arg(w, "w", xhat)
    wd_, bd_ = _chan_arg(wd, "wd", xhat), _chan_arg(bd, "bd", xhat)
    write_yd = not _yd_is_xhd(xd, w, wd, bd)
    yd = torch.empty_like(xhat) if write_yd else _empty(xhat)
    xhd = torch.empty_like(xhat) if has_xd else _empty(xhat)
    a = xhat.new_empty(T, C) if has_xd and batch else _empty(xhat)
    if xhat.numel():
        grid, cfg = _launch(xhat)
        _tangent_fwd_kernel[grid](xd if has_xd else xhat, xhat, r_[0], w_[0], wd_[0], bd_[0], yd, xhd, a, N, C, S,
                                  *r_[1:], *w_[1:], *wd_[1:], *bd_[1:], HAS_XD=has_xd, BATCH=batch,
                                  HAS_W=w is not None, HAS_WD=wd is not None, HAS_BD=bd is not None,
                                  WRITE_YD=write_yd, STATS=has_xd and batch, **cfg)
    return yd, xhd, a


@batchnorm_tangent_fwd.register_fake
def _(xd, xhat, r, w, wd, bd, batch):
    T, _, C, _ = xhat.shape
    has_xd = xd is not None
    return (_empty(xhat) if _yd_is_xhd(xd, w, wd, bd) else torch.empty_like(xhat),
            torch.empty_like(xhat) if has_xd else _empty(xhat),
            xhat.new_empty(T, C) if has_xd and batch else _empty(xhat))


@torch.library.custom_op("fastmaml_triton::batchnorm_tangent_bwd",
                         mutates_args=("gw_out", "gwd_out", "gb_out", "gbd_out"))
def batchnorm_tangent_bwd(gy: torch.Tensor, gyd: torch.Tensor, xhat: torch.Tensor, xhd: Optional[torch.Tensor],
                          a: Optional[torch.Tensor], r: torch.Tensor, w: Optional[torch.Tensor],
                          wd: Optional[torch.Tensor], batch: bool, need_x: bool, gw_out: Optional[torch.Tensor],
                          gwd_out: Optional[torch.Tensor], gb_out: Optional[torch.Tensor],
                          gbd_out: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Writes Σ gy x̂, Σ(ġy x̂ + gy x̂̇), Σ gy, Σ ġy into the given `[T, C]` outputs; returns (gx, ġx)
    `[T, N, C, S]` (empty unless `need_x`)."""
    return launch_tangent_bwd(gy, gyd, None, xhat, xhd, a, r, w, wd, batch, need_x, gw_out, gwd_out, gb_out, gbd_out)


@batchnorm_tangent_bwd.register_fake
def _(gy, gyd, xhat, xhd, a, r, w, wd, batch, need_x, gw_out, gwd_out, gb_out, gbd_out):
    return fake_grads(xhat, need_x, 2)
