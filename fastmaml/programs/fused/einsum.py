"""`torch.einsum` of one or two tensors: a value alone (sums and reorderings of its per-example dims), two
values (attention's `"bhqd,bhkd->bhqk"`, batched bilinear forms), or a value and a parameter or derived
tensor (`"nd,cd->nc"`, a head `"bld,de->ble"`, per-head weights `"bhd,hde->bhe"`).

The equation is the model's, over its batch: the examples' label leads every value operand and the output
(or an ellipsis leads all of them), and no parameter carries it. Each rule prefixes a task label of its own,
so one einsum runs all tasks. A label that one operand alone carries and the output drops is summed out
before (the compiler lowers it: `Equation.reduced`), so every rule here is multilinear with every operand's
label present in the other operand or the output, which makes each gradient an einsum too:
- value: y = einsum(x), linear; its transpose reorders ȳ back and spreads it over the summed labels;
- two values (bilinear, as ProductRule): ga = einsum(ȳ, b → a), gb = einsum(a, ȳ → b), their tangents add
  the cross terms einsum(ȳ, ḃ → a) and einsum(ȧ, ȳ → b);
- a value and a parameter W, per task `[T, *shape]` or common `[*shape]`: gW = einsum(ȳ, x → W) per task
  (summed over the examples), and ġW = einsum(ġy, x → W) + einsum(ȳ, ẋ → W).
Size-1 dims broadcast as torch.einsum broadcasts them; gradients are summed back to each operand's shape.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .base import LinearMapRule, Rule
from .joins import ProductRule, _reduce

ELLIPSIS = "."  # one character for "..." in parsed subscripts


@dataclass(frozen=True)
class Equation:
    """A parsed einsum equation: `inputs` the operands' subscripts, `output` the result's, "..." as ".";
    `task` a label none of them uses."""

    inputs: Tuple[str, ...]
    output: str

    @staticmethod
    def parse(equation: str, operands: int) -> "Equation":
        """Raises ValueError for an equation PyTorch would refuse or that does not match `operands`."""
        eq = equation.replace(" ", "")
        left, arrow, right = eq.partition("->")
        inputs = tuple(s.replace("...", ELLIPSIS) for s in left.split(","))
        if len(inputs) != operands:
            raise ValueError(f"einsum {equation!r} names {len(inputs)} operands, given {operands}")
        for s in inputs + ((right.replace("...", ELLIPSIS),) if arrow else ()):
            letters = s.replace(ELLIPSIS, "")
            if s.count(ELLIPSIS) > 1 or not all(c in string.ascii_letters for c in letters):
                raise ValueError(f"einsum {equation!r}: subscripts are letters and at most one '...' per operand")
        if arrow:
            output = right.replace("...", ELLIPSIS)
            if len(set(output)) != len(output) or set(output) - set("".join(inputs)):
                raise ValueError(f"einsum {equation!r}: an output label repeats or is in no operand")
        else:  # implicit: the labels that occur once, in alphabetical order, after the ellipsis
            labels = "".join(inputs).replace(ELLIPSIS, "")
            once = "".join(sorted(c for c in set(labels) if labels.count(c) == 1))
            output = (ELLIPSIS if any(ELLIPSIS in s for s in inputs) else "") + once
        return Equation(inputs, output)

    @property
    def task(self) -> str:
        used = set("".join(self.inputs) + self.output)
        return next(c for c in string.ascii_letters if c not in used)

    def summed_alone(self, i: int) -> str:
        """The labels of operand i that no other operand and not the output carry (summed out first)."""
        others = self.output + "".join(s for j, s in enumerate(self.inputs) if j != i)
        return "".join(c for c in self.inputs[i] if c not in others and c != ELLIPSIS)

    def reduced(self, i: int) -> "Equation":
        """This equation with operand i's `summed_alone` labels removed (after summing them out)."""
        drop = self.summed_alone(i)
        inputs = list(self.inputs)
        inputs[i] = "".join(c for c in inputs[i] if c not in drop)
        return Equation(tuple(inputs), self.output)


def _text(subscripts: str) -> str:
    return subscripts.replace(ELLIPSIS, "...")


def _equation(inputs, output: str) -> str:
    return ",".join(_text(s) for s in inputs) + "->" + _text(output)


def _letters(subscripts: str) -> int:
    return len(subscripts.replace(ELLIPSIS, ""))


