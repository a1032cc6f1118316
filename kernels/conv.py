"""Task-batched 2-d convolutions with per-task weights, as implicit GEMMs, and their tangents (R-op):

    conv2d_fwd(x, xd, w, wd, b, bd, y, yd, ...)            y  = conv(x, w) + b
                                                           ẏ  = conv(ẋ, w) + conv(x, ẇ) + ḃ
    conv2d_bwd_input(gy, gyd, w, wd, gx, gxd, ...)         gx = ∂x(gy, w)
                                                           ġx = ∂x(ġy, w) + ∂x(gy, ẇ)
    conv2d_bwd_weight(gy, gyd, x, xd, gw, gwd, gb, gbd, ...)
                                                           gw = ∂w(x, gy),  gb = Σ gy
                                                           ġw = ∂w(x, ġy) + ∂w(ẋ, gy),  ġb = Σ ġy
    conv2d_fwd_bn_stats(x, xd, w, wd, b, bd, y, yd, stats, ..., y_in, ...)
                                                           conv2d_fwd, and the BatchNorm batch statistics of
                                                           y (and ẏ) per task and channel, from its epilogue

x `[T, N, C, H, W]`, gy `[T, N, O, H', W']`, w `[T, O, C, kh, kw]` per task or `[O, C, kh, kw]` common
(read with task stride 0), b `[T, O]` or `[O]`; any strides (weights are views of the flat `[T, P]`
fast weights; gradient outputs are written in place through their strides). Every output is optional
(None: not computed, and the loads only it needs are skipped); None inputs are zero. Each op is one
launch (the weight gradient with split-K: plus one sum of the partial results).

One kernel per pass, each a GEMM whose operand tiles are gathered from the activations (implicit GEMM,
no im2col buffer), with two accumulators that share the tile loads: the tangent's two products read
the same x (gy) and w tiles as the value's product, as in the linear layers' dual GEMM (kernels/linear.py);
a value and its tangent (x and ẋ, w and ẇ, gy and ġy) are read through one set of offsets (same strides
within a task; the launcher copies a pair to contiguous when they differ). Grid: (row blocks × column
blocks, T) and, for the weight gradient, a split axis. Task t's slice of a per-task tensor starts at
t · (its task stride), 0 for a common weight; offsets within a task are int32 (checked on launch).
- forward: rows m = (n, p, q) output positions, columns o, reduction over (i, j, c): filter position
  outer, channel blocks inner, one flat loop of kh·kw·⌈C/BK⌉ steps; a row's input pixel (p·s − pad + i·d,
  ...) is computed once per step for the whole tile and out-of-image rows are masked (zero padding).
  With fewer than 16 channels (first layers: 1 or 3) the reduction index k = (c, i, j) runs flat over
  C·kh·kw instead, decomposed per element (`flat`), so a block is not mostly padding. With BatchNorm
  statistics, the epilogue also writes per channel its tile's mean and Σ (y − tile mean)² (and Σ ẏ,
  Σ (y − tile mean) ẏ) into a `[4, T, row blocks, O]` buffer, combined over the tiles afterwards.
- input gradient: rows m = (n, h, w) input positions, columns c, reduction over (i, j, o); output
  position p = (h + pad − i·d) / s where it divides exactly (stride > 1: the other rows of the step are
  masked, so the work is s² times the useful one; the standard nets use stride 1).
- weight gradient: a program per (o block, c block, filter position (i, j)) and task (`flat`: per
  (o block, block of flat (c, i, j) columns)), reduction over r = (n, p, q); split-K over r (grid axis
  2) into a float32 workspace summed afterwards, so that layers with few weight tiles and many positions
  (the 84×84 layers) fill the GPU (about 4 programs per SM). The bias gradients are row sums of the gy
  tiles, stored by the programs of the first column block and filter position.

Block sizes (`blocks`): chosen by compiling for sm_90 (ptxas -v, no GPU run) so that no configuration
spills registers much; not tuned by measurement. Integer arguments are not specialized (`_jit`), so a
network compiles a handful of kernels, not one per layer shape.

Precision: float32 on `tl.dot` in IEEE FP32 (`tf32=False`) or TF32 (`tf32=True`); bfloat16/float16 tiles
go to `tl.dot` as they are (tensor cores) with float32 accumulation; float64 a broadcast multiply-sum
(fp64 `tl.dot` is not available everywhere). Under the interpreter half tiles are upcast to float32
before `tl.dot` (its bf16 dot is wrong; products of bf16 numbers are exact in fp32, so the result is
the same up to summation order).
"""

from __future__ import annotations

import inspect
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._common import SUPPORTED, acc_dtype, check_device

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


def _jit(fn):
    """`triton.jit` with no specialization on the integer arguments (sizes, geometry, strides): one
    compiled kernel per combination of constexpr flags and blocks, whatever the layer (Triton would
    otherwise compile a variant per divisibility by 16 and per value 1 of each of them; the operand loads
    are gathers, which gain little from it)."""
    params = inspect.signature(fn).parameters
    ints = [n for n, q in params.items() if not n.endswith("_ptr") and "constexpr" not in str(q.annotation)]
    return triton.jit(fn, do_not_specialize=ints)


