"""BatchNorm1d/2d rule on batch statistics (the MAML convention) or on fixed statistics (`bn_stats`).

Activations `[T, N, C, *spatial]` run as `[T, N, C, S]`; statistics per task and channel. The math
(forward, backward, both tangents, by hand with per-channel sums) is in fastmaml/ops/reference/batchnorm.py.
Running statistics are read only as fixed statistics and never updated.

On batch statistics, where the op table has kernels for the fused BatchNorm + activation ops
(`batchnorm_act_*`: the C++ CPU kernels of csrc/bn_act.cpp), each pass is one of them, with the rule's
`slope` (1: no activation; BatchNormLeakyReLURule's LeakyReLU slope): one read of x for the statistics and
one pass for the output, and the tangent passes keep x and ẋ with per-channel statistics instead of
full-size x̂ and x̂̇. Elsewhere (the reference backend, CUDA) the BatchNorm ops run as before; where the
"triton" backend has BatchNorm kernels it keeps them.

Given statistics: where a convolution running strategy "triton" is the only writer and this rule the only
reader of x, the program passes the batch statistics of x from the convolution's epilogue (`given`:
`[2, T, C]` mean and biased variance, with the tangent `[4, T, C]`); the forwards then normalize with them
(`batchnorm_act_given_fwd`, elementwise: x is not reduced again) and save what the fused passes save, so
the backwards are the `batchnorm_act_*` ones. Fixed statistics ignore them.
"""

from __future__ import annotations

from .base import Rule

_ACT = "act"  # tag of what the fused BatchNorm + activation passes saved


def fused_batch_norm(ops) -> bool:
    """Whether the batch-statistics passes run the fused BatchNorm + activation ops: where `ops` has kernels
    for them (the four `batchnorm_act_*` ops are registered together), not their reference, which composes
    the same BatchNorm ops the unfused passes call."""
    return ops.chosen.get("batchnorm_act_train_fwd", ("torch",))[0] != "torch"


