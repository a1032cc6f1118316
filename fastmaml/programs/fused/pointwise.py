"""Elementwise activations y = f(x): gx = f'(x) gy, ẏ = f'(x) ẋ, ġx = f'(x) ġy + f''(x) ẋ gy.

`d1(g, x, y)` applies f' (PyTorch's own backward kernels), `d2(x, y)` gives f'' (None where it is 0:
the piecewise-linear ReLU and LeakyReLU). PReLU's slope is a parameter (`PReLURule`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Rule

aten = torch.ops.aten


class PointwiseRule(Rule):
    saves_input = False  # whether d1/d2 need x (else they use y only)

    def f(self, x):
        raise NotImplementedError

    def d1(self, g, x, y):
        raise NotImplementedError

    def d2(self, x, y):
        return None

    def forward(self, ops, x, p, save):
        y = self.f(x)
        return y, ((x if self.saves_input else None), y) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        return self.d1(gy, *saved) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        y = self.f(x)
        saved = ((x if self.saves_input else None), y, xd)
        return y, (None if xd is None else self.d1(xd, x, y)), saved

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if not need_x:
            return None, None
        x, y, xd = saved
        gx = self.d1(gy, x, y)
        gxd = self.d1(gyd, x, y)
        if xd is not None:
            second = self.d2(x, y)
            if second is not None:
                gxd = gxd.addcmul_(second * xd, gy)
        return gx, gxd


class ReLURule(PointwiseRule):
    def f(self, x):
        return torch.relu(x)

    def d1(self, g, x, y):
        return aten.threshold_backward(g, y, 0)


class LeakyReLURule(PointwiseRule):
    saves_input = True

    def __init__(self, name, kind, slope: float):
        super().__init__(name, kind)
        self.slope = slope

    def f(self, x):
        return F.leaky_relu(x, self.slope)

    def d1(self, g, x, y):
        return aten.leaky_relu_backward(g, x, self.slope, False)


class TanhRule(PointwiseRule):
    def f(self, x):
        return torch.tanh(x)

    def d1(self, g, x, y):
        return aten.tanh_backward(g, y)

    def d2(self, x, y):
        return (y * y - 1) * (2 * y)  # −2y(1 − y²)


class SigmoidRule(PointwiseRule):
    def f(self, x):
        return torch.sigmoid(x)

    def d1(self, g, x, y):
        return aten.sigmoid_backward(g, y)

    def d2(self, x, y):
        return y * (1 - y) * (1 - 2 * y)


class ELURule(PointwiseRule):
    """f = s x for x > 0, s α (e^{i x} − 1) else (ELU: s = i = 1; SELU: its fixed α and s; CELU: i = 1/α):
    f'' = i² (f + s α) for x ≤ 0 (= s α i² e^{i x}), 0 else."""

    saves_input = True

    def __init__(self, name, kind, alpha: float, scale: float = 1.0, input_scale: float = 1.0):
        super().__init__(name, kind)
        self.alpha, self.scale, self.input_scale = float(alpha), float(scale), float(input_scale)

    def f(self, x):
        return aten.elu(x, self.alpha, self.scale, self.input_scale)

    def d1(self, g, x, y):
        return aten.elu_backward(g, self.alpha, self.scale, self.input_scale, False, x)

    def d2(self, x, y):
        return torch.where(x > 0, 0.0, (y + self.scale * self.alpha) * self.input_scale**2)


class GELURule(PointwiseRule):
    """Exact (erf) GELU: f' = Φ(x) + x φ(x), f'' = φ(x) (2 − x²)."""

    saves_input = True

    def f(self, x):
        return F.gelu(x)

    def d1(self, g, x, y):
        return aten.gelu_backward(g, x, approximate="none")

    def d2(self, x, y):
        phi = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2 * math.pi))
        return phi * (2 - x * x)


class SiLURule(PointwiseRule):
    """SiLU (swish) f = x σ(x): f' = σ (1 + x (1 − σ)), f'' = σ (1 − σ) (2 + x (1 − 2σ))."""

    saves_input = True

    def f(self, x):
        return F.silu(x)

    def d1(self, g, x, y):
        return aten.silu_backward(g, x)

    def d2(self, x, y):
        s = torch.sigmoid(x)
        return s * (1 - s) * (2 + x * (1 - 2 * s))


