"""Joins and constant maps: residual adds (`a + b`, `torch.add(a, b, alpha=...)`, `a - b`), concatenation
along a feature dimension, and affine maps by constants (`c * x`, `x / c`, `-x`, `x + c`, `c - x`, with
Python numbers or constant tensors such as buffers).

A value read by several nodes (fan-out) needs nothing here: the program adds the gradients (and their
tangents) that its readers send back.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import memory_format as mf
from .base import JoinRule, LinearMapRule


def _reduce(g, shape):
    """g summed down to `shape` (undoing a broadcast of equal rank)."""
    return g if g.shape == shape else g.sum_to_size(shape)


class AddRule(JoinRule):
    """y = a + alpha · b (alpha = −1: a − b). Both values have the same per-example rank; size-1 dims
    broadcast."""

    def __init__(self, name: str, kind: str, alpha: float = 1.0):
        super().__init__(name, kind, 2)
        self.alpha = alpha

    def apply(self, xs):
        a, b = xs
        if a.dim() != b.dim():
            raise ValueError(
                f"model: {self.describe()} adds values of per-task shapes {tuple(a.shape[1:])} and "
                f"{tuple(b.shape[1:])}; the fused engine needs equal ranks (size-1 dims broadcast)"
            )
        y = a + b if self.alpha == 1.0 else torch.add(a, b, alpha=self.alpha)
        return y, (a.shape, b.shape, y.shape)

    def tangent(self, xds, saved):
        ad, bd = xds
        if bd is None:
            return ad.expand(saved[2])
        bd = bd if self.alpha == 1.0 else bd * self.alpha
        return bd.expand(saved[2]) if ad is None else ad + bd

    def transpose(self, gy, saved):
        sa, sb, _ = saved
        gb = _reduce(gy, sb)
        return _reduce(gy, sa), (gb if self.alpha == 1.0 else gb * self.alpha)


class CatRule(JoinRule):
    """torch.cat of `arity` values along per-example dim `dim` (not the examples' dim)."""

    def __init__(self, name: str, kind: str, arity: int, dim: int):
        super().__init__(name, kind, arity)
        self.dim = dim

    def _dim(self, x):
        return self.dim + 1 if self.dim >= 0 else self.dim + x.dim()

    def apply(self, xs):
        d = self._dim(xs[0])
        return mf.cat(xs, d, xs[0]), (d, [x.shape for x in xs])

    def tangent(self, xds, saved):
        d, shapes = saved
        like = next(t for t in xds if t is not None)
        return mf.cat([t if t is not None else like.new_zeros(s) for t, s in zip(xds, shapes)], d, like)

    def transpose(self, gy, saved):
        d, shapes = saved
        return tuple(gy.split([s[d] for s in shapes], d))


class AffineRule(LinearMapRule):
    """y = scale · x + shift, scale and shift constants (Python numbers or tensors, broadcast as PyTorch
    does against the per-example shape; shift None for none)."""

    def __init__(self, name: str, kind: str, scale=1.0, shift: Optional[object] = None):
        super().__init__(name, kind)
        self.scale = scale
        self.shift = shift

    def _scaled(self, x):
        return x if isinstance(self.scale, float) and self.scale == 1.0 else x * self.scale

    def apply(self, x, save):
        y = self._scaled(x)
        if self.shift is not None:
            y = y + self.shift
        return y, (x.shape, y.shape)

    def tangent(self, xd, saved):
        return self._scaled(xd).expand(saved[1])

    def transpose(self, gy, saved):
        return _reduce(self._scaled(gy), saved[0])
