"""A conv net's first block as one rule: Conv2d on the model's input, then BatchNorm2d + ReLU + MaxPool2d.

z = maxpool_k(relu(BN(conv2d(x, cw) + cb))). Its convolution output y is the largest activation of a conv
net (64 channels at the input's resolution, from an image's few channels) and costs little to compute,
so on batch statistics, where the op table has kernels for it (`conv_bn_relu_maxpool_*`, the C++ CPU kernels
of csrc/conv_bn_relu_maxpool.cpp), the forward computes y plane by plane and writes only the pooled z, and
the backward gets the weight gradients from the picks and the input patches' moments, never writing y or its
gradient. The statistics of y come from those moments (mean cw·pmean + cb, variance cwᵀ pcov cw; see
ops/reference/block_tail.py).

The tangent passes (the Hessian-vector products, on the support set) are kernels of the same kind
(`conv_bn_relu_maxpool_tangent_*`): the tangent forward is the forward itself (the same bits, so an HVP sees
the picks and statistics of the gradient it pairs with) plus ż at the picks, whose statistics' tangents come
from the patch moments too (a = r cwᵀ pcov ċw); the tangent backward needs the picks' sums of the gradient and
of its tangent only. Everything else runs the convolution rule and the block-tail rule in turn (`ConvRule`,
`BatchNormReLUMaxPoolRule`): fixed statistics, other backends, and the differentiable forward. The compiler
fuses the pair (`graph.fuse`) where the convolution reads the model's input (no gradient w.r.t. it is ever
needed), has at most `MAX_TAPS` taps Ci·kh·kw (a one-channel image's 3×3 kernel), and its output has no other
reader.
"""

from __future__ import annotations

import torch

from . import memory_format as mf
from .conv import ConvRule
from .norm import BatchNormRule
from .norm_act import BatchNormReLUMaxPoolRule

# Ci·kh·kw of the convolutions fused: the kernels take up to 32, but their cost per output position grows with
# the taps (the patch moments as taps², the convolution as taps × channels) while the traffic they save does
# not; an RGB 3×3 first layer (27 taps) ran slower fused than apart, a one-channel 3×3 one faster
# (benchmarks/RESULTS.md, "a conv net's first block as one rule").
MAX_TAPS = 9


def fused_conv_block(ops) -> bool:
    """Whether the batch-statistics forward and backward run the `conv_bn_relu_maxpool_*` kernels (the op
    table has them, not their reference)."""
    return ops.chosen.get("conv_bn_relu_maxpool_fwd", ("torch",))[0] != "torch"


