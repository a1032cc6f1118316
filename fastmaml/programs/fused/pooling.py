"""Pooling rules on `[T, N, C, H, W]` (run as `[T·N, C, H, W]`).

Max pooling is piecewise linear: the forward's argmax indices route tangents forward (gather) and
gradients backward (PyTorch's own max-pool backward with those indices); a ReLU before it runs after it, on
the pooled map (`ReLUMaxPool2dRule`, fused by `graph.fuse`). Average pooling is linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LinearMapRule, Rule

aten = torch.ops.aten


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _merge(x):
    """`[T, N, C, H, W]` -> (`[T·N, C, H, W]`, (T, N))."""
    return x.reshape(-1, *x.shape[2:]), x.shape[:2]


class MaxPool2dRule(LinearMapRule):
    def __init__(self, name: str, kind: str, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__(name, kind)
        self.kernel = _pair(kernel_size)
        self.stride = _pair(stride if stride else kernel_size)  # None or [] (F.max_pool2d): the kernel size
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.ceil_mode = ceil_mode

    @property
    def window(self):
        """k for square k×k windows at stride k without padding or dilation, floor mode (each input element in
        at most one window), else None."""
        k = self.kernel[0]
        plain = self.padding == [0, 0] and self.dilation == [1, 1] and not self.ceil_mode
        return k if plain and self.kernel == [k, k] and self.stride == [k, k] else None

    def _check(self, x):
        if x.dim() != 5:
            raise ValueError(
                f"model layer {self.describe()}: expected per-task inputs [T, N, C, H, W], got shape {tuple(x.shape)}"
            )

    def apply(self, x, save):
        self._check(x)
        x4, tn = _merge(x)
        if not save:
            y = F.max_pool2d(x4, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode)
            return y.view(*tn, *y.shape[1:]), None
        y, idx = F.max_pool2d(
            x4, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode, return_indices=True
        )
        return y.view(*tn, *y.shape[1:]), (x4, idx)

    def tangent(self, xd, saved):
        x4, idx = saved
        flat = xd.reshape(x4.shape[0], x4.shape[1], -1)
        yd = flat.gather(2, idx.flatten(2))
        return yd.view(*xd.shape[:3], *idx.shape[2:])

    def transpose(self, gy, saved):
        x4, idx = saved
        g4 = gy.reshape(-1, *gy.shape[2:])
        gx = aten.max_pool2d_with_indices_backward(
            g4, x4, self.kernel, self.stride, self.padding, self.dilation, self.ceil_mode, idx
        )
        return gx.view(*gy.shape[:2], *gx.shape[1:])


class ReLUMaxPool2dRule(Rule):
    """ReLU followed by MaxPool2d, computed as MaxPool2d then ReLU: relu(x) is never written.

    Max commutes with ReLU, so the values are the same; where the window's maximum is positive, its first
    maximum is the same element before and after the ReLU, and elsewhere both routes give zero (ReLU's
    derivative is 0 at and below 0), so gradients and tangents are the same too. ReLU's second derivative is
    0: ġx routes ġz as gx routes gz. Non-overlapping windows (`MaxPool2dRule.window`) run the op
    `relu_maxpool_fwd` (the C++ CPU kernel pools relu(x) plane by plane), others PyTorch's pooling."""

    def __init__(self, relu: Rule, pool: MaxPool2dRule):
        super().__init__(f"{relu.name}+{pool.name}", f"{relu.kind}+{pool.kind}")
        self.pool = pool

    def _pooled(self, ops, x, save: bool):
        """(z, what the pool's `tangent`/`transpose` take, or None)."""
        k = self.pool.window
        if k is None or x.dim() != 5:
            y, saved = self.pool.apply(x, save)
            return y.relu_(), saved
        z, idx = ops.relu_maxpool_fwd(x, k)
        return z, (x.reshape(-1, *x.shape[2:]), idx.flatten(0, 1)) if save else None

    def forward(self, ops, x, p, save):
        z, pooled = self._pooled(ops, x, save)
        return z, (pooled, z) if save else None

    def backward(self, ops, gz, saved, p, need_x, outs):
        if not need_x:
            return None
        pooled, z = saved
        return self.pool.transpose(aten.threshold_backward(gz, z, 0), pooled)

    def tangent_forward(self, ops, x, xd, p, v):
        z, pooled = self._pooled(ops, x, True)
        zd = None if xd is None else aten.threshold_backward(self.pool.tangent(xd, pooled), z, 0)
        return z, zd, (pooled, z)

    def tangent_backward(self, ops, gz, gzd, saved, p, v, need_x, outs, touts):
        if not need_x:
            return None, None
        pooled, z = saved
        return tuple(self.pool.transpose(aten.threshold_backward(g, z, 0), pooled) for g in (gz, gzd))