@triton.jit
def _mma(acc, a, b, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b for tiles a `[BM, BK]`, b `[BK, BN]`."""
    if USE_DOT:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    else:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return acc


@triton.jit
def _tile(v, CAST: tl.constexpr, ACC: tl.constexpr):
    """A loaded tile as `tl.dot` takes it: upcast to ACC where CAST (float64, or half types under the
    interpreter), else in its own type (float32; half types on tensor cores)."""
    if CAST:
        v = v.to(ACC)
    return v


# ---------------------------------------------------------------- forward: y, ẏ


# fmt: off
@_jit
def _fwd_kernel(x_ptr, xd_ptr, w_ptr, wd_ptr, b_ptr, bd_ptr, y_ptr, yd_ptr, st_ptr,
                N, C, H, W, OC, HO, WO, KW, KK, SH, SW, PH, PW, DH, DW,
                sx_t, sxd_t, sx_n, sx_c, sx_h, sx_w,              # x and ẋ share their strides within a task
                sw_t, swd_t, sw_o, sw_c, sw_i, sw_j,              # w and ẇ likewise
                sb_t, sb_o, sbd_t, sbd_o,
                sy_t, sy_n, sy_o, sy_h, sy_w, syd_t, syd_n, syd_o, syd_h, syd_w,
                sst_q, sst_t, sst_b,                              # partial statistics [Q, T, row blocks, OC]
                Y_ON: tl.constexpr, YD_ON: tl.constexpr, HAS_XD: tl.constexpr, HAS_WD: tl.constexpr,
                HAS_B: tl.constexpr, HAS_BD: tl.constexpr, LOAD_X: tl.constexpr, LOAD_W: tl.constexpr,
                STATS: tl.constexpr, TSTATS: tl.constexpr, Y_IN: tl.constexpr,
                FLAT: tl.constexpr, USE_DOT: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr,
                ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    col_blocks = tl.cdiv(OC, BN)
    pid_m = pid // col_blocks
    pid_n = pid % col_blocks
    rm = pid_m * BM + tl.arange(0, BM)  # output positions (n, p, q)
    rn = pid_n * BN + tl.arange(0, BN)  # output channels
    mm = rm < N * HO * WO
    mn = rn < OC
    n = rm // (HO * WO)
    pq = rm % (HO * WO)
    p = pq // WO
    q = pq % WO
    h0 = p * SH - PH
    w0 = q * SW - PW
    x_row = n * sx_n
    acc = tl.zeros((BM, BN), dtype=ACC)
    accd = tl.zeros((BM, BN), dtype=ACC)
    if FLAT:  # reduction index k = (c, i, j), decomposed per element: C·kh·kw in BK steps
        steps = tl.cdiv(C * KK, BK)
    else:  # filter position outer, channel blocks inner
        c_blocks = tl.cdiv(C, BK)
        steps = KK * c_blocks
    for step in range(0, steps):
        if FLAT:
            rk = step * BK + tl.arange(0, BK)
            mk = rk < C * KK
            c = rk // KK
            ij = rk % KK
            i = ij // KW
            j = ij % KW
            h = h0[:, None] + (i * DH)[None, :]
            w = w0[:, None] + (j * DW)[None, :]
            a_off = x_row[:, None] + (c * sx_c)[None, :] + h * sx_h + w * sx_w
            a_mask = mm[:, None] & mk[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b_off = (c * sw_c + i * sw_i + j * sw_j)[:, None] + (rn * sw_o)[None, :]
        else:
            ij = step // c_blocks
            i = ij // KW
            j = ij % KW
            rk = (step % c_blocks) * BK + tl.arange(0, BK)
            mk = rk < C
            h = h0 + i * DH
            w = w0 + j * DW
            ok = mm & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_off = (x_row + h * sx_h + w * sx_w)[:, None] + (rk * sx_c)[None, :]
            a_mask = ok[:, None] & mk[None, :]
            b_off = (i * sw_i + j * sw_j + rk * sw_c)[:, None] + (rn * sw_o)[None, :]
        b_mask = mk[:, None] & mn[None, :]
        if LOAD_X:
            a = _tile(tl.load(x_ptr + t * sx_t + a_off, mask=a_mask, other=0), CAST, ACC)
        if LOAD_W:
            bt = _tile(tl.load(w_ptr + t * sw_t + b_off, mask=b_mask, other=0), CAST, ACC)
        if Y_ON:
            acc = _mma(acc, a, bt, USE_DOT, PREC)
        if YD_ON:
            if HAS_XD:
                ad = _tile(tl.load(xd_ptr + t * sxd_t + a_off, mask=a_mask, other=0), CAST, ACC)
                accd = _mma(accd, ad, bt, USE_DOT, PREC)
            if HAS_WD:
                bd = _tile(tl.load(wd_ptr + t * swd_t + b_off, mask=b_mask, other=0), CAST, ACC)
                accd = _mma(accd, a, bd, USE_DOT, PREC)
    out_mask = mm[:, None] & mn[None, :]
    y_off = (n * sy_n + p * sy_h + q * sy_w)[:, None] + (rn * sy_o)[None, :]
    if Y_ON:
        if HAS_B:
            acc += tl.load(b_ptr + t * sb_t + rn * sb_o, mask=mn, other=0).to(ACC)[None, :]
        tl.store(y_ptr + t * sy_t + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    if YD_ON:
        if HAS_BD:
            accd += tl.load(bd_ptr + t * sbd_t + rn * sbd_o, mask=mn, other=0).to(ACC)[None, :]
        off = (n * syd_n + p * syd_h + q * syd_w)[:, None] + (rn * syd_o)[None, :]
        tl.store(yd_ptr + t * syd_t + off, accd.to(yd_ptr.dtype.element_ty), mask=out_mask)
    if STATS or TSTATS:
        # BatchNorm statistics of this tile's rows, per channel, of y (and ẏ) as stored: the tile mean and
        # Σ (y − tile mean)² (and Σ ẏ, Σ (y − tile mean) ẏ), combined over row blocks afterwards
        if Y_IN:  # y given (not computed here): read back
            v = tl.load(y_ptr + t * sy_t + y_off, mask=out_mask, other=0).to(ACC)
        else:
            v = acc.to(y_ptr.dtype.element_ty).to(ACC)
        v = tl.where(mm[:, None], v, 0.0)
        mean = tl.sum(v, axis=0) / tl.sum(mm.to(ACC), axis=0)
        dev = tl.where(mm[:, None], v - mean[None, :], 0.0)
        st = st_ptr + t * sst_t + pid_m * sst_b + rn
        if STATS:
            tl.store(st, mean, mask=mn)
            tl.store(st + sst_q, tl.sum(dev * dev, axis=0), mask=mn)
        if TSTATS:
            vd = tl.where(mm[:, None], accd.to(yd_ptr.dtype.element_ty).to(ACC), 0.0)
            tl.store(st + 2 * sst_q, tl.sum(vd, axis=0), mask=mn)
            tl.store(st + 3 * sst_q, tl.sum(dev * vd, axis=0), mask=mn)


@_jit
def _stats_kernel(part_ptr, out_ptr, R, OC, RB, TILE, sp_q, sp_t, sp_b, so_q, so_t, so_o,
                  TANGENT: tl.constexpr, ACC: tl.constexpr, BB: tl.constexpr, BC: tl.constexpr):
    """The forward epilogue's per-tile statistics `[Q, T, RB, OC]` combined over the RB row tiles (n_i rows
    each: TILE, the last R − (RB − 1)·TILE): a program per (channel block, task), two passes over the tiles."""
    t = tl.program_id(1).to(tl.int64)
    rc = tl.program_id(0) * BC + tl.arange(0, BC)
    mc = rc < OC
    base = part_ptr + t * sp_t + rc[None, :]
    acc = tl.zeros((BB, BC), dtype=ACC)
    for b0 in range(0, RB, BB):
        rb = b0 + tl.arange(0, BB)
        n = tl.minimum(TILE, R - rb * TILE).to(ACC)
        mask = (rb < RB)[:, None] & mc[None, :]
        acc += n[:, None] * tl.load(base + (rb * sp_b)[:, None], mask=mask, other=0).to(ACC)
    mean = tl.sum(acc, axis=0) / R
    m2 = tl.zeros((BB, BC), dtype=ACC)
    s = tl.zeros((BB, BC), dtype=ACC)
    d = tl.zeros((BB, BC), dtype=ACC)
    for b0 in range(0, RB, BB):
        rb = b0 + tl.arange(0, BB)
        n = tl.minimum(TILE, R - rb * TILE).to(ACC)
        mask = (rb < RB)[:, None] & mc[None, :]
        off = base + (rb * sp_b)[:, None]
        dm = tl.where(mask, tl.load(off, mask=mask, other=0).to(ACC) - mean[None, :], 0.0)
        m2 += tl.load(off + sp_q, mask=mask, other=0).to(ACC) + n[:, None] * dm * dm
        if TANGENT:
            si = tl.load(off + 2 * sp_q, mask=mask, other=0).to(ACC)
            s += si
            d += tl.load(off + 3 * sp_q, mask=mask, other=0).to(ACC) + dm * si
    out = out_ptr + t * so_t + rc * so_o
    tl.store(out, mean, mask=mc)
    tl.store(out + so_q, tl.sum(m2, axis=0) / R, mask=mc)
    if TANGENT:
        tl.store(out + 2 * so_q, tl.sum(s, axis=0) / R, mask=mc)
        tl.store(out + 3 * so_q, tl.sum(d, axis=0) / R, mask=mc)


# ---------------------------------------------------------------- input gradient: gx, ġx


@_jit
def _bwd_input_kernel(gy_ptr, gyd_ptr, w_ptr, wd_ptr, gx_ptr, gxd_ptr,
                      N, C, H, W, OC, HO, WO, KW, KK, SH, SW, PH, PW, DH, DW,
                      sg_t, sgd_t, sg_n, sg_o, sg_h, sg_w,        # gy and ġy share their strides within a task
                      sw_t, swd_t, sw_o, sw_c, sw_i, sw_j,        # w and ẇ likewise
                      sx_t, sx_n, sx_c, sx_h, sx_w, sxd_t, sxd_n, sxd_c, sxd_h, sxd_w,
                      GX_ON: tl.constexpr, GXD_ON: tl.constexpr, HAS_GYD: tl.constexpr, HAS_WD: tl.constexpr,
                      LOAD_G: tl.constexpr, LOAD_W: tl.constexpr, USE_DOT: tl.constexpr, CAST: tl.constexpr,
                      PREC: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    col_blocks = tl.cdiv(C, BN)
    pid_m = pid // col_blocks
    pid_n = pid % col_blocks
    rm = pid_m * BM + tl.arange(0, BM)  # input positions (n, h, w)
    rn = pid_n * BN + tl.arange(0, BN)  # input channels
    mm = rm < N * H * W
    mn = rn < C
    n = rm // (H * W)
    hw = rm % (H * W)
    h = hw // W
    w = hw % W
    g_row = n * sg_n
    acc = tl.zeros((BM, BN), dtype=ACC)
    accd = tl.zeros((BM, BN), dtype=ACC)
    o_blocks = tl.cdiv(OC, BK)
    for step in range(0, KK * o_blocks):
        ij = step // o_blocks
        i = ij // KW
        j = ij % KW
        rk = (step % o_blocks) * BK + tl.arange(0, BK)  # output channels
        mk = rk < OC
        ph = h + PH - i * DH
        pw = w + PW - j * DW
        p = ph // SH
        q = pw // SW
        ok = mm & (ph >= 0) & (pw >= 0) & (p * SH == ph) & (q * SW == pw) & (p < HO) & (q < WO)
        a_off = (g_row + p * sg_h + q * sg_w)[:, None] + (rk * sg_o)[None, :]
        a_mask = ok[:, None] & mk[None, :]
        b_off = (i * sw_i + j * sw_j + rk * sw_o)[:, None] + (rn * sw_c)[None, :]
        b_mask = mk[:, None] & mn[None, :]
        if LOAD_G:
            a = _tile(tl.load(gy_ptr + t * sg_t + a_off, mask=a_mask, other=0), CAST, ACC)
        if LOAD_W:
            bt = _tile(tl.load(w_ptr + t * sw_t + b_off, mask=b_mask, other=0), CAST, ACC)
        if GX_ON:
            acc = _mma(acc, a, bt, USE_DOT, PREC)
        if GXD_ON:
            if HAS_GYD:
                ad = _tile(tl.load(gyd_ptr + t * sgd_t + a_off, mask=a_mask, other=0), CAST, ACC)
                accd = _mma(accd, ad, bt, USE_DOT, PREC)
            if HAS_WD:
                bd = _tile(tl.load(wd_ptr + t * swd_t + b_off, mask=b_mask, other=0), CAST, ACC)
                accd = _mma(accd, a, bd, USE_DOT, PREC)
    out_mask = mm[:, None] & mn[None, :]
    if GX_ON:
        off = (n * sx_n + h * sx_h + w * sx_w)[:, None] + (rn * sx_c)[None, :]
        tl.store(gx_ptr + t * sx_t + off, acc.to(gx_ptr.dtype.element_ty), mask=out_mask)
    if GXD_ON:
        off = (n * sxd_n + h * sxd_h + w * sxd_w)[:, None] + (rn * sxd_c)[None, :]
        tl.store(gxd_ptr + t * sxd_t + off, accd.to(gxd_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------- weight gradient: gw, ġw, gb, ġb


@_jit
def _bwd_weight_kernel(gy_ptr, gyd_ptr, x_ptr, xd_ptr, gw_ptr, gwd_ptr, gb_ptr, gbd_ptr,
                       N, C, H, W, OC, HO, WO, KW, KK, SH, SW, PH, PW, DH, DW, R_CHUNK,
                       sg_t, sgd_t, sg_n, sg_o, sg_h, sg_w,       # gy and ġy share their strides within a task
                       sx_t, sxd_t, sx_n, sx_c, sx_h, sx_w,       # x and ẋ likewise
                       sw_s, sw_t, sw_o, sw_c, sw_i, sw_j, swd_s, swd_t, swd_o, swd_c, swd_i, swd_j,
                       sb_s, sb_t, sb_o, sbd_s, sbd_t, sbd_o,
                       GW_ON: tl.constexpr, GWD_ON: tl.constexpr, GB_ON: tl.constexpr, GBD_ON: tl.constexpr,
                       HAS_GYD: tl.constexpr, HAS_XD: tl.constexpr, LOAD_X: tl.constexpr, LOAD_G: tl.constexpr,
                       LOAD_GD: tl.constexpr, ACCUMULATE: tl.constexpr, FLAT: tl.constexpr,
                       USE_DOT: tl.constexpr, CAST: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    if FLAT:  # columns k = (c, i, j): C·kh·kw of them, decomposed per element
        col_blocks = tl.cdiv(C * KK, BN)
        pid_n = pid % col_blocks
        pid_m = pid // col_blocks
        kc = pid_n * BN + tl.arange(0, BN)
        mn = kc < C * KK
        c = kc // KK
        ij = kc % KK
        i = ij // KW
        j = ij % KW
        first = pid_n  # the programs of column block 0 keep the bias sums
    else:  # a program per filter position (i, j) (fastest: neighbours read the same gy tile), columns c
        ij = pid % KK
        rest = pid // KK
        col_blocks = tl.cdiv(C, BN)
        pid_n = rest % col_blocks
        pid_m = rest // col_blocks
        i = ij // KW
        j = ij % KW
        c = pid_n * BN + tl.arange(0, BN)
        mn = c < C
        first = pid_n + ij
    rm = pid_m * BM + tl.arange(0, BM)  # output channels o
    mm = rm < OC
    R = N * HO * WO
    r_lo = split * R_CHUNK
    r_hi = tl.minimum(r_lo + R_CHUNK, R)
    acc = tl.zeros((BM, BN), dtype=ACC)
    accd = tl.zeros((BM, BN), dtype=ACC)
    acc_b = tl.zeros((BM,), dtype=ACC)
    acc_bd = tl.zeros((BM,), dtype=ACC)
    for r0 in range(r_lo, r_hi, BK):
        rk = r0 + tl.arange(0, BK)  # output positions (n, p, q)
        mk = rk < r_hi
        n = rk // (HO * WO)
        pq = rk % (HO * WO)
        p = pq // WO
        q = pq % WO
        a_off = (n * sg_n + p * sg_h + q * sg_w)[None, :] + (rm * sg_o)[:, None]
        a_mask = mm[:, None] & mk[None, :]
        if FLAT:
            h = (p * SH - PH)[:, None] + (i * DH)[None, :]
            w = (q * SW - PW)[:, None] + (j * DW)[None, :]
            b_off = (n * sx_n)[:, None] + (c * sx_c)[None, :] + h * sx_h + w * sx_w
            b_mask = mk[:, None] & mn[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        else:
            h = p * SH - PH + i * DH
            w = q * SW - PW + j * DW
            ok = mk & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b_off = (n * sx_n + h * sx_h + w * sx_w)[:, None] + (c * sx_c)[None, :]
            b_mask = ok[:, None] & mn[None, :]
        if LOAD_G:
            a = _tile(tl.load(gy_ptr + t * sg_t + a_off, mask=a_mask, other=0), CAST, ACC)
        if LOAD_GD:
            ad = _tile(tl.load(gyd_ptr + t * sgd_t + a_off, mask=a_mask, other=0), CAST, ACC)
        if LOAD_X:
            bt = _tile(tl.load(x_ptr + t * sx_t + b_off, mask=b_mask, other=0), CAST, ACC)
        if GW_ON:
            acc = _mma(acc, a, bt, USE_DOT, PREC)
        if GWD_ON:
            if HAS_GYD:
                accd = _mma(accd, ad, bt, USE_DOT, PREC)
            if HAS_XD:
                bd = _tile(tl.load(xd_ptr + t * sxd_t + b_off, mask=b_mask, other=0), CAST, ACC)
                accd = _mma(accd, a, bd, USE_DOT, PREC)
        if GB_ON:  # (every program sums; those of the first column block and position store)
            acc_b += tl.sum(a.to(ACC), axis=1)
        if GBD_ON:
            acc_bd += tl.sum(ad.to(ACC), axis=1)
    out_mask = mm[:, None] & mn[None, :]
    s64 = split.to(tl.int64)
    if GW_ON:
        ptr = gw_ptr + s64 * sw_s + t * sw_t + (rm * sw_o)[:, None] + (c * sw_c + i * sw_i + j * sw_j)[None, :]
        if ACCUMULATE:
            acc += tl.load(ptr, mask=out_mask, other=0).to(ACC)
        tl.store(ptr, acc.to(gw_ptr.dtype.element_ty), mask=out_mask)
    if GWD_ON:
        ptr = gwd_ptr + s64 * swd_s + t * swd_t + (rm * swd_o)[:, None] + (c * swd_c + i * swd_i + j * swd_j)[None, :]
        if ACCUMULATE:
            accd += tl.load(ptr, mask=out_mask, other=0).to(ACC)
        tl.store(ptr, accd.to(gwd_ptr.dtype.element_ty), mask=out_mask)
    bias_mask = mm & ((tl.zeros((BM,), dtype=tl.int32) + first) == 0)
    if GB_ON:
        tl.store(gb_ptr + s64 * sb_s + t * sb_t + rm * sb_o, acc_b.to(gb_ptr.dtype.element_ty), mask=bias_mask)
    if GBD_ON:
        tl.store(gbd_ptr + s64 * sbd_s + t * sbd_t + rm * sbd_o, acc_bd.to(gbd_ptr.dtype.element_ty), mask=bias_mask)
# fmt: on


# ---------------------------------------------------------------- launch wrappers


def _pair(v, name: str) -> Tuple[int, int]:
    v = list(v) if isinstance(v, (list, tuple)) else [v, v]
    if len(v) == 1:
        v = v * 2
    if len(v) != 2 or not all(isinstance(e, int) for e in v):
        raise ValueError(f"{name}: expected one or two ints, got {v}")
    return int(v[0]), int(v[1])


def _geometry(stride, padding, dilation) -> Tuple[int, int, int, int, int, int]:
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if sh < 1 or sw < 1:
        raise ValueError(f"stride: expected positive values, got {[sh, sw]}")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding: expected non-negative values, got {[ph, pw]}")
    if dh < 1 or dw < 1:
        raise ValueError(f"dilation: expected positive values, got {[dh, dw]}")
    return sh, sw, ph, pw, dh, dw


def out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    """Output length of a convolution along one axis."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _tensor(v, name: str, dims: Sequence[int], ref: Tensor) -> Opt:
    """`v` checked: a tensor with one of `dims` dimensions, `ref`'s dtype and device (None passes)."""
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(v).__name__}")
    if v.dim() not in dims:
        raise ValueError(f"{name}: expected {' or '.join(str(d) for d in dims)} dimensions, got shape {list(v.shape)}")
    if v.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (as the input), got {v.dtype}")
    if v.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as the input), got {v.device}")
    return v


