"""Layers without a rule of their own (nn.LSTM, nn.GRU, nn.RNN, nn.MaxPool1d, nn.Softsign, nn.LocalResponseNorm,
...), and functions or methods of one value without one (`torch.sort(h, -1).values`, `torch.cumprod`): the
layer's own forward, or the model's own call, per task through torch.func, inside the fused program, so
that one such layer or call no longer sends the whole model to the torch.func program.

y = f(x, θ) per task, its derivatives PyTorch's (as derived.py takes them for expressions of parameters):
- forward y = f(x, θ); backward (x̄, θ̄) = vjp of f at (x, θ) applied to ȳ;
- tangent forward: h(z, ż) = (f(z), J ż) by jvp, z = (x, θ);
- tangent backward: the vjp of h at (ġy, ȳ) gives, w.r.t. z, the gradient's tangent Jᵀ ġy + (∂z(J ż))ᵀ ȳ,
  and, w.r.t. ż, the gradient Jᵀ ȳ.
Each pass maps over the tasks with torch.func.vmap, or task by task where vmap cannot batch the layer's ops
(`aten::lstm` has no batching rule), holding MODEL_CALL_LOCK (torch.func's forward-AD levels are per
process). θ common to all tasks (step 0, a shared layer) is expanded over the tasks, so its gradient comes
per task. The backward passes recompute the forward (nothing of torch.func is kept between passes).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
import torch.func
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..base import MODEL_CALL_LOCK, without_fused_rnn_kernels
from .base import Rule

Tensor = torch.Tensor

# what vmap says of a function it cannot batch (which then runs task by task)
UNBATCHABLE = ("Batching rule not implemented", "data-dependent control flow")


class FunctionalRule(Rule):
    """y = fn(x, *weights) per task (x `[N, ...]`, each weight `[*shape]`, y `[N, ...]`); p: the weights, each per
    task `[T, *shape]` or common `[*shape]` (`weight_ranks`: the dims of one task's weight). `recurrent`:
    a recurrent layer, run without oneDNN and cuDNN (`programs/base.without_fused_rnn_kernels`)."""

    def __init__(
        self, name: str, kind: str, fn: Callable[..., Tensor], weight_ranks: Sequence[int], recurrent: bool = False
    ):
        super().__init__(name, kind)
        self.fn = fn
        self.weight_ranks = tuple(weight_ranks)
        self.recurrent = recurrent
        self.per_task = False  # set once vmap refuses the layer

    # -------------------------------------------------------------- mapping over tasks
    def _map(self, g: Callable, *args: Tensor):
        """g over the task dim of every arg (all `[T, ...]`), results stacked; serialized across threads
        (torch.func.jvp keeps its forward-AD levels per process)."""
        with MODEL_CALL_LOCK, without_fused_rnn_kernels(self.recurrent):
            return self._map_unlocked(g, *args)

    def _map_unlocked(self, g: Callable, *args: Tensor):
        if not self.per_task:
            try:
                return torch.func.vmap(g, randomness="error")(*args)
            except RuntimeError as e:
                if not any(why in str(e) for why in UNBATCHABLE):
                    raise
                self.per_task = True
        outs = [g(*(a[t] for a in args)) for t in range(args[0].shape[0])]
        flat = [tree_flatten(o) for o in outs]
        return tree_unflatten([torch.stack(xs) for xs in zip(*(leaves for leaves, _ in flat))], flat[0][1])

    def _weights(self, p: Sequence, T: int) -> Tuple[Tensor, ...]:
        """Every weight per task `[T, *shape]`."""
        return tuple(w if w.dim() > r else w.expand(T, *w.shape) for w, r in zip(p, self.weight_ranks))

    def _f(self, x: Tensor, *w: Tensor) -> Tensor:
        y = self.fn(x, *w)
        if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != x.shape[0] or not y.is_floating_point():
            got = type(y).__name__ if not isinstance(y, Tensor) else f"shape {tuple(y.shape)}, {y.dtype}"
            raise ValueError(
                f"model layer {self.describe()}: for inputs of shape {tuple(x.shape)} it returns {got}; the fused "
                "engine needs one floating-point tensor with the examples first"
            )
        return y

    def _tangent(self, n: int):
        """h(z, ż) = (f(z), J ż) of the n tensors z = (x, *weights)."""

        def h(*args):
            return torch.func.jvp(self._f, args[:n], args[n:])

        return h

    @staticmethod
    def _write(outs: Sequence, values: Sequence[Tensor]) -> None:
        for out, value in zip(outs, values):
            if out is not None:
                out.copy_(value)

    # -------------------------------------------------------------- the passes
    def forward(self, ops, x, p, save):
        w = self._weights(p, x.shape[0])
        return self._map(self._f, x, *w), (x, w) if save else None

    def backward(self, ops, gy, saved, p, need_x, outs):
        x, w = saved

        def grads(*args):
            return torch.func.vjp(self._f, *args[:-1])[1](args[-1])

        g = self._map(grads, x, *w, gy)
        self._write(outs, g[1:])
        return g[0] if need_x else None

    def tangent_forward(self, ops, x, xd, p, v):
        T = x.shape[0]
        w = self._weights(p, T)
        n = 1 + len(w)
        directions = self._weights([torch.zeros_like(t) if d is None else d for t, d in zip(w, v)], T)
        zd = (torch.zeros_like(x) if xd is None else xd,) + directions
        y, yd = self._map(self._tangent(n), x, *w, *zd)
        return y, yd, (x, w, zd)

    def tangent_backward(self, ops, gy, gyd, saved, p, v, need_x, outs, touts):
        x, w, zd = saved
        n = 1 + len(w)
        h = self._tangent(n)

        def grads(*args):
            return torch.func.vjp(h, *args[: 2 * n])[1]((args[-1], args[-2]))

        g = self._map(grads, x, *w, *zd, gy, gyd)
        tangents, gradients = g[:n], g[n:]
        self._write(outs, gradients[1:])
        self._write(touts, tangents[1:])
        return (gradients[0], tangents[0]) if need_x else (None, None)
