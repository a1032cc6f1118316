"""BatchNorm on batch or fixed statistics, alone and followed by ReLU: forward, backward, tangent
forward, tangent backward, task-batched.

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
from .normalize import (
    affine_grads,
    affine_input_grads,
    affine_tangent,
    affine_tangent_grads,
    normalized_tangent,
    normalized_tangent_grad,
    project,
)

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


# ---------------------------------------------------------------- batch norm on batch statistics
# x `[T, N, C, S]` (S: spatial positions, 1 for BatchNorm1d on [N, C]); statistics per task and
# channel over (N, S); m = N·S values each. r = 1/sqrt(var + eps) `[T, 1, C, 1]`, x̂ = (x − μ) r; the
# normalization's own math (its Jacobian P and tangents) is normalize.py's.

_RED = (1, 3)


def _channel(w: Opt) -> Opt:
    """A per-channel vector `[T, C]` or `[C]` -> broadcastable `[T|1, 1, C, 1]`."""
    if w is None:
        return None
    return w[:, None, :, None] if w.dim() == 2 else w[None, None, :, None]


@register("batchnorm_fwd", "torch")
def batchnorm_fwd(x: Tensor, w: Opt, b: Opt, eps: float, mean: Opt = None, var: Opt = None):
    """Returns (y, x̂, r) `[T, N, C, S]`, `[T, N, C, S]`, `[T|1, 1, C, 1]`.

    Batch statistics per task when `mean`/`var` are None; otherwise fixed statistics `[C]` (BatchNorm
    as an affine map). With batch statistics y, the mean and r are `batchnorm_train_fwd`'s, bit for bit:
    the Hessian-vector product pass recomputes a step's forward with this op, and only the same ops
    round alike (a ReLU or max-pool decision that differed at a near-tie would pair the step's gradient
    with the Hessian of another linear piece of the loss)."""
    if mean is None:
        y, mu, r = batchnorm_train_fwd(x, w, b, eps)
        r = r[:, None, :, None]
        xc = x - mu[:, None, :, None]
        return y, (xc * r if torch.is_grad_enabled() else xc.mul_(r)), r
    mu, var = mean[None, None, :, None], var[None, None, :, None]
    r = torch.rsqrt(var + eps)
    xc = x - mu
    xhat = xc * r if torch.is_grad_enabled() else xc.mul_(r)  # in place when no graph is recorded
    if w is None:
        return xhat, xhat, r
    return torch.addcmul(_channel(b), xhat, _channel(w)), xhat, r


def _task(v: Opt, t: int) -> Opt:
    """Task t's slice of a per-channel vector `[T, C]`, or the common `[C]` itself."""
    return v[t] if v is not None and v.dim() == 2 else v