def _shaped(v: Opt, name: str, shape: tuple, common: bool = False) -> Opt:
    """`v` of shape `shape` (or `shape[1:]`, common to all tasks, when `common`), viewed as `[*shape]`."""
    if v is None:
        return None
    if tuple(v.shape) != shape and not (common and tuple(v.shape) == shape[1:]):
        also = f" or {list(shape[1:])}" if common else ""
        raise ValueError(f"{name}: expected shape {list(shape)}{also}, got {list(v.shape)}")
    return v.expand(shape)


def _activation(v, name: str) -> Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() != 5:
        raise ValueError(f"{name}: expected a [T, N, C, H, W] tensor, got {getattr(v, 'shape', type(v).__name__)}")
    if v.dtype not in SUPPORTED:
        raise TypeError(f"{name}: expected one of {SUPPORTED}, got {v.dtype}")
    check_device(v, name)
    return v


_INT32 = 2**31 - 1


def _strides(v: Opt, n: int) -> tuple:
    """The strides of `v` (zeros if None); the kernels index within one task in int32 (the task offset is
    int64), so one task's slice must span fewer than 2³¹ elements."""
    if v is None:
        return (0,) * n
    span = sum((size - 1) * abs(st) for size, st in zip(v.shape[1:], v.stride()[1:]) if size > 0)
    if span > _INT32:
        raise ValueError(f"a tensor of shape {list(v.shape)}: one task's slice spans over 2^31 elements")
    return tuple(v.stride())


