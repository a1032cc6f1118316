"""Per-example normalization (LayerNorm, GroupNorm, InstanceNorm): forward, backward, tangent forward,
tangent backward, task-batched.

Every such norm is one normalization of a view x `[T, B, G, A, S]`, statistics per task, row and group over
(A, S), followed by an affine map with weights per (G, A):
- LayerNorm over the last k dims (size D): B the rows (examples × leading dims), G = 1, A = D, S = 1;
- GroupNorm with G groups of C channels: B = N, A = C/G channels, S spatial positions;
- InstanceNorm: GroupNorm with G = C.
Weights and their directions are `[T, G, A]` (per task), `[G, A]` (common) or None (no affine weight, or a
zero direction); the statistics (mean, r = 1/sqrt(var + eps)) are `[T, B, G]`. The forward and backward are
PyTorch's group-norm kernels (C = G·A channels) per task, or its layer-norm kernels for LayerNorm's view (G = 1,
S = 1: measured 3× faster than group norm's on rows); the tangent ops are normalize.py's math (and
batchnorm.py's conventions).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..registry import register
from .normalize import (
    affine_input_grads,
    affine_tangent,
    affine_tangent_grads,
    normalized_tangent,
    normalized_tangent_grad,
)

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]

_RED = (3, 4)  # statistics over (A, S)
_SUMS = (1, 4)  # a weight's gradient over (B, S)


def _affine(w: Opt) -> Opt:
    """`[T, G, A]` or `[G, A]` -> broadcastable `[T|1, 1, G, A, 1]`."""
    if w is None:
        return None
    return w[:, None, :, :, None] if w.dim() == 3 else w[None, None, :, :, None]


def _stat(v: Tensor) -> Tensor:
    """`[T, B, G]` -> broadcastable `[T, B, G, 1, 1]`."""
    return v[..., None, None]


def _row(w: Opt, t: int) -> Opt:
    """Task t's weights `[G·A]` (contiguous) from `[T, G, A]`, or the common `[G, A]` ones."""
    if w is None:
        return None
    return (w[t] if w.dim() == 3 else w).reshape(-1).contiguous()


def _common(w: Opt) -> bool:
    """Whether w is absent or common to all tasks (`[G, A]`, not `[T, G, A]`)."""
    return w is None or w.dim() == 2


def _channels(x: Tensor) -> Tensor:
    """`[T, B, G, A, S]` -> `[T, B, G·A, S]`, the layout of PyTorch's group-norm kernels (C = G·A channels)."""
    T, B, G, A, S = x.shape
    return x.reshape(T, B, G * A, S)


