"""Masks: comparisons of values (`x > 0`, `a <= b`, `x != 0`), their logical combinations (`&`, `|`, `^`,
`~`), and what reads them: `torch.where(mask, a, b)`, `x.masked_fill(mask, value)`, and a mask cast to a
floating-point value (`mask.float()`, `mask.to(x.dtype)`, `mask.type_as(x)`) that other rules then read.

A mask has no derivative: its rules are not `differentiable`, so the program runs no backward for them and
their tangent is None (zero). Given the mask, `where` is linear in its two values: ẏ = where(m, ȧ, ḃ),
ga = where(m, gy, 0), gb = where(m, 0, gy), and the tangents of the gradients are the same maps of ġy.
"""

from __future__ import annotations

import operator

import torch

from .base import JoinRule, Rule
from .joins import _check_ranks, _reduce

COMPARISONS = {
    "gt": operator.gt,
    "lt": operator.lt,
    "ge": operator.ge,
    "le": operator.le,
    "eq": operator.eq,
    "ne": operator.ne,
}
LOGICAL = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}


class _MaskRule(Rule):
    """A rule whose output carries no gradient: forward only (tangent None)."""

    differentiable = False

    def __init__(self, name: str, kind: str, arity: int):
        super().__init__(name, kind)
        self.arity = arity

    def apply(self, xs):
        raise NotImplementedError

    def forward(self, ops, xs, p, save):
        return self.apply(xs if self.arity > 1 else [xs]), None

    def tangent_forward(self, ops, xs, xds, p, v):
        return self.apply(xs if self.arity > 1 else [xs]), None, None


class CompareRule(_MaskRule):
    """`a <op> b` of two values, or of a value and the number `other` (then one input)."""

    def __init__(self, name: str, kind: str, op: str, other=None):
        super().__init__(name, kind, 1 if other is not None else 2)
        self.op, self.other = op, other

    def apply(self, xs):
        if self.other is not None:
            return COMPARISONS[self.op](xs[0], self.other)
        _check_ranks(self, xs[0], xs[1], "compares")
        return COMPARISONS[self.op](xs[0], xs[1])


class LogicalRule(_MaskRule):
    """`a & b`, `a | b`, `a ^ b` of two masks, or `~a` (`op` "not", one input)."""

    def __init__(self, name: str, kind: str, op: str):
        super().__init__(name, kind, 1 if op == "not" else 2)
        self.op = op

    def apply(self, xs):
        if self.op == "not":
            return torch.logical_not(xs[0])
        _check_ranks(self, xs[0], xs[1], "combines")
        return LOGICAL[self.op](xs[0], xs[1])


class MaskCastRule(_MaskRule):
    """A mask as a floating-point value: `dtype` (`mask.float()`, `mask.to(torch.float64)`), or None for
    the dtype of a second input (`mask.type_as(x)`, `mask.to(x.dtype)`)."""

    def __init__(self, name: str, kind: str, dtype=None):
        super().__init__(name, kind, 1 if dtype is not None else 2)
        self.dtype = dtype

    def apply(self, xs):
        return xs[0].to(self.dtype if self.dtype is not None else xs[1].dtype)


class WhereRule(JoinRule):
    """`torch.where(mask, a, b)`: inputs the mask, then a and b where they are values; `a` / `b` give the
    number in place of one that is not (`x.masked_fill(mask, value)` is where(mask, value, x)). Equal
    per-example ranks; size-1 dims broadcast."""

    def __init__(self, name: str, kind: str, a=None, b=None):
        self.a, self.b = a, b
        super().__init__(name, kind, 1 + (a is None) + (b is None))

    def _branches(self, xs):
        """(a, b) from the inputs (the mask first) and the numbers; None for a missing tangent."""
        rest = list(xs[1:])
        a = rest.pop(0) if self.a is None else None
        b = rest.pop(0) if self.b is None else None
        return a, b

    def apply(self, xs):
        m = xs[0]
        a, b = self._branches(xs)
        for v in (a, b):
            if v is not None:
                _check_ranks(self, m, v, "selects by a mask between")
        y = torch.where(m, self.a if a is None else a, self.b if b is None else b)
        return y, (m, None if a is None else a.shape, None if b is None else b.shape, y)

    def tangent(self, xds, saved):
        m, _, _, y = saved
        ad, bd = self._branches(xds)
        if ad is None and bd is None:
            return None
        zero = y.new_zeros(())
        return torch.where(m, zero if ad is None else ad, zero if bd is None else bd).expand(y.shape)

    def transpose(self, gy, saved):
        m, sa, sb, _ = saved
        zero = gy.new_zeros(())
        out = [None]
        if sa is not None:
            out.append(_reduce(torch.where(m, gy, zero), sa))
        if sb is not None:
            out.append(_reduce(torch.where(m, zero, gy), sb))
        return tuple(out)