def _or(v: Opt, dummy: Tensor) -> Tensor:
    """A pointer argument for an absent tensor (never read: its constexpr flag is off)."""
    return dummy if v is None else v


def _pair_strides(a: Tensor, ad: Opt) -> Tuple[Tensor, Opt, tuple]:
    """An operand and its tangent, read with the same strides within a task (one set of offsets for both
    tiles): made contiguous when they differ (views of flat buffers of equal layout do not). Returns
    (a, ad, (task stride of a, of ad, *the shared strides))."""
    if ad is not None and a.stride()[1:] != ad.stride()[1:]:
        a, ad = a.contiguous(), ad.contiguous()  # (a common weight, task stride 0, stays broadcast)
    shared = _strides(a, a.dim())
    return a, ad, (shared[0], _strides(ad, a.dim())[0], *shared[1:])


def _weight_pair(w: Tensor, wd: Opt, T: int) -> Tuple[Tensor, Opt, tuple]:
    """A weight `[T, O, C, kh, kw]` | `[O, C, kh, kw]` and its tangent, as `_pair_strides` (a common
    one read with task stride 0), both expanded to `[T, O, C, kh, kw]`."""
    if wd is not None and w.stride()[-4:] != wd.stride()[-4:]:
        w, wd = w.contiguous(), wd.contiguous()
    task = [0 if v is None or v.dim() == 4 else v.stride(0) for v in (w, wd)]
    shape = (T, *w.shape[-4:])
    w, wd = w.expand(shape), None if wd is None else wd.expand(shape)
    return w, wd, (*task, *_strides(w, 5)[1:])


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _precision(dtype: torch.dtype, tf32: bool) -> dict:
    """USE_DOT, CAST, PREC, ACC of a dtype."""
    use_dot = dtype != torch.float64
    half = dtype in (torch.bfloat16, torch.float16)
    cast = not use_dot or (half and INTERPRET)
    prec = "tf32" if (tf32 and dtype == torch.float32) or (half and not INTERPRET) else "ieee"
    return dict(USE_DOT=use_dot, CAST=cast, PREC=prec, ACC=acc_dtype(dtype))