@register("examplenorm_fwd", "torch")
def examplenorm_fwd(x: Tensor, w: Opt, b: Opt, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """x `[T, B, G, A, S]` -> (y `[T, B, G, A, S]`, mean `[T, B, G]`, r `[T, B, G]`), y = x̂ w + b, with PyTorch's
    group-norm kernel per task (one read for the statistics, one pass for y), or once over all tasks' rows
    where the weights are common (step 0, a shared layer). The tangent forward's callers recompute y with this
    op: the same ops round alike (see `batchnorm_fwd`)."""
    T, B, G, A, S = x.shape
    if G == 1 and S == 1:
        return _layernorm_fwd(x, w, b, eps)
    x4 = _channels(x)
    if _common(w) and _common(b):
        y, mean, r = torch.native_group_norm(
            x4.reshape(T * B, G * A, S), _row(w, 0), _row(b, 0), T * B, G * A, S, G, eps
        )
        return y.view(x.shape), mean.view(T, B, G), r.view(T, B, G)

    def args(t):
        return x4[t], _row(w, t), _row(b, t), B, G * A, S, G, eps

    if torch.is_grad_enabled():  # differentiable path (AdaptedModel): out= variants record no graph
        y, mean, r = (torch.stack(z) for z in zip(*(torch.native_group_norm(*args(t)) for t in range(T))))
        return y.view(x.shape), mean, r
    y, mean, r = torch.empty_like(x4), x.new_empty(T, B, G), x.new_empty(T, B, G)
    for t in range(T):
        torch.ops.aten.native_group_norm.out(*args(t), out0=y[t], out1=mean[t], out2=r[t])
    return y.view(x.shape), mean, r


def _layernorm_fwd(x: Tensor, w: Opt, b: Opt, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """`examplenorm_fwd` of LayerNorm's view `[T, B, 1, A, 1]` with PyTorch's layer-norm kernel."""
    T, B, _, A, _ = x.shape
    x3 = x.reshape(T, B, A)
    if _common(w) and _common(b):
        y, mean, r = torch.native_layer_norm(x3.reshape(T * B, A), [A], _row(w, 0), _row(b, 0), eps)
        return y.view(x.shape), mean.view(T, B, 1), r.view(T, B, 1)

    def args(t):
        return x3[t], [A], _row(w, t), _row(b, t), eps

    if torch.is_grad_enabled():  # differentiable path (AdaptedModel): out= variants record no graph
        y, mean, r = (torch.stack(z) for z in zip(*(torch.native_layer_norm(*args(t)) for t in range(T))))
        return y.view(x.shape), mean, r
    y, mean, r = torch.empty_like(x3), x.new_empty(T, B, 1), x.new_empty(T, B, 1)
    for t in range(T):
        torch.ops.aten.native_layer_norm.out(*args(t), out0=y[t], out1=mean[t], out2=r[t])
    return y.view(x.shape), mean, r


def _layernorm_bwd(
    gy: Tensor, x: Tensor, mean: Tensor, r: Tensor, w: Opt, need_x: bool, gw_out: Opt, gb_out: Opt
) -> Opt:
    """`examplenorm_bwd` of LayerNorm's view `[T, B, 1, A, 1]` with PyTorch's layer-norm backward kernel (the
    bias gradient, Σ gy, summed here: the kernel wants the bias to give it)."""
    T, B, _, A, _ = x.shape
    x3, gy3 = x.reshape(T, B, A), gy.reshape(T, B, A)
    if gb_out is not None:
        gb_out.copy_(gy3.sum(1).view(gb_out.shape))
    mask = [need_x, gw_out is not None, False]
    if not any(mask):
        return None
    if mask == [True, False, False] and _common(w):
        rows = T * B
        gx = torch.ops.aten.native_layer_norm_backward(
            gy3.reshape(rows, A),
            x3.reshape(rows, A),
            [A],
            mean.reshape(rows, 1),
            r.reshape(rows, 1),
            _row(w, 0),
            None,
            mask,
        )[0]
        return gx.view(x.shape)
    gx = torch.empty_like(x3) if need_x else None
    for t in range(T):
        outs = torch.ops.aten.native_layer_norm_backward(gy3[t], x3[t], [A], mean[t], r[t], _row(w, t), None, mask)
        for out, value in zip((gx, gw_out), outs):
            if out is not None:
                out[t].copy_(value.view(out[t].shape))
    return None if gx is None else gx.view(x.shape)


@register("examplenorm_bwd", "torch")
def examplenorm_bwd(
    gy: Tensor, x: Tensor, mean: Tensor, r: Tensor, w: Opt, need_x: bool, gw_out: Opt, gb_out: Opt
) -> Opt:
    """Backward of `examplenorm_fwd` with PyTorch's group-norm backward kernel per task (once over all tasks'
    rows where only gx is asked for and the weight is common): writes Σ gy x̂ → `gw_out [T, G, A]`, Σ gy →
    `gb_out [T, G, A]`; returns gx `[T, B, G, A, S]` if `need_x`."""
    T, B, G, A, S = x.shape
    if G == 1 and S == 1:
        return _layernorm_bwd(gy, x, mean, r, w, need_x, gw_out, gb_out)
    mask = [need_x, gw_out is not None, gb_out is not None]
    if not any(mask):
        return None
    x4, gy4 = _channels(x), _channels(gy)
    if mask == [True, False, False] and _common(w):
        rows = T * B
        gx = torch.ops.aten.native_group_norm_backward(
            gy4.reshape(rows, G * A, S),
            x4.reshape(rows, G * A, S),
            mean.reshape(rows, G),
            r.reshape(rows, G),
            _row(w, 0),
            rows,
            G * A,
            S,
            G,
            mask,
        )[0]
        return gx.view(x.shape)
    gx = torch.empty_like(x4) if need_x else None
    for t in range(T):
        outs = torch.ops.aten.native_group_norm_backward(gy4[t], x4[t], mean[t], r[t], _row(w, t), B, G * A, S, G, mask)
        for out, value in zip((gx, gw_out, gb_out), outs):
            if out is not None:
                out[t].copy_(value.view(out[t].shape))
    return None if gx is None else gx.view(x.shape)


@register("examplenorm_tangent_fwd", "torch")
def examplenorm_tangent_fwd(x: Tensor, xd: Opt, mean: Tensor, r: Tensor, w: Opt, wd: Opt, bd: Opt):
    """The tangent of `examplenorm_fwd` (whose statistics it takes) along (ẋ, ẇ, ḃ): returns (ẏ, x̂, x̂̇, a),
    x̂̇ = P(ẋ), ẏ = x̂̇ w + x̂ ẇ + ḃ, a = mean(x̂ ẋ) `[T, B, G, 1, 1]` (x̂̇ and a None when ẋ is: zero; ẏ None when
    ẋ, ẇ and ḃ all are). x̂, x̂̇ and a are what `examplenorm_tangent_bwd` takes."""
    xhat = (x - _stat(mean)).mul_(_stat(r))
    xhd = a = None
    if xd is not None:
        xhd, a = normalized_tangent(xd, xhat, _stat(r), _RED)
    return affine_tangent(xhd, xhat, _affine(w), _affine(wd), _affine(bd)), xhat, xhd, a


@register("examplenorm_tangent_bwd", "torch")
def examplenorm_tangent_bwd(
    gy: Tensor,
    gyd: Tensor,
    xhat: Tensor,
    xhd: Opt,
    a: Opt,
    r: Tensor,
    w: Opt,
    wd: Opt,
    need_x: bool,
    gw_out: Opt,
    gwd_out: Opt,
    gb_out: Opt,
    gbd_out: Opt,
) -> Tuple[Opt, Opt]:
    """Backward and its tangent (as `batchnorm_tangent_bwd` on batch statistics, over this view's dims; r
    `[T, B, G]`): writes gw, ġw, gb, ġb `[T, G, A]` into the given outputs; returns (gx, ġx) `[T, B, G, A, S]`
    if `need_x`, else (None, None)."""
    affine_tangent_grads(gy, gyd, xhat, xhd, _SUMS, (gw_out, gwd_out, gb_out, gbd_out))
    if not need_x:
        return None, None
    gxh, gxhd = affine_input_grads(gy, gyd, _affine(w), _affine(wd))
    return normalized_tangent_grad(gxh, gxhd, xhat, xhd, a, _stat(r), _RED)
