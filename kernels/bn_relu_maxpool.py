"""BatchNorm (batch statistics) + ReLU + k×k max-pooling at stride k, fused, for all tasks, with or
without the tangent (R-op): the Triton counterpart of csrc/bn_relu_maxpool.cpp, same contract.

    bn_relu_maxpool_fwd(x, xd, w, b, wd, bd, eps, k)  -> (z, ż, idx, μ, r, a, mean ẋ)
    bn_relu_maxpool_bwd(gz, gzd, z, idx, x, xd, μ, r, a, mean ẋ, w, wd, k, need_x) -> (gx, ġx, gw, ġw, gb, ġb)

x `[T, N, C, H, W]` (contiguous); per-channel tensors `[T, C]` (contiguous); pooled tensors
`[T, N, C, H/k, W/k]`; idx are PyTorch's max-pool indices (h·W + w). Without a tangent (xd None) the
outputs ż, a, mean ẋ and ġx, ġw, ġb come back empty. The math is in fastmaml/ops/layers.py.

One program per (task, channel): shifted sums over its N·H·W values (`_moments` of kernels/batchnorm.py), then the
forward walks the pooled outputs in blocks, each lane reading its k×k window (a static loop) and
picking as PyTorch does (first maximum; NaN wins). The backward sums over the picked elements where
z > 0, then writes gx densely: each element loads its window's pick and takes the routed gradient if
it is the pick (a gather: no second write to the same element).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtype, check_device
from .batchnorm import MAX_BLOCK, _chunk, _empty, _eps_split, _moments


@triton.jit
def _fwd_kernel(x_ptr, xd_ptr, w_ptr, b_ptr, wd_ptr, bd_ptr, z_ptr, zd_ptr, idx_ptr, mu_ptr, r_ptr, a_ptr,
                dm_ptr, N, C, H, W, Ho, Wo, eps_hi, eps_lo, K: tl.constexpr, TANGENT: tl.constexpr,
                ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = (pid // C).to(tl.int64)
    c = (pid % C).to(tl.int64)
    S = H * W
    base = t * N * C * S + c * S
    mean, var, dm, cov = _moments(x_ptr, xd_ptr, base, N, C, S, TANGENT, ACC, BLOCK)
    r = 1.0 / tl.sqrt((var + eps_hi) + eps_lo)
    tl.store(mu_ptr + t * C + c, mean.to(mu_ptr.dtype.element_ty))
    tl.store(r_ptr + t * C + c, r.to(r_ptr.dtype.element_ty))
    a = cov * r
    wd = 0.0
    bd = 0.0
    if TANGENT:
        tl.store(a_ptr + t * C + c, a.to(a_ptr.dtype.element_ty))
        tl.store(dm_ptr + t * C + c, dm.to(dm_ptr.dtype.element_ty))
        wd = tl.load(wd_ptr + t * C + c).to(ACC)
        bd = tl.load(bd_ptr + t * C + c).to(ACC)
    w = tl.load(w_ptr + t * C + c).to(ACC)
    b = tl.load(b_ptr + t * C + c).to(ACC)
    P = Ho * Wo
    out_base = t * N * C * P + c * P
    for start in range(0, N * P, BLOCK):
        o = start + tl.arange(0, BLOCK)
        mask = o < N * P
        n = o // P
        rem = o - n * P
        oh = rem // Wo
        ow = rem - oh * Wo
        plane = base + n.to(tl.int64) * C * S
        best = tl.full([BLOCK], float("-inf"), x_ptr.dtype.element_ty)
        where = tl.zeros([BLOCK], tl.int64)
        best_d = tl.zeros([BLOCK], ACC)
        for dh in tl.static_range(K):
            for dw in tl.static_range(K):
                e = ((oh * K + dh) * W + ow * K + dw).to(tl.int64)
                xv = tl.load(x_ptr + plane + e, mask=mask, other=0).to(ACC)
                xh = (xv - mean) * r
                y = (xh * w + b).to(x_ptr.dtype.element_ty)  # compared in x's type, as the reference
                v = tl.where((y > 0) | (y != y), y, 0.0)
                take = (v > best) | (v != v)
                best = tl.where(take, v, best)
                where = tl.where(take, e, where)
                if TANGENT:
                    xdv = tl.load(xd_ptr + plane + e, mask=mask, other=0).to(ACC)
                    yd = (xdv - dm - xh * a) * r * w + xh * wd + bd
                    best_d = tl.where(take, yd, best_d)
        out = out_base + n.to(tl.int64) * C * P + rem
        tl.store(z_ptr + out, best, mask=mask)
        tl.store(idx_ptr + out, where, mask=mask)
        if TANGENT:
            tl.store(zd_ptr + out, tl.where(best > 0, best_d, 0.0).to(zd_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(gz_ptr, gzd_ptr, z_ptr, idx_ptr, x_ptr, xd_ptr, mu_ptr, r_ptr, a_ptr, dm_ptr, w_ptr, wd_ptr,
                gx_ptr, gxd_ptr, gw_ptr, gwd_ptr, gb_ptr, gbd_ptr, N, C, H, W, Ho, Wo, K: tl.constexpr,
                TANGENT: tl.constexpr, NEED_X: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = (pid // C).to(tl.int64)
    c = (pid % C).to(tl.int64)
    S = H * W
    P = Ho * Wo
    base = t * N * C * S + c * S
    out_base = t * N * C * P + c * P
    mean = tl.load(mu_ptr + t * C + c).to(ACC)
    r = tl.load(r_ptr + t * C + c).to(ACC)
    w = tl.load(w_ptr + t * C + c).to(ACC)
    a = 0.0
    dm = 0.0
    wd = 0.0
    if TANGENT:
        a = tl.load(a_ptr + t * C + c).to(ACC)
        dm = tl.load(dm_ptr + t * C + c).to(ACC)
        wd = tl.load(wd_ptr + t * C + c).to(ACC)
    # sums over the picked elements where z > 0: gy, gy x̂, ġy, ġy x̂, gy x̂̇
    s_g = tl.zeros([BLOCK], ACC)
    s_gx = tl.zeros([BLOCK], ACC)
    s_d = tl.zeros([BLOCK], ACC)
    s_dx = tl.zeros([BLOCK], ACC)
    s_gxd = tl.zeros([BLOCK], ACC)
    for start in range(0, N * P, BLOCK):
        o = start + tl.arange(0, BLOCK)
        mask = o < N * P
        n = o // P
        out = out_base + n.to(tl.int64) * C * P + (o - n * P)
        on = tl.load(z_ptr + out, mask=mask, other=0) > 0
        g = tl.where(on, tl.load(gz_ptr + out, mask=mask, other=0).to(ACC), 0.0)
        e = base + n.to(tl.int64) * C * S + tl.load(idx_ptr + out, mask=mask, other=0)
        xh = (tl.load(x_ptr + e, mask=mask, other=0).to(ACC) - mean) * r
        s_g += g
        s_gx += g * xh
        if TANGENT:
            gd = tl.where(on, tl.load(gzd_ptr + out, mask=mask, other=0).to(ACC), 0.0)
            xhd = (tl.load(xd_ptr + e, mask=mask, other=0).to(ACC) - dm - xh * a) * r
            s_d += gd
            s_dx += gd * xh
            s_gxd += g * xhd
    sg = tl.sum(s_g, axis=0)
    sgx = tl.sum(s_gx, axis=0)
    tl.store(gb_ptr + t * C + c, sg.to(gb_ptr.dtype.element_ty))
    tl.store(gw_ptr + t * C + c, sgx.to(gw_ptr.dtype.element_ty))
    sd = 0.0
    sdx = 0.0
    sgxd = 0.0
    if TANGENT:
        sd = tl.sum(s_d, axis=0)
        sdx = tl.sum(s_dx, axis=0)
        sgxd = tl.sum(s_gxd, axis=0)
        tl.store(gbd_ptr + t * C + c, sd.to(gbd_ptr.dtype.element_ty))
        tl.store(gwd_ptr + t * C + c, (sdx + sgxd).to(gwd_ptr.dtype.element_ty))
    if NEED_X:
        m = N * S
        m1 = w * sg / m
        m2 = w * sgx / m
        n1 = (w * sd + wd * sg) / m
        n3 = (w * sgxd + w * sdx + wd * sgx) / m
        for start in range(0, N * S, BLOCK):
            offs, mask = _chunk(start, base, N, C, S, BLOCK)
            i = start + tl.arange(0, BLOCK)
            n = i // S
            s = i - n * S
            h = s // W
            oh = h // K
            ow = (s - h * W) // K
            inside = mask & (oh < Ho) & (ow < Wo)
            out = out_base + n.to(tl.int64) * C * P + oh * Wo + ow
            picked = (tl.load(idx_ptr + out, mask=inside, other=-1) == s) & \
                (tl.load(z_ptr + out, mask=inside, other=0) > 0)
            g = tl.where(picked, tl.load(gz_ptr + out, mask=inside, other=0).to(ACC), 0.0)
            xh = (tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) - mean) * r
            gx = r * (w * g - m1 - xh * m2)
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            if TANGENT:
                gd = tl.where(picked, tl.load(gzd_ptr + out, mask=inside, other=0).to(ACC), 0.0)
                xhd = (tl.load(xd_ptr + offs, mask=mask, other=0).to(ACC) - dm - xh * a) * r
                gxd = -r * a * gx + r * (w * gd + wd * g - n1 - xhd * m2 - xh * n3)
                tl.store(gxd_ptr + offs, gxd.to(gxd_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launches


def _check(x: torch.Tensor, name: str, shape=None, dtype=None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(x).__name__}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype}, got {x.dtype}")
    check_device(x, name)
    return x.contiguous()


def _config(x: torch.Tensor) -> dict:
    T, N, C, H, W = x.shape
    return dict(ACC=acc_dtype(x.dtype), BLOCK=min(max(triton.next_power_of_2(N * H * W), 16), MAX_BLOCK))


def launch_fwd(x, xd, w, b, wd, bd, eps: float, k: int):
    if x.dim() != 5:
        raise ValueError(f"x: expected activations [T, N, C, H, W], got shape {tuple(x.shape)}")
    x = _check(x, "x")
    T, N, C, H, W = x.shape
    if not 1 <= k <= min(H, W):
        raise ValueError(f"k: expected a pooling window 1 <= k <= min(H, W) = {min(H, W)}, got {k}")
    chan = dict(shape=(T, C), dtype=x.dtype)
    w, b = _check(w, "w", **chan), _check(b, "b", **chan)
    tangent = xd is not None
    if tangent:
        xd = _check(xd, "xd", x.shape, x.dtype)
        wd, bd = _check(wd, "wd", **chan), _check(bd, "bd", **chan)
    Ho, Wo = H // k, W // k
    z = x.new_empty(T, N, C, Ho, Wo)
    idx = torch.empty(T, N, C, Ho, Wo, dtype=torch.int64, device=x.device)
    zd = torch.empty_like(z) if tangent else _empty(x)
    mean, r = x.new_empty(T, C), x.new_empty(T, C)
    a, dmean = (x.new_empty(T, C), x.new_empty(T, C)) if tangent else (_empty(x), _empty(x))
    if z.numel():
        _fwd_kernel[(T * C,)](x, xd if tangent else x, w, b, wd if tangent else w, bd if tangent else b, z, zd, idx,
                              mean, r, a, dmean, N, C, H, W, Ho, Wo, *_eps_split(eps), K=k, TANGENT=tangent,
                              **_config(x))
    return z, zd, idx, mean, r, a, dmean


def launch_bwd(gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd, k: int, need_x: bool):
    if x.dim() != 5:
        raise ValueError(f"x: expected activations [T, N, C, H, W], got shape {tuple(x.shape)}")
    x = _check(x, "x")
    T, N, C, H, W = x.shape
    pooled = dict(shape=z.shape, dtype=x.dtype)
    gz, z = _check(gz, "gz", **pooled), _check(z, "z", **pooled)
    idx = _check(idx, "idx", z.shape, torch.int64)
    chan = dict(shape=(T, C), dtype=x.dtype)
    mean, r, w = _check(mean, "mean", **chan), _check(r, "r", **chan), _check(w, "w", **chan)
    tangent = xd is not None
    if tangent:
        gzd = _check(gzd, "gzd", **pooled)
        xd = _check(xd, "xd", x.shape, x.dtype)
        a, dmean, wd = _check(a, "a", **chan), _check(dmean, "dmean", **chan), _check(wd, "wd", **chan)
    gx = torch.empty_like(x) if need_x else _empty(x)
    gxd = torch.empty_like(x) if need_x and tangent else _empty(x)
    gw, gb = x.new_empty(T, C), x.new_empty(T, C)
    gwd, gbd = (x.new_empty(T, C), x.new_empty(T, C)) if tangent else (_empty(x), _empty(x))
    if T * C:
        _bwd_kernel[(T * C,)](gz, gzd if tangent else gz, z, idx, x, xd if tangent else x, mean, r,
                              a if tangent else r, dmean if tangent else r, w, wd if tangent else w, gx, gxd, gw, gwd,
                              gb, gbd, N, C, H, W, z.shape[3], z.shape[4], K=k, TANGENT=tangent, NEED_X=need_x,
                              **_config(x))
    return gx, gxd, gw, gwd, gb, gbd


# ---------------------------------------------------------------- ops


@torch.library.custom_op("fastmaml_triton::bn_relu_maxpool_fwd", mutates_args=())
def bn_relu_maxpool_fwd(x: torch.Tensor, xd: Optional[torch.Tensor], w: torch.Tensor, b: torch.Tensor,
                        wd: Optional[torch.Tensor], bd: Optional[torch.Tensor], eps: float, k: int
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor, torch.Tensor]:
    """x `[T, N, C, H, W]`, w, b (and with the tangent xd like x, wd, bd) `[T, C]` -> (z, ż, idx, mean, r,
    a, mean ẋ); ż, a, mean ẋ empty without the tangent."""
    return launch_fwd(x, xd, w, b, wd, bd, eps, k)


@bn_relu_maxpool_fwd.register_fake
def _(x, xd, w, b, wd, bd, eps, k):
    T, N, C, H, W = x.shape
    z = x.new_empty(T, N, C, H // k, W // k)
    stats = (x.new_empty(T, C), x.new_empty(T, C)) if xd is not None else (_empty(x), _empty(x))
    return (z, torch.empty_like(z) if xd is not None else _empty(x), torch.empty_like(z, dtype=torch.int64),
            x.new_empty(T, C), x.new_empty(T, C), *stats)


@torch.library.custom_op("fastmaml_triton::bn_relu_maxpool_bwd", mutates_args=())
def bn_relu_maxpool_bwd(gz: torch.Tensor, gzd: Optional[torch.Tensor], z: torch.Tensor, idx: torch.Tensor,
                        x: torch.Tensor, xd: Optional[torch.Tensor], mean: torch.Tensor, r: torch.Tensor,
                        a: Optional[torch.Tensor], dmean: Optional[torch.Tensor], w: torch.Tensor,
                        wd: Optional[torch.Tensor], k: int, need_x: bool
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                   torch.Tensor]:
    """-> (gx, ġx `[T, N, C, H, W]` (empty unless `need_x`; ġx also without the tangent), gw, ġw, gb, ġb
    `[T, C]` (ġw, ġb empty without the tangent))."""
    return launch_bwd(gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd, k, need_x)


@bn_relu_maxpool_bwd.register_fake
def _(gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd, k, need_x):
    T, C = x.shape[0], x.shape[2]
    tangent = xd is not None
    return (torch.empty_like(x) if need_x else _empty(x), torch.empty_like(x) if need_x and tangent else _empty(x),
            x.new_empty(T, C), x.new_empty(T, C) if tangent else _empty(x), x.new_empty(T, C),
            x.new_empty(T, C) if tangent else _empty(x))
