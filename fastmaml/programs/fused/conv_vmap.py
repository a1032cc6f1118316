"""Convolutions without a task-batching rule of their own: transposed convolutions (ConvTranspose1d/2d/3d,
`F.conv_transpose*d`) and 3-d convolutions (Conv3d, `F.conv3d`).

The layer's functional op B(x, w) runs per task under torch.func.vmap (PyTorch's batching rule folds the
tasks into the channels' groups, as conv.py's "grouped" strategy does by hand), and the rule takes every
pass from B being bilinear in input and weight:
- forward y = B(x, w) + b, keeping B's vjp at (x, w);
- backward (x̄, w̄) = vjp(ȳ), b̄ = ȳ summed over all but the channel dim;
- tangent ẏ = B(ẋ, w) + B(x, ẇ) + ḃ;
- tangent backward: the gradients' tangents are vjp(ġy) at (x, w) plus the cross terms (B(·, ẇ)ᵀ ȳ, B(ẋ, ·)ᵀ ȳ),
  which are B's vjp at (ẋ, ẇ) applied to ȳ.
A common weight `[*shape]` (step 0, a shared layer) is expanded over the tasks, so that its gradient comes
per task as the program needs it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.func

from .base import Rule

Tensor = torch.Tensor


class VmappedConvRule(Rule):
    """y = op(x, w) + b per task, `op(x [N, C, *], w) -> [N, O, *]` the layer's functional convolution with
    its geometry bound. p = (w, b): w per task `[T, *shape]` or common `[*shape]`; b `[T, O]`, `[O]` or None.
    `weight_rank`: the dims of one task's weight."""

    param_names = ("weight", "bias")

    def __init__(self, name: str, kind: str, op: Callable[[Tensor, Tensor], Tensor], weight_rank: int):
        super().__init__(name, kind)
        self.op = op
        self.weight_rank = weight_rank
        self.batched = torch.func.vmap(op)

    def _per_task(self, w: Optional[Tensor], T: int) -> Optional[Tensor]:
        return w if w is None or w.dim() > self.weight_rank else w.expand(T, *w.shape)

    @staticmethod
    def _bias_view(b: Tensor, y: Tensor) -> Tensor:
        """b `[T, O]` or `[O]` broadcastable against y `[T, N, O, *]`."""
        b = b if b.dim() == 2 else b.unsqueeze(0)
        return b.view(b.shape[0], 1, b.shape[1], *([1] * (y.dim() - 3)))

    def _bias(self, y: Tensor, b: Optional[Tensor]) -> Tensor:
        return y if b is None else y + self._bias_view(b, y)

    @staticmethod
    def _bias_grad(g: Tensor, out: Optional[Tensor]) -> None:
        """Writes g `[T, N, O, *]` summed over the examples and positions into out `[T, O]`."""
        if out is not None:
            out.copy_(g.sum([1] + list(range(3, g.dim()))))

    def forward(self, ops, x, p, save):
        w = self._per_task(p[0], x.shape[0])
        if not save:
            return self._bias(self.batched(x, w), p[1]), None
        y, vjp = torch.func.vjp(self.batched, x, w)
        return self._bias(y, p[1]), vjp

    def backward(self, ops, gy, vjp, p, need_x, outs):
        gx, gw = vjp(gy)
        if outs[0] is not None:
            outs[0].copy_(gw)
        self._bias_grad(gy, outs[1])
        return gx if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        w, T = self._per_task(p[0], x.shape[0]), x.shape[0]
        wd = self._per_task(v[0], T)
        y, vjp = torch.func.vjp(self.batched, x, w)
        yd = None if xd is None else self.batched(xd, w)
        if wd is not None:
            yd = self.batched(x, wd) if yd is None else yd + self.batched(x, wd)
        if v[1] is not None:
            bd = self._bias_view(v[1], y)
            yd = bd.expand(y.shape) if yd is None else yd + bd
        cross = None
        if xd is not None or wd is not None:  # B's vjp at (ẋ, ẇ): the cross terms
            cross = torch.func.vjp(
                self.batched, torch.zeros_like(x) if xd is None else xd, torch.zeros_like(w) if wd is None else wd
            )[1]
        return self._bias(y, p[1]), yd, (vjp, cross)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        vjp, cross = saved
        gx, gw = vjp(gy)
        gxd, gwd = vjp(gyd)
        if cross is not None:
            cx, cw = cross(gy)
            gxd, gwd = gxd + cx, gwd + cw
        for out, g in ((outs[0], gw), (touts[0], gwd)):
            if out is not None:
                out.copy_(g)
        self._bias_grad(gy, outs[1])
        self._bias_grad(gyd, touts[1])
        return (gx, gxd) if need_x else (None, None)
