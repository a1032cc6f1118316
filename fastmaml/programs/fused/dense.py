"""Linear rule: y = x wᵀ + b over the last feature dim, per-task weights as batched GEMMs."""

from __future__ import annotations

from .base import Rule


class LinearRule(Rule):
    param_names = ("weight", "bias")

    def __init__(self, name: str, kind: str, in_features: int):
        super().__init__(name, kind)
        self.in_features = in_features

    def _rows(self, x):
        """`[T, N, *mid, I]` -> `[T, N·mid, I]` (a view when contiguous)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"model layer {self.describe()}: expected inputs with {self.in_features} features "
                f"in the last dim, got per-task shape {tuple(x.shape)}"
            )
        return x if x.dim() == 3 else x.reshape(x.shape[0], -1, self.in_features)

    def forward(self, ops, x, p, save):
        w, b = p
        x3 = self._rows(x)
        y = ops.linear_fwd(x3, w, b)
        if x.dim() != 3:
            y = y.view(*x.shape[:-1], y.shape[-1])
        return y, (x3, x.shape) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        x3, shape = saved
        if gy.dim() != 3:
            gy = gy.reshape(x3.shape[0], x3.shape[1], -1)
        gx = ops.linear_bwd(gy, x3, p[0], need_x, outs[0], outs[1])
        return gx if gx is None or len(shape) == 3 else gx.view(shape)

    def tangent_forward(self, ops, x, xd, p, v):
        w, b = p
        x3 = self._rows(x)
        xd3 = xd if xd is None or xd.dim() == 3 else xd.reshape(x3.shape)
        y, yd = ops.linear_value_tangent_fwd(x3, xd3, w, b, v[0], v[1])
        if x.dim() != 3:
            out_shape = (*x.shape[:-1], y.shape[-1])
            y, yd = y.view(out_shape), (None if yd is None else yd.reshape(out_shape))
        return y, yd, (x3, xd3, x.shape)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        x3, xd3, shape = saved
        if gy.dim() != 3:
            gy, gyd = gy.reshape(*x3.shape[:2], -1), gyd.reshape(*x3.shape[:2], -1)
        gx, gxd = ops.linear_tangent_bwd(gy, gyd, x3, xd3, p[0], v[0], need_x, outs[0], touts[0], outs[1], touts[1])
        if gx is None or len(shape) == 3:
            return gx, gxd
        return gx.view(shape), gxd.view(shape)


def _transposed(w):
    return None if w is None else w.transpose(-1, -2)


class TransposedLinearRule(LinearRule):
    """`x @ W` / `torch.matmul(x, W)` with W `[in, out]` one of the model's parameters: the Linear rule on Wᵀ
    (no bias), its weight's gradient and that gradient's tangent transposed back. p = (W,)."""

    param_names = ("weight",)

    @staticmethod
    def _temp(out):
        """A `[T, out, in]` buffer for the gradient w.r.t. Wᵀ where W's `[T, in, out]` one is asked for."""
        return None if out is None else out.new_empty(*out.shape[:-2], out.shape[-1], out.shape[-2])

    def forward(self, ops, x, p, save):
        return super().forward(ops, x, (_transposed(p[0]), None), save)

    def backward(self, ops, gy, saved, p, need_x, outs):
        g = self._temp(outs[0])
        gx = super().backward(ops, gy, saved, (_transposed(p[0]), None), need_x, (g, None))
        if g is not None:
            outs[0].copy_(_transposed(g))
        return gx

    def tangent_forward(self, ops, x, xd, p, v):
        return super().tangent_forward(ops, x, xd, (_transposed(p[0]), None), (_transposed(v[0]), None))

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        g, gd = self._temp(outs[0]), self._temp(touts[0])
        gx, gxd = super().tangent_backward(
            ops, gy, gyd, saved, (_transposed(p[0]), None), (_transposed(v[0]), None), need_x, (g, None), (gd, None)
        )
        for out, value in ((outs[0], g), (touts[0], gd)):
            if out is not None:
                out.copy_(_transposed(value))
        return gx, gxd
