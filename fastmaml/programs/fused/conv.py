"""Conv2d rule and its task-batching strategies.

Per-task weights `[T, O, C, kh, kw]` make every task a different convolution. Strategies:
- "loop": one convolution per task (x[t] `[N, C, H, W]` with w[t]);
- "grouped": tasks folded into channels, `[N, T·C, H, W]` with groups=T (one call, two transposes);
- "triton": the Triton implicit-GEMM kernels with per-task weights (kernels/conv.py through
  fastmaml/ops/backends/triton_conv.py; CUDA, or the CPU under TRITON_INTERPRET=1 for tests): one launch
  per pass, the tangent passes (value and tangent together) too. Never chosen by "auto" (unmeasured).
A common weight `[O, C, kh, kw]` (step 0, or a shared layer) is one convolution over `[T·N, C, H, W]`.
Grouped and depthwise convolutions (`Geometry.groups` G, weights `[O, C/G, kh, kw]`) run every strategy but
"triton" (its kernels have groups 1; "grouped" instead), "grouped" with T·G groups.
`STRATEGY` holds the choice per device type ("auto": by size, see `choose`); `ConvRule.strategy`
overrides it per layer. The choice and its threshold come from `benchmarks/conv_batching.py` (grouped
wins while a task's N·H·W is small, the per-task loop beyond; results in benchmarks/RESULTS.md).
Gradients w.r.t. input and weight come from one
`aten.convolution_backward` call.

R-op: ẏ = conv(ẋ, w) + conv(x, ẇ) + ḃ (one convolution of [ẋ | x] with [w | ẇ] along input
channels; two for G > 1, whose groups that concatenation would mix); backward tangent:
ġw = ∂w(x, ġy) + ∂w(ẋ, gy), ġx = ∂x(ġy, w) + ∂x(gy, ẇ).

A convolution whose output only a BatchNorm rule reads runs `forward_stats` / `tangent_forward_stats`
(FusedProgram): with strategy "triton" they also return the batch statistics of y (and ẏ) from the
kernel's epilogue, which the program gives to the BatchNorm (norm.py); with the others, None.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import memory_format as mf
from .base import Rule

aten = torch.ops.aten

STRATEGIES = ("loop", "grouped", "triton", "auto")
STRATEGY = {"cpu": "auto", "cuda": "grouped"}
GROUPED_MAX_POSITIONS = 256  # "auto": grouped when a task's N·H·W is at most this, else the loop


def choose(strategy: str, x) -> str:
    """The strategy for input x `[T, N, C, H, W]`: `strategy` itself unless it is "auto"."""
    if strategy != "auto":
        return strategy
    return "grouped" if x.shape[1] * x.shape[3] * x.shape[4] <= GROUPED_MAX_POSITIONS else "loop"


def _pair(v):
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class Geometry:
    """Kernel size, stride, padding, dilation and groups of a 2-d convolution (padding "valid" or "same",
    symmetric only: the compiler rejects an even effective kernel with "same"; groups > 1: grouped and
    depthwise convolutions, weights `[O, C / groups, kh, kw]`)."""

    def __init__(self, kernel_size, stride=1, padding=0, dilation=1, groups=1):
        self.groups = int(groups)
        self.kernel = _pair(kernel_size)
        self.stride = _pair(stride)
        self.dilation = _pair(dilation)
        if isinstance(padding, str):
            k = _pair(kernel_size)
            same = [d * (kk - 1) // 2 for d, kk in zip(self.dilation, k)]
            self.padding = [0, 0] if padding == "valid" else same
        else:
            self.padding = _pair(padding)

    @staticmethod
    def same_is_asymmetric(kernel_size, dilation) -> bool:
        return any(d * (k - 1) % 2 for d, k in zip(_pair(dilation), _pair(kernel_size)))


def _triton():
    """The "triton" strategy's passes (fastmaml/ops/backends/triton_conv.py; triton imported at first use)."""
    from ...ops.backends import triton_conv

    return triton_conv


