"""Joins and constant maps: residual adds (`a + b`, `torch.add(a, b, alpha=...)`, `a - b`), the elementwise
maximum and minimum of two values, concatenation along a feature dimension, and affine maps by constants
(`c * x`, `x / c`, `-x`, `x + c`, `c - x`, with Python numbers or constant tensors such as buffers).

A value read by several nodes (fan-out) needs nothing here: the program adds the gradients (and their
tangents) that its readers send back.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import memory_format as mf
from .base import JoinRule, LinearMapRule, Rule


def _reduce(g, shape):
    """g summed down to `shape` (undoing a broadcast of equal rank)."""
    return g if g.shape == shape else g.sum_to_size(shape)


def _check_ranks(rule: Rule, a, b, verb: str, also: str = "", ok: bool = True) -> None:
    """Two values broadcast only where their per-task ranks are equal (and `ok`); else an error naming the rule."""
    if a.dim() != b.dim() or not ok:
        raise ValueError(
            f"model: {rule.describe()} {verb} values of per-task shapes {tuple(a.shape[1:])} and "
            f"{tuple(b.shape[1:])}; the fused engine needs equal ranks (size-1 dims broadcast){also}"
        )


class AddRule(JoinRule):
    """y = a + alpha · b (alpha = −1: a − b). Both values have the same per-example rank; size-1 dims
    broadcast."""

    def __init__(self, name: str, kind: str, alpha: float = 1.0):
        super().__init__(name, kind, 2)
        self.alpha = alpha

    def apply(self, xs):
        a, b = xs
        _check_ranks(self, a, b, "adds")
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


class MaximumRule(JoinRule):
    """y = max(a, b) elementwise (`torch.maximum`, `torch.max(a, b)`), or with `minimum` min(a, b). Piecewise
    linear: with m = [a > b] (for the minimum [a < b]) and ½ at ties (PyTorch's convention), ẏ = m ȧ + (1 − m) ḃ,
    ga = m gy, gb = (1 − m) gy, and the tangent of the gradients is the same map of ġy. Equal per-example ranks;
    size-1 dims broadcast."""

    def __init__(self, name: str, kind: str, minimum: bool = False):
        super().__init__(name, kind, 2)
        self.minimum = minimum

    def apply(self, xs):
        a, b = xs
        _check_ranks(self, a, b, "compares")
        if self.minimum:
            y, first = torch.minimum(a, b), a < b
        else:
            y, first = torch.maximum(a, b), a > b
        m = first.to(y.dtype).add_((a == b).to(y.dtype), alpha=0.5)
        return y, (m, a.shape, b.shape)

    def tangent(self, xds, saved):
        m = saved[0]
        ad, bd = xds
        if bd is None:
            return m * ad
        if ad is None:
            return (1 - m) * bd
        return bd + m * (ad - bd)

    def transpose(self, gy, saved):
        m, sa, sb = saved
        ga = m * gy
        return _reduce(ga, sa), _reduce(gy - ga, sb)


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


class ParamAffineRule(Rule):
    """y = x · p (`multiply`) or y = sign · x + p_sign · p, with p one of the model's parameters broadcast
    against the per-example value `[N, *features]` as PyTorch broadcasts it: a learned temperature or
    per-channel scale, a learned bias or positional embedding. Its shape `shape` may not span the examples'
    dim (a size-1 dim there is fine). p = (param,): per task `[T, *shape]` or common `[*shape]`."""

    param_names = ("param",)

    def __init__(self, name: str, kind: str, shape, multiply: bool, sign: float = 1.0, p_sign: float = 1.0):
        super().__init__(name, kind)
        self.shape = tuple(shape)
        self.multiply, self.sign, self.p_sign = multiply, sign, p_sign

    def _lead(self, x) -> int:
        """The value's dims the parameter has none of, the task dim excluded (checked)."""
        lead = x.dim() - 1 - len(self.shape)
        if lead < 0 or (lead == 0 and self.shape[0] != 1):
            raise ValueError(
                f"model layer {self.describe()}: a parameter of shape {self.shape} broadcast against per-example "
                f"inputs {tuple(x.shape[1:])} spans the examples' dim; the fused engine needs it to broadcast over "
                "the examples (fewer dims, or size 1 there)"
            )
        return lead

    def _view(self, t, x):
        """A parameter (or direction) `[T, *shape]` / `[*shape]` broadcastable against x `[T, N, *features]`."""
        if t is None or t.dim() == len(self.shape):
            return t
        return t.view(t.shape[0], *([1] * self._lead(x)), *self.shape)

    def _to_param(self, g, x, out) -> None:
        """Writes g `[T, N, *features]` summed over what the parameter is broadcast along into `out` `[T, *shape]`."""
        lead = self._lead(x)
        if lead:
            g = g.sum(tuple(range(1, 1 + lead)))
        out.copy_(g.sum_to_size(out.shape))

    def _apply(self, x, p):
        if self.multiply:
            return x * p
        x = x if self.sign == 1.0 else x * self.sign
        return x + p if self.p_sign == 1.0 else x + self.p_sign * p

    def forward(self, ops, x, p, save):
        return self._apply(x, self._view(p[0], x)), x if save else None

    def backward(self, ops, gy, x, p, need_x, outs):
        if outs[0] is not None:
            self._to_param(gy * x if self.multiply else gy * self.p_sign, x, outs[0])
        if not need_x:
            return None
        return _reduce(gy * self._view(p[0], x) if self.multiply else gy * self.sign, x.shape)

    def tangent_forward(self, ops, x, xd, p, v):
        P, V = self._view(p[0], x), self._view(v[0], x)
        y = self._apply(x, P)
        if self.multiply:
            yd = None if xd is None else xd * P
            if V is not None:
                yd = x * V if yd is None else yd + x * V
        else:
            yd = None if xd is None else xd * self.sign
            if V is not None:
                yd = self.p_sign * V if yd is None else yd + self.p_sign * V
        return y, (None if yd is None else yd.expand(y.shape)), (x, xd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        x, xd = saved
        if not self.multiply:
            for g, out in ((gy, outs[0]), (gyd, touts[0])):
                if out is not None:
                    self._to_param(g * self.p_sign, x, out)
            return (_reduce(gy * self.sign, x.shape), _reduce(gyd * self.sign, x.shape)) if need_x else (None, None)
        if outs[0] is not None:
            self._to_param(gy * x, x, outs[0])
        if touts[0] is not None:
            self._to_param(gyd * x if xd is None else gyd * x + gy * xd, x, touts[0])
        if not need_x:
            return None, None
        P, V = self._view(p[0], x), self._view(v[0], x)
        gxd = gyd * P if V is None else gyd * P + gy * V
        return _reduce(gy * P, x.shape), _reduce(gxd, x.shape)


class ProductRule(JoinRule):
    """y = a · b of two values (gating, squeeze-and-excitation, `x * torch.sigmoid(x)`), or with `matmul` the
    matrix product a @ b of their last two dims (attention scores and weights). Bilinear: the tangent is
    ȧ b + a ḃ, the gradients gy b and a gy (transposed for the matrix product), and the tangent of the
    gradients adds the cross terms ġa = ġy b + gy ḃ, ġb = a ġy + ȧ gy. Equal per-example ranks; size-1 dims
    broadcast (and batch dims of the matrix product)."""

    def __init__(self, name: str, kind: str, matmul: bool = False):
        super().__init__(name, kind, 2)
        self.matmul = matmul

    def _check(self, a, b):
        also = ", with matrices in the last two dims of per-example values" if self.matmul else ""
        _check_ranks(self, a, b, "multiplies", also, ok=not (self.matmul and a.dim() < 4))

    def _times(self, a, b):
        return a @ b if self.matmul else a * b

    def _grad_a(self, g, b, shape):
        """The gradient w.r.t. a (of `shape`) of <g, a ∘ b>."""
        return _reduce(g @ b.transpose(-1, -2) if self.matmul else g * b, shape)

    def _grad_b(self, g, a, shape):
        """The gradient w.r.t. b (of `shape`) of <g, a ∘ b>."""
        return _reduce(a.transpose(-1, -2) @ g if self.matmul else g * a, shape)

    def forward(self, ops, xs, p, save):
        a, b = xs
        self._check(a, b)
        return self._times(a, b), (a, b) if save else None

    def backward(self, ops, gy, saved, p, need, outs):
        a, b = saved
        return (
            self._grad_a(gy, b, a.shape) if need[0] else None,
            self._grad_b(gy, a, b.shape) if need[1] else None,
        )

    def tangent_forward(self, ops, xs, xds, p, v):
        a, b = xs
        self._check(a, b)
        ad, bd = xds
        y = self._times(a, b)
        yd = None if ad is None else self._times(ad, b)
        if bd is not None:
            yd = self._times(a, bd) if yd is None else yd + self._times(a, bd)
        return y, (None if yd is None else yd.expand(y.shape)), (a, b, ad, bd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need, outs, touts):
        a, b, ad, bd = saved
        out_a = out_b = (None, None)
        if need[0]:
            gad = self._grad_a(gyd, b, a.shape)
            out_a = (self._grad_a(gy, b, a.shape), gad if bd is None else gad + self._grad_a(gy, bd, a.shape))
        if need[1]:
            gbd = self._grad_b(gyd, a, b.shape)
            out_b = (self._grad_b(gy, a, b.shape), gbd if ad is None else gbd + self._grad_b(gy, ad, b.shape))
        return out_a, out_b


class HostOperandRule(Rule):
    """A value and a number or tensor c the model computes as it runs from sizes and buffers (p = (c,),
    evaluated per call): `scores / q.size(-1) ** 0.5`, `x + self.pe[:, : x.size(1)]` (a positional encoding
    cut to the sequence), `scores.masked_fill(self.causal[:L, :L] == 0, -inf)`. `op`: "add" (x + c), "sub"
    (x − c), "rsub" (c − x), "mul" (x · c), "div" (x / c), "fill" (where(c, `fill`, x)), "keep" (where(c, x,
    `fill`)), "attn_keep" / "attn_block" (an attention mask: for a boolean c, "keep" / "fill" with −inf;
    else "add"). Affine in x: ẏ = A ẋ, ḡx = Aᵀ ḡy. A tensor c broadcasts against the per-example value as
    PyTorch broadcasts it (from the right), without spanning the examples' dim."""

    def __init__(self, name: str, kind: str, op: str, fill: float = 0.0):
        super().__init__(name, kind)
        self.op, self.fill = op, fill

    def _check(self, x, c) -> None:
        if isinstance(c, torch.Tensor) and (c.dim() > x.dim() - 1 or (c.dim() == x.dim() - 1 and c.shape[0] != 1)):
            raise ValueError(
                f"model layer {self.describe()}: a tensor of shape {tuple(c.shape)} broadcast against per-example "
                f"inputs {tuple(x.shape[1:])} spans the examples' dim; the fused engine needs it to broadcast over "
                "the examples (fewer dims, or size 1 there)"
            )

    def _op(self, c) -> str:
        if self.op.startswith("attn"):
            if not (isinstance(c, torch.Tensor) and c.dtype == torch.bool):
                return "add"
            return "keep" if self.op == "attn_keep" else "fill"
        return self.op

    def _linear(self, x, c):
        """A x (the map without its shift)."""
        op = self._op(c)
        if op in ("add", "sub"):
            return x
        if op == "rsub":
            return -x
        if op == "mul":
            return x * c
        if op == "div":
            return x / c
        return x.masked_fill(c if op == "fill" else ~c, 0.0)

    def _apply(self, x, c):
        op = self._op(c)
        if op == "add":
            return x + c
        if op == "sub":
            return x - c
        if op == "rsub":
            return c - x
        if op in ("fill", "keep"):
            return x.masked_fill(c if op == "fill" else ~c, float("-inf") if self.op.startswith("attn") else self.fill)
        return self._linear(x, c)

    def forward(self, ops, x, p, save):
        c = p[0]
        self._check(x, c)
        y = self._apply(x, c)
        return y, (c, x.shape, y.shape) if save else None

    def _transpose(self, gy, saved):
        c, shape, _ = saved
        return _reduce(self._linear(gy, c), shape)

    def backward(self, ops, gy, saved, p, need_x, outs):
        return self._transpose(gy, saved) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        y, saved = self.forward(ops, x, p, True)
        return y, (None if xd is None else self._linear(xd, saved[0]).expand(y.shape)), saved

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        return (self._transpose(gy, saved), self._transpose(gyd, saved)) if need_x else (None, None)
