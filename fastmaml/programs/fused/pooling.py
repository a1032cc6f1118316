"""Pooling rules on `[T, N, C, H, W]` (run as `[T·N, C, H, W]`).

Max pooling is piecewise linear: the forward's argmax indices route tangents forward (gather) and
gradients backward (PyTorch's own max-pool backward with those indices). Average pooling is linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LinearMapRule

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