# `tl.dot` takes K = 8 for 32-bit types in recent Triton (3.3 on; 16 before)
_DOT_K8 = 8 if tuple(int(v) for v in triton.__version__.split(".")[:2] if v.isdigit()) >= (3, 3) else 16


def blocks(rows: int, cols: int, red: int, cfg: dict, tangent: bool) -> Tuple[int, int, int, int]:
    """(BM, BN, BK, num_warps) of an implicit GEMM with `rows` × `cols` outputs and reduction blocks over
    `red` (one filter position's channels, or C·kh·kw flat). Chosen on sm_90 so that ptxas spills no
    registers (the tangent kernels hold two accumulators): FP32 on `tl.dot` (IEEE, FMA units) keeps its
    operand tiles in registers, hence BK = 16 or 8; TF32 and half types run on tensor cores. The float64
    multiply-sum keeps its `[BM, BK, BN]` product small. Under the interpreter: few, large programs (its
    cost is per operation), still small enough for several blocks in the tests."""
    use_dot = cfg["USE_DOT"]
    if INTERPRET:
        lo = 16 if use_dot else 4
        return _pow2(rows, 16, 256), _pow2(cols, lo, 16), _pow2(red, lo, 16), 4
    if not use_dot:
        return _pow2(rows, 4, 32), _pow2(cols, 4, 16), _pow2(red, 4, 8), 4
    if cfg["PREC"] == "ieee":  # 128×64×16 (value), 64×64×8 (tangent), 8 warps
        if tangent:
            return _pow2(rows, 16, 64), _pow2(cols, 16, 64), _DOT_K8, 8
        return _pow2(rows, 16, 128), _pow2(cols, 16, 64), _pow2(red, 16, 16), 8
    # tensor cores: 128×64×32 (value), 128×64×16 (tangent), 8 warps
    return _pow2(rows, 16, 128), _pow2(cols, 16, 64), _pow2(red, 16, 16 if tangent else 32), 8


def flat(C: int) -> bool:
    """Reduce over (c, i, j) flat, decomposed per element, when one filter position's channels would
    fill under 16 lanes of a block (first layers: 1 or 3 channels)."""
    return C < 16