@register("batchnorm_train_fwd", "torch")
def batchnorm_train_fwd(x: Tensor, w: Opt, b: Opt, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Batch-statistics BatchNorm with PyTorch's fused kernel, one call per task (two passes instead of
    four). x `[T, N, C, S]` -> (y `[T, N, C, S]`, mean `[T, C]`, r `[T, C]`); the backward needs x."""
    if torch.is_grad_enabled():  # differentiable path (AdaptedModel): out= variants record no graph
        ys = [
            torch.ops.aten.native_batch_norm(x[t], _task(w, t), _task(b, t), None, None, True, 0.0, eps)
            for t in range(x.shape[0])
        ]
        return tuple(torch.stack(z) for z in zip(*ys))
    T, C = x.shape[0], x.shape[2]
    y, mean, r = torch.empty_like(x), x.new_empty(T, C), x.new_empty(T, C)
    for t in range(T):
        args = (x[t], _task(w, t), _task(b, t), None, None, True, 0.0, eps)
        if y[t].is_contiguous():
            torch.ops.aten.native_batch_norm.out(*args, out=y[t], save_mean=mean[t], save_invstd=r[t])
        else:  # channels-last activations: the out= variant writes a wrong y into such an out (PyTorch 2.13 CPU)
            y[t], mean[t], r[t] = torch.ops.aten.native_batch_norm(*args)
    return y, mean, r


@register("batchnorm_train_bwd", "torch")
def batchnorm_train_bwd(
    gy: Tensor, x: Tensor, mean: Tensor, r: Tensor, w: Opt, eps: float, need_x: bool, gw_out: Opt, gb_out: Opt
) -> Opt:
    """Backward of `batchnorm_train_fwd` with PyTorch's fused kernel per task: writes gw `[T, C]`,
    gb `[T, C]` into the given outputs, returns gx `[T, N, C, S]` if `need_x`."""
    mask = [need_x, gw_out is not None, gb_out is not None]
    gx = torch.empty_like(x) if need_x else None
    gy = gy.contiguous()
    # without affine weights, unit ones: CUDA's kernel sizes gw like the weight (and fails on None)
    ones = x.new_ones(x.shape[2]) if w is None else None
    for t in range(x.shape[0]):
        # (a weight row with a stride, e.g. a view w[:, ::2], made PyTorch 2.13's CPU kernel return a wrong gx
        # for S = 1: contiguous rows)
        wt = ones if w is None else _task(w, t).contiguous()
        args = (gy[t], x[t], wt, None, None, mean[t], r[t], True, eps, mask)
        if all(mask):  # outputs written in place (aten's out= needs all three)
            torch.ops.aten.native_batch_norm_backward.out(*args, out0=gx[t], out1=gw_out[t], out2=gb_out[t])
            continue
        gx_t, gw_t, gb_t = torch.ops.aten.native_batch_norm_backward(*args)
        for out, value in ((gx, gx_t), (gw_out, gw_t), (gb_out, gb_t)):
            if out is not None:
                out[t] = value
    return gx


@register("batchnorm_bwd", "torch")
def batchnorm_bwd(
    gy: Tensor, xhat: Tensor, r: Tensor, w: Opt, batch_stats: bool, need_x: bool, gw_out: Opt, gb_out: Opt
) -> Opt:
    """Writes Σ gy x̂ → `gw_out [T, C]`, Σ gy → `gb_out [T, C]`; returns gx `[T, N, C, S]` if `need_x`."""
    affine_grads(gy, xhat, _RED, gw_out, gb_out)
    if not need_x:
        return None
    gxh = gy if w is None else gy * _channel(w)
    return project(gxh, xhat, r, _RED, own=w is not None) if batch_stats else gxh * r


@register("batchnorm_tangent_fwd", "torch")
def batchnorm_tangent_fwd(xd: Opt, xhat: Tensor, r: Tensor, w: Opt, wd: Opt, bd: Opt, batch_stats: bool):
    """Returns (ẏ, x̂̇, a): x̂̇ = P(ẋ) (batch statistics) or r ẋ (fixed), ẏ = x̂̇ w + x̂ ẇ + ḃ, and
    a = mean(x̂ ẋ) `[T, 1, C, 1]` (ṙ = −r² a; None with fixed statistics). ẋ None: zero."""
    xhd = a = None
    if xd is not None:
        if batch_stats:
            xhd, a = normalized_tangent(xd, xhat, r, _RED)
        else:
            xhd = xd * r
    return affine_tangent(xhd, xhat, _channel(w), _channel(wd), _channel(bd)), xhd, a


@register("batchnorm_tangent_bwd", "torch")
def batchnorm_tangent_bwd(
    gy: Tensor,
    gyd: Tensor,
    xhat: Tensor,
    xhd: Opt,
    a: Opt,
    r: Tensor,
    w: Opt,
    wd: Opt,
    batch_stats: bool,
    need_x: bool,
    gw_out: Opt,
    gwd_out: Opt,
    gb_out: Opt,
    gbd_out: Opt,
) -> Tuple[Opt, Opt]:
    """Backward and its tangent. ġw = Σ(ġy x̂ + gy x̂̇), ġb = Σ ġy; with gx̂ = gy w,
    ġx̂ = ġy w + gy ẇ, m1 = mean(gx̂), m2 = mean(x̂ gx̂):
    ġx = −r a · gx + r (ġx̂ − mean(ġx̂) − x̂̇ m2 − x̂ mean(x̂̇ gx̂ + x̂ ġx̂))   (batch statistics)
    ġx = r ġx̂                                                           (fixed statistics).
    Returns (gx, ġx) `[T, N, C, S]` if `need_x`, else (None, None)."""
    affine_tangent_grads(gy, gyd, xhat, xhd, _RED, (gw_out, gwd_out, gb_out, gbd_out))
    if not need_x:
        return None, None
    gxh, gxhd = affine_input_grads(gy, gyd, _channel(w), _channel(wd))
    if not batch_stats:
        return gxh * r, gxhd * r
    return normalized_tangent_grad(gxh, gxhd, xhat, xhd, a, r, _RED)


# ---------------------------------------------------------------- batch norm followed by ReLU
# z = max(y, 0) with y the BatchNorm output above; the mask z > 0 gates gradients and tangents:
# gy = [z > 0] gz, ż = [z > 0] ẏ, and (ReLU's second derivative being 0) ġy = [z > 0] ġz.
# Compositions of the BatchNorm references; the backwards take z (the forward's output, which the
# next layer keeps anyway) instead of y.


def _relu(y: Tensor, own: bool) -> Tensor:
    """max(y, 0); in place when `own` (y is a temporary) and no graph is recorded."""
    return y.relu_() if own and not torch.is_grad_enabled() else torch.relu(y)


def _relu_mask(g: Opt, z: Tensor) -> Opt:
    """[z > 0] g (PyTorch's ReLU backward kernel); None stays None."""
    return None if g is None else torch.ops.aten.threshold_backward(g, z, 0)


@register("batchnorm_relu_train_fwd", "torch")
def batchnorm_relu_train_fwd(x: Tensor, w: Opt, b: Opt, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """x `[T, N, C, S]` -> (z `[T, N, C, S]`, mean `[T, C]`, r `[T, C]`), batch statistics; the backward
    needs x and z."""
    y, mean, r = batchnorm_train_fwd(x, w, b, eps)
    return _relu(y, True), mean, r


@register("batchnorm_relu_fwd", "torch")
def batchnorm_relu_fwd(x: Tensor, w: Opt, b: Opt, eps: float, mean: Opt = None, var: Opt = None):
    """Returns (z, x̂, r) `[T, N, C, S]`, `[T, N, C, S]`, `[T|1, 1, C, 1]`; batch statistics unless
    `mean`/`var` `[C]` are given."""
    y, xhat, r = batchnorm_fwd(x, w, b, eps, mean, var)
    return _relu(y, w is not None), xhat, r  # without w, y is x̂ itself


@register("batchnorm_relu_train_bwd", "torch")
def batchnorm_relu_train_bwd(
    gz: Tensor,
    z: Tensor,
    x: Tensor,
    mean: Tensor,
    r: Tensor,
    w: Opt,
    eps: float,
    need_x: bool,
    gw_out: Opt,
    gb_out: Opt,
) -> Opt:
    """Backward of `batchnorm_relu_train_fwd`: writes gw, gb `[T, C]` into the given outputs, returns gx
    `[T, N, C, S]` if `need_x`."""
    return batchnorm_train_bwd(_relu_mask(gz, z), x, mean, r, w, eps, need_x, gw_out, gb_out)


@register("batchnorm_relu_bwd", "torch")
def batchnorm_relu_bwd(
    gz: Tensor, z: Tensor, xhat: Tensor, r: Tensor, w: Opt, batch_stats: bool, need_x: bool, gw_out: Opt, gb_out: Opt
) -> Opt:
    """With gy = [z > 0] gz: writes Σ gy x̂ → `gw_out`, Σ gy → `gb_out` `[T, C]`; returns gx if `need_x`."""
    return batchnorm_bwd(_relu_mask(gz, z), xhat, r, w, batch_stats, need_x, gw_out, gb_out)


@register("batchnorm_relu_value_tangent_fwd", "torch")
def batchnorm_relu_value_tangent_fwd(
    x: Tensor, xd: Opt, w: Opt, b: Opt, wd: Opt, bd: Opt, eps: float, mean: Opt = None, var: Opt = None
):
    """(z, ż, x̂, x̂̇, a, r): the forward (`batchnorm_relu_fwd`) and its tangent ż = [z > 0] ẏ, with ẏ, x̂̇, a
    as `batchnorm_tangent_fwd` (ż None when ẋ, ẇ, ḃ are all None)."""
    y, xhat, r = batchnorm_fwd(x, w, b, eps, mean, var)
    yd, xhd, a = batchnorm_tangent_fwd(xd, xhat, r, w, wd, bd, mean is None)
    z = _relu(y, w is not None)
    return z, _relu_mask(yd, z), xhat, xhd, a, r


@register("batchnorm_relu_tangent_bwd", "torch")
def batchnorm_relu_tangent_bwd(
    gz: Tensor,
    gzd: Tensor,
    z: Tensor,
    xhat: Tensor,
    xhd: Opt,
    a: Opt,
    r: Tensor,
    w: Opt,
    wd: Opt,
    batch_stats: bool,
    need_x: bool,
    gw_out: Opt,
    gwd_out: Opt,
    gb_out: Opt,
    gbd_out: Opt,
) -> Tuple[Opt, Opt]:
    """`batchnorm_tangent_bwd` of gy = [z > 0] gz, ġy = [z > 0] ġz: writes gw, ġw, gb, ġb into the given
    outputs; returns (gx, ġx) `[T, N, C, S]` if `need_x`, else (None, None)."""
    return batchnorm_tangent_bwd(
        _relu_mask(gz, z),
        _relu_mask(gzd, z),
        xhat,
        xhd,
        a,
        r,
        w,
        wd,
        batch_stats,
        need_x,
        gw_out,
        gwd_out,
        gb_out,
        gbd_out,
    )


# ---------------------------------------------------------------- batch norm followed by a leaky ReLU
# z = act(y) with y the batch-statistics BatchNorm output above and act(y) = y > 0 ? y : slope·y; slope 1 is
# no activation (plain BatchNorm: z = y, never read as a mask), slope 0 is ReLU. For slope >= 0, z keeps
# y's sign, so k = [z > 0] + slope·[z <= 0] is act's derivative: gy = k gz, ż = k ẏ and (its second
# derivative being 0) ġy = k ġz. The tangent ops keep x and ẋ with per-channel statistics (mean, r,
# a = mean(x̂ ẋ), mean(ẋ), each `[T, C]`) and recompute x̂ and x̂̇ in the backward, instead of keeping
# full-size x̂ and x̂̇: what the C++ kernels (csrc/bn_act.cpp) do in one pass per plane. The forward of the
# value-and-tangent op is `batchnorm_act_train_fwd`'s, bit for bit (see `batchnorm_fwd`).


def _leaky(y: Tensor, slope: float, own: bool) -> Tensor:
    """act(y) (y itself for slope 1); in place when `own` (y is a temporary) and no graph is recorded."""
    if slope == 1.0:
        return y
    if own and not torch.is_grad_enabled():
        return torch.nn.functional.leaky_relu_(y, slope)
    return torch.nn.functional.leaky_relu(y, slope)


def _leaky_mask(g: Opt, z: Opt, slope: float) -> Opt:
    """k g, k = [z > 0] + slope·[z <= 0] (PyTorch's leaky ReLU backward on its output); None stays None."""
    if g is None or slope == 1.0:
        return g
    return torch.ops.aten.leaky_relu_backward(g, z, slope, True)


def _col(v: Tensor) -> Tensor:
    """`[T, C]` -> `[T, 1, C, 1]`."""
    return v[:, None, :, None]


@register("batchnorm_act_train_fwd", "torch")
def batchnorm_act_train_fwd(x: Tensor, w: Opt, b: Opt, eps: float, slope: float) -> Tuple[Tensor, Tensor, Tensor]:
    """x `[T, N, C, S]` -> (z `[T, N, C, S]`, mean `[T, C]`, r `[T, C]`), batch statistics, slope >= 0; the
    backward needs x (and z unless slope is 1)."""
    y, mean, r = batchnorm_train_fwd(x, w, b, eps)
    return _leaky(y, slope, True), mean, r


@register("batchnorm_act_train_bwd", "torch")
def batchnorm_act_train_bwd(
    gz: Tensor,
    z: Opt,
    x: Tensor,
    mean: Tensor,
    r: Tensor,
    w: Opt,
    eps: float,
    slope: float,
    need_x: bool,
    gw_out: Opt,
    gb_out: Opt,
) -> Opt:
    """Backward of `batchnorm_act_train_fwd` (z may be None for slope 1): writes gw, gb `[T, C]` into the
    given outputs, returns gx `[T, N, C, S]` if `need_x`."""
    return batchnorm_train_bwd(_leaky_mask(gz, z, slope), x, mean, r, w, eps, need_x, gw_out, gb_out)


@register("batchnorm_act_value_tangent_fwd", "torch")
def batchnorm_act_value_tangent_fwd(x: Tensor, xd: Opt, w: Opt, b: Opt, wd: Opt, bd: Opt, eps: float, slope: float):
    """(z, ż, mean, r, a, mean(ẋ)): the forward of `batchnorm_act_train_fwd` (bit for bit) and its tangent
    ż = k ẏ along (ẋ, ẇ, ḃ) (None: zero; ż None when all three are), ẏ as `batchnorm_tangent_fwd`;
    per-channel values `[T, C]` (a = mean(x̂ ẋ) and mean(ẋ) zero without ẋ)."""
    y, mean, r = batchnorm_train_fwd(x, w, b, eps)
    zeros = x.new_zeros(mean.shape)
    if xd is None and wd is None and bd is None:
        return _leaky(y, slope, True), None, mean, r, zeros, zeros
    xhat = (x - _col(mean)).mul_(_col(r))
    yd, _, a = batchnorm_tangent_fwd(xd, xhat, _col(r), w, wd, bd, True)
    z = _leaky(y, slope, True)
    return (
        z,
        _leaky_mask(yd, z, slope),
        mean,
        r,
        zeros if a is None else a.view(mean.shape),
        zeros if xd is None else xd.mean(_RED),
    )


@register("batchnorm_act_given_fwd", "torch")
def batchnorm_act_given_fwd(
    x: Tensor, xd: Opt, w: Opt, b: Opt, wd: Opt, bd: Opt, stats: Tensor, eps: float, slope: float
):
    """`batchnorm_act_value_tangent_fwd` on batch statistics computed elsewhere (the epilogue of the
    convolution that wrote x): `stats` `[2, T, C]` (mean, biased variance of x per task and channel) or, with
    a tangent, `[4, T, C]` (also mean(ẋ) and mean((x − mean) ẋ)). Returns (z, ż, mean, r, a, mean(ẋ)) as
    that op does (the same backward ops apply); z does not depend on the tangent, bit for bit. Elementwise
    only: x is not reduced again. Computed in the statistics' dtype, z and ż returned in x's."""
    mean, r = stats[0].contiguous(), torch.rsqrt(stats[1] + eps)
    zeros = torch.zeros_like(mean)
    xhat = (x - _col(mean)).mul_(_col(r))
    y = xhat if w is None else xhat * _channel(w)
    if b is not None:
        y = y + _channel(b)
    z = _leaky(y, slope, y is not xhat).to(x.dtype)
    if xd is None and wd is None and bd is None:
        return z, None, mean, r, zeros, zeros
    a = dmean = zeros
    xhd = None
    if xd is not None:
        if stats.shape[0] != 4:
            raise ValueError(f"stats: a tangent needs [4, T, C] statistics, got {list(stats.shape)}")
        a, dmean = r * stats[3], stats[2].contiguous()
        xhd = (xd - _col(dmean)).addcmul_(xhat, _col(a), value=-1.0).mul_(_col(r))
    yd = affine_tangent(xhd, xhat, _channel(w), _channel(wd), _channel(bd))
    return z, _leaky_mask(yd, z, slope).to(x.dtype), mean, r, a, dmean


@register("batchnorm_act_tangent_bwd", "torch")
def batchnorm_act_tangent_bwd(
    gz: Tensor,
    gzd: Tensor,
    z: Opt,
    x: Tensor,
    xd: Opt,
    mean: Tensor,
    r: Tensor,
    a: Tensor,
    dmean: Tensor,
    w: Opt,
    wd: Opt,
    slope: float,
    need_x: bool,
    gw_out: Opt,
    gwd_out: Opt,
    gb_out: Opt,
    gbd_out: Opt,
) -> Tuple[Opt, Opt]:
    """Backward of `batchnorm_act_value_tangent_fwd` and its tangent (`batchnorm_tangent_bwd` of gy = k gz,
    ġy = k ġz, with x̂ and x̂̇ recomputed from x, ẋ and the statistics): writes gw, ġw, gb, ġb `[T, C]` into
    the given outputs; returns (gx, ġx) `[T, N, C, S]` if `need_x`, else (None, None)."""
    xhat = (x - _col(mean)).mul_(_col(r))
    xhd = None if xd is None else (xd - _col(dmean)).addcmul_(xhat, _col(a), value=-1.0).mul_(_col(r))
    return batchnorm_tangent_bwd(
        _leaky_mask(gz, z, slope),
        _leaky_mask(gzd, z, slope),
        xhat,
        xhd,
        None if xd is None else _col(a),
        _col(r),
        w,
        wd,
        True,
        need_x,
        gw_out,
        gwd_out,
        gb_out,
        gbd_out,
    )