class SoftplusRule(PointwiseRule):
    """Softplus f = log(1 + e^{βx}) / β, linear (f = x) where βx > threshold: f' = σ(βx), f'' = β σ (1 − σ)
    (0 on the linear part)."""

    saves_input = True

    def __init__(self, name, kind, beta: float, threshold: float):
        super().__init__(name, kind)
        self.beta, self.threshold = beta, threshold

    def f(self, x):
        return F.softplus(x, self.beta, self.threshold)

    def d1(self, g, x, y):
        return aten.softplus_backward(g, x, self.beta, self.threshold)

    def d2(self, x, y):
        s = torch.sigmoid(x * self.beta)
        return torch.where(x * self.beta > self.threshold, 0.0, self.beta * s * (1 - s))


class HardtanhRule(PointwiseRule):
    """Hardtanh (ReLU6: min 0, max 6) clamps x to [min, max]: piecewise linear, f'' = 0."""

    saves_input = True

    def __init__(self, name, kind, min_val: float, max_val: float):
        super().__init__(name, kind)
        self.min_val, self.max_val = min_val, max_val

    def f(self, x):
        return F.hardtanh(x, self.min_val, self.max_val)

    def d1(self, g, x, y):
        return aten.hardtanh_backward(g, x, self.min_val, self.max_val)


class HardswishRule(PointwiseRule):
    """Hardswish f = x · relu6(x + 3) / 6: f' = (2x + 3) / 6 on (−3, 3) (0 below, 1 above), f'' = 1/3 there."""

    saves_input = True

    def f(self, x):
        return F.hardswish(x)

    def d1(self, g, x, y):
        return aten.hardswish_backward(g, x)

    def d2(self, x, y):
        return ((x > -3) & (x < 3)).to(x.dtype) / 3


class HardsigmoidRule(PointwiseRule):
    """Hardsigmoid f = relu6(x + 3) / 6: piecewise linear, f' = 1/6 on (−3, 3), f'' = 0. (PyTorch's
    `hardsigmoid_backward` scales by a float32 1/6 in float64 too, 2e-8 off: not used.)"""

    saves_input = True

    def f(self, x):
        return F.hardsigmoid(x)

    def d1(self, g, x, y):
        return g * ((x > -3) & (x < 3)).to(g.dtype) / 6


class MathRule(PointwiseRule):
    """Elementwise math: exp, log, sqrt, rsqrt, reciprocal, abs, sin, cos, and powers by a constant
    (`x ** c`, `x.pow(c)`, `torch.square`). `FUNCTIONS[kind]` gives f and, from x (and y = f(x)), f' and f''
    (None: 0)."""

    saves_input = True

    FUNCTIONS = {
        "exp": (torch.exp, lambda x, y, c: y, lambda x, y, c: y),
        "log": (torch.log, lambda x, y, c: x.reciprocal(), lambda x, y, c: -(x * x).reciprocal()),
        "sqrt": (torch.sqrt, lambda x, y, c: 0.5 / y, lambda x, y, c: -0.25 / (y * y * y)),
        "rsqrt": (torch.rsqrt, lambda x, y, c: -0.5 * y * y * y, lambda x, y, c: 0.75 * y**5),
        "reciprocal": (torch.reciprocal, lambda x, y, c: -(y * y), lambda x, y, c: 2 * y * y * y),
        "abs": (torch.abs, lambda x, y, c: torch.sign(x), None),
        "sin": (torch.sin, lambda x, y, c: torch.cos(x), lambda x, y, c: -y),
        "cos": (torch.cos, lambda x, y, c: -torch.sin(x), lambda x, y, c: -y),
        "pow": (
            lambda x, c: torch.pow(x, c),
            lambda x, y, c: c * torch.pow(x, c - 1),
            lambda x, y, c: None if c == 1 else c * (c - 1) * torch.pow(x, c - 2),
        ),
    }

    def __init__(self, name, kind, function: str, exponent: float = 1.0):
        super().__init__(name, kind)
        self.function, self.exponent = function, exponent
        self._f, self._d1, self._d2 = self.FUNCTIONS[function]

    def f(self, x):
        return self._f(x, self.exponent) if self.function == "pow" else self._f(x)

    def d1(self, g, x, y):
        return g * self._d1(x, y, self.exponent)

    def d2(self, x, y):
        return None if self._d2 is None else self._d2(x, y, self.exponent)


