"""Parameter-free linear maps PyTorch applies to each example of a batch: resampling (`F.interpolate`,
`nn.Upsample`, every mode), padding by reflection, replication or wrapping (`F.pad`'s other modes and the
padding layers), `flip`, `roll`, `cumsum`, `tril`/`triu` of per-example matrices, pixel shuffle and
unshuffle, `F.unfold` (im2col).

One rule runs them all. The map f runs on the tasks' examples as one batch `[T·N, ...]`, with the model's
own arguments (sizes the model computes as it runs, such as `size=skip.shape[-2:]`, are evaluated per
call). f is linear, so ẏ = f(ẋ), and its transpose, which gives x̄ and the tangent of x̄, is f's
vector-Jacobian product (torch.func.vjp at the forward's input; the autograd graphs of these maps keep
sizes and indices, not the input).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
import torch.func

from ..base import MODEL_CALL_LOCK
from .base import Rule

Tensor = torch.Tensor


class ExampleMapRule(Rule):
    """y = f(x) per example, f linear: `fn(batch, args) -> batch` on `[T·N, ...]`, with `args` the node's
    arguments computed as the model runs (None where it has none). `dims`: the per-example dims the map
    works along, which must not reach the examples' dim (a negative dim counts from the end); `min_rank`: the
    number of per-example dims the map needs (tril/triu: 2)."""

    def __init__(self, name: str, kind: str, fn: Callable[[Tensor, Any], Tensor], dims=(), min_rank: int = 0):
        super().__init__(name, kind)
        self.fn = fn
        self.dims = tuple(dims)
        self.min_rank = min_rank

    def _check(self, x: Tensor) -> None:
        rank = x.dim() - 2  # per-example dims
        bad = [d for d in self.dims if not (-rank <= d < 0 or 0 < d <= rank)]
        if bad or rank < self.min_rank:
            what = f"dims {self.dims} are not per-example dims" if bad else f"needs {self.min_rank} per-example dims"
            raise ValueError(
                f"model layer {self.describe()}: {what} of inputs {tuple(x.shape[1:])}; mapping the examples' "
                "dim 0 would mix them (each example must be mapped on its own)"
            )

    def _map(self, x: Tensor, p: tuple, save: bool) -> Tuple[Tensor, Optional[Callable]]:
        self._check(x)
        args = p[0] if p else None
        batch = x.flatten(0, 1)
        if save:
            with MODEL_CALL_LOCK:  # torch.func's levels are per process
                y, vjp = torch.func.vjp(lambda b: self.fn(b, args), batch)
        else:
            y, vjp = self.fn(batch, args), None
        return y.unflatten(0, x.shape[:2]), vjp

    @staticmethod
    def _transpose(gy: Tensor, saved) -> Tensor:
        vjp, shape = saved
        with MODEL_CALL_LOCK:
            return vjp(gy.flatten(0, 1))[0].reshape(shape)

    def forward(self, ops, x, p, save):
        y, vjp = self._map(x, p, save)
        return y, (vjp, x.shape) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        return self._transpose(gy, saved) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        y, vjp = self._map(x, p, True)
        yd = None if xd is None else self._map(xd, p, False)[0]
        return y, yd, (vjp, x.shape)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if not need_x:
            return None, None
        return self._transpose(gy, saved), self._transpose(gyd, saved)