def _graph(*tensors) -> bool:
    """Whether autograd records a call on `tensors` (the Triton kernels have no autograd formula)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def conv_forward(x, w, b, g: Geometry, strategy: str):
    """x `[T, N, C, H, W]`, w `[T, O, C, kh, kw]`|`[O, C, kh, kw]`, b `[T, O]`|`[O]`|None
    -> `[T, N, O, H', W']`."""
    if strategy == "triton":
        if not _graph(x, w, b):
            return _triton().conv_forward(x, w, b, g.stride, g.padding, g.dilation)
        strategy = "grouped"  # differentiable (AdaptedModel): PyTorch's convolution
    T, N = x.shape[:2]
    if w.dim() == 4:
        common_b = b if b is None or b.dim() == 1 else None
        y = F.conv2d(x.reshape(T * N, *x.shape[2:]), w, common_b, g.stride, g.padding, g.dilation, g.groups)
        y = y.view(T, N, *y.shape[1:])
        if b is not None and b.dim() == 2:
            y = y + b[:, None, :, None, None]
        return y
    if b is not None and b.dim() == 1:
        b = b.expand(T, -1)
    if strategy == "loop" and torch.is_grad_enabled():  # differentiable path (AdaptedModel)
        return torch.stack(
            [
                F.conv2d(x[t], w[t], None if b is None else b[t], g.stride, g.padding, g.dilation, g.groups)
                for t in range(T)
            ]
        )
    if strategy == "loop":  # each task's output written in place into one [T, N, O, H', W'] buffer (x's format)
        y0 = F.conv2d(x[0], w[0], None if b is None else b[0], g.stride, g.padding, g.dilation, g.groups)
        if T == 1:  # one task (the CPU's chunks of large activations): the output as it comes, no copy
            return y0.unsqueeze(0)
        y = mf.empty_as((T, *y0.shape), x)
        y[0] = y0
        for t in range(1, T):
            aten.convolution.out(
                x[t],
                w[t],
                None if b is None else b[t],
                g.stride,
                g.padding,
                g.dilation,
                False,
                [0, 0],
                g.groups,
                out=y[t],
            )
        return y
    C, Cout = x.shape[2], w.shape[1]
    xg = x.transpose(0, 1).reshape(N, T * C, *x.shape[3:])
    y = F.conv2d(
        xg,
        w.reshape(T * Cout, *w.shape[2:]),
        None if b is None else b.reshape(T * Cout),
        g.stride,
        g.padding,
        g.dilation,
        T * g.groups,
    )
    return mf.dense_as(y.view(N, T, Cout, *y.shape[2:]).transpose(0, 1), x)


def conv_backward(gy, x, w, g: Geometry, strategy: str, need_x: bool, gw_out, gb_out=None, accumulate=False):
    """∂x(gy, w) `[T, N, C, H, W]` (if need_x); ∂w(x, gy) and Σ gy per task written (or added, with
    `accumulate`, weight only) into `gw_out [T, O, C, kh, kw]` / `gb_out [T, O]` when given.
    w per task or common."""
    T, N = x.shape[:2]
    need_w, need_b = gw_out is not None, gb_out is not None
    if not (need_x or need_w or need_b):
        return None
    if strategy == "triton":
        return _triton().conv_backward(gy, x, w, g.stride, g.padding, g.dilation, need_x, gw_out, gb_out, accumulate)
    if need_b and (strategy != "loop" or (w.dim() == 4 and not need_w)):
        torch.sum(gy, (1, 3, 4), out=gb_out)
        need_b = False
    if w.dim() == 4 and not need_w:
        gx = aten.convolution_backward(
            gy.reshape(T * N, *gy.shape[2:]),
            x.reshape(T * N, *x.shape[2:]),
            w,
            None,
            g.stride,
            g.padding,
            g.dilation,
            False,
            [0, 0],
            g.groups,
            [True, False, False],
        )[0]
        return gx.view(T, N, *gx.shape[1:])
    if w.dim() == 4:
        w = w.expand(T, *w.shape)
    mask = [need_x, need_w, need_b]
    if strategy == "loop" and T == 1:  # one task: its gradients as they come (out= variants copy)
        gx, gw, gb = aten.convolution_backward(
            gy[0],
            x[0],
            w[0],
            [w.shape[1]] if need_b else None,
            g.stride,
            g.padding,
            g.dilation,
            False,
            [0, 0],
            g.groups,
            mask,
        )
        if need_w:
            gw_out[0].add_(gw) if accumulate else gw_out[0].copy_(gw)
        if need_b:
            gb_out[0].copy_(gb)
        return gx.unsqueeze(0) if need_x else None
    if strategy == "loop":
        gx = torch.empty_like(x) if need_x else None
        bias = [w.shape[1]] if need_b else None
        for t in range(T):
            if all(mask) and not accumulate:  # outputs written in place (aten's out= needs all three)
                aten.convolution_backward.out(
                    gy[t],
                    x[t],
                    w[t],
                    bias,
                    g.stride,
                    g.padding,
                    g.dilation,
                    False,
                    [0, 0],
                    g.groups,
                    mask,
                    out0=gx[t],
                    out1=gw_out[t],
                    out2=gb_out[t],
                )
                continue
            gx_t, gw_t, gb_t = aten.convolution_backward(
                gy[t], x[t], w[t], bias, g.stride, g.padding, g.dilation, False, [0, 0], g.groups, mask
            )
            if need_x:
                gx[t] = gx_t
            if need_w:
                gw_out[t].add_(gw_t) if accumulate else gw_out[t].copy_(gw_t)
            if need_b:
                gb_out[t] = gb_t
        return gx
    C, Cout = x.shape[2], w.shape[1]
    xg = x.transpose(0, 1).reshape(N, T * C, *x.shape[3:])
    gg = gy.transpose(0, 1).reshape(N, T * Cout, *gy.shape[3:])
    gx, gw, _ = aten.convolution_backward(
        gg,
        xg,
        w.reshape(T * Cout, *w.shape[2:]),
        None,
        g.stride,
        g.padding,
        g.dilation,
        False,
        [0, 0],
        T * g.groups,
        mask,
    )
    if need_w:
        gw = gw.view(gw_out.shape)
        gw_out.add_(gw) if accumulate else gw_out.copy_(gw)
    if not need_x:
        return None
    return mf.dense_as(gx.view(N, T, C, *gx.shape[2:]).transpose(0, 1), x)


def triton_value_tangent(x, xd, w, b, wd, bd, g: Geometry, y=None):
    """Strategy "triton", R-op forward: (y, ẏ = conv(ẋ, w) + conv(x, ẇ) + ḃ), both from one launch that
    shares the tile loads (only ẏ when y is given)."""
    if y is None:
        return _triton().conv_value_tangent(x, xd, w, b, wd, bd, g.stride, g.padding, g.dilation)
    return y, _triton().conv_value_tangent(x, xd, w, b, wd, bd, g.stride, g.padding, g.dilation, value=False)[1]


def triton_tangent_backward(gy, gyd, x, xd, w, wd, g: Geometry, need_x, outs, touts, gx=None):
    """Strategy "triton", R-op backward: gw, gb, ġw, ġb in one launch, (gx, ġx) in another (only ġx when gx
    is given)."""
    return _triton().conv_tangent_backward(
        gy, gyd, x, xd, w, wd, g.stride, g.padding, g.dilation, need_x, outs, touts, gx=gx
    )


class ConvRule(Rule):
    param_names = ("weight", "bias")
    reuses_primal = True

    def __init__(self, name: str, kind: str, geometry: Geometry, in_channels: int):
        super().__init__(name, kind)
        self.geometry = geometry
        self.in_channels = in_channels
        self.strategy = None  # None: STRATEGY[device type]

    def _strategy(self, x):
        s = choose(self.strategy or STRATEGY.get(x.device.type, "auto"), x)
        return "grouped" if s == "triton" and self.geometry.groups > 1 else s  # the kernels have groups=1

    def _check(self, x):
        if x.dim() != 5 or x.shape[2] != self.in_channels:
            raise ValueError(
                f"model layer {self.describe()}: expected per-task inputs [T, N, {self.in_channels}, "
                f"H, W], got shape {tuple(x.shape)}"
            )
        return x if mf.follows_channels_last(x) else x.contiguous()

    def forward(self, ops, x, p, save):
        x = self._check(x)
        y = conv_forward(x, p[0], p[1], self.geometry, self._strategy(x))
        return y, x if save else None

    def forward_stats(self, ops, x, p, save):
        """`forward` and the BatchNorm statistics of y: (y, saved, stats `[2, T, O]` (mean, biased variance per
        task and channel) from the "triton" strategy's epilogue, None with the others)."""
        x = self._check(x)
        if self._strategy(x) != "triton" or _graph(x, *p):
            return (*self.forward(ops, x, p, save), None)
        g = self.geometry
        y, stats = _triton().conv_forward(x, p[0], p[1], g.stride, g.padding, g.dilation, bn_stats=True)
        return y, x if save else None, stats

    def tangent_forward_stats(self, ops, x, xd, p, v, y=None, stats=None):
        """`tangent_forward` and the BatchNorm statistics of y and ẏ: (y, ẏ, saved, stats `[4, T, O]`: mean and
        biased variance of y, mean(ẏ), mean((y − mean) ẏ)), stats None with strategies other than "triton".
        y (the activation tape's) comes with `stats` `[2, T, O]`, the value's statistics kept with it: they
        are returned unchanged, so that the BatchNorm normalizes as in the pass that computed y (without
        them, None)."""
        x = self._check(x)
        if self._strategy(x) != "triton" or (y is not None and stats is None):
            return (*self.tangent_forward(ops, x, xd, p, v, y=y), None)
        (w, b), (wd, bd), g = p, v, self.geometry
        geo = (g.stride, g.padding, g.dilation)
        if y is None:
            y, yd, st = _triton().conv_value_tangent(x, xd, w, b, wd, bd, *geo, bn_stats=True)
        else:
            _, yd, st = _triton().conv_value_tangent(x, xd, w, b, wd, bd, *geo, value=False, bn_stats=True, y=y)
            st = torch.cat([stats, st[2:]])
        return y, yd, (x, xd), st

    def backward(self, ops, gy, x, p, need_x, outs):
        return conv_backward(mf.dense_as(gy, x), x, p[0], self.geometry, self._strategy(x), need_x, outs[0], outs[1])

    def tangent_forward(self, ops, x, xd, p, v, y=None):
        """y: the output at this point when already known (the activation tape), else computed."""
        x = self._check(x)
        w, b = p
        wd, bd = v
        s = self._strategy(x)
        if s == "triton":
            return (*triton_value_tangent(x, xd, w, b, wd, bd, self.geometry, y), (x, xd))
        if y is None:
            y = conv_forward(x, w, b, self.geometry, s)
        if xd is not None and wd is not None and self.geometry.groups > 1:
            yd = conv_forward(mf.dense_as(xd, x), w, bd, self.geometry, s) + conv_forward(x, wd, None, self.geometry, s)
        elif xd is not None and wd is not None:  # one convolution of [ẋ | x] with [w | ẇ]
            wt = w if w.dim() == 5 else w.expand_as(wd)
            yd = conv_forward(mf.cat([xd, x], 2, x), torch.cat([wt, wd], 2), bd, self.geometry, s)
        elif wd is not None:
            yd = conv_forward(x, wd, bd, self.geometry, s)
        elif xd is not None:
            yd = conv_forward(mf.dense_as(xd, x), w, bd, self.geometry, s)
        else:
            yd = None if bd is None else bd[:, None, :, None, None].expand_as(y)
        return y, yd, (x, xd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts, gx=None):
        """gx: ∂x(gy, w) when already known (the activation tape), else computed with the weight gradient."""
        x, xd = saved
        w, wd = p[0], v[0]
        s = self._strategy(x)
        g = self.geometry
        gy, gyd = mf.dense_as(gy, x), mf.dense_as(gyd, x)
        if s == "triton":
            return triton_tangent_backward(gy, gyd, x, xd, w, wd, g, need_x, outs, touts, gx)
        if gx is None or not need_x:
            gx = conv_backward(gy, x, w, g, s, need_x, outs[0], outs[1])
        else:
            conv_backward(gy, x, w, g, s, False, outs[0], outs[1])
        gxd = conv_backward(gyd, x, w, g, s, need_x, touts[0], touts[1])
        if xd is not None or (wd is not None and need_x):
            # ∂x(gy, ẇ) and ∂w(ẋ, gy) in one call; a missing operand only gives its shape
            extra = conv_backward(
                gy,
                x if xd is None else mf.dense_as(xd, x),
                w if wd is None else wd,
                g,
                s,
                need_x and wd is not None,
                touts[0] if xd is not None else None,
                accumulate=True,
            )
            if extra is not None:
                gxd = gxd + extra
        return gx, gxd


def _unsqueezed(t, dim: int):
    return None if t is None else t.unsqueeze(dim)


class Conv1dRule(Rule):
    """Conv1d `[T, N, C, L]` as the Conv2d rule on `[T, N, C, 1, L]` with kernels `[O, C, 1, k]`: every strategy
    and pass of ConvRule, the weights, their directions and gradients viewed with the extra dim."""

    param_names = ("weight", "bias")
    reuses_primal = True

    def __init__(self, name: str, kind: str, kernel_size, stride, padding, dilation, in_channels: int, groups=1):
        super().__init__(name, kind)
        one = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
        pad = padding if isinstance(padding, str) else (0, one(padding))
        geometry = Geometry((1, one(kernel_size)), (1, one(stride)), pad, (1, one(dilation)), groups)
        self.conv2d = ConvRule(name, kind, geometry, in_channels)

    def _x(self, x):
        if x.dim() != 4:
            raise ValueError(
                f"model layer {self.describe()}: expected per-task inputs [T, N, {self.conv2d.in_channels}, L], "
                f"got shape {tuple(x.shape)}"
            )
        return x.unsqueeze(3)

    @staticmethod
    def _p(p):
        """(weight, bias) with the weight (or its direction or gradient) `[T, O, C, k]` / `[O, C, k]` as 2-d kernels."""
        return (_unsqueezed(p[0], -2), p[1])

    def forward(self, ops, x, p, save):
        y, saved = self.conv2d.forward(ops, self._x(x), self._p(p), save)
        return y.squeeze(3), saved

    def backward(self, ops, gy, saved, p, need_x, outs):
        gx = self.conv2d.backward(ops, gy.unsqueeze(3), saved, self._p(p), need_x, self._p(outs))
        return None if gx is None else gx.squeeze(3)

    def tangent_forward(self, ops, x, xd, p, v, y=None):
        y, yd, saved = self.conv2d.tangent_forward(
            ops, self._x(x), _unsqueezed(xd, 3), self._p(p), self._p(v), y=_unsqueezed(y, 3)
        )
        return y.squeeze(3), (None if yd is None else yd.squeeze(3)), saved

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts, gx=None):
        gx, gxd = self.conv2d.tangent_backward(
            ops,
            gy.unsqueeze(3),
            gyd.unsqueeze(3),
            saved,
            self._p(p),
            self._p(v),
            need_x,
            self._p(outs),
            self._p(touts),
            gx=_unsqueezed(gx, 3),
        )
        return (None, None) if gx is None else (gx.squeeze(3), gxd.squeeze(3))
