"""BatchNorm followed by its activation as one rule: BatchNorm1d/2d + ReLU (z = max(BN(x), 0)), BatchNorm +
LeakyReLU (ResNet-12's block), and BatchNorm2d + ReLU + MaxPool2d with non-overlapping windows (the tail of
every conv-net block).

The compiler fuses them where the intermediate value has no other reader (`graph.fuse`). Each is a
BatchNormRule (the BatchNorm's parameters and `index` into `bn_stats`, the same `as_channels` of its
input) whose passes also apply the activation: the forward writes z only (not BatchNorm's output y), the
backwards mask the incoming gradient and its tangent, and the tangent forward computes (z, ż) and what the
tangent backward needs in one op. z is what the next layer keeps anyway, so the pair saves no more than
BatchNorm alone did. The math is in fastmaml/ops/reference/batchnorm.py ("batch norm followed by ReLU").
"""

from __future__ import annotations

import torch

from . import memory_format as mf
from .norm import BatchNormRule, fused_batch_norm
from .pointwise import LeakyReLURule, ReLURule
from .pooling import MaxPool2dRule, ReLUMaxPool2dRule

aten = torch.ops.aten


class BatchNormReLURule(BatchNormRule):
    slope = 0.0  # (the passes on `given` statistics: `batchnorm_act_*` with slope 0)

    def __init__(self, norm: BatchNormRule, relu: ReLURule):
        super().__init__(
            f"{norm.name}+{relu.name}", f"{norm.kind}+{relu.kind}", norm.eps, norm.num_features, norm.index
        )
        self.norm, self.relu = norm, relu  # the parts, for BatchNormReLUMaxPoolRule's fixed statistics

    def forward(self, ops, x, p, save, given=None):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        if mean is None and given is not None:
            return self._given_forward(ops, x, x4, w, b, given, save)
        if mean is None:  # batch statistics: the backward needs x
            z, mu, r = ops.batchnorm_relu_train_fwd(x4, w, b, self.eps)
            return z.view(x.shape), (z, x4, mu, r, x.shape) if save else None
        z, xhat, r = ops.batchnorm_relu_fwd(x4, w, b, self.eps, mean, var)
        return z.view(x.shape), (z, xhat, r, x.shape) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        if self._fused_saved(saved):
            return self._act_backward(ops, gy, saved, p, need_x, outs)
        if len(saved) == 5:
            z, x4, mu, r, shape = saved
            gx = ops.batchnorm_relu_train_bwd(
                gy.reshape(x4.shape), z, x4, mu, r, p[0], self.eps, need_x, outs[0], outs[1]
            )
        else:
            z, xhat, r, shape = saved
            gx = ops.batchnorm_relu_bwd(gy.reshape(xhat.shape), z, xhat, r, p[0], False, need_x, outs[0], outs[1])
        return None if gx is None else gx.view(shape)

    def tangent_forward(self, ops, x, xd, p, v, given=None):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        if mean is None and given is not None:
            return self._given_tangent_forward(ops, x, x4, xd, w, b, v, given)
        xd4 = None if xd is None else xd.reshape(x4.shape)
        z, zd, xhat, xhd, a, r = ops.batchnorm_relu_value_tangent_fwd(x4, xd4, w, b, v[0], v[1], self.eps, mean, var)
        return (
            z.view(x.shape),
            (None if zd is None else zd.reshape(x.shape)),
            (z, xhat, xhd, a, r, x.shape, mean is None),
        )

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if self._fused_saved(saved):
            return self._act_tangent_backward(ops, gy, gyd, saved, p, v, need_x, outs, touts)
        z, xhat, xhd, a, r, shape, batch = saved
        gx, gxd = ops.batchnorm_relu_tangent_bwd(
            gy.reshape(xhat.shape),
            gyd.reshape(xhat.shape),
            z,
            xhat,
            xhd,
            a,
            r,
            p[0],
            v[0],
            batch,
            need_x,
            outs[0],
            touts[0],
            outs[1],
            touts[1],
        )
        if gx is None:
            return None, None
        return gx.view(shape), gxd.view(shape)


