"""Nonlinear reductions over per-example dims: variance and standard deviation (`x.var(dim)`, `x.std(dim)`:
a feature's spread, instance statistics written by hand), the Euclidean norm (`x.norm(dim=1)`: a cosine
classifier written by hand) and logsumexp.

Variance v = Σ c² / k over the dims, c = x − mean(x), k = n − correction. Since Σ c = 0 the mean's own
derivative drops out: v̇ = 2 Σ c ẋ / k and gx = 2 c g / k. The standard deviation is f(v) = √v, with
f' = 1 / (2y) and f'' = −1 / (4y³), both 0 where y = 0 (PyTorch's convention: `std_backward` masks there). For
y = f(v): gx = f'(v) 2c g / k, ẏ = f'(v) v̇, and the tangent of the gradient is
ġx = 2/k [f'(v) ((ẋ − mean(ẋ)) g + c ġ) + f''(v) v̇ c g].

Euclidean norm y = √(Σ x²), with r = 1 / y (0 where y = 0: PyTorch's `norm_backward` masks there):
gx = r x g, ẏ = r Σ x ẋ, ġx = r (ẋ g + x ġ) − r² ẏ x g.

logsumexp y = log Σ eˣ, s = e^(x − y): gx = s g, ẏ = Σ s ẋ, ġx = s ġ + s (ẋ − ẏ) g.
"""

from __future__ import annotations

import torch

from .base import Rule
from .shape import _task_dim


class _Reduction(Rule):
    """Over per-example `dims` (counted without the task dim), keeping them (size 1) when `keepdim`."""

    def __init__(self, name: str, kind: str, dims, keepdim: bool):
        super().__init__(name, kind)
        self.dims, self.keepdim = tuple(dims), keepdim

    def _dims(self, x):
        dims = sorted(_task_dim(d, x.dim()) for d in self.dims)
        if len(set(dims)) != len(dims) or dims[0] < 2:
            raise ValueError(f"model layer {self.describe()}: dims {self.dims} are not distinct per-example dims")
        return dims

    def _kept(self, y, dims):
        """y reduced over dims, with those dims back as size 1 (to broadcast against x)."""
        if not self.keepdim:
            for d in dims:
                y = y.unsqueeze(d)
        return y


class VarRule(_Reduction):
    """`x.var(dims, correction=...)`; with `std` its square root."""

    def __init__(self, name: str, kind: str, dims, correction: float, keepdim: bool, std: bool):
        super().__init__(name, kind, dims, keepdim)
        self.correction, self.std = float(correction), std

    def _primal(self, x):
        """(y, c, k, f'(v) with dims kept, dims)."""
        dims = self._dims(x)
        n = 1
        for d in dims:
            n *= x.shape[d]
        k = n - self.correction
        c = x - x.mean(dims, keepdim=True)
        v = c.square().sum(dims, keepdim=True) / k
        if not self.std:
            y, f1 = v, torch.ones_like(v)
        else:
            y = v.sqrt()
            f1 = torch.where(y == 0, torch.zeros_like(y), 0.5 / y)
        return (y if self.keepdim else y.squeeze(dims)), c, k, f1, dims

    def forward(self, ops, x, p, save):
        y, c, k, f1, dims = self._primal(x)
        return y, (c, k, f1, dims, None, None) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        if not need_x:
            return None
        c, k, f1, dims = saved[:4]
        return (2.0 / k) * c * (f1 * self._kept(gy, dims))

    def tangent_forward(self, ops, x, xd, p, v):
        y, c, k, f1, dims = self._primal(x)
        if xd is None:
            return y, None, (c, k, f1, dims, None, None)
        vd = (2.0 / k) * (c * xd).sum(dims, keepdim=True)
        yd = f1 * vd
        return y, (yd if self.keepdim else yd.squeeze(dims)), (c, k, f1, dims, xd, vd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if not need_x:
            return None, None
        c, k, f1, dims, xd, vd = saved
        g, gd = self._kept(gy, dims), self._kept(gyd, dims)
        gx = (2.0 / k) * c * (f1 * g)
        gxd = c * (f1 * gd)
        if xd is not None:
            gxd = gxd + (xd - xd.mean(dims, keepdim=True)) * (f1 * g)
            if self.std:  # f''(v) = −1/(4y³) = −2 f'(v)³
                gxd = gxd - 2.0 * f1.pow(3) * vd * c * g
        return gx, (2.0 / k) * gxd


class NormRule(_Reduction):
    """The Euclidean norm over `dims` (`x.norm(dim=...)`, `torch.norm(x, p=2, dim=...)`,
    `torch.linalg.vector_norm(x, dim=...)`)."""

    def _primal(self, x):
        """(y with dims kept, r = 1 / y masked to 0 at y = 0, dims)."""
        dims = self._dims(x)
        y = torch.linalg.vector_norm(x, 2, dims, keepdim=True)
        return y, torch.where(y == 0, torch.zeros_like(y), y.reciprocal()), dims

    def _out(self, y, dims):
        return y if self.keepdim else y.squeeze(dims)

    def forward(self, ops, x, p, save):
        y, r, dims = self._primal(x)
        return self._out(y, dims), (x, r, dims, None, None) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        if not need_x:
            return None
        x, r, dims = saved[:3]
        return x * (r * self._kept(gy, dims))

    def tangent_forward(self, ops, x, xd, p, v):
        y, r, dims = self._primal(x)
        if xd is None:
            return self._out(y, dims), None, (x, r, dims, None, None)
        yd = r * (x * xd).sum(dims, keepdim=True)
        return self._out(y, dims), self._out(yd, dims), (x, r, dims, xd, yd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if not need_x:
            return None, None
        x, r, dims, xd, yd = saved
        rg, rgd = r * self._kept(gy, dims), r * self._kept(gyd, dims)
        gxd = x * rgd
        if xd is not None:
            gxd = gxd + xd * rg - x * (r * yd * rg)
        return x * rg, gxd


class LogSumExpRule(_Reduction):
    """`torch.logsumexp(x, dims)`."""

    def _primal(self, x):
        dims = self._dims(x)
        y = torch.logsumexp(x, dims, keepdim=True)
        return y, (x - y).exp_(), dims

    def _out(self, y, dims):
        return y if self.keepdim else y.squeeze(dims)

    def forward(self, ops, x, p, save):
        y, s, dims = self._primal(x)
        return self._out(y, dims), (s, dims, None, None) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        s, dims = saved[:2]
        return s * self._kept(gy, dims) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        y, s, dims = self._primal(x)
        if xd is None:
            return self._out(y, dims), None, (s, dims, None, None)
        yd = (s * xd).sum(dims, keepdim=True)
        return self._out(y, dims), self._out(yd, dims), (s, dims, xd, yd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if not need_x:
            return None, None
        s, dims, xd, yd = saved
        g = self._kept(gy, dims)
        gxd = s * self._kept(gyd, dims)
        if xd is not None:
            gxd = gxd + s * (xd - yd) * g
        return s * g, gxd
