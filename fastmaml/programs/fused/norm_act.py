"""BatchNorm1d/2d immediately followed by ReLU, as one rule: z = max(BN(x), 0).

The compiler fuses the pair (`compile_model`). It is a BatchNormRule (same parameters, owned by the
BatchNorm module's path; same `index` into `bn_stats`; same `as_channels` of its input), whose ops
also apply the ReLU: the forward writes z only (not BatchNorm's output y), the backwards mask the
incoming gradient and its tangent by z > 0, and the tangent forward computes (z, ż) and what the
tangent backward needs in one op. z is what the next layer keeps anyway, so the pair saves no more
than BatchNorm alone did. The math is in fastmaml/ops/layers.py ("batch norm followed by ReLU").
"""
from __future__ import annotations

from .norm import BatchNormRule
from .pointwise import ReLURule


class BatchNormReLURule(BatchNormRule):
    def __init__(self, norm: BatchNormRule, relu: ReLURule):
        self.path = norm.path  # the parameters belong to the BatchNorm module
        self.name = f"{norm.name}+{relu.name}"
        self.kind = f"{norm.kind}+{relu.kind}"
        self.eps, self.num_features, self.index = norm.eps, norm.num_features, norm.index

    def forward(self, ops, x, p, save):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        if mean is None:  # batch statistics: the backward needs x
            z, mu, r = ops.batchnorm_relu_train_fwd(x4, w, b, self.eps)
            return z.view(x.shape), (z, x4, mu, r, x.shape) if save else None
        z, xhat, r = ops.batchnorm_relu_fwd(x4, w, b, self.eps, mean, var)
        return z.view(x.shape), (z, xhat, r, x.shape) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        if len(saved) == 5:
            z, x4, mu, r, shape = saved
            gx = ops.batchnorm_relu_train_bwd(gy.reshape(x4.shape), z, x4, mu, r, p[0], self.eps, need_x, outs[0],
                                              outs[1])
        else:
            z, xhat, r, shape = saved
            gx = ops.batchnorm_relu_bwd(gy.reshape(xhat.shape), z, xhat, r, p[0], False, need_x, outs[0], outs[1])
        return None if gx is None else gx.view(shape)

    def tangent_forward(self, ops, x, xd, p, v):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        xd4 = None if xd is None else xd.reshape(x4.shape)
        z, zd, xhat, xhd, a, r = ops.batchnorm_relu_value_tangent_fwd(x4, xd4, w, b, v[0], v[1], self.eps, mean, var)
        return (z.view(x.shape), (None if zd is None else zd.reshape(x.shape)),
                (z, xhat, xhd, a, r, x.shape, mean is None))

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        z, xhat, xhd, a, r, shape, batch = saved
        gx, gxd = ops.batchnorm_relu_tangent_bwd(gy.reshape(xhat.shape), gyd.reshape(xhat.shape), z, xhat, xhd, a,
                                                 r, p[0], v[0], batch, need_x, outs[0], touts[0], outs[1], touts[1])
        if gx is None:
            return None, None
        return gx.view(shape), gxd.view(shape)
