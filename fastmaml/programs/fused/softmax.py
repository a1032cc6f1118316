"""Softmax and log-softmax over a per-example dim (attention weights; a classifier's log-probabilities inside
the model).

softmax y = softmax(x): J v = y ⊙ (v − Σ y v), symmetric, so gx = J gy and ẏ = J ẋ; with c = Σ y gy, the
tangent of the gradient is ġx = ẏ ⊙ (gy − c) + y ⊙ (ġy − Σ (ẏ gy + y ġy)).
log-softmax y = x − logsumexp(x), p = e^y: J v = v − Σ p v (ẏ = J ẋ), gx = Jᵀ gy = gy − p Σ gy, and
ġx = ġy − p Σ ġy − ṗ Σ gy with ṗ = p ⊙ ẏ. Sums run over the softmax dim.
"""

from __future__ import annotations

import torch

from .base import Rule


class SoftmaxRule(Rule):
    def __init__(self, name: str, kind: str, dim: int, log: bool = False):
        super().__init__(name, kind)
        self.dim, self.log = dim, log

    def _dim(self, x) -> int:
        return self.feature_dim(self.dim, x, "a softmax")

    def _f(self, x, d):
        return torch.log_softmax(x, d) if self.log else torch.softmax(x, d)

    def _jvp(self, v, y, d):
        if self.log:
            return v - (y.exp() * v).sum(d, keepdim=True)
        return y * (v - (y * v).sum(d, keepdim=True))

    def _vjp(self, g, y, d):
        if self.log:
            return g - y.exp() * g.sum(d, keepdim=True)
        return y * (g - (y * g).sum(d, keepdim=True))

    def forward(self, ops, x, p, save):
        d = self._dim(x)
        y = self._f(x, d)
        return y, (y, d) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        return self._vjp(gy, *saved) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        d = self._dim(x)
        y = self._f(x, d)
        yd = None if xd is None else self._jvp(xd, y, d)
        return y, yd, (y, yd, d)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if not need_x:
            return None, None
        y, yd, d = saved
        gx, gxd = self._vjp(gy, y, d), self._vjp(gyd, y, d)
        if yd is not None:
            if self.log:
                gxd = gxd - (y.exp() * yd) * gy.sum(d, keepdim=True)
            else:
                c = (y * gy).sum(d, keepdim=True)
                gxd = gxd + yd * (gy - c) - y * (yd * gy).sum(d, keepdim=True)
        return gx, gxd
