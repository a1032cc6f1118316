"""The normalization x̂ = (x − mean(x)) r, r = 1/sqrt(var(x) + eps), statistics over a set of dims `red`: its
Jacobian, its tangent and the tangent of its backward. Shared by BatchNorm (statistics per task and channel,
batchnorm.py) and the per-example norms (LayerNorm, GroupNorm, InstanceNorm: example_norm.py).

Conventions: x̂, ẋ, gradients full size; r and the means are kept with size-1 dims at `red` (broadcastable).
P(z) = r (z − mean(z) − x̂ mean(x̂ z)) is the Jacobian of x̂ (symmetric), used both ways.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


def project(z: Tensor, xhat: Tensor, r: Tensor, red: Sequence[int], own: bool) -> Tensor:
    """P(z); `own`: z is a temporary of the caller and may be overwritten (saves a full-size buffer)."""
    mz = z.mean(red, keepdim=True)
    mxz = (xhat * z).mean(red, keepdim=True)
    out = z.sub_(mz) if own else z - mz
    return out.addcmul_(xhat, mxz, value=-1.0).mul_(r)


def normalized_tangent(xd: Tensor, xhat: Tensor, r: Tensor, red: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """(x̂̇, a): x̂̇ = P(ẋ) and a = mean(x̂ ẋ) (so that ṙ = −r² a)."""
    a = (xhat * xd).mean(red, keepdim=True)
    return (xd - xd.mean(red, keepdim=True) - xhat * a) * r, a


def normalized_tangent_grad(
    gxh: Tensor, gxhd: Tensor, xhat: Tensor, xhd: Opt, a: Opt, r: Tensor, red: Sequence[int]
) -> Tuple[Tensor, Tensor]:
    """(gx, ġx) from the gradient w.r.t. x̂ and its tangent (gx̂, ġx̂), with m2 = mean(x̂ gx̂):
    gx = P(gx̂), ġx = −r a · gx + r (ġx̂ − mean(ġx̂) − x̂̇ m2 − x̂ mean(x̂̇ gx̂ + x̂ ġx̂)).
    x̂̇ and a None: zero (no tangent of x)."""
    m2 = (xhat * gxh).mean(red, keepdim=True)
    gx = (gxh - gxh.mean(red, keepdim=True) - xhat * m2) * r
    dot = xhat * gxhd
    if xhd is not None:
        dot.addcmul_(xhd, gxh)
    inner = gxhd - gxhd.mean(red, keepdim=True) - xhat * dot.mean(red, keepdim=True)
    if xhd is not None:
        inner.addcmul_(xhd, m2, value=-1.0)
    gxd = inner * r
    if a is not None:
        gxd.addcmul_(gx, r * a, value=-1.0)
    return gx, gxd


# ---------------------------------------------------------------- the affine map y = x̂ w + b after it
# w, b and their directions ẇ, ḃ come broadcastable to x̂ (or None: absent, or a zero direction); `sums`
# are the dims a parameter's gradient sums over (those it is broadcast along, but the tasks').


def affine_grads(gy: Tensor, xhat: Tensor, sums: Sequence[int], gw_out: Opt, gb_out: Opt) -> None:
    """Writes Σ gy x̂ → `gw_out`, Σ gy → `gb_out` (where given)."""
    if gw_out is not None:
        torch.sum(gy * xhat, sums, out=gw_out)
    if gb_out is not None:
        torch.sum(gy, sums, out=gb_out)


def affine_tangent_grads(
    gy: Tensor, gyd: Tensor, xhat: Tensor, xhd: Opt, sums: Sequence[int], outs: Tuple[Opt, Opt, Opt, Opt]
) -> None:
    """`affine_grads` and their tangents: writes gw, ġw = Σ(ġy x̂ + gy x̂̇), gb, ġb = Σ ġy into `outs` (gw, ġw,
    gb, ġb; where given)."""
    gw_out, gwd_out, gb_out, gbd_out = outs
    affine_grads(gy, xhat, sums, gw_out, gb_out)
    if gwd_out is not None:
        prod = gyd * xhat
        if xhd is not None:
            prod.addcmul_(gy, xhd)
        torch.sum(prod, sums, out=gwd_out)
    if gbd_out is not None:
        torch.sum(gyd, sums, out=gbd_out)


def affine_tangent(xhd: Opt, xhat: Tensor, w: Opt, wd: Opt, bd: Opt) -> Opt:
    """ẏ = x̂̇ w + x̂ ẇ + ḃ; None when all three terms are."""
    yd = None
    if xhd is not None:
        yd = xhd if w is None else xhd * w
    if wd is not None:
        yd = xhat * wd if yd is None else yd.addcmul_(xhat, wd)
    if bd is not None:
        yd = bd.expand_as(xhat) if yd is None else yd + bd
    return yd


def affine_input_grads(gy: Tensor, gyd: Tensor, w: Opt, wd: Opt) -> Tuple[Tensor, Tensor]:
    """(gx̂, ġx̂) = (gy w, ġy w + gy ẇ)."""
    gxh = gy if w is None else gy * w
    gxhd = gyd if w is None else gyd * w
    if wd is not None:
        gxhd = gxhd.addcmul(gy, wd)
    return gxh, gxhd
