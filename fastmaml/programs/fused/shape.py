"""Reshapes of the examples' features: Flatten, view/reshape that keep the batch dimension, squeeze and
unsqueeze of per-example dims, sums and means over per-example dims, permutes and transposes, indexing,
the parts of chunk/split, expand, repeat, constant padding; a parameter expanded over the examples.
`[T, N, *feat]` in and out; none of them mixes the examples of a task."""

from __future__ import annotations

import torch

from .base import LinearMapRule, Rule


class FlattenRule(LinearMapRule):
    """Flatten of per-example dims start_dim..end_dim (start_dim >= 1; the task dim shifts them by 1)."""

    def __init__(self, name: str, kind: str, start_dim: int = 1, end_dim: int = -1):
        super().__init__(name, kind)
        self.start_dim = start_dim
        self.end_dim = end_dim

    def apply(self, x, save):
        start = self.start_dim + 1 if self.start_dim >= 0 else self.start_dim + x.dim()
        end = self.end_dim + 1 if self.end_dim >= 0 else self.end_dim + x.dim()
        if start < 2:
            raise ValueError(
                f"model layer {self.describe()}: start_dim={self.start_dim} would merge the examples "
                f"of a task (per-task input shape {tuple(x.shape)})"
            )
        return x.flatten(start, end), x.shape

    def transpose(self, gy, shape):
        return gy.reshape(shape)


class ReshapeRule(Rule):
    """`x.view(shape)` / `x.reshape(shape)` with a per-example `shape` that keeps the examples apart: the
    node binds p = (shape,), evaluated on every pass from the model's own size arithmetic (e.g.
    `x.view(x.size(0), -1)`, where `x.size(0)` is the number of examples N)."""

    def forward(self, ops, x, p, save):
        y = self._reshape(x, p[0])
        return y, x.shape if save else None

    def _reshape(self, x, shape):
        y = x.reshape(x.shape[0], *shape)
        if y.dim() < 2 or y.shape[1] != x.shape[1]:
            raise ValueError(
                f"model: {self.describe()} reshapes the per-task input {tuple(x.shape[1:])} to {tuple(y.shape[1:])}, "
                f"which mixes the {x.shape[1]} examples; fastmaml needs the first (batch) dimension kept, e.g. "
                "x.view(x.size(0), -1)"
            )
        return y

    def backward(self, ops, gy, shape, p, need_x, outs):
        return gy.reshape(shape) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        y = self._reshape(x, p[0])
        return y, (None if xd is None else xd.reshape(y.shape)), x.shape

    def tangent_backward(self, ops, gy, gyd, shape, p, v, need_x, outs, touts):
        return (gy.reshape(shape), gyd.reshape(shape)) if need_x else (None, None)


def _task_dim(d: int, rank: int) -> int:
    """Per-example dim d (negative: from the end) as a dim of the per-task tensor of `rank` dims, which has the
    task dim in front. A negative d may reach the examples' dim (dim 1): the rule then works per task, as the
    model does on its batch."""
    return d + 1 if d >= 0 else d + rank


class SqueezeRule(LinearMapRule):
    """`x.squeeze(dims)` / `x.unsqueeze(dim)` of per-example dims (`unsqueeze`: one dim, inserted)."""

    def __init__(self, name: str, kind: str, dims, unsqueeze: bool = False):
        super().__init__(name, kind)
        self.dims = tuple(dims)
        self.unsqueeze = unsqueeze

    def apply(self, x, save):
        if self.unsqueeze:
            return x.unsqueeze(_task_dim(self.dims[0], x.dim() + 1)), x.shape
        dims = tuple(_task_dim(d, x.dim()) for d in self.dims)
        return x.squeeze(dims) if len(dims) > 1 else x.squeeze(dims[0]), x.shape

    def transpose(self, gy, shape):
        return gy.reshape(shape)


class SumRule(LinearMapRule):
    """Sum over per-example dims (`x.sum(1)`: dims counted without the task dim)."""

    def __init__(self, name: str, kind: str, dims, keepdim: bool = False):
        super().__init__(name, kind)
        self.dims = tuple(dims)
        self.keepdim = keepdim

    def apply(self, x, save):
        dims = sorted(_task_dim(d, x.dim()) for d in self.dims)
        return self._reduce(x, dims), (x.shape, dims)

    def transpose(self, gy, saved):
        shape, dims = saved
        if not self.keepdim:
            for d in dims:
                gy = gy.unsqueeze(d)
        return self._spread(gy, shape, dims).expand(shape)

    def _reduce(self, x, dims):
        return x.sum(dims, keepdim=self.keepdim)

    def _spread(self, gy, shape, dims):
        return gy


class MeanRule(SumRule):
    """Mean over per-example dims (`x.mean((2, 3))` over a conv map: dims counted without the task dim)."""

    def _reduce(self, x, dims):
        return x.mean(dims, keepdim=self.keepdim)

    def _spread(self, gy, shape, dims):
        count = 1
        for d in dims:
            count *= shape[d]
        return gy / count


