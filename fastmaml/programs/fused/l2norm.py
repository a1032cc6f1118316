"""L2 normalization, `F.normalize(x, dim=d)`: of a value (`NormalizeRule`) and of a Linear layer's weight rows
(`NormalizedLinearRule`: a cosine classifier, `F.linear(F.normalize(x), F.normalize(self.weight))`).

y = x / n with n = max(‖x‖, eps) along d. With s = [‖x‖ > eps] (per row), the Jacobian is symmetric,
J v = (v − s y (y·v)) / n, so the gradient is gx = J gy. Along ẋ, ẏ = J ẋ and ṅ = s (y·ẋ); the tangent of the
gradient, with c = y·gy, is ġx = (ġy − s ẏ c − s y (ẏ·gy + y·ġy)) / n − gx ṅ / n.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import Rule
from .dense import LinearRule

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


def normalize(x: Tensor, dim: int, eps: float) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """(y, (y, n, s)): y = x / max(‖x‖, eps) along `dim`; n and s kept with size 1 at `dim`."""
    norm = torch.linalg.vector_norm(x, 2, dim, keepdim=True)
    n = norm.clamp_min(eps)
    y = x / n
    return y, (y, n, (norm > eps).to(x.dtype))


def _dot(a: Tensor, b: Tensor, dim: int) -> Tensor:
    return (a * b).sum(dim, keepdim=True)


def normalize_jvp(v: Tensor, saved, dim: int) -> Tensor:
    """J v (also the gradient J gy: J is symmetric)."""
    y, n, s = saved
    return (v - y * (s * _dot(y, v, dim))) / n


def normalize_tangent_grad(gy: Tensor, gyd: Tensor, yd: Opt, xd: Opt, saved, dim: int) -> Tuple[Tensor, Tensor]:
    """(gx, ġx) from the gradient gy and its tangent ġy, with ẏ = J ẋ (None with ẋ: zero)."""
    y, n, s = saved
    gx = normalize_jvp(gy, saved, dim)
    if yd is None:
        return gx, normalize_jvp(gyd, saved, dim)
    c = _dot(y, gy, dim)
    gxd = (gyd - s * (yd * c + y * (_dot(yd, gy, dim) + _dot(y, gyd, dim)))) / n
    return gx, gxd - gx * (s * _dot(y, xd, dim) / n)


class NormalizeRule(Rule):
    """`F.normalize(x, dim=d)` (p = 2) of a value `[T, N, *features]` over a per-example dim."""

    def __init__(self, name: str, kind: str, dim: int, eps: float):
        super().__init__(name, kind)
        self.dim, self.eps = dim, float(eps)

    def _dim(self, x) -> int:
        return self.feature_dim(self.dim, x, "a normalization")

    def forward(self, ops, x, p, save):
        d = self._dim(x)
        y, saved = normalize(x, d, self.eps)
        return y, (saved, d) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        return normalize_jvp(gy, *saved) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        d = self._dim(x)
        y, saved = normalize(x, d, self.eps)
        yd = None if xd is None else normalize_jvp(xd, saved, d)
        return y, yd, (saved, d, yd, xd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if not need_x:
            return None, None
        s, d, yd, xd = saved
        return normalize_tangent_grad(gy, gyd, yd, xd, s, d)


class NormalizedLinearRule(LinearRule):
    """y = x Ŵᵀ + b with Ŵ = `F.normalize(W, dim=1)` (each output's weight row of unit norm, eps): a cosine
    classifier's layer. The Linear passes run on Ŵ (and Ŵ̇ = J Ẇ); the weight's gradient and its tangent
    come back through the normalization's Jacobian."""

    def __init__(self, name: str, kind: str, in_features: int, eps: float):
        super().__init__(name, kind, in_features)
        self.eps = float(eps)

    def _normalized(self, w) -> Tuple[Tensor, tuple]:
        """(Ŵ, what the Jacobian needs) of w `[T, O, I]` or `[O, I]`, rows along the last dim."""
        return normalize(w, w.dim() - 1, self.eps)

    @staticmethod
    def _temp(out: Opt, w) -> Opt:
        """A buffer for the gradient w.r.t. Ŵ where the weight's gradient `out` `[T, O, I]` is asked for."""
        return None if out is None else torch.empty(out.shape, dtype=w.dtype, device=w.device)

    def forward(self, ops, x, p, save):
        what, jac = self._normalized(p[0])
        y, saved = super().forward(ops, x, (what, p[1]), save)
        return y, (saved, what, jac) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        saved, what, jac = saved
        g_hat = self._temp(outs[0], what)
        gx = super().backward(ops, gy, saved, (what, p[1]), need_x, (g_hat, outs[1]))
        if g_hat is not None:
            outs[0].copy_(normalize_jvp(g_hat, jac, g_hat.dim() - 1))
        return gx

    def tangent_forward(self, ops, x, xd, p, v):
        what, jac = self._normalized(p[0])
        wd = None if v[0] is None else normalize_jvp(v[0], jac, v[0].dim() - 1)
        y, yd, saved = super().tangent_forward(ops, x, xd, (what, p[1]), (wd, v[1]))
        return y, yd, (saved, what, jac, wd, v[0])

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        saved, what, jac, wd_hat, wd = saved
        g_hat, gd_hat = self._temp(outs[0], what), self._temp(touts[0], what)
        if g_hat is None and gd_hat is not None:
            g_hat = self._temp(touts[0], what)
        gx, gxd = super().tangent_backward(
            ops, gy, gyd, saved, (what, p[1]), (wd_hat, v[1]), need_x, (g_hat, outs[1]), (gd_hat, touts[1])
        )
        if g_hat is not None:  # (a common weight's Jacobian broadcasts over the tasks)
            last = g_hat.dim() - 1
            if gd_hat is None:
                outs[0].copy_(normalize_jvp(g_hat, jac, last))
            else:
                g, gd = normalize_tangent_grad(g_hat, gd_hat, wd_hat, wd, jac, last)
                if outs[0] is not None:
                    outs[0].copy_(g)
                touts[0].copy_(gd)
        return gx, gxd
