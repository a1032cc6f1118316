"""Linear layer y = x wᵀ + b, task-batched: forward, value and tangent, backward, tangent backward.

Conventions (every reference): T tasks lead every tensor. A weight is per task (`[T, *shape]`, fast
weights) or common to all tasks (`[*shape]`: step 0 or a shared, not adapted, parameter); its direction
(`wd`, from the tangent u) is per task `[T, *shape]` or None (zero: a shared parameter). A tangent `xd` of
None is zero. Weight gradients are always per task `[T, *shape]`. Dotted names are tangents: `yd` = ẏ,
`gyd` = ġy (the tangent of the gradient w.r.t. y).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..registry import register

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


def _mm(x: Tensor, w: Tensor) -> Tensor:
    """x `[T, N, I]` @ wᵀ with w `[T, O, I]` or `[O, I]` -> `[T, N, O]`."""
    if w.dim() == 3:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.matmul(x, w.t())


def _addmm(bias: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """bias (`[T, O]` or `[O]`) + x wᵀ -> `[T, N, O]`, one fused GEMM."""
    if w.dim() == 3:
        b = bias.unsqueeze(1) if bias.dim() == 2 else bias.expand(x.shape[0], 1, -1)
        return torch.baddbmm(b, x, w.transpose(1, 2))
    if bias.dim() == 2:
        return torch.baddbmm(bias.unsqueeze(1), x, w.t().expand(x.shape[0], -1, -1))
    T, N, n_in = x.shape
    return torch.addmm(bias, x.reshape(T * N, n_in), w.t()).view(T, N, -1)


def _bmm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out `[T, O, I]` = a @ b. `out` is usually a view into a flat `[T, P]` buffer, whose batch stride is
    P, not O·I; bmm's `out=` on such a view is slower on the CPU than a contiguous product plus a copy."""
    if out.is_contiguous():
        torch.bmm(a, b, out=out)
    else:
        out.copy_(torch.bmm(a, b))


def _back(gy: Tensor, w: Tensor) -> Tensor:
    """gy `[T, N, O]` @ w (`[T, O, I]` or `[O, I]`) -> `[T, N, I]`."""
    return torch.bmm(gy, w) if w.dim() == 3 else torch.matmul(gy, w)


# ---------------------------------------------------------------- linear: y = x wᵀ + b


@register("linear_fwd", "torch")
def linear_fwd(x: Tensor, w: Tensor, b: Opt) -> Tensor:
    """x `[T, N, I]`, w `[T, O, I]`|`[O, I]`, b `[T, O]`|`[O]`|None -> y `[T, N, O]`."""
    return _mm(x, w) if b is None else _addmm(b, x, w)


def _linear_tangent(x: Tensor, xd: Opt, w: Tensor, wd: Opt, bd: Opt) -> Opt:
    """ẏ = ẋ wᵀ + x ẇᵀ + ḃ `[T, N, O]` (None when all three are zero)."""
    yd = None
    if wd is not None:
        yd = _mm(x, wd) if bd is None else _addmm(bd, x, wd)
    elif bd is not None:
        yd = bd.unsqueeze(1).expand(x.shape[0], x.shape[1], -1)
    if xd is not None:
        yd = _mm(xd, w) if yd is None else yd + _mm(xd, w)
    return yd


@register("linear_value_tangent_fwd", "torch")
def linear_value_tangent_fwd(x: Tensor, xd: Opt, w: Tensor, b: Opt, wd: Opt, bd: Opt) -> Tuple[Tensor, Opt]:
    """(y, ẏ): y = x wᵀ + b `[T, N, O]` and its tangent ẏ `[T, N, O]` (or None), in one op."""
    return linear_fwd(x, w, b), _linear_tangent(x, xd, w, wd, bd)


@register("linear_bwd", "torch")
def linear_bwd(gy: Tensor, x: Tensor, w: Tensor, need_x: bool, gw_out: Opt, gb_out: Opt) -> Opt:
    """Writes ∂L/∂w = gyᵀ x into `gw_out [T, O, I]` and Σ_n gy into `gb_out [T, O]` (when given);
    returns ∂L/∂x = gy w `[T, N, I]` if `need_x`, else None."""
    if gw_out is not None:
        _bmm_into(gw_out, gy.transpose(1, 2), x)
    if gb_out is not None:
        torch.sum(gy, 1, out=gb_out)
    return _back(gy, w) if need_x else None


@register("linear_tangent_bwd", "torch")
def linear_tangent_bwd(
    gy: Tensor,
    gyd: Tensor,
    x: Tensor,
    xd: Opt,
    w: Tensor,
    wd: Opt,
    need_x: bool,
    gw_out: Opt,
    gwd_out: Opt,
    gb_out: Opt,
    gbd_out: Opt,
) -> Tuple[Opt, Opt]:
    """Backward and its tangent: ġw = ġyᵀ x + gyᵀ ẋ, ġb = Σ ġy, ġx = ġy w + gy ẇ.

    Writes gw/gb (as `linear_bwd`) and ġw/ġb into the given outputs; returns (gx, ġx) `[T, N, I]` if
    `need_x`, else (None, None)."""
    if gw_out is not None:
        _bmm_into(gw_out, gy.transpose(1, 2), x)
    if gb_out is not None:
        torch.sum(gy, 1, out=gb_out)
    if gwd_out is not None:
        if xd is None:
            _bmm_into(gwd_out, gyd.transpose(1, 2), x)
        else:  # one GEMM over the concatenated examples: [ġy | gy]ᵀ [x ; ẋ]
            _bmm_into(gwd_out, torch.cat([gyd, gy], 1).transpose(1, 2), torch.cat([x, xd], 1))
    if gbd_out is not None:
        torch.sum(gyd, 1, out=gbd_out)
    if not need_x:
        return None, None
    gx = _back(gy, w)
    gxd = _back(gyd, w)
    if wd is not None:
        gxd = gxd.baddbmm_(gy, wd)
    return gx, gxd