def _target_programs(device: torch.device) -> int:
    """About how many programs fill the device: 4 per SM on CUDA; a few under the interpreter (so that
    the tests take the split-K path)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def weight_split(programs: int, positions: int, BK: int, device: torch.device) -> int:
    """Splits of the reduction over `positions` for `programs` weight tiles: enough to fill the device,
    with at least 4 blocks of BK positions each (1 under the interpreter)."""
    r_blocks = triton.cdiv(max(positions, 1), BK)
    want = triton.cdiv(_target_programs(device), max(programs, 1))
    return max(1, min(want, r_blocks // (1 if INTERPRET else 4)))


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of BatchNorm statistics from the forward's epilogue: the accumulation type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _combine_stats(part: Tensor, BM: int, R: int, stats: Tensor, tangent: bool) -> None:
    """Writes the statistics over all R rows into `stats` `[2|4, T, O]` from the per-tile partials `part`
    `[2|4, T, row blocks, O]` (tile mean m_i, Σ (y − m_i)², Σ ẏ, Σ (y − m_i) ẏ over the n_i rows of tile i):
    mean = Σ n_i m_i / R, var = (Σ M2_i + Σ n_i (m_i − mean)²) / R, mean(ẏ) = Σ s_i / R and
    mean((y − mean) ẏ) = (Σ D_i + Σ (m_i − mean) s_i) / R. One launch, deterministic (no atomics)."""
    _, T, RB, OC = part.shape
    BC = _pow2(OC, 16, 64)
    _stats_kernel[(triton.cdiv(OC, BC), T)](
        part,
        stats,
        R,
        OC,
        RB,
        BM,
        *part.stride()[:3],
        *stats.stride(),
        TANGENT=tangent,
        ACC=acc_dtype(part.dtype),
        BB=_pow2(RB, 2, 16),
        BC=BC,
    )


def _fwd(
    x: Tensor,
    xd: Opt,
    w: Tensor,
    wd: Opt,
    b: Opt,
    bd: Opt,
    y: Opt,
    yd: Opt,
    stats: Opt,
    stride,
    padding,
    dilation,
    y_in: bool,
    tf32: bool,
) -> None:
    """`conv2d_fwd` (stats None) and `conv2d_fwd_bn_stats`."""
    x = _activation(x, "x")
    T, N, C, H, W = x.shape
    w = _tensor(w, "w", (4, 5), x)
    if w is None or w.shape[-3] != C:
        raise ValueError(f"w: expected [T, O, {C}, kh, kw] or [O, {C}, kh, kw], got {getattr(w, 'shape', None)}")
    OC, _, KH, KW = w.shape[-4:]
    sh, sw, ph, pw, dh, dw = _geometry(stride, padding, dilation)
    HO, WO = out_size(H, KH, sh, ph, dh), out_size(W, KW, sw, pw, dw)
    if HO < 1 or WO < 1:
        raise ValueError(f"x: input {H}×{W} is smaller than the {KH}×{KW} kernel (dilation {dh}, {dw}, padding)")
    _shaped(w, "w", (T, OC, C, KH, KW), common=True)
    xd = _shaped(_tensor(xd, "xd", (5,), x), "xd", (T, N, C, H, W))
    wd = _tensor(wd, "wd", (4, 5), x)
    wd = _shaped(wd, "wd", (T, OC, C, KH, KW) if wd is None or wd.dim() == 5 else (OC, C, KH, KW))
    b = _shaped(_tensor(b, "b", (1, 2), x), "b", (T, OC), common=True)
    bd = _shaped(_tensor(bd, "bd", (1, 2), x), "bd", (T, OC), common=True)
    y = _shaped(_tensor(y, "y", (5,), x), "y", (T, N, OC, HO, WO))
    yd = _shaped(_tensor(yd, "yd", (5,), x), "yd", (T, N, OC, HO, WO))
    tangent_stats = False
    if stats is not None:
        if not isinstance(stats, torch.Tensor) or stats.dim() != 3 or stats.shape[0] not in (2, 4):
            raise ValueError(
                f"stats: expected a [2, {T}, {OC}] or [4, {T}, {OC}] tensor, got {getattr(stats, 'shape', stats)}"
            )
        _shaped(stats, "stats", (stats.shape[0], T, OC))
        if stats.dtype != _stats_dtype(x.dtype) or stats.device != x.device:
            raise TypeError(
                f"stats: expected {_stats_dtype(x.dtype)} on {x.device}, got {stats.dtype} on {stats.device}"
            )
        if y is None:
            raise ValueError("stats: the statistics are y's: give y (written, or read with y_in)")
        tangent_stats = stats.shape[0] == 4
        if tangent_stats and yd is None:
            raise ValueError("stats: [4, T, O] (with the tangent's statistics) needs yd")
        if N == 0 and T * OC > 0:
            raise ValueError("stats: no output positions to average over (N = 0)")
    Y_ON = y is not None and not y_in
    if yd is None:
        xd = wd = bd = None
    if not Y_ON:
        b = None
    if T * N * OC == 0 or (not Y_ON and yd is None and stats is None):
        return
    if yd is not None and xd is None and wd is None:  # ẏ = ḃ (or 0)
        yd.copy_(torch.zeros((), dtype=x.dtype, device=x.device) if bd is None else bd[:, None, :, None, None])
        if tangent_stats:  # mean(ẏ) = ḃ, mean((y − mean) ẏ) = 0
            stats[2].zero_() if bd is None else stats[2].copy_(bd)
            stats[3].zero_()
            tangent_stats = False
        yd = None
        if not Y_ON and stats is None:
            return
    x, xd, x_st = _pair_strides(x, xd)
    w, wd, w_st = _weight_pair(w, wd, T)
    cfg = _precision(x.dtype, tf32)
    FLAT = flat(C)
    R = N * HO * WO
    BM, BN, BK, warps = blocks(R, OC, C * KH * KW if FLAT else C, cfg, yd is not None)
    grid = (triton.cdiv(R, BM) * triton.cdiv(OC, BN), T)
    YD_ON = yd is not None
    HAS_XD, HAS_WD = YD_ON and xd is not None, YD_ON and wd is not None
    part = None
    if stats is not None:  # per-tile partial statistics, combined below
        part = x.new_empty((4 if tangent_stats else 2, T, triton.cdiv(R, BM), OC), dtype=stats.dtype)
    # fmt: off
    _fwd_kernel[grid](
        x, _or(xd, x), w, _or(wd, x), _or(b, x), _or(bd, x), _or(y, x), _or(yd, x), _or(part, x),
        N, C, H, W, OC, HO, WO, KW, KH * KW, sh, sw, ph, pw, dh, dw,
        *x_st, *w_st, *_strides(b, 2), *_strides(bd, 2), *_strides(y, 5), *_strides(yd, 5),
        *(part.stride()[:3] if part is not None else (0, 0, 0)),
        Y_ON=Y_ON, YD_ON=YD_ON, HAS_XD=HAS_XD, HAS_WD=HAS_WD, HAS_B=b is not None, HAS_BD=bd is not None,
        LOAD_X=Y_ON or HAS_WD, LOAD_W=Y_ON or HAS_XD, STATS=part is not None, TSTATS=tangent_stats,
        Y_IN=part is not None and not Y_ON, FLAT=FLAT, BM=BM, BN=BN, BK=BK, num_warps=warps, **cfg)
    # fmt: on
    if part is not None:
        _combine_stats(part, BM, R, stats, tangent_stats)


# fmt: off
@torch.library.custom_op("fastmaml_triton::conv2d_fwd", mutates_args=("y", "yd"))
def conv2d_fwd(x: Tensor, xd: Opt, w: Tensor, wd: Opt, b: Opt, bd: Opt, y: Opt, yd: Opt, stride: List[int],
               padding: List[int], dilation: List[int], tf32: bool) -> None:
    """Writes y = conv(x, w) + b and ẏ = conv(ẋ, w) + conv(x, ẇ) + ḃ `[T, N, O, H', W']` (each output that
    is given; a None input is zero). x, xd `[T, N, C, H, W]`; w, wd `[T, O, C, kh, kw]` | `[O, C, kh, kw]`;
    b, bd `[T, O]` | `[O]`. One launch: the tangent's products share the value's x and w tile loads."""
    # fmt: on
    _fwd(x, xd, w, wd, b, bd, y, yd, None, stride, padding, dilation, False, tf32)


@conv2d_fwd.register_fake
def _(x, xd, w, wd, b, bd, y, yd, stride, padding, dilation, tf32):
    return None


# fmt: off
@torch.library.custom_op("fastmaml_triton::conv2d_fwd_bn_stats", mutates_args=("y", "yd", "stats"))
def conv2d_fwd_bn_stats(x: Tensor, xd: Opt, w: Tensor, wd: Opt, b: Opt, bd: Opt, y: Tensor, yd: Opt, stats: Tensor,
                        stride: List[int], padding: List[int], dilation: List[int], y_in: bool, tf32: bool) -> None:
    """`conv2d_fwd` that also writes the BatchNorm batch statistics of y, per task and channel over
    (N, H', W'), into `stats`: `[2, T, O]` mean and biased variance; `[4, T, O]` (yd given) also mean(ẏ) and
    mean((y − mean) ẏ). float32 (float64 for float64 inputs), of y and ẏ as stored. From the kernel's
    epilogue: each tile of output rows writes its mean and Σ of squared deviations from it (and Σ ẏ,
    Σ (y − tile mean) ẏ), combined over the tiles afterwards (no second read of y, no atomics). With
    `y_in`, y is an input already computed (the activation tape): read in the epilogue, not written, and b
    is not used."""
    # fmt: on
    _fwd(x, xd, w, wd, b, bd, y, yd, stats, stride, padding, dilation, y_in, tf32)


@conv2d_fwd_bn_stats.register_fake
def _(x, xd, w, wd, b, bd, y, yd, stats, stride, padding, dilation, y_in, tf32):
    return None


# fmt: off
@torch.library.custom_op("fastmaml_triton::conv2d_bwd_input", mutates_args=("gx", "gxd"))
def conv2d_bwd_input(gy: Tensor, gyd: Opt, w: Tensor, wd: Opt, gx: Opt, gxd: Opt, stride: List[int],
                     padding: List[int], dilation: List[int], tf32: bool) -> None:
    """Writes gx = ∂x(gy, w) and ġx = ∂x(ġy, w) + ∂x(gy, ẇ) `[T, N, C, H, W]` (each output that is given;
    its shape gives H and W). gy, gyd `[T, N, O, H', W']`; w, wd `[T, O, C, kh, kw]` | `[O, C, kh, kw]`.
    One launch: the tangent's products share the value's gy and w tile loads."""
    # fmt: on
    gy = _activation(gy, "gy")
    T, N, OC, HO, WO = gy.shape
    w = _tensor(w, "w", (4, 5), gy)
    if w is None or w.shape[-4] != OC:
        raise ValueError(f"w: expected [T, {OC}, C, kh, kw] or [{OC}, C, kh, kw], got {getattr(w, 'shape', None)}")
    _, C, KH, KW = w.shape[-4:]
    _shaped(w, "w", (T, OC, C, KH, KW), common=True)
    sh, sw, ph, pw, dh, dw = _geometry(stride, padding, dilation)
    gx = _tensor(gx, "gx", (5,), gy)
    gxd = _tensor(gxd, "gxd", (5,), gy)
    ref = gx if gx is not None else gxd
    if ref is None:
        return
    H, W = ref.shape[-2:]
    if out_size(H, KH, sh, ph, dh) != HO or out_size(W, KW, sw, pw, dw) != WO:
        raise ValueError(f"gx: an input of {H}×{W} does not give gy's {HO}×{WO} with this kernel and geometry")
    gx = _shaped(gx, "gx", (T, N, C, H, W))
    gxd = _shaped(gxd, "gxd", (T, N, C, H, W))
    gyd = _shaped(_tensor(gyd, "gyd", (5,), gy), "gyd", (T, N, OC, HO, WO))
    wd = _tensor(wd, "wd", (4, 5), gy)
    wd = _shaped(wd, "wd", (T, OC, C, KH, KW) if wd is None or wd.dim() == 5 else (OC, C, KH, KW))
    if gxd is None:
        gyd = wd = None
    if T * N * C == 0:
        return
    if gxd is not None and gyd is None and wd is None:
        gxd.zero_()
        gxd = None
        if gx is None:
            return
    gy, gyd, g_st = _pair_strides(gy, gyd)
    w, wd, w_st = _weight_pair(w, wd, T)
    cfg = _precision(gy.dtype, tf32)
    BM, BN, BK, warps = blocks(N * H * W, C, OC, cfg, gxd is not None)
    grid = (triton.cdiv(N * H * W, BM) * triton.cdiv(C, BN), T)
    GX_ON, GXD_ON = gx is not None, gxd is not None
    HAS_GYD, HAS_WD = GXD_ON and gyd is not None, GXD_ON and wd is not None
    # fmt: off
    _bwd_input_kernel[grid](
        gy, _or(gyd, gy), w, _or(wd, gy), _or(gx, gy), _or(gxd, gy),
        N, C, H, W, OC, HO, WO, KW, KH * KW, sh, sw, ph, pw, dh, dw,
        *g_st, *w_st, *_strides(gx, 5), *_strides(gxd, 5),
        GX_ON=GX_ON, GXD_ON=GXD_ON, HAS_GYD=HAS_GYD, HAS_WD=HAS_WD, LOAD_G=GX_ON or HAS_WD,
        LOAD_W=GX_ON or HAS_GYD, BM=BM, BN=BN, BK=BK, num_warps=warps, **cfg)
    # fmt: on


@conv2d_bwd_input.register_fake
def _(gy, gyd, w, wd, gx, gxd, stride, padding, dilation, tf32):
    return None


# fmt: off
@torch.library.custom_op("fastmaml_triton::conv2d_bwd_weight", mutates_args=("gw", "gwd", "gb", "gbd"))
def conv2d_bwd_weight(gy: Tensor, gyd: Opt, x: Tensor, xd: Opt, gw: Opt, gwd: Opt, gb: Opt, gbd: Opt,
                      stride: List[int], padding: List[int], dilation: List[int], accumulate: bool,
                      tf32: bool) -> None:
    """Writes gw = ∂w(x, gy), ġw = ∂w(x, ġy) + ∂w(ẋ, gy) `[T, O, C, kh, kw]` (their shape gives the kernel
    size) and gb = Σ gy, ġb = Σ ġy `[T, O]`, each output that is given; with `accumulate`, gw and ġw are
    added to (the bias gradients are always written). gy, gyd `[T, N, O, H', W']`; x, xd `[T, N, C, H, W]`.
    One launch (plus the sum of the split-K partial results): the tangent's products share the value's
    gy and x tile loads."""
    # fmt: on
    gy = _activation(gy, "gy")
    T, N, OC, HO, WO = gy.shape
    x = _activation(x, "x")
    if x.shape[:2] != gy.shape[:2] or x.dtype != gy.dtype or x.device != gy.device:
        raise ValueError(
            f"x: expected [{T}, {N}, C, H, W] {gy.dtype} on {gy.device} (as gy), got {list(x.shape)} {x.dtype} "
            f"on {x.device}"
        )
    C, H, W = x.shape[2:]
    sh, sw, ph, pw, dh, dw = _geometry(stride, padding, dilation)
    gw = _tensor(gw, "gw", (5,), gy)
    gwd = _tensor(gwd, "gwd", (5,), gy)
    ref = gw if gw is not None else gwd
    KH, KW = (1, 1) if ref is None else ref.shape[-2:]
    if ref is not None and (out_size(H, KH, sh, ph, dh) != HO or out_size(W, KW, sw, pw, dw) != WO):
        raise ValueError(f"gw: a {KH}×{KW} kernel on x's {H}×{W} does not give gy's {HO}×{WO} with this geometry")
    gw = _shaped(gw, "gw", (T, OC, C, KH, KW))
    gwd = _shaped(gwd, "gwd", (T, OC, C, KH, KW))
    gb = _shaped(_tensor(gb, "gb", (2,), gy), "gb", (T, OC))
    gbd = _shaped(_tensor(gbd, "gbd", (2,), gy), "gbd", (T, OC))
    gyd = _shaped(_tensor(gyd, "gyd", (5,), gy), "gyd", (T, N, OC, HO, WO))
    xd = _shaped(_tensor(xd, "xd", (5,), gy), "xd", (T, N, C, H, W))
    if gbd is not None and gyd is None:
        gbd.zero_()
        gbd = None
    if gwd is None:
        xd = None
        gyd = gyd if gbd is not None else None
    if gwd is not None and gyd is None and xd is None:
        if not accumulate:
            gwd.zero_()
        gwd = None
    weights = gw is not None or gwd is not None
    if T * OC == 0 or not (weights or gb is not None or gbd is not None):
        return
    if not weights:  # bias sums only: one column block, one filter position
        C, KH, KW = 1, 1, 1
    gy, gyd, g_st = _pair_strides(gy, gyd)
    x, xd, x_st = _pair_strides(x, xd)
    cfg = _precision(gy.dtype, tf32)
    FLAT = flat(C)
    cols = C * KH * KW if FLAT else C
    BM, BN, BK, warps = blocks(OC, cols, 1 << 30, cfg, gwd is not None)  # BK over positions: the largest
    if INTERPRET:
        BK = 64
    R = N * HO * WO
    programs = triton.cdiv(OC, BM) * triton.cdiv(cols, BN) * (1 if FLAT else KH * KW)
    S = weight_split(programs * T, R, BK, gy.device)
    chunk = triton.cdiv(triton.cdiv(R, S), BK) * BK
    S = triton.cdiv(R, chunk) if R else 1
    outs = {"gw": gw, "gwd": gwd, "gb": gb, "gbd": gbd}
    if S > 1:  # partial sums per split, in the accumulation type, summed below
        ws_dtype = torch.float64 if gy.dtype == torch.float64 else torch.float32
        outs = {k: None if v is None else v.new_empty((S, *v.shape), dtype=ws_dtype) for k, v in outs.items()}
        split_st = {k: None if v is None else v.stride() for k, v in outs.items()}
    else:
        split_st = {k: None if v is None else (0, *_strides(v, v.dim())) for k, v in outs.items()}

    def st(k: str, n: int) -> tuple:
        return split_st[k] if split_st[k] is not None else (0,) * n

    GW_ON, GWD_ON, GB_ON, GBD_ON = gw is not None, gwd is not None, gb is not None, gbd is not None
    HAS_GYD, HAS_XD = gyd is not None, GWD_ON and xd is not None
    # fmt: off
    _bwd_weight_kernel[(programs, T, S)](
        gy, _or(gyd, gy), x, _or(xd, gy), _or(outs["gw"], gy), _or(outs["gwd"], gy), _or(outs["gb"], gy),
        _or(outs["gbd"], gy),
        N, C, H, W, OC, HO, WO, KW, KH * KW, sh, sw, ph, pw, dh, dw, chunk,
        *g_st, *x_st, *st("gw", 6), *st("gwd", 6), *st("gb", 3), *st("gbd", 3),
        GW_ON=GW_ON, GWD_ON=GWD_ON, GB_ON=GB_ON, GBD_ON=GBD_ON, HAS_GYD=HAS_GYD, HAS_XD=HAS_XD,
        LOAD_X=GW_ON or (GWD_ON and HAS_GYD), LOAD_G=GW_ON or HAS_XD or GB_ON,
        LOAD_GD=(GWD_ON and HAS_GYD) or GBD_ON, ACCUMULATE=accumulate and S == 1, FLAT=FLAT,
        BM=BM, BN=BN, BK=BK, num_warps=warps, **cfg)
    # fmt: on
    if S > 1:
        for k, dst in (("gw", gw), ("gwd", gwd), ("gb", gb), ("gbd", gbd)):
            if dst is None:
                continue
            total = outs[k].sum(0)
            if accumulate and k in ("gw", "gwd"):
                total += dst
            dst.copy_(total)


@conv2d_bwd_weight.register_fake
def _(gy, gyd, x, xd, gw, gwd, gb, gbd, stride, padding, dilation, accumulate, tf32):
    return None
