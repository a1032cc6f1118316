"""The conv-net block tail BatchNorm2d + ReLU + MaxPool2d (k×k windows at stride k) as one op per pass, and
ReLU + MaxPool2d without BatchNorm (its forward).

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
from .batchnorm import (
    _RED,
    _relu_mask,
    batchnorm_relu_train_fwd,
    batchnorm_tangent_bwd,
    batchnorm_tangent_fwd,
    batchnorm_train_bwd,
)

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


# ---------------------------------------------------------------- batch norm + ReLU + max-pool
# The conv nets' block tail z = maxpool_k(relu(BN(x))), k×k windows at stride k, no padding, floor;
# batch statistics. idx are PyTorch's max-pool indices (h·W + w in each [H, W] plane). In the backward
# the gradient reaches the chosen element only where z > 0 (ReLU's mask there). The tangent versions
# keep x and ẋ and per-channel statistics (mean, r, a = mean(x̂ ẋ), mean(ẋ), each `[T, C]`) and
# recompute x̂ and x̂̇ in the backward, instead of keeping full-size x̂, x̂̇ and relu(y).


def per_task_channels(v: Opt, name: str, like: Tensor, fill: float) -> Tensor:
    """The per-channel argument `name` of the block kernels, `[T, C]`, `[C]` or None (all `fill`), as a
    contiguous `[T, C]` (T, C = like's dims 0 and 2)."""
    T, C = like.shape[0], like.shape[2]
    if v is None:
        return like.new_full((T, C), fill)
    if tuple(v.shape) not in ((C,), (T, C)):
        raise ValueError(f"{name}: expected per-channel values [{C}] or [{T}, {C}], got shape {tuple(v.shape)}")
    return v.expand(T, C).contiguous()


def with_tangents(x: Tensor, xd: Opt, w: Opt, b: Opt, wd: Opt, *rest) -> Optional[str]:
    """`supports` of the fused tangent kernels (arguments of `bn_relu_maxpool_tangent_fwd`): they take both
    ẋ and ẇ (the first adapted layer and shared weights have neither; the reference covers those)."""
    return None if xd is not None and wd is not None else "a zero tangent or weight direction"


def with_tangents_bwd(gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd, *rest) -> Optional[str]:
    """`with_tangents` for the arguments of `bn_relu_maxpool_tangent_bwd`."""
    return with_tangents(x, xd, w, None, wd)


def _pool_args(k: int):
    return [k, k], [k, k], [0, 0], [1, 1], False


@register("bn_relu_maxpool_train_fwd", "torch")
def bn_relu_maxpool_train_fwd(x: Tensor, w: Opt, b: Opt, eps: float, k: int):
    """x `[T, N, C, H, W]` -> (z `[T, N, C, H/k, W/k]`, idx int64 like z, mean `[T, C]`, r `[T, C]`)."""
    T, N, C, H, W = x.shape
    y, mean, r = batchnorm_relu_train_fwd(x.reshape(T, N, C, H * W), w, b, eps)
    z, idx = torch.ops.aten.max_pool2d_with_indices(y.view(T * N, C, H, W), *_pool_args(k))
    return z.view(T, N, *z.shape[1:]), idx.view(T, N, *idx.shape[1:]), mean, r


def _route(gz: Tensor, z: Tensor, idx: Tensor, x: Tensor, k: int) -> Tensor:
    """The pooled gradient `[T, N, C, Ho, Wo]` at the chosen elements where z > 0 -> `[T, N, C, H, W]` (x's
    shape)."""
    T, N, C, H, W = x.shape
    g = _relu_mask(gz, z).reshape(T * N, C, *z.shape[3:])
    gy = torch.ops.aten.max_pool2d_with_indices_backward(
        g, x.reshape(T * N, C, H, W), *_pool_args(k), idx.view(T * N, C, *idx.shape[3:])
    )
    return gy.view(x.shape)


@register("bn_relu_maxpool_train_bwd", "torch")
def bn_relu_maxpool_train_bwd(
    gz: Tensor,
    z: Tensor,
    idx: Tensor,
    x: Tensor,
    mean: Tensor,
    r: Tensor,
    w: Opt,
    eps: float,
    k: int,
    need_x: bool,
    gw_out: Opt,
    gb_out: Opt,
) -> Opt:
    """Backward of `bn_relu_maxpool_train_fwd`: writes gw, gb `[T, C]` into the given outputs; returns gx
    `[T, N, C, H, W]` if `need_x`."""
    T, N, C, H, W = x.shape
    x4 = x.view(T, N, C, H * W)
    gx = batchnorm_train_bwd(_route(gz, z, idx, x, k).view(x4.shape), x4, mean, r, w, eps, need_x, gw_out, gb_out)
    return None if gx is None else gx.view(x.shape)


@register("bn_relu_maxpool_tangent_fwd", "torch")
def bn_relu_maxpool_tangent_fwd(x: Tensor, xd: Opt, w: Opt, b: Opt, wd: Opt, bd: Opt, eps: float, k: int):
    """(z, ż, idx, mean, r, a, mean(ẋ)): the forward of `bn_relu_maxpool_train_fwd` and its tangent along
    (ẋ, ẇ, ḃ) (None: zero; ż None when all three are); per-channel values `[T, C]` (a, mean(ẋ) zero
    without ẋ). z, idx, mean and r come from `bn_relu_maxpool_train_fwd` itself: the Hessian-vector
    product pass recomputes a step's forward, and only the same ops round alike and pick the same
    elements (a pick that differed would pair the step's gradient with the Hessian of another linear
    piece of the loss)."""
    T, N, C, H, W = x.shape
    z, idx, mean, r = bn_relu_maxpool_train_fwd(x, w, b, eps, k)
    zeros = x.new_zeros(T, C)
    if xd is None and wd is None and bd is None:
        return z, None, idx, mean, r, zeros, zeros
    x4 = x.reshape(T, N, C, H * W)
    xd4 = None if xd is None else xd.reshape(x4.shape)
    col = lambda v: v[:, None, :, None]  # noqa: E731  [T, C] -> [T, 1, C, 1]
    xhat = (x4 - col(mean)).mul_(col(r))
    yd, _, a = batchnorm_tangent_fwd(xd4, xhat, col(r), w, wd, bd, True)
    zd = yd.reshape(T * N, C, H * W).gather(2, idx.view(T * N, C, -1)).view(z.shape)
    return (
        z,
        _relu_mask(zd, z),
        idx,
        mean,
        r,
        zeros if a is None else a.view(T, C),
        zeros if xd is None else xd4.mean(_RED),
    )


@register("bn_relu_maxpool_tangent_bwd", "torch")
def bn_relu_maxpool_tangent_bwd(
    gz: Tensor,
    gzd: Tensor,
    z: Tensor,
    idx: Tensor,
    x: Tensor,
    xd: Opt,
    mean: Tensor,
    r: Tensor,
    a: Tensor,
    dmean: Tensor,
    w: Opt,
    wd: Opt,
    k: int,
    need_x: bool,
    gw_out: Opt,
    gwd_out: Opt,
    gb_out: Opt,
    gbd_out: Opt,
) -> Tuple[Opt, Opt]:
    """Backward of `bn_relu_maxpool_tangent_fwd` and its tangent (`batchnorm_tangent_bwd` of the routed
    gradients): writes gw, ġw, gb, ġb `[T, C]` into the given outputs; returns (gx, ġx) `[T, N, C, H, W]`
    if `need_x`, else (None, None)."""
    T, N, C, H, W = x.shape
    x4 = x.reshape(T, N, C, H * W)
    col = lambda v: v[:, None, :, None]  # noqa: E731  [T, C] -> [T, 1, C, 1]
    xhat = (x4 - col(mean)).mul_(col(r))
    xhd = None if xd is None else (xd.reshape(x4.shape) - col(dmean)).addcmul_(xhat, col(a), value=-1.0).mul_(col(r))
    gy, gyd = (_route(g, z, idx, x, k).view(x4.shape) for g in (gz, gzd))
    gx, gxd = batchnorm_tangent_bwd(
        gy,
        gyd,
        xhat,
        xhd,
        None if xd is None else col(a),
        col(r),
        w,
        wd,
        True,
        need_x,
        gw_out,
        gwd_out,
        gb_out,
        gbd_out,
    )
    return (None, None) if gx is None else (gx.view(x.shape), gxd.view(x.shape))


# ---------------------------------------------------------------- a first conv block: conv + the block tail
# z = maxpool_k(relu(BN(conv2d(x, cw) + cb))) with per-task weights cw `[T, C, Ci, kh, kw]` (every argument
# per task here; the rule expands common ones). The statistics of y = conv2d(x, cw) + cb are also those of the
# input patches p (D = Ci·kh·kw values per output position, zero on the padding): pmean = mean p and
# pcov = mean (p − pmean)(p − pmean)ᵀ over a task's positions, float64 (mean_c = cw_c·pmean + cb_c,
# var_c = cw_cᵀ pcov cw_c); kernels compute the statistics from them and never write y.


def _conv_per_task(x: Tensor, cw: Tensor, cb: Tensor, stride, padding, dilation) -> Tensor:
    """y `[T, N, C, Hc, Wc]` = conv2d(x[t], cw[t]) + cb[t] per task."""
    return torch.stack(
        [torch.nn.functional.conv2d(x[t], cw[t], cb[t], stride, padding, dilation) for t in range(x.shape[0])]
    )


def _patch_moments(x: Tensor, kernel, stride, padding, dilation) -> Tuple[Tensor, Tensor]:
    """(pmean `[T, D]`, pcov `[T, D, D]`) float64 of the input patches of each task."""
    means, covs = [], []
    for t in range(x.shape[0]):
        p = torch.nn.functional.unfold(x[t].double(), kernel, dilation, padding, stride)  # [N, D, L]
        p = p.transpose(1, 2).reshape(-1, p.shape[1])
        mean = p.mean(0)
        c = p - mean
        means.append(mean)
        covs.append(c.T @ c / p.shape[0])
    return torch.stack(means), torch.stack(covs)


@register("conv_bn_relu_maxpool_fwd", "torch")
def conv_bn_relu_maxpool_fwd(
    x: Tensor, cw: Tensor, cb: Tensor, w: Tensor, b: Tensor, eps: float, k: int, stride, padding, dilation
):
    """x `[T, N, Ci, H, W]`, cw `[T, C, Ci, kh, kw]`, cb, w, b `[T, C]` -> (z `[T, N, C, Hc/k, Wc/k]`, idx int64
    like z, mean `[T, C]`, r `[T, C]`, pmean `[T, D]`, pcov `[T, D, D]`)."""
    y = _conv_per_task(x, cw, cb, stride, padding, dilation)
    z, idx, mean, r = bn_relu_maxpool_train_fwd(y, w, b, eps, k)
    return (z, idx, mean, r, *_patch_moments(x, cw.shape[3:], stride, padding, dilation))


@register("conv_bn_relu_maxpool_bwd", "torch")
def conv_bn_relu_maxpool_bwd(
    gz: Tensor,
    z: Tensor,
    idx: Tensor,
    x: Tensor,
    cw: Tensor,
    cb: Tensor,
    w: Tensor,
    pmean: Tensor,
    pcov: Tensor,
    eps: float,
    k: int,
    stride,
    padding,
    dilation,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of `conv_bn_relu_maxpool_fwd` (no gradient w.r.t. x) -> (gcw `[T, C, Ci, kh, kw]`, gcb, gw,
    gb `[T, C]`); recomputes y and its statistics (pmean, pcov unused)."""
    y = _conv_per_task(x, cw, cb, stride, padding, dilation)
    T, C = y.shape[0], y.shape[2]
    _, _, mean, r = bn_relu_maxpool_train_fwd(y, w, cb, eps, k)
    gw, gb = y.new_empty(T, C), y.new_empty(T, C)
    gy = bn_relu_maxpool_train_bwd(gz, z, idx, y, mean, r, w, eps, k, True, gw, gb)
    gcw, gcb = y.new_empty(cw.shape), y.new_empty(T, C)
    for t in range(T):
        _, gcw[t], gcb[t] = torch.ops.aten.convolution_backward(
            gy[t], x[t], cw[t], [C], stride, padding, dilation, False, [0, 0], 1, [False, True, True]
        )
    return gcw, gcb, gw, gb


@register("conv_bn_relu_maxpool_tangent_fwd", "torch")
def conv_bn_relu_maxpool_tangent_fwd(
    x: Tensor,
    cw: Tensor,
    cb: Tensor,
    w: Tensor,
    b: Tensor,
    dcw: Tensor,
    dcb: Tensor,
    dw: Tensor,
    db: Tensor,
    eps: float,
    k: int,
    stride,
    padding,
    dilation,
):
    """The forward and its tangent along (dcw, dcb, dw, db) (per task, like cw, cb, w, b; x has none) ->
    (z, zd, idx, mean, r, pmean, pcov)."""
    y = _conv_per_task(x, cw, cb, stride, padding, dilation)
    yd = _conv_per_task(x, dcw, dcb, stride, padding, dilation)
    z, zd, idx, mean, r, _, _ = bn_relu_maxpool_tangent_fwd(y, yd, w, b, dw, db, eps, k)
    return (z, zd, idx, mean, r, *_patch_moments(x, cw.shape[3:], stride, padding, dilation))


@register("conv_bn_relu_maxpool_tangent_bwd", "torch")
def conv_bn_relu_maxpool_tangent_bwd(
    gz: Tensor,
    gzd: Tensor,
    z: Tensor,
    idx: Tensor,
    x: Tensor,
    cw: Tensor,
    cb: Tensor,
    w: Tensor,
    dcw: Tensor,
    dw: Tensor,
    pmean: Tensor,
    pcov: Tensor,
    eps: float,
    k: int,
    stride,
    padding,
    dilation,
) -> Tuple[Tensor, ...]:
    """The backward of `conv_bn_relu_maxpool_tangent_fwd` and its tangent -> (gcw, gcb, gw, gb, and their
    tangents); recomputes y, ẏ (without dcb, which the statistics cancel) and their statistics."""
    y = _conv_per_task(x, cw, cb, stride, padding, dilation)
    yd = _conv_per_task(x, dcw, torch.zeros_like(cb), stride, padding, dilation)
    T, C = y.shape[0], y.shape[2]
    zeros = y.new_zeros(T, C)
    _, _, _, mean, r, a, dmean = bn_relu_maxpool_tangent_fwd(y, yd, w, zeros, dw, zeros, eps, k)
    gw, gwd, gb, gbd = (y.new_empty(T, C) for _ in range(4))
    gy, gyd = bn_relu_maxpool_tangent_bwd(gz, gzd, z, idx, y, yd, mean, r, a, dmean, w, dw, k, True, gw, gwd, gb, gbd)
    grads = []
    for g in (gy, gyd):
        gcw, gcb = y.new_empty(cw.shape), y.new_empty(T, C)
        for t in range(T):
            _, gcw[t], gcb[t] = torch.ops.aten.convolution_backward(
                g[t], x[t], cw[t], [C], stride, padding, dilation, False, [0, 0], 1, [False, True, True]
            )
        grads.append((gcw, gcb))
    (gcw, gcb), (gcwd, gcbd) = grads
    return gcw, gcb, gw, gb, gcwd, gcbd, gwd, gbd


# ---------------------------------------------------------------- ReLU + max-pool
# The block tail of a conv net without BatchNorm: z = maxpool_k(relu(x)) = relu(maxpool_k(x)), k×k windows
# at stride k, no padding, floor. The backward and the tangents route through idx where z > 0 (ReLU's mask),
# so idx matters only there; the pooled gradient then goes back through PyTorch's max-pool backward.


@register("relu_maxpool_fwd", "torch")
def relu_maxpool_fwd(x: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """x `[T, N, C, H, W]` -> (z, idx `[T, N, C, H/k, W/k]`), idx PyTorch's max-pool indices (h·W + w) of the
    pick where z > 0 (elsewhere of x's maximum, which relu(x) ties with zeros). Pools first, then the ReLU on
    the pooled map."""
    T, N, C, H, W = x.shape
    y, idx = torch.nn.functional.max_pool2d(x.reshape(T * N, C, H, W), k, return_indices=True)
    z = y.relu_() if not torch.is_grad_enabled() else torch.relu(y)
    return z.view(T, N, *z.shape[1:]), idx.view(T, N, *idx.shape[1:])