class PermuteRule(LinearMapRule):
    """`x.permute(dims)` / `x.transpose(a, b)` that keep the examples' dim first (`dims` per example, dims[0] 0;
    negative dims count from the end). The output is made contiguous, as the next layers read it."""

    def __init__(self, name: str, kind: str, dims):
        super().__init__(name, kind)
        self.dims = tuple(dims)

    def _order(self, x):
        rank = x.dim() - 1
        dims = [d + rank if d < 0 else d for d in self.dims]
        if sorted(dims) != list(range(rank)) or dims[0] != 0:
            raise ValueError(
                f"model layer {self.describe()}: dims {self.dims} are not a permutation of the per-example inputs' "
                f"{rank} dims {tuple(x.shape[1:])} that keeps the examples' dim 0 first"
            )
        return (0, *(d + 1 for d in dims))

    def apply(self, x, save):
        order = self._order(x)
        return x.permute(order).contiguous(), order

    def tangent(self, xd, order):
        return xd.permute(order).contiguous()

    def transpose(self, gy, order):
        inverse = [0] * len(order)
        for i, d in enumerate(order):
            inverse[d] = i
        return gy.permute(inverse)


class SliceRule(LinearMapRule):
    """`x[index]` with slices, integers, None (a new size-1 dim) and at most one Ellipsis, every example kept:
    `index` starts with `:` or with an Ellipsis that spans the examples' dim. The transpose writes the
    gradient into zeros at the indexed places."""

    def __init__(self, name: str, kind: str, index):
        super().__init__(name, kind)
        self.explicit = sum(i is not Ellipsis and i is not None for i in index)
        self.leading_ellipsis = index[0] is Ellipsis
        self.index = (slice(None),) + tuple(index)  # the task dim first

    def apply(self, x, save):
        if self.leading_ellipsis and self.explicit >= x.dim() - 1:
            raise ValueError(
                f"model layer {self.describe()}: the index {self.index[1:]} reaches the examples' dim 0 of "
                f"per-example inputs {tuple(x.shape[1:])}; index per-example dims only"
            )
        return x[self.index], x.shape

    def transpose(self, gy, shape):
        gx = gy.new_zeros(shape)
        gx[self.index] = gy
        return gx


class TransposeRule(PermuteRule):
    """`x.transpose(a, b)` of two per-example dims (not the examples' dim 0)."""

    def __init__(self, name: str, kind: str, dim0: int, dim1: int):
        super().__init__(name, kind, ())
        self.pair = (dim0, dim1)

    def _order(self, x):
        rank = x.dim() - 1
        a, b = (d + rank if d < 0 else d for d in self.pair)
        if not (0 < a < rank and 0 < b < rank):
            raise ValueError(
                f"model layer {self.describe()}: transpose of dims {self.pair} of per-example inputs "
                f"{tuple(x.shape[1:])} (dims 1..{rank - 1} can be swapped)"
            )
        order = list(range(x.dim()))
        order[a + 1], order[b + 1] = order[b + 1], order[a + 1]
        return tuple(order)