class AvgPool2dRule(LinearMapRule):
    def __init__(
        self,
        name: str,
        kind: str,
        kernel_size,
        stride=None,
        padding=0,
        ceil_mode=False,
        count_include_pad=True,
        divisor_override=None,
    ):
        super().__init__(name, kind)
        self.kernel = _pair(kernel_size)
        self.stride = _pair(stride if stride else kernel_size)
        self.padding = _pair(padding)
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = divisor_override

    def apply(self, x, save):
        if x.dim() != 5:
            raise ValueError(
                f"model layer {self.describe()}: expected per-task inputs [T, N, C, H, W], got shape {tuple(x.shape)}"
            )
        x4, tn = _merge(x)
        y = F.avg_pool2d(
            x4, self.kernel, self.stride, self.padding, self.ceil_mode, self.count_include_pad, self.divisor_override
        )
        return y.view(*tn, *y.shape[1:]), x4

    def transpose(self, gy, x4):
        g4 = gy.reshape(-1, *gy.shape[2:])
        gx = aten.avg_pool2d_backward(
            g4,
            x4,
            self.kernel,
            self.stride,
            self.padding,
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )
        return gx.view(*gy.shape[:2], *gx.shape[1:])


class AdaptiveAvgPool2dRule(LinearMapRule):
    def __init__(self, name: str, kind: str, output_size):
        super().__init__(name, kind)
        self.output_size = output_size

    def apply(self, x, save):
        if x.dim() != 5:
            raise ValueError(
                f"model layer {self.describe()}: expected per-task inputs [T, N, C, H, W], got shape {tuple(x.shape)}"
            )
        x4, tn = _merge(x)
        y = F.adaptive_avg_pool2d(x4, self.output_size)
        return y.view(*tn, *y.shape[1:]), x4

    def transpose(self, gy, x4):
        gx = aten._adaptive_avg_pool2d_backward(gy.reshape(-1, *gy.shape[2:]).contiguous(), x4)
        return gx.view(*gy.shape[:2], *gx.shape[1:])


class AdaptiveMaxPool2dRule(MaxPool2dRule):
    """Adaptive max pooling to `output_size` (`F.adaptive_max_pool2d(x, 1)`: a global max pool): the max-pool
    rule's routing (its `tangent` gathers by the same per-plane indices) with PyTorch's adaptive kernels."""

    def __init__(self, name: str, kind: str, output_size):
        Rule.__init__(self, name, kind)
        self.output_size = output_size

    @property
    def window(self):
        return None

    def apply(self, x, save):
        self._check(x)
        x4, tn = _merge(x)
        y, idx = F.adaptive_max_pool2d(x4, self.output_size, return_indices=True)
        return y.view(*tn, *y.shape[1:]), (x4, idx) if save else None

    def transpose(self, gy, saved):
        x4, idx = saved
        gx = aten.adaptive_max_pool2d_backward(gy.reshape(-1, *gy.shape[2:]), x4, idx)
        return gx.view(*gy.shape[:2], *gx.shape[1:])


class MaxOverDimRule(LinearMapRule):
    """The maximum over a per-example dim (`torch.amax(x, d)`, `x.max(d).values`: a max over tokens or points,
    PointNet's global feature): piecewise linear, routed through the first maximum's index as max pooling."""

    def __init__(self, name: str, kind: str, dim: int, keepdim: bool = False):
        super().__init__(name, kind)
        self.dim, self.keepdim = dim, keepdim

    def apply(self, x, save):
        d = self.feature_dim(self.dim, x, "a maximum")
        y, idx = torch.max(x, d, keepdim=True)
        return (y if self.keepdim else y.squeeze(d)), (x.shape, d, idx)

    def tangent(self, xd, saved):
        _, d, idx = saved
        yd = xd.gather(d, idx)
        return yd if self.keepdim else yd.squeeze(d)

    def transpose(self, gy, saved):
        shape, d, idx = saved
        g = gy if self.keepdim else gy.unsqueeze(d)
        return g.new_zeros(shape).scatter_(d, idx, g)
