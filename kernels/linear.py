"""Task-batched dual GEMM of the linear layers' Hessian-vector products, one kernel:

    c  = a bᵀ + bias                 [T, M, N]
    cd = ad bᵀ + a bdᵀ + bias_d      [T, M, N]    (the tangent: shares the loads of a and b)
    ra = Σ_k a,  rad = Σ_k ad        [T, M]       (bias gradients, stored by column block 0)

with a, ad `[T, M, K]`, b, bd `[T, N, K]` or common `[N, K]` (stride 0 over tasks), any strides,
so that transposed views give every linear op of `fastmaml.ops.layers` (see `fastmaml/ops/triton.py`):
forward y, ẏ (a = x, ad = ẋ, b = w, bd = ẇ); input gradients gx, ġx (a = gy, ad = ġy, b = wᵀ, bd = ẇᵀ);
weight and bias gradients gw, ġw, gb, ġb (a = gyᵀ, ad = ġyᵀ, b = xᵀ, bd = ẋᵀ).

Grid: (row blocks × column blocks, T); each program loops over K in BK steps. Widths that are not
powers of two (40 → a 64-wide tile) are padded inside by masked loads and stores. float32 (and half
types, upcast) use `tl.dot` in IEEE precision; float64 a broadcast multiply-sum (no fp64 `tl.dot`
everywhere). Outputs are written in place through their strides (views into `[T, P]` buffers).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED, acc_dtype, check_device


@triton.jit
def _mma(acc, a, b, USE_DOT: tl.constexpr):
    """acc + a @ b for tiles a `[BM, BK]`, b `[BK, BN]`."""
    if USE_DOT:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return acc


@triton.jit
def _dual_gemm_kernel(a_ptr, ad_ptr, b_ptr, bd_ptr, bias_ptr, biasd_ptr, c_ptr, cd_ptr, ra_ptr, rad_ptr,
                      M, N, K,
                      sa_t, sa_m, sa_k, sad_t, sad_m, sad_k, sb_t, sb_n, sb_k, sbd_t, sbd_n, sbd_k,
                      sbias_t, sbias_n, sbiasd_t, sbiasd_n,
                      sc_t, sc_m, sc_n, scd_t, scd_m, scd_n, sra_t, sra_m, srad_t, srad_m,
                      C_ON: tl.constexpr, CD_ON: tl.constexpr, HAS_AD: tl.constexpr, HAS_BD: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_BIASD: tl.constexpr, RA: tl.constexpr, RAD: tl.constexpr,
                      USE_DOT: tl.constexpr, ACC: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.program_id(1).to(tl.int64)
    col_blocks = tl.cdiv(N, BN)
    pid_m = pid // col_blocks
    pid_n = pid % col_blocks
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    rn = pid_n.to(tl.int64) * BN + tl.arange(0, BN)
    mm = rm < M
    mn = rn < N
    acc_c = tl.zeros((BM, BN), dtype=ACC)
    acc_cd = tl.zeros((BM, BN), dtype=ACC)
    acc_ra = tl.zeros((BM,), dtype=ACC)
    acc_rad = tl.zeros((BM,), dtype=ACC)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mk = rk < K
        a_mask = mm[:, None] & mk[None, :]
        b_mask = mk[:, None] & mn[None, :]
        a = tl.load(a_ptr + t * sa_t + rm[:, None] * sa_m + rk[None, :] * sa_k, mask=a_mask, other=0).to(ACC)
        b = tl.load(b_ptr + t * sb_t + rk[:, None] * sb_k + rn[None, :] * sb_n, mask=b_mask, other=0).to(ACC)
        if C_ON:
            acc_c = _mma(acc_c, a, b, USE_DOT)
        if RA:
            acc_ra += tl.sum(a, axis=1)
        if HAS_AD:
            ad = tl.load(ad_ptr + t * sad_t + rm[:, None] * sad_m + rk[None, :] * sad_k, mask=a_mask,
                         other=0).to(ACC)
            if CD_ON:
                acc_cd = _mma(acc_cd, ad, b, USE_DOT)
            if RAD:
                acc_rad += tl.sum(ad, axis=1)
        if HAS_BD:
            bd = tl.load(bd_ptr + t * sbd_t + rk[:, None] * sbd_k + rn[None, :] * sbd_n, mask=b_mask,
                         other=0).to(ACC)
            acc_cd = _mma(acc_cd, a, bd, USE_DOT)
    c_mask = mm[:, None] & mn[None, :]
    if C_ON:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + t * sbias_t + rn * sbias_n, mask=mn, other=0).to(ACC)
            acc_c += bias[None, :]
        tl.store(c_ptr + t * sc_t + rm[:, None] * sc_m + rn[None, :] * sc_n, acc_c.to(c_ptr.dtype.element_ty),
                 mask=c_mask)
    if CD_ON:
        if HAS_BIASD:
            bias_d = tl.load(biasd_ptr + t * sbiasd_t + rn * sbiasd_n, mask=mn, other=0).to(ACC)
            acc_cd += bias_d[None, :]
        tl.store(cd_ptr + t * scd_t + rm[:, None] * scd_m + rn[None, :] * scd_n,
                 acc_cd.to(cd_ptr.dtype.element_ty), mask=c_mask)
    if pid_n == 0:
        if RA:
            tl.store(ra_ptr + t * sra_t + rm * sra_m, acc_ra.to(ra_ptr.dtype.element_ty), mask=mm)
        if RAD:
            tl.store(rad_ptr + t * srad_t + rm * srad_m, acc_rad.to(rad_ptr.dtype.element_ty), mask=mm)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _blocks(M: int, N: int, K: int, use_dot: bool) -> Tuple[int, int, int]:
    """Tile sizes: `tl.dot` needs ≥ 16 per dim; the fp64 multiply-sum keeps its [BM, BK, BN] product small."""
    if use_dot:
        return _pow2(M, 16, 64), _pow2(N, 16, 64), _pow2(K, 16, 32)
    return _pow2(M, 4, 32), _pow2(N, 4, 32), _pow2(K, 4, 8)


def _checked(t: Optional[torch.Tensor], name: str, shape: tuple, a: torch.Tensor,
             common: bool = False) -> Optional[torch.Tensor]:
    """`t` of shape `shape` (or `shape[1:]`, common to all tasks, when `common`), as `[*shape]`."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape and not (common and tuple(t.shape) == shape[1:]):
        also = f" or {list(shape[1:])}" if common else ""
        raise ValueError(f"{name}: expected shape {list(shape)}{also}, got {list(t.shape)}")
    if t.dtype != a.dtype:
        raise TypeError(f"{name}: expected dtype {a.dtype} (as a), got {t.dtype}")
    if t.device != a.device:
        raise ValueError(f"{name}: expected device {a.device} (as a), got {t.device}")
    return t.expand(shape)