class BatchNormRule(Rule):
    """p = (weight, bias, statistics): statistics None (batch statistics) or fixed (mean [C], var [C]),
    from `bn_stats[index]` for a BatchNorm module (`index`: its position among the model's BatchNorm
    layers, None for `F.batch_norm`, whose statistics the node binds itself)."""

    param_names = ("weight", "bias")
    slope = 1.0  # the leaky ReLU fused after the normalization in the `batchnorm_act_*` passes (1: none)
    takes_stats = True
    input_is_normalized = True  # the BatchNorm normalizes the rule's input (else `normalized_input` gives that value)

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

    # ---- batch statistics through the fused ops (`batchnorm_act_*` with `self.slope`); z is kept for the
    # activation's mask unless slope is 1, x (the input, a view of the value) for the backward

    def _act_forward(self, ops, x, x4, w, b, save):
        z, mu, r = ops.batchnorm_act_train_fwd(x4, w, b, self.eps, self.slope)
        mask = None if self.slope == 1.0 else z
        return z.view(x.shape), (_ACT, mask, x4, mu, r, x.shape) if save else None

    def _act_backward(self, ops, gz, saved, p, need_x, outs):
        _, z, x4, mu, r, shape = saved
        gx = ops.batchnorm_act_train_bwd(
            gz.reshape(x4.shape), z, x4, mu, r, p[0], self.eps, self.slope, need_x, outs[0], outs[1]
        )
        return None if gx is None else gx.view(shape)

    def _act_tangent_forward(self, ops, x, x4, xd, w, b, v):
        xd4 = None if xd is None else xd.reshape(x4.shape)
        z, zd, mu, r, a, dmean = ops.batchnorm_act_value_tangent_fwd(x4, xd4, w, b, v[0], v[1], self.eps, self.slope)
        mask = None if self.slope == 1.0 else z
        return (
            z.view(x.shape),
            (None if zd is None else zd.reshape(x.shape)),
            (_ACT, mask, x4, xd4, mu, r, a, dmean, x.shape),
        )

    def _act_tangent_backward(self, ops, gz, gzd, saved, p, v, need_x, outs, touts):
        _, z, x4, xd4, mu, r, a, dmean, shape = saved
        gx, gxd = ops.batchnorm_act_tangent_bwd(
            gz.reshape(x4.shape),
            gzd.reshape(x4.shape),
            z,
            x4,
            xd4,
            mu,
            r,
            a,
            dmean,
            p[0],
            v[0],
            self.slope,
            need_x,
            outs[0],
            touts[0],
            outs[1],
            touts[1],
        )
        if gx is None:
            return None, None
        return gx.view(shape), gxd.view(shape)

    def _given_forward(self, ops, x, x4, w, b, given, save):
        z, _, mu, r, _, _ = ops.batchnorm_act_given_fwd(x4, None, w, b, None, None, given[:2], self.eps, self.slope)
        mask = None if self.slope == 1.0 else z
        return z.view(x.shape), (_ACT, mask, x4, mu, r, x.shape) if save else None

    def _given_tangent_forward(self, ops, x, x4, xd, w, b, v, given):
        xd4 = None if xd is None else xd.reshape(x4.shape)
        z, zd, mu, r, a, dmean = ops.batchnorm_act_given_fwd(x4, xd4, w, b, v[0], v[1], given, self.eps, self.slope)
        mask = None if self.slope == 1.0 else z
        return (
            z.view(x.shape),
            (None if zd is None else zd.reshape(x.shape)),
            (_ACT, mask, x4, xd4, mu, r, a, dmean, x.shape),
        )

    @staticmethod
    def _fused_saved(saved) -> bool:
        return saved[0] is _ACT

    def forward(self, ops, x, p, save, given=None):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        if mean is None and given is not None:
            return self._given_forward(ops, x, x4, w, b, given, save)
        if mean is None and fused_batch_norm(ops):
            return self._act_forward(ops, x, x4, w, b, save)
        if mean is None:  # batch statistics: PyTorch's fused kernels per task; the backward needs x
            y, mu, r = ops.batchnorm_train_fwd(x4, w, b, self.eps)
            return y.view(x.shape), (x4, mu, r, x.shape) if save else None
        y, xhat, r = ops.batchnorm_fwd(x4, w, b, self.eps, mean, var)
        return y.view(x.shape), (xhat, r, x.shape) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        if self._fused_saved(saved):
            return self._act_backward(ops, gy, saved, p, need_x, outs)
        if len(saved) == 4:
            x4, mu, r, shape = saved
            gx = ops.batchnorm_train_bwd(gy.reshape(x4.shape), x4, mu, r, p[0], self.eps, need_x, outs[0], outs[1])
        else:
            xhat, r, shape = saved
            gx = ops.batchnorm_bwd(gy.reshape(xhat.shape), xhat, r, p[0], False, need_x, outs[0], outs[1])
        return None if gx is None else gx.view(shape)

    def tangent_forward(self, ops, x, xd, p, v, given=None):
        w, b, mean, var = self._split(p)
        x4 = self.as_channels(x)
        batch = mean is None
        if batch and given is not None:
            return self._given_tangent_forward(ops, x, x4, xd, w, b, v, given)
        if batch and fused_batch_norm(ops):
            return self._act_tangent_forward(ops, x, x4, xd, w, b, v)
        y, xhat, r = ops.batchnorm_fwd(x4, w, b, self.eps, mean, var)
        xd4 = None if xd is None else xd.reshape(x4.shape)
        yd, xhd, a = ops.batchnorm_tangent_fwd(xd4, xhat, r, w, v[0], v[1], batch)
        return y.view(x.shape), (None if yd is None else yd.reshape(x.shape)), (xhat, xhd, a, r, x.shape, batch)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if self._fused_saved(saved):
            return self._act_tangent_backward(ops, gy, gyd, saved, p, v, need_x, outs, touts)
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