class BatchNormReLUMaxPoolRule(BatchNormRule):
    """z = maxpool_k(relu(BatchNorm2d(x))) with k×k windows at stride k (`fusable`), as one rule.

    On batch statistics each pass is one op (`bn_relu_maxpool_train_fwd/bwd`, and with tangents
    `bn_relu_maxpool_tangent_fwd/bwd`): the forwards write only the pooled z (and ż), the max-pool
    indices and per-channel statistics, not BatchNorm's or ReLU's full-size outputs; the backwards
    read x (and ẋ) and the pooled gradients and write gx (and ġx) once. With fixed statistics the
    BatchNorm rule (an affine map) and the ReLU + max-pool rule (`ReLUMaxPool2dRule`: pooled first, by the
    `relu_maxpool_fwd` kernel where the op table has it) run in turn.
    """

    takes_stats = False  # its fused kernels reduce x themselves (given statistics: not wired)

    def __init__(self, norm_relu: BatchNormReLURule, pool: MaxPool2dRule):
        super().__init__(
            f"{norm_relu.name}+{pool.name}",
            f"{norm_relu.kind}+{pool.kind}",
            norm_relu.eps,
            norm_relu.num_features,
            norm_relu.index,
        )
        self.norm, self.tail = norm_relu.norm, ReLUMaxPool2dRule(norm_relu.relu, pool)
        self.pool = pool
        self.k = pool.kernel[0]

    @staticmethod
    def fusable(norm_relu: BatchNormReLURule, pool: MaxPool2dRule) -> bool:
        """Square windows at stride = window, no padding or dilation, floor mode (the pool makes the input a
        BatchNorm2d's `[N, C, H, W]`)."""
        return pool.window is not None

    def _checked(self, x):
        """x `[T, N, C, H, W]` (checked: C channels, 5 dims), dense in its format for the kernels."""
        self.as_channels(x)
        self.pool._check(x)
        return mf.dense_as(x, x)

    def forward(self, ops, x, p, save):
        w, b, mean, var = self._split(p)
        if mean is not None:  # fixed statistics
            y, s1 = self.norm.forward(ops, x, p, save)
            z, s2 = self.tail.forward(ops, y, (), save)
            return z, ("composed", s1, s2) if save else None
        x = self._checked(x)
        z, idx, mu, r = ops.bn_relu_maxpool_train_fwd(x, w, b, self.eps, self.k)
        return z, ("fused", z, idx, x, mu, r) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        if saved[0] == "composed":
            _, s1, s2 = saved
            return self.norm.backward(ops, self.tail.backward(ops, gy, s2, (), True, ()), s1, p, need_x, outs)
        _, z, idx, x, mu, r = saved
        return ops.bn_relu_maxpool_train_bwd(gy, z, idx, x, mu, r, p[0], self.eps, self.k, need_x, outs[0], outs[1])

    def tangent_forward(self, ops, x, xd, p, v):
        w, b, mean, var = self._split(p)
        if mean is not None:  # fixed statistics
            y, yd, s1 = self.norm.tangent_forward(ops, x, xd, p, v)
            z, zd, s2 = self.tail.tangent_forward(ops, y, yd, (), ())
            return z, zd, ("composed", s1, s2)
        x = self._checked(x)
        xd = mf.dense_as(xd, x)
        z, zd, idx, mu, r, a, dmean = ops.bn_relu_maxpool_tangent_fwd(x, xd, w, b, v[0], v[1], self.eps, self.k)
        return z, zd, ("fused", z, idx, x, xd, mu, r, a, dmean)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if saved[0] == "composed":
            _, s1, s2 = saved
            g, gd = self.tail.tangent_backward(ops, gy, gyd, s2, (), (), True, (), ())
            return self.norm.tangent_backward(ops, g, gd, s1, p, v, need_x, outs, touts)
        _, z, idx, x, xd, mu, r, a, dmean = saved
        return ops.bn_relu_maxpool_tangent_bwd(
            gy, gyd, z, idx, x, xd, mu, r, a, dmean, p[0], v[0], self.k, need_x, outs[0], touts[0], outs[1], touts[1]
        )


