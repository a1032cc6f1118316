"""The layer-rule interface of the fused engine.

A rule is one layer's hand-derived forward, backward, tangent forward (R-op) and tangent backward,
all tasks at once. Activations flow as `[T, N, *features]`. Per call the program binds:
- `p`: the layer's parameters in `param_names` order, each per task `[T, *shape]`, common `[*shape]`
  or None (absent, e.g. no bias);
- `v`: their directions from the tangent u, per task `[T, *shape]`, or None (a shared parameter);
- `outs` / `touts`: where the gradient / its tangent of each parameter go (`[T, *shape]` views into
  the flat `[T, P]` buffers), or None when not needed.
`need_x` says whether the gradient w.r.t. the layer's input is needed (False for the first layer
whose parameters need a gradient). A tangent `xd` of None is zero.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


class Rule:
    """A layer without parameters that is the identity on tangents' structure; subclasses override."""

    param_names: Tuple[str, ...] = ()

    def __init__(self, name: str, module: torch.nn.Module):
        self.path = name  # module path in the model ("" for the model itself)
        self.name = name or "<model>"
        self.kind = type(module).__name__

    def describe(self) -> str:
        return f"{self.name} ({self.kind})"

    def forward(self, ops, x: Tensor, p: tuple, save: bool) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def backward(self, ops, gy: Tensor, saved: Any, p: tuple, need_x: bool, outs: tuple) -> Opt:
        raise NotImplementedError

    def tangent_forward(self, ops, x: Tensor, xd: Opt, p: tuple, v: tuple) -> Tuple[Tensor, Opt, Any]:
        raise NotImplementedError

    def tangent_backward(self, ops, gy: Tensor, gyd: Tensor, saved: Any, p: tuple, v: tuple, need_x: bool,
                         outs: tuple, touts: tuple) -> Tuple[Opt, Opt]:
        raise NotImplementedError


class LinearMapRule(Rule):
    """A parameter-free linear map A (pooling, reshapes): ẏ = A ẋ, ġx = Aᵀ ġy.

    Subclasses give `apply(x) -> (y, saved)` and `transpose(gy, saved) -> gx`."""

    def apply(self, x: Tensor, save: bool) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def transpose(self, gy: Tensor, saved: Any) -> Tensor:
        raise NotImplementedError

    def tangent(self, xd: Tensor, saved: Any) -> Tensor:
        return self.apply(xd, False)[0]

    def forward(self, ops, x, p, save):
        return self.apply(x, save)

    def backward(self, ops, gy, saved, p, need_x, outs):
        return self.transpose(gy, saved) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        y, saved = self.apply(x, True)
        return y, (None if xd is None else self.tangent(xd, saved)), saved

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if not need_x:
            return None, None
        return self.transpose(gy, saved), self.transpose(gyd, saved)
