"""The rule interface of the fused engine.

A rule is one node's hand-derived forward, backward, tangent forward (R-op) and tangent backward, all
tasks at once. Values flow as `[T, N, *features]`. Per call the program binds:
- `p`: the node's parameters in `param_names` order, each per task `[T, *shape]`, common `[*shape]`
  or None (absent, e.g. no bias); BatchNorm rules get their statistics appended;
- `v`: their directions from the tangent u, per task `[T, *shape]`, or None (a shared parameter);
- `outs` / `touts`: where the gradient / its tangent of each parameter go (`[T, *shape]` views into
  the flat `[T, P]` buffers), or None when not needed.
`need_x` says whether the gradient w.r.t. the input is needed. A tangent `xd` of None is zero.

A rule whose primal work is costly (`reuses_primal`: convolutions) also takes what the step's `loss_grad`
already computed at the same point: `tangent_forward(..., y=)` its output, `tangent_backward(..., gx=)` the
gradient it sent to its input; the program passes them when the activation tape has them. A rule that
`takes_stats` (BatchNorm, BatchNorm+ReLU, BatchNorm+LeakyReLU) also takes `given=`, the batch statistics of
its input from the convolution that wrote it (`ConvRule.forward_stats`), when the program has them.

Most rules read one value (`Rule`); joins read several (`JoinRule`: residual adds, concatenation). A
rule keeps no reference to the model: what it needs from a module (eps, slopes, geometry) is copied
when it is built, and the program cache keys on those attributes (programs/select.py).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
Opt = Optional[torch.Tensor]


class Rule:
    """One-input rule. `name`: where it comes from in the model (module path or fx node name);
    `kind`: the module type or function it implements."""

    param_names: Tuple[str, ...] = ()
    arity = 1
    reuses_primal = False  # tangent_forward takes `y=`, tangent_backward `gx=` (see the module docstring)
    differentiable = True  # False: the output carries no gradient (a mask): no backward, tangent None
    takes_stats = False  # forward and tangent_forward take `given=` statistics of x (see the module docstring)

    def __init__(self, name: str, kind: str):
        self.name = name or "<model>"
        self.kind = kind

    def describe(self) -> str:
        return f"{self.name} ({self.kind})"

    def feature_dim(self, dim: int, x: Tensor, what: str) -> int:
        """The model's per-example dim `dim` (negative: from the end) as a dim of the per-task value x
        `[T, N, *features]`, checked to be a feature dim: `what` over the examples' dim would mix them."""
        d = dim + 1 if dim >= 0 else dim + x.dim()
        if not 2 <= d < x.dim():
            raise ValueError(
                f"model layer {self.describe()}: dim={dim} is not a feature dim of per-example inputs "
                f"{tuple(x.shape[1:])} ({what} over the examples' dim would mix them)"
            )
        return d

    def forward(self, ops, x: Tensor, p: tuple, save: bool) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def backward(self, ops, gy: Tensor, saved: Any, p: tuple, need_x: bool, outs: tuple) -> Opt:
        raise NotImplementedError

    def tangent_forward(self, ops, x: Tensor, xd: Opt, p: tuple, v: tuple) -> Tuple[Tensor, Opt, Any]:
        raise NotImplementedError

    def tangent_backward(
        self, ops, gy: Tensor, gyd: Tensor, saved: Any, p: tuple, v: tuple, need_x: bool, outs: tuple, touts: tuple
    ) -> Tuple[Opt, Opt]:
        raise NotImplementedError


class LinearMapRule(Rule):
    """A parameter-free linear map A (pooling, reshapes, scaling): ẏ = A ẋ, ġx = Aᵀ ġy.

    Subclasses give `apply(x, save) -> (y, saved)` and `transpose(gy, saved) -> gx`."""

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


class JoinRule(Rule):
    """A parameter-free rule over several values (`arity` of them) that is linear in each: y = f(x_1, …).

    Subclasses give `apply(xs) -> (y, saved)` (any `xs[i]` may be None only in `tangent`, meaning zero)
    and `transpose(gy, saved) -> (gx_1, …)`; the tangent is f applied to the tangents (linear maps)."""

    def __init__(self, name: str, kind: str, arity: int):
        super().__init__(name, kind)
        self.arity = arity

    def apply(self, xs: Sequence[Tensor]) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def tangent(self, xds: Sequence[Opt], saved: Any) -> Opt:
        raise NotImplementedError

    def transpose(self, gy: Tensor, saved: Any) -> Tuple[Tensor, ...]:
        raise NotImplementedError

    def forward(self, ops, xs, p, save):
        return self.apply(xs)

    def backward(self, ops, gy, saved, p, need, outs):
        gxs = self.transpose(gy, saved)
        return tuple(g if n else None for g, n in zip(gxs, need))

    def tangent_forward(self, ops, xs, xds, p, v):
        y, saved = self.apply(xs)
        return y, (None if all(d is None for d in xds) else self.tangent(xds, saved)), saved

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need, outs, touts):
        gxs, gxds = self.transpose(gy, saved), self.transpose(gyd, saved)
        return tuple((g, gd) if n else (None, None) for g, gd, n in zip(gxs, gxds, need))