def _strides(t: Optional[torch.Tensor], n: int) -> tuple:
    return tuple(t.stride()) if t is not None else (0,) * n


def _or(t: Optional[torch.Tensor], dummy: torch.Tensor) -> torch.Tensor:
    """A pointer argument for an absent tensor (never read: its constexpr flag is off)."""
    return dummy if t is None else t


@torch.library.custom_op("fastmaml_triton::linear_gemm", mutates_args=("c", "cd", "ra", "rad"))
def linear_gemm(a: torch.Tensor, ad: Optional[torch.Tensor], b: torch.Tensor, bd: Optional[torch.Tensor],
                bias: Optional[torch.Tensor], bias_d: Optional[torch.Tensor], c: Optional[torch.Tensor],
                cd: Optional[torch.Tensor], ra: Optional[torch.Tensor], rad: Optional[torch.Tensor]) -> None:
    """Writes c = a bᵀ + bias, cd = ad bᵀ + a bdᵀ + bias_d `[T, M, N]`, ra = Σ_k a, rad = Σ_k ad `[T, M]`
    (each output that is given; None inputs are zero). a, ad `[T, M, K]`; b, bd `[T, N, K]` | `[N, K]`;
    bias, bias_d `[T, N]` | `[N]`."""
    if not isinstance(a, torch.Tensor) or a.dim() != 3:
        raise ValueError(f"a: expected a [T, M, K] tensor, got {getattr(a, 'shape', type(a).__name__)}")
    if a.dtype not in SUPPORTED:
        raise TypeError(f"a: expected one of {SUPPORTED}, got {a.dtype}")
    check_device(a, "a")
    T, M, K = a.shape
    if not isinstance(b, torch.Tensor) or b.dim() not in (2, 3) or b.shape[-1] != K:
        raise ValueError(f"b: expected [T, N, K] or [N, K] with K = {K} (as a), got "
                         f"{getattr(b, 'shape', type(b).__name__)}")
    N = b.shape[-2]
    b = _checked(b, "b", (T, N, K), a, common=True)
    ad = _checked(ad, "ad", (T, M, K), a)
    bd = _checked(bd, "bd", (T, N, K), a, common=True)
    bias = _checked(bias, "bias", (T, N), a, common=True)
    bias_d = _checked(bias_d, "bias_d", (T, N), a, common=True)
    c = _checked(c, "c", (T, M, N), a)
    cd = _checked(cd, "cd", (T, M, N), a)
    ra = _checked(ra, "ra", (T, M), a)
    rad = _checked(rad, "rad", (T, M), a)
    if rad is not None and ad is None:
        raise ValueError("rad: Σ_k ad was asked for without ad")
    if T * M == 0 or (c is None and cd is None and ra is None and rad is None):
        return
    if cd is None:  # inputs only the tangent needs
        bd, bias_d = None, None
        ad = ad if rad is not None else None
    if c is None:
        bias = None
    n_cols = N if c is not None or cd is not None else 1  # bias sums only: one column block
    use_dot = a.dtype != torch.float64
    BM, BN, BK = _blocks(M, n_cols, K, use_dot)
    _dual_gemm_kernel[(triton.cdiv(M, BM) * triton.cdiv(n_cols, BN), T)](
        a, _or(ad, a), b, _or(bd, a), _or(bias, a), _or(bias_d, a), _or(c, a), _or(cd, a), _or(ra, a),
        _or(rad, a), M, n_cols, K,
        *a.stride(), *_strides(ad, 3), *b.stride(), *_strides(bd, 3), *_strides(bias, 2), *_strides(bias_d, 2),
        *_strides(c, 3), *_strides(cd, 3), *_strides(ra, 2), *_strides(rad, 2),
        C_ON=c is not None, CD_ON=cd is not None, HAS_AD=ad is not None, HAS_BD=bd is not None,
        HAS_BIAS=bias is not None, HAS_BIASD=bias_d is not None, RA=ra is not None, RAD=rad is not None,
        USE_DOT=use_dot, ACC=acc_dtype(a.dtype), BM=BM, BN=BN, BK=BK, num_warps=4)


@linear_gemm.register_fake
def _(a, ad, b, bd, bias, bias_d, c, cd, ra, rad):
    return None
