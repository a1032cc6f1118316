"""MixedProgram: a float32 model's program run with low-precision activations (the "bf16" policy of
fastmaml/precision.py).

Every call casts the fast weights φ `[T, Pa]`, the shared weights ψ `[Ps]`, the inputs x `[T, N, *in]`, the
tangents u `[T, Pa]` and fixed BatchNorm statistics to the compute dtype and runs the model's own program on
them: its convolutions and matrix products take bf16 operands and accumulate in float32 (cuDNN, cuBLAS,
oneDNN), and its activations are bf16. The loss and its gradient are computed in float32 on the upcast
output (the gradient goes back into the sweep in bf16), and every result (losses, weight gradients, Hessian-
vector products, statistics) comes back in float32, so the engine keeps its fast weights, adjoints and
meta-gradient in float32. This is what `torch.autocast` does for a training step, for the whole inner loop.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.func

from ..losses import Loss
from .base import HVP, LossGrad, Program
from .torchfunc import TorchFuncProgram


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A floating-point tensor in `dtype` (anything else, None included, as it is)."""
    return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _cast_stats(stats, dtype):
    """BatchNorm statistics (a list per layer of None or a tuple of tensors and counts) in `dtype`."""
    if stats is None:
        return None
    return [None if s is None else tuple(_cast(v, dtype) for v in s) for s in stats]


class FloatLossOps:
    """An op table whose loss ops compute in float32 on upcast outputs; the gradient w.r.t. the output (and
    its tangent) goes back in the output's dtype. Every other op is the wrapped table's."""

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def mse_grad(self, out, y):
        loss, g = self._ops.mse_grad(out.float(), y.float())
        return loss, g.to(out.dtype)

    def mse_grad_tangent(self, outd):
        return self._ops.mse_grad_tangent(outd.float()).to(outd.dtype)

    def cross_entropy_grad(self, z, y):
        loss, g, p = self._ops.cross_entropy_grad(z.float(), y)
        return loss, g.to(z.dtype), p

    def cross_entropy_grad_tangent(self, p, zd):
        return self._ops.cross_entropy_grad_tangent(p, zd.float()).to(zd.dtype)


def float_loss(loss: Loss) -> Loss:
    """`loss` evaluated in float32 on an upcast output (for a program that calls `loss.fn` itself)."""
    fn = loss.fn

    def upcast(out, y):
        return fn(out.float(), y.float() if y.is_floating_point() else y)

    return dataclasses.replace(loss, fn=upcast)


class MixedProgram(Program):
    """`inner` (the model's program) run in `compute` dtype, float32 in and out (see the module docstring).

    For a torch.func program the loss is evaluated in float32 by the program itself (a copy built with
    `float_loss`); for the fused program by its loss ops (`FloatLossOps`)."""

    def __init__(self, inner: Program, compute: torch.dtype, model=None):
        super().__init__(inner.layout, inner.loss)
        if isinstance(inner, TorchFuncProgram):
            inner = TorchFuncProgram(model, inner.layout, float_loss(inner.loss))
        self.inner = inner
        self.compute = compute
        self.name = f"{inner.name}, {str(compute).replace('torch.', '')} activations"
        self.keeps_activations = inner.keeps_activations
        self.draws_masks = inner.draws_masks

    def _in(self, *tensors):
        return [_cast(t, self.compute) for t in tensors]

    def loss_grad(
        self, ops, phi, shared, x, y, *, shared_grad=False, bn_stats=None, activations=None, record_stats=False
    ) -> LossGrad:
        phi, shared, x = self._in(phi, shared, x)
        lg = self.inner.loss_grad(
            FloatLossOps(ops),
            phi,
            shared,
            x,
            y,
            shared_grad=shared_grad,
            bn_stats=_cast_stats(bn_stats, self.compute),
            activations=activations,
            record_stats=record_stats,
        )
        f = torch.float32
        return LossGrad(
            _cast(lg.loss, f),
            _cast(lg.grad, f),
            _cast(lg.grad_shared, f),
            _cast(lg.output, f),
            _cast_stats(lg.stats, f),
        )

    def hvp(
        self, ops, phi, shared, x, y, u, *, shared_grad=False, need_grad=True, bn_stats=None, activations=None
    ) -> HVP:
        phi, shared, x, u = self._in(phi, shared, x, u)
        h = self.inner.hvp(
            FloatLossOps(ops),
            phi,
            shared,
            x,
            y,
            u,
            shared_grad=shared_grad,
            need_grad=need_grad,
            bn_stats=_cast_stats(bn_stats, self.compute),
            activations=activations,
        )
        f = torch.float32
        return HVP(_cast(h.grad, f), _cast(h.hu, f), _cast(h.hu_shared, f))

    def forward(self, ops, phi, shared, x, *, bn_stats=None) -> torch.Tensor:
        phi, shared, x = self._in(phi, shared, x)
        out = self.inner.forward(ops, phi, shared, x, bn_stats=_cast_stats(bn_stats, self.compute))
        return out.float()

    def batch_stats(self, ops, phi, shared, x):
        phi, shared, x = self._in(phi, shared, x)
        return _cast_stats(self.inner.batch_stats(ops, phi, shared, x), torch.float32)

    def evaluate(self, ops, phi, shared, x, y, *, bn_stats=None):
        phi, shared, x = self._in(phi, shared, x)
        _, out = self.inner.evaluate(ops, phi, shared, x, y, bn_stats=_cast_stats(bn_stats, self.compute))
        out = out.float()
        with torch.no_grad():
            return torch.func.vmap(self.loss.fn)(out, y), out