class ConvBlockRule(BatchNormRule):
    """p = (conv weight, conv bias, BatchNorm weight, BatchNorm bias, statistics) (BatchNormRule's, after the
    convolution's two)."""

    param_names = ("conv_weight", "conv_bias", "weight", "bias")
    takes_stats = False
    input_is_normalized = False  # the BatchNorm normalizes the convolution's output, not x

    def __init__(self, conv: ConvRule, tail: BatchNormReLUMaxPoolRule):
        super().__init__(
            f"{conv.name}+{tail.name}", f"{conv.kind}+{tail.kind}", tail.eps, tail.num_features, tail.index
        )
        self.conv, self.tail = conv, tail
        self.k = tail.k

    @staticmethod
    def fusable(conv: ConvRule) -> bool:
        """A convolution worth fusing: at most `MAX_TAPS` taps Ci·kh·kw, not grouped (the kernels' groups is 1)."""
        kh, kw = conv.geometry.kernel
        return conv.in_channels * kh * kw <= MAX_TAPS and conv.geometry.groups == 1

    def _geometry(self):
        g = self.conv.geometry
        return g.stride, g.padding, g.dilation

    @staticmethod
    def _per_task(v, T: int, shape, fill: float, like):
        """A weight or per-channel value, common `[*shape]`, per task `[T, *shape]` or None (`fill`), as a
        contiguous `[T, *shape]`."""
        if v is None:
            return like.new_full((T, *shape), fill)
        return v.expand(T, *shape).contiguous()

    def _args(self, x, p):
        """(cw `[T, C, Ci, kh, kw]`, cb, w, b `[T, C]`) per task for the kernels."""
        cw, cb, w, b, _ = p
        T, C = x.shape[0], self.num_features
        shape = tuple(cw.shape[-4:])
        return (
            self._per_task(cw, T, shape, 0.0, x),
            self._per_task(cb, T, (C,), 0.0, x),
            self._per_task(w, T, (C,), 1.0, x),
            self._per_task(b, T, (C,), 0.0, x),
        )

    def _fused(self, ops, p) -> bool:
        return p[4] is None and fused_conv_block(ops) and not torch.is_grad_enabled()

    def normalized_input(self, ops, x, p):
        """The convolution's output `[T, N, C, H, W]`, the value the BatchNorm normalizes (what the program measures
        for per-step statistics)."""
        return self.conv.forward(ops, x, p[:2], False)[0]

    def forward(self, ops, x, p, save):
        if not self._fused(ops, p):
            y, s1 = self.conv.forward(ops, x, p[:2], save)
            z, s2 = self.tail.forward(ops, y, p[2:], save)
            return z, ("composed", s1, s2) if save else None
        x = self.conv._check(x)
        cw, cb, w, b = self._args(x, p)
        z, idx, _, _, pmean, pcov = ops.conv_bn_relu_maxpool_fwd(x, cw, cb, w, b, self.eps, self.k, *self._geometry())
        # the kernels write z contiguous; the next layers get it in x's format (channels-last for large maps)
        return mf.dense_as(z, x), ("fused", z, idx, x, cw, cb, w, pmean, pcov) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        if saved[0] == "composed":
            _, s1, s2 = saved
            g = self.tail.backward(ops, gy, s2, p[2:], True, outs[2:])
            return self.conv.backward(ops, g, s1, p[:2], need_x, outs[:2])
        if need_x:
            raise RuntimeError(f"model layer {self.describe()}: the fused first block has no input gradient")
        _, z, idx, x, cw, cb, w, pmean, pcov = saved
        grads = ops.conv_bn_relu_maxpool_bwd(gy, z, idx, x, cw, cb, w, pmean, pcov, self.eps, self.k, *self._geometry())
        for out, g in zip(outs, grads):
            if out is not None:
                out.copy_(g.view(out.shape))
        return None

    def _directions(self, x, p, v):
        """(dcw, dcb, dw, db) per task for the kernels; None (a shared parameter) is zero."""
        T, C = x.shape[0], self.num_features
        shapes = (tuple(p[0].shape[-4:]), (C,), (C,), (C,))
        return tuple(self._per_task(d, T, shape, 0.0, x) for d, shape in zip(v, shapes))

    def tangent_forward(self, ops, x, xd, p, v):
        if xd is not None or not self._fused(ops, p):
            y, yd, s1 = self.conv.tangent_forward(ops, x, xd, p[:2], v[:2])
            z, zd, s2 = self.tail.tangent_forward(ops, y, yd, p[2:], v[2:])
            return z, zd, ("composed", s1, s2)
        x = self.conv._check(x)
        cw, cb, w, b = self._args(x, p)
        dcw, dcb, dw, db = self._directions(x, p, v)
        z, zd, idx, _, _, pmean, pcov = ops.conv_bn_relu_maxpool_tangent_fwd(
            x, cw, cb, w, b, dcw, dcb, dw, db, self.eps, self.k, *self._geometry()
        )
        saved = ("fused", z, idx, x, cw, cb, w, dcw, dw, pmean, pcov)
        return mf.dense_as(z, x), mf.dense_as(zd, x), saved

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        if saved[0] == "composed":
            _, s1, s2 = saved
            g, gd = self.tail.tangent_backward(ops, gy, gyd, s2, p[2:], v[2:], True, outs[2:], touts[2:])
            return self.conv.tangent_backward(ops, g, gd, s1, p[:2], v[:2], need_x, outs[:2], touts[:2])
        if need_x:
            raise RuntimeError(f"model layer {self.describe()}: the fused first block has no input gradient")
        _, z, idx, x, cw, cb, w, dcw, dw, pmean, pcov = saved
        grads = ops.conv_bn_relu_maxpool_tangent_bwd(
            gy, gyd, z, idx, x, cw, cb, w, dcw, dw, pmean, pcov, self.eps, self.k, *self._geometry()
        )
        for out, g in zip(tuple(outs) + tuple(touts), grads):
            if out is not None:
                out.copy_(g.view(out.shape))
        return None, None