class ClampRule(PointwiseRule):
    """`x.clamp(min, max)` (either bound None): piecewise linear, f' = 1 where min <= x <= max (PyTorch's
    clamp passes the gradient at the bounds), f'' = 0."""

    saves_input = True

    def __init__(self, name, kind, low, high):
        super().__init__(name, kind)
        self.low, self.high = low, high

    def f(self, x):
        return torch.clamp(x, self.low, self.high)

    def d1(self, g, x, y):
        inside = torch.ones_like(x, dtype=torch.bool)
        if self.low is not None:
            inside &= x >= self.low
        if self.high is not None:
            inside &= x <= self.high
        return g * inside.to(g.dtype)


class PReLURule(Rule):
    """PReLU (`nn.PReLU`, `F.prelu`): y = x where x > 0, else a x, with the learned slope a one per channel
    (`[C]`, the per-example dim 0) or one for all (`[1]`). With m = [x > 0] and s = m + (1 − m) a (PyTorch
    takes a at x = 0): gx = s g, ga = Σ (1 − m) x g over the examples and the dims after the channel,
    ẏ = s ẋ + (1 − m) x ȧ, ġx = s ġ + (1 − m) ȧ g, ġa = Σ (1 − m)(ẋ g + x ġ). p = (weight,)."""

    param_names = ("weight",)

    def __init__(self, name: str, kind: str, num_parameters: int):
        super().__init__(name, kind)
        self.num_parameters = num_parameters

    def _view(self, a, x):
        """A slope (or direction) `[T, C]` / `[C]` broadcastable against x `[T, N, C, *rest]`."""
        if a is None:
            return None
        per_task = a.dim() == 2
        if self.num_parameters == 1:
            return a.view(a.shape[0], *([1] * (x.dim() - 1))) if per_task else a
        if x.dim() < 3 or x.shape[2] != self.num_parameters:
            raise ValueError(
                f"model layer {self.describe()}: {self.num_parameters} slopes, one per channel, but per-example "
                f"inputs {tuple(x.shape[1:])} have no channel dim of that size first"
            )
        rest = [1] * (x.dim() - 3)
        return a.view(a.shape[0], 1, self.num_parameters, *rest) if per_task else a.view(-1, *rest)

    def _to_param(self, g, out) -> None:
        """g `[T, N, C, *rest]` summed to the slope's `out` `[T, C]` (or `[T, 1]`)."""
        dims = tuple(range(1, g.dim())) if self.num_parameters == 1 else (1, *range(3, g.dim()))
        out.copy_(g.sum(dims).view(out.shape))

    def _slope(self, x, a):
        """(m = [x > 0], s = m + (1 − m) a, (1 − m) x)."""
        m = x > 0
        return m, torch.where(m, torch.ones_like(x), self._view(a, x)), torch.where(m, torch.zeros_like(x), x)

    def forward(self, ops, x, p, save):
        return x * self._slope(x, p[0])[1], x if save else None

    def backward(self, ops, gy, x, p, need_x, outs):
        m, s, below = self._slope(x, p[0])
        if outs[0] is not None:
            self._to_param(below * gy, outs[0])
        return s * gy if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        m, s, below = self._slope(x, p[0])
        y = x * s
        yd = None if xd is None else s * xd
        if v[0] is not None:
            yd = below * self._view(v[0], x) if yd is None else yd + below * self._view(v[0], x)
        return y, yd, (x, xd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        x, xd = saved
        m, s, below = self._slope(x, p[0])
        if outs[0] is not None:
            self._to_param(below * gy, outs[0])
        if touts[0] is not None:
            gd = below * gyd
            if xd is not None:
                gd = gd + torch.where(m, torch.zeros_like(xd), xd) * gy
            self._to_param(gd, touts[0])
        if not need_x:
            return None, None
        gxd = s * gyd
        if v[0] is not None:
            gxd = gxd + torch.where(m, torch.zeros_like(gy), self._view(v[0], x) * gy)
        return s * gy, gxd