class EinsumSumRule(LinearMapRule):
    """`torch.einsum("<sub>-><out>", x)` of one value: its per-example dims summed over the labels `out`
    drops, the others reordered (the examples' label, or the ellipsis, first in both). Linear."""

    def __init__(self, name: str, kind: str, sub: str, out: str, task: str):
        super().__init__(name, kind)
        self.sub, self.out, self.task = sub, out, task
        kept = "".join(c for c in sub if c in out)
        self.forward_eq = _equation([task + sub], task + out)
        self.back_eq = _equation([task + out], task + kept)  # ȳ reordered to x's order, summed labels absent

    def apply(self, x, save):
        return torch.einsum(self.forward_eq, x), x.shape

    def transpose(self, gy, shape):
        g = torch.einsum(self.back_eq, gy)
        ellipsis_dims = len(shape) - 1 - _letters(self.sub)
        d = 1
        for c in self.sub:  # insert a size-1 dim where each summed label was
            if c == ELLIPSIS:
                d += ellipsis_dims
                continue
            if c not in self.out:
                g = g.unsqueeze(d)
            d += 1
        return g.expand(shape)


class EinsumRule(ProductRule):
    """`torch.einsum("<a>,<b>-><out>", a, b)` of two values (bilinear: ProductRule's passes with einsums in
    place of the product)."""

    def __init__(self, name: str, kind: str, eq: Equation):
        super().__init__(name, kind)
        sa, sb = eq.inputs
        t = eq.task
        self.eq = eq
        self.forward_eq = _equation([t + sa, t + sb], t + eq.output)
        self.grad_a_eq = _equation([t + eq.output, t + sb], t + sa)
        self.grad_b_eq = _equation([t + sa, t + eq.output], t + sb)

    def _check(self, a, b):
        sa, sb = self.eq.inputs
        if ELLIPSIS in sa and ELLIPSIS in sb and a.dim() - _letters(sa) != b.dim() - _letters(sb):
            raise ValueError(
                f"model: {self.describe()} multiplies values of per-task shapes {tuple(a.shape[1:])} and "
                f"{tuple(b.shape[1:])} whose '...' span different numbers of dims (the examples' dims would not "
                "line up); the fused engine needs them equal"
            )

    def _times(self, a, b):
        return torch.einsum(self.forward_eq, a, b)

    def _grad_a(self, g, b, shape):
        return _reduce(torch.einsum(self.grad_a_eq, g, b), shape)

    def _grad_b(self, g, a, shape):
        return _reduce(torch.einsum(self.grad_b_eq, a, g), shape)


class EinsumParamRule(Rule):
    """`torch.einsum` of a value x and a parameter W (in either order in the model's equation; here
    `"<x>,<w>-><out>"`), W per task `[T, *shape]` or common `[*shape]`. p = (W,)."""

    param_names = ("param",)

    def __init__(self, name: str, kind: str, eq: Equation):
        super().__init__(name, kind)
        sx, sw = eq.inputs
        t, out = eq.task, eq.output
        self.rank = len(sw)
        self.y_eq = {  # by whether W is per task
            True: _equation([t + sx, t + sw], t + out),
            False: _equation([t + sx, sw], t + out),
        }
        self.gx_eq = {True: _equation([t + out, t + sw], t + sx), False: _equation([t + out, sw], t + sx)}
        self.gw_eq = _equation([t + out, t + sx], t + sw)

    def _y(self, x, w):
        return torch.einsum(self.y_eq[w.dim() > self.rank], x, w)

    def _gx(self, g, w, shape):
        return _reduce(torch.einsum(self.gx_eq[w.dim() > self.rank], g, w), shape)

    def _gw(self, g, x):
        return torch.einsum(self.gw_eq, g, x)

    @staticmethod
    def _write(out, g) -> None:
        out.copy_(_reduce(g, out.shape))

    def forward(self, ops, x, p, save):
        return self._y(x, p[0]), x if save else None

    def backward(self, ops, gy, x, p, need_x, outs):
        if outs[0] is not None:
            self._write(outs[0], self._gw(gy, x))
        return self._gx(gy, p[0], x.shape) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        w, wd = p[0], v[0]
        y = self._y(x, w)
        yd: Optional[torch.Tensor] = None if xd is None else self._y(xd, w)
        if wd is not None:
            yd = self._y(x, wd) if yd is None else yd + self._y(x, wd)
        return y, (None if yd is None else yd.expand(y.shape)), (x, xd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        x, xd = saved
        w, wd = p[0], v[0]
        if outs[0] is not None:
            self._write(outs[0], self._gw(gy, x))
        if touts[0] is not None:
            self._write(touts[0], self._gw(gyd, x) if xd is None else self._gw(gyd, x) + self._gw(gy, xd))
        if not need_x:
            return None, None
        gxd = self._gx(gyd, w, x.shape)
        if wd is not None:
            gxd = gxd + self._gx(gy, wd, x.shape)
        return self._gx(gy, w, x.shape), gxd