class PartRule(LinearMapRule):
    """Part `index` of `x.chunk(chunks, dim)` or of `x.split(sizes, dim)` (an int: parts of that size, the last
    shorter; or a list of sizes) along a per-example dim, as PyTorch cuts them; the transpose writes the
    gradient into zeros at the part's place."""

    def __init__(self, name: str, kind: str, dim: int, index: int, chunks=None, sizes=None):
        super().__init__(name, kind)
        self.dim, self.index, self.chunks, self.sizes = dim, index, chunks, sizes

    def _range(self, x):
        """(task-tensor dim, start, length) of the part (checked)."""
        d = self.feature_dim(self.dim, x, f"a {self.kind}")
        n = x.shape[d]
        if self.chunks is not None:
            step = -(-n // self.chunks)
            start, length = self.index * step, min(step, n - self.index * step)
        elif isinstance(self.sizes, int):
            start, length = self.index * self.sizes, min(self.sizes, n - self.index * self.sizes)
        else:
            start, length = sum(self.sizes[: self.index]), self.sizes[self.index]
            length = length if sum(self.sizes) == n else 0
        if length <= 0:
            raise ValueError(
                f"model layer {self.describe()}: part {self.index} of {self.kind} along dim {self.dim} does not "
                f"exist for per-example inputs {tuple(x.shape[1:])}"
            )
        return d, start, length

    def apply(self, x, save):
        d, start, length = self._range(x)
        return x.narrow(d, start, length), (x.shape, d, start, length)

    def transpose(self, gy, saved):
        shape, d, start, length = saved
        gx = gy.new_zeros(shape)
        gx.narrow(d, start, length).copy_(gy)
        return gx


class ExpandRule(Rule):
    """`x.expand(sizes)` / `x.expand_as(y)` of size-1 per-example dims, the examples' dim kept (its size -1,
    or y's own): the node binds p = (sizes,) (per example, from the model's size arithmetic when it computes
    them); the transpose sums over the expanded dims."""

    def _target(self, x, sizes):
        sizes = tuple(sizes)
        if len(sizes) != x.dim() - 1 or sizes[0] not in (-1, x.shape[1]):
            raise ValueError(
                f"model layer {self.describe()}: expand to {sizes} of per-example inputs {tuple(x.shape[1:])}; the "
                "fused engine needs as many sizes as dims and the examples' dim kept (-1)"
            )
        return (x.shape[0], *(n if s == -1 else s for n, s in zip(x.shape[1:], sizes)))

    def forward(self, ops, x, p, save):
        return x.expand(self._target(x, p[0])), x.shape if save else None

    def backward(self, ops, gy, shape, p, need_x, outs):
        return gy.sum_to_size(shape) if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        target = self._target(x, p[0])
        return x.expand(target), (None if xd is None else xd.expand(target)), x.shape

    def tangent_backward(self, ops, gy, gyd, shape, p, v, need_x, outs, touts):
        return (gy.sum_to_size(shape), gyd.sum_to_size(shape)) if need_x else (None, None)


class ExpandParamRule(Rule):
    """`p.expand(N, *sizes)` / `p.repeat(N, 1, ...)` of a parameter or derived tensor p `[*shape]` (its leading
    dim of size 1, or new leading dims), N the number of examples: the same tensor for every example, `[T, N,
    *S]` (ViT's class token, `torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)`; CAVIA's context vector).
    The node's input x only gives the examples' count (no gradient flows to it); it binds p = (p, sizes), the
    sizes per call from the model's size arithmetic (N first). p's gradient sums over the examples and the
    expanded dims."""

    param_names = ("param",)

    def __init__(self, name: str, kind: str, shape):
        super().__init__(name, kind)
        self.shape = tuple(shape)

    def _expanded(self, p, x, sizes):
        """p `[*shape]` | `[T, *shape]` -> `[T, N, *S]` (a view)."""
        sizes = tuple(sizes)
        T, N = x.shape[0], x.shape[1]
        pad = len(sizes) - len(self.shape)
        aligned = (1,) * pad + self.shape
        target = tuple(n if s == -1 else s for n, s in zip(aligned, sizes))
        if pad < 0 or sizes[0] != N or any(a not in (1, t) for a, t in zip(aligned, target)):
            raise ValueError(
                f"model layer {self.describe()}: expand of a tensor of shape {self.shape} to {sizes}; the fused "
                f"engine needs the number of examples ({N}) first and the other sizes -1 or broadcast from 1"
            )
        per_task = p.dim() > len(self.shape)
        return p.view(T if per_task else 1, *aligned).expand(T, *target)

    def _sum(self, g, out):
        """Σ of g `[T, N, *S]` over the examples and expanded dims, written into out `[T, *shape]`."""
        if out is not None:
            pad = g.dim() - 1 - len(self.shape)
            out.copy_(g.sum_to_size(g.shape[0], *((1,) * pad + self.shape)).view(out.shape))

    def forward(self, ops, x, p, save):
        return self._expanded(p[0], x, p[1]), None

    def backward(self, ops, gy, saved, p, need_x, outs):
        self._sum(gy, outs[0])
        return None

    def tangent_forward(self, ops, x, xd, p, v):
        y = self._expanded(p[0], x, p[1])
        return y, (None if v[0] is None else self._expanded(v[0], x, p[1])), None

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        self._sum(gy, outs[0])
        self._sum(gyd, touts[0])
        return None, None


class RepeatRule(LinearMapRule):
    """`x.repeat(sizes)` (tiling) of per-example dims, the examples' dim repeated once; the transpose sums the
    tiles."""

    def __init__(self, name: str, kind: str, repeats):
        super().__init__(name, kind)
        self.repeats = tuple(repeats)

    def apply(self, x, save):
        if len(self.repeats) != x.dim() - 1 or self.repeats[0] != 1:
            raise ValueError(
                f"model layer {self.describe()}: repeat {self.repeats} of per-example inputs {tuple(x.shape[1:])}; "
                "the fused engine needs one count per dim and the examples' dim repeated once"
            )
        return x.repeat(1, *self.repeats), x.shape

    def transpose(self, gy, shape):
        tiles = [d for n, r in zip(shape, (1, *self.repeats)) for d in (r, n)]
        return gy.reshape(tiles).sum(tuple(range(0, len(tiles), 2)))


class PadRule(LinearMapRule):
    """`F.pad(x, pad, value=c)` (constant mode) of per-example dims (pairs from the last dim backwards; negative
    amounts crop): the transpose crops what was padded (and pads what was cropped) with zeros; tangents are
    padded with zeros."""

    def __init__(self, name: str, kind: str, pad, value: float = 0.0):
        super().__init__(name, kind)
        self.pad, self.value = tuple(pad), float(value)

    def apply(self, x, save):
        if len(self.pad) // 2 >= x.dim() - 1:
            raise ValueError(
                f"model layer {self.describe()}: pad {self.pad} reaches the examples' dim of per-example inputs "
                f"{tuple(x.shape[1:])}"
            )
        return torch.nn.functional.pad(x, self.pad, value=self.value), None

    def tangent(self, xd, saved):
        return torch.nn.functional.pad(xd, self.pad)

    def transpose(self, gy, saved):
        return torch.nn.functional.pad(gy, [-p for p in self.pad])
