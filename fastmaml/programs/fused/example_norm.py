"""LayerNorm, GroupNorm and InstanceNorm rule: a normalization by each example's own statistics.

Unlike BatchNorm, these norms never mix the examples of a task, have no running statistics and do the same
in train and eval mode. Each runs as the view `[T, B, G, A, S]` of fastmaml/ops/reference/example_norm.py
(statistics over (A, S), affine weights per (G, A)); the rule maps activations `[T, N, *features]` and the
weights to that view and back.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

from .base import Rule


class ExampleNormRule(Rule):
    """p = (weight, bias), each `weight_shape` (`[T, *weight_shape]` per task) or None.

    Either `normalized_shape` (LayerNorm over the last dims) or `groups` (GroupNorm; None: one group per
    channel, InstanceNorm) with `channels` (the input's C, None where only the input tells: a functional form
    without weights)."""

    param_names = ("weight", "bias")

    def __init__(
        self,
        name: str,
        kind: str,
        eps: float,
        normalized_shape: Optional[Tuple[int, ...]] = None,
        groups: Optional[int] = None,
        channels: Optional[int] = None,
    ):
        super().__init__(name, kind)
        self.eps = float(eps)
        self.normalized_shape = None if normalized_shape is None else tuple(normalized_shape)
        self.groups = groups
        self.channels = channels

    @property
    def weight_rank(self) -> int:
        return 1 if self.normalized_shape is None else len(self.normalized_shape)

    def _fail(self, x, expected: str):
        raise ValueError(
            f"model layer {self.describe()}: expected per-task inputs {expected}, got shape {tuple(x.shape)}"
        )

    def as_view(self, x):
        """`[T, N, *features]` -> `[T, B, G, A, S]` (checked)."""
        T = x.shape[0]
        if self.normalized_shape is not None:
            k = len(self.normalized_shape)
            if x.dim() < k + 2 or tuple(x.shape[-k:]) != self.normalized_shape:
                self._fail(x, f"[T, N, ..., {', '.join(map(str, self.normalized_shape))}]")
            return x.reshape(T, -1, 1, math.prod(self.normalized_shape), 1)
        c = self.channels if self.channels is not None else (x.shape[2] if x.dim() > 2 else 0)
        g = c if self.groups is None else self.groups
        if x.dim() < 3 or x.shape[2] != c or (self.groups is None and x.dim() < 4) or c % g:
            self._fail(x, f"[T, N, {c or 'C'}, ...]" + (", with positions" if self.groups is None else ""))
        return x.reshape(T, x.shape[1], g, c // g, -1)

    def _params(self, view, p):
        """(w, b) as `[T, G, A]` / `[G, A]` for the view `[T, B, G, A, S]`."""
        G, A = view.shape[2], view.shape[3]
        return tuple(
            None if t is None else t.reshape(t.shape[0], G, A) if t.dim() > self.weight_rank else t.reshape(G, A)
            for t in p[:2]
        )

    @staticmethod
    def _outs(view, outs):
        T, G, A = view.shape[0], view.shape[2], view.shape[3]
        return tuple(None if o is None else o.view(T, G, A) for o in outs)

    def forward(self, ops, x, p, save):
        view = self.as_view(x)
        w, b = self._params(view, p)
        y, mean, r = ops.examplenorm_fwd(view, w, b, self.eps)
        return y.view(x.shape), (view, mean, r, x.shape) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        view, mean, r, shape = saved
        w, _ = self._params(view, p)
        gx = ops.examplenorm_bwd(gy.reshape(view.shape), view, mean, r, w, need_x, *self._outs(view, outs))
        return None if gx is None else gx.view(shape)

    def tangent_forward(self, ops, x, xd, p, v):
        view = self.as_view(x)
        w, b = self._params(view, p)
        wd, bd = self._params(view, v)
        y, mean, r = ops.examplenorm_fwd(view, w, b, self.eps)
        xd = None if xd is None else xd.reshape(view.shape)
        yd, xhat, xhd, a = ops.examplenorm_tangent_fwd(view, xd, mean, r, w, wd, bd)
        return y.view(x.shape), (None if yd is None else yd.reshape(x.shape)), (xhat, xhd, a, r, x.shape)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        xhat, xhd, a, r, shape = saved
        w, _ = self._params(xhat, p)
        wd, _ = self._params(xhat, v)
        gw, gb = self._outs(xhat, outs)
        gwd, gbd = self._outs(xhat, touts)
        gx, gxd = ops.examplenorm_tangent_bwd(
            gy.reshape(xhat.shape), gyd.reshape(xhat.shape), xhat, xhd, a, r, w, wd, need_x, gw, gwd, gb, gbd
        )
        if gx is None:
            return None, None
        return gx.view(shape), gxd.view(shape)