class BatchNormLeakyReLURule(BatchNormRule):
    """z = leaky_relu(BatchNorm(x), slope) as one rule (ResNet-12's block): BatchNorm's own output is not
    kept. z keeps y's sign (slope > 0), so [z > 0] gives the mask: gy = gz · (1 or slope), ż = ẏ · (1 or
    slope) and, the second derivative being 0, ġy = ġz · (1 or slope).

    On batch statistics, where the op table has kernels for them, each pass is one fused op
    (`batchnorm_act_*` with the slope, BatchNormRule's `_act_*` passes: the C++ CPU kernels of
    csrc/bn_act.cpp); elsewhere, and with fixed statistics, the rule composes the BatchNorm ops with the
    slope applied in place."""

    def __init__(self, norm: BatchNormRule, act: LeakyReLURule):
        super().__init__(f"{norm.name}+{act.name}", f"{norm.kind}+{act.kind}", norm.eps, norm.num_features, norm.index)
        self.slope = act.slope

    def _act(self, y, own: bool):
        if own and not torch.is_grad_enabled():
            return torch.nn.functional.leaky_relu_(y, self.slope)
        return torch.nn.functional.leaky_relu(y, self.slope)

    def _mask(self, g, z):
        return None if g is None else aten.leaky_relu_backward(g, z, self.slope, True)

    def forward(self, ops, x, p, save, given=None):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        if mean is None and given is not None:
            return self._given_forward(ops, x, x4, w, b, given, save)
        if mean is None and fused_batch_norm(ops):
            return self._act_forward(ops, x, x4, w, b, save)
        if mean is None:  # batch statistics: the backward needs x
            y, mu, r = ops.batchnorm_train_fwd(x4, w, b, self.eps)
            z = self._act(y, True)
            return z.view(x.shape), (z, x4, mu, r, x.shape) if save else None
        y, xhat, r = ops.batchnorm_fwd(x4, w, b, self.eps, mean, var)
        z = self._act(y, w is not None)  # without w, y is x̂ itself (kept)
        return z.view(x.shape), (z, xhat, r, x.shape) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        if self._fused_saved(saved):
            return self._act_backward(ops, gy, saved, p, need_x, outs)
        if len(saved) == 5:
            z, x4, mu, r, shape = saved
            gx = ops.batchnorm_train_bwd(
                self._mask(gy.reshape(x4.shape), z), x4, mu, r, p[0], self.eps, need_x, outs[0], outs[1]
            )
        else:
            z, xhat, r, shape = saved
            gx = ops.batchnorm_bwd(
                self._mask(gy.reshape(xhat.shape), z), xhat, r, p[0], False, need_x, outs[0], outs[1]
            )
        return None if gx is None else gx.view(shape)

    def tangent_forward(self, ops, x, xd, p, v, given=None):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        if mean is None and given is not None:
            return self._given_tangent_forward(ops, x, x4, xd, w, b, v, given)
        if mean is None and fused_batch_norm(ops):
            return self._act_tangent_forward(ops, x, x4, xd, w, b, v)
        y, xhat, r = ops.batchnorm_fwd(x4, w, b, self.eps, mean, var)
        xd4 = None if xd is None else xd.reshape(x4.shape)
        yd, xhd, a = ops.batchnorm_tangent_fwd(xd4, xhat, r, w, v[0], v[1], mean is None)
        z = self._act(y, w is not None)
        zd = self._mask(yd, z)
        return (
            z.view(x.shape),
            (None if zd is None else zd.reshape(x.shape)),
            (z, xhat, xhd, a, r, x.shape, mean is None),
        )

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if self._fused_saved(saved):
            return self._act_tangent_backward(ops, gy, gyd, saved, p, v, need_x, outs, touts)
        z, xhat, xhd, a, r, shape, batch = saved
        gy, gyd = self._mask(gy.reshape(xhat.shape), z), self._mask(gyd.reshape(xhat.shape), z)
        gx, gxd = ops.batchnorm_tangent_bwd(
            gy, gyd, xhat, xhd, a, r, p[0], v[0], batch, need_x, outs[0], touts[0], outs[1], touts[1]
        )
        if gx is None:
            return None, None
        return gx.view(shape), gxd.view(shape)
