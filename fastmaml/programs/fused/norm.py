"""BatchNorm1d/2d rule on batch statistics (the MAML convention) or on fixed statistics (`bn_stats`).

Activations `[T, N, C, *spatial]` run as `[T, N, C, S]`; statistics per task and channel. The math
(forward, backward, both tangents, by hand with per-channel sums) is in fastmaml/ops/reference/batchnorm.py.
Running statistics are read only as fixed statistics and never updated.
"""

from __future__ import annotations

from .base import Rule


class BatchNormRule(Rule):
    """p = (weight, bias, statistics): statistics None (batch statistics) or fixed (mean [C], var [C]),
    from `bn_stats[index]` for a BatchNorm module (`index`: its position among the model's BatchNorm
    layers, None for `F.batch_norm`, whose statistics the node binds itself)."""

    param_names = ("weight", "bias")

    def __init__(self, name: str, kind: str, eps: float, num_features: int, index=None):
        super().__init__(name, kind)
        self.eps = eps
        self.num_features = num_features
        self.index = index

    def as_channels(self, x):
        """`[T, N, C, *spatial]` -> `[T, N, C, S]` (checked)."""
        if x.dim() < 3 or x.shape[2] != self.num_features:
            raise ValueError(
                f"model layer {self.describe()}: expected per-task inputs [T, N, {self.num_features}, "
                f"...], got shape {tuple(x.shape)}"
            )
        return x.reshape(x.shape[0], x.shape[1], self.num_features, -1)

    @staticmethod
    def _split(p):
        w, b, stats = p
        mean, var = stats if stats is not None else (None, None)
        return w, b, mean, var

    def forward(self, ops, x, p, save):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        if mean is None:  # batch statistics: PyTorch's fused kernels per task; the backward needs x
            y, mu, r = ops.batchnorm_train_fwd(x4, w, b, self.eps)
            return y.view(x.shape), (x4, mu, r, x.shape) if save else None
        y, xhat, r = ops.batchnorm_fwd(x4, w, b, self.eps, mean, var)
        return y.view(x.shape), (xhat, r, x.shape) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        if len(saved) == 4:
            x4, mu, r, shape = saved
            gx = ops.batchnorm_train_bwd(gy.reshape(x4.shape), x4, mu, r, p[0], self.eps, need_x, outs[0], outs[1])
        else:
            xhat, r, shape = saved
            gx = ops.batchnorm_bwd(gy.reshape(xhat.shape), xhat, r, p[0], False, need_x, outs[0], outs[1])
        return None if gx is None else gx.view(shape)

    def tangent_forward(self, ops, x, xd, p, v):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        batch = mean is None
        y, xhat, r = ops.batchnorm_fwd(x4, w, b, self.eps, mean, var)
        xd4 = None if xd is None else xd.reshape(x4.shape)
        yd, xhd, a = ops.batchnorm_tangent_fwd(xd4, xhat, r, w, v[0], v[1], batch)
        return y.view(x.shape), (None if yd is None else yd.reshape(x.shape)), (xhat, xhd, a, r, x.shape, batch)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        xhat, xhd, a, r, shape, batch = saved
        gx, gxd = ops.batchnorm_tangent_bwd(
            gy.reshape(xhat.shape),
            gyd.reshape(xhat.shape),
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
