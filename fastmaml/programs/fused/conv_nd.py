"""Convolutions without a batching strategy of their own: transposed convolutions (ConvTranspose1d/2d/3d,
`F.conv_transpose*d`) and 3-d convolutions (Conv3d, `F.conv3d`), as PyTorch's `aten.convolution`, one call per
task (measured faster on this CPU than vmap's or a hand-folded grouped call: benchmarks/RESULTS.md).

The convolution B(x, w) is bilinear in input and weight, and `aten.convolution_backward(ḡ, x, w)` gives
both of its transposes, (B(·, w)ᵀ ḡ, B(x, ·)ᵀ ḡ). So:
- forward y = B(x, w) + b; backward (x̄, w̄) = convolution_backward(ȳ, x, w), b̄ = ȳ summed;
- tangent ẏ = B(ẋ, w) + B(x, ẇ) + ḃ;
- tangent backward: the gradients' tangents are convolution_backward(ġy, x, w) plus the cross terms
  (B(·, ẇ)ᵀ ȳ, B(ẋ, ·)ᵀ ȳ) = convolution_backward(ȳ, ẋ, ẇ).
A common weight `[*shape]` (step 0, a shared layer) is used by every task; its gradient still comes per task.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .base import Rule

Tensor = torch.Tensor
aten = torch.ops.aten


class ConvNdRule(Rule):
    """y = conv(x, w) + b per task, with `aten.convolution`'s `stride`, `padding`, `dilation`, `transposed`,
    `output_padding` and `groups` (lists of one number per spatial dim). p = (w, b): w per task
    `[T, *shape]` or common `[*shape]` (`weight_rank` dims); b `[T, O]`, `[O]` or None."""

    param_names = ("weight", "bias")

    def __init__(
        self, name: str, kind: str, weight_rank: int, stride, padding, dilation, transposed, output_padding, groups
    ):
        super().__init__(name, kind)
        self.weight_rank = weight_rank
        self.geometry = (
            list(stride),
            list(padding),
            list(dilation),
            bool(transposed),
            list(output_padding),
            int(groups),
        )

    def _w(self, w: Optional[Tensor], t: int) -> Optional[Tensor]:
        return None if w is None else w[t] if w.dim() > self.weight_rank else w

    def _b(self, b: Optional[Tensor], t: int) -> Optional[Tensor]:
        return None if b is None else b[t] if b.dim() == 2 else b

    def _conv(self, x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
        """All tasks: x `[T, N, C, *]` -> `[T, N, O, *]` (outside autograd, each task's output written in place
        into one buffer)."""
        y0 = aten.convolution(x[0], self._w(w, 0), self._b(b, 0), *self.geometry)
        if torch.is_grad_enabled():  # differentiable path (AdaptedModel): out= variants record no graph
            rest = [aten.convolution(x[t], self._w(w, t), self._b(b, t), *self.geometry) for t in range(1, x.shape[0])]
            return torch.stack([y0] + rest)
        if x.shape[0] == 1:
            return y0.unsqueeze(0)
        y = y0.new_empty(x.shape[0], *y0.shape)
        y[0] = y0
        for t in range(1, x.shape[0]):
            aten.convolution.out(x[t], self._w(w, t), self._b(b, t), *self.geometry, out=y[t])
        return y

    def _transposes(self, g: Tensor, x: Tensor, w: Tensor, need_x: bool, need_w: bool):
        """Per task, (B(·, w)ᵀ g, B(x, ·)ᵀ g) stacked (None where not needed)."""
        gx: List[Tensor] = []
        gw: List[Tensor] = []
        for t in range(x.shape[0]):
            wt = self._w(w, t)
            a, c, _ = aten.convolution_backward(g[t], x[t], wt, None, *self.geometry, [need_x, need_w, False])
            gx.append(a)
            gw.append(c)
        return (torch.stack(gx) if need_x else None), (torch.stack(gw) if need_w else None)

    @staticmethod
    def _bias_sum(g: Tensor) -> Tensor:
        """g `[T, N, O, *]` summed over the examples and positions -> `[T, O]`."""
        return g.sum([1] + list(range(3, g.dim())))

    @staticmethod
    def _write(outs: Sequence[Optional[Tensor]], values: Sequence[Optional[Tensor]]) -> None:
        for out, value in zip(outs, values):
            if out is not None:
                out.copy_(value)

    def forward(self, ops, x, p, save):
        return self._conv(x, p[0], p[1]), x if save else None

    def backward(self, ops, gy, x, p, need_x, outs):
        gx, gw = self._transposes(gy, x, p[0], need_x, outs[0] is not None)
        self._write(outs, (gw, None if outs[1] is None else self._bias_sum(gy)))
        return gx

    def tangent_forward(self, ops, x, xd, p, v):
        (w, b), (wd, bd) = p, v
        y = self._conv(x, w, b)
        yd = None if xd is None else self._conv(xd, w, None)
        if wd is not None:
            yd = self._conv(x, wd, None) if yd is None else yd + self._conv(x, wd, None)
        if bd is not None:
            bv = bd.view(*bd.shape, *([1] * (y.dim() - 3))).unsqueeze(1)  # [T, 1, O, 1, ...]
            yd = bv.expand(y.shape) if yd is None else yd + bv
        return y, yd, (x, xd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        x, xd = saved
        w, wd = p[0], v[0]
        need_w = outs[0] is not None or touts[0] is not None
        gx, gw = self._transposes(gy, x, w, need_x, need_w)
        gxd, gwd = self._transposes(gyd, x, w, need_x, need_w)
        if xd is not None or wd is not None:  # the cross terms: B(·, ẇ)ᵀ ȳ and B(ẋ, ·)ᵀ ȳ
            cx, cw = self._transposes(
                gy,
                torch.zeros_like(x) if xd is None else xd,
                w if wd is None else wd,
                need_x and wd is not None,
                need_w and xd is not None,
            )
            gxd = gxd if cx is None else gxd + cx
            gwd = gwd if cw is None else gwd + cw
        self._write(outs, (gw, None if outs[1] is None else self._bias_sum(gy)))
        self._write(touts, (gwd, None if touts[1] is None else self._bias_sum(gyd)))
        return (gx, gxd) if need_x else (None, None)
