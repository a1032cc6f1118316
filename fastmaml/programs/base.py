"""The Program interface: how a model computes loss, gradient and Hessian-vector products for all
tasks at once. `InnerLoop` and `meta_step` only talk to a Program, so the any-module torch.func
program and the fused hand-derived engine are interchangeable.

Shapes: fast weights `phi [T, Pa]` (or `[Pa]`, the same weights for every task), shared weights
`shared [Ps]`, inputs `x [T, N, *in]`, targets `y [T, N, *out]`, tangents `u [T, Pa]`.
`bn_stats`: None (BatchNorm on batch statistics) or fixed (mean [C], var [C]) per BatchNorm layer,
in module order (see fastmaml/batchnorm.py). `activations`: a dict that `loss_grad` (or an `hvp` given it
empty) fills with what a later `hvp` at the same φ, ψ, x, y and `bn_stats` may reuse instead of recomputing
it (the activation tape); a program with nothing worth keeping (`keeps_activations` False) leaves it empty.
`ops`: the op table of the call
(`fastmaml.ops.resolve(backend, device)`): the backend is an argument of every call, never state of a
Program (a Program is cached per model and shared by calls with different backends).
"""

from __future__ import annotations

import abc
import contextlib
import threading
from typing import Iterator, NamedTuple, Optional

import torch
import torch.func

from ..layout import ParamLayout
from ..losses import Loss

# Held while fastmaml runs a model's own modules: tracing (torch.fx patches nn.Module.__call__ for the whole
# process while it traces) and the torch.func program (torch.func.jvp keeps its forward-AD levels per
# process). Calls from several threads are serialized rather than failing.
MODEL_CALL_LOCK = threading.RLock()


@contextlib.contextmanager
def without_fused_rnn_kernels(off: bool = True) -> Iterator[None]:
    """PyTorch's oneDNN and cuDNN kernels off (when `off`), process-wide, for the recurrent layers, which then
    run PyTorch's own cells: oneDNN's `mkldnn_rnn_layer` (float32 LSTM/GRU on CPU) has no forward-mode
    derivative, and its backward lost its workspace when the meta-step ran under autograd for learned inner
    rates; cuDNN's RNN has no forward-mode derivative and no double backward either (not run: no GPU in the
    session that wrote this). Hold MODEL_CALL_LOCK."""
    if not off:
        yield
        return
    onednn, cudnn = torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled
    torch.backends.mkldnn.enabled = torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled, torch.backends.cudnn.enabled = onednn, cudnn


class LossGrad(NamedTuple):
    loss: torch.Tensor  # [T] per-task mean loss
    grad: torch.Tensor  # [T, Pa] ∂loss_t/∂φ_t
    grad_shared: Optional[torch.Tensor]  # [T, Ps] ∂loss_t/∂ψ, when asked for
    output: torch.Tensor  # [T, N, *out] model output
    stats: Optional[list] = None  # `batch_stats` of the same forward, when asked for and the program gives it


class HVP(NamedTuple):
    grad: Optional[torch.Tensor]  # [T, Pa] the gradient at φ (a by-product of forward-over-reverse), if asked
    hu: torch.Tensor  # [T, Pa] H_aa u
    hu_shared: Optional[torch.Tensor]  # [T, Ps] H_sa u (mixed block), when asked for


class Program(abc.ABC):
    """A compiled model + loss. Subclasses: TorchFuncProgram (any nn.Module), FusedProgram."""

    name: str = "program"
    keeps_activations: bool = False  # whether `loss_grad(activations=...)` keeps anything for `hvp`
    draws_masks: bool = False  # whether it has dropout in training mode (its sweeps then need `draws.Draws`)

    def __init__(self, layout: ParamLayout, loss: Loss):
        self.layout = layout
        self.loss = loss
        self.output_sizes = {}  # (example shape, dtype, device) -> size of the output's last dim, once measured

    @abc.abstractmethod
    def loss_grad(
        self, ops, phi, shared, x, y, *, shared_grad: bool = False, bn_stats=None, activations=None, record_stats=False
    ) -> LossGrad:
        """Per-task loss and its gradient w.r.t. φ (and ψ if `shared_grad`); fills `activations` (a dict) when
        given. record_stats: also the BatchNorm layers' batch statistics of this forward (`batch_stats`'s form),
        where the program takes them from the forward itself; else `stats` is None (`record_stats_of`)."""

    @abc.abstractmethod
    def hvp(
        self,
        ops,
        phi,
        shared,
        x,
        y,
        u,
        *,
        shared_grad: bool = False,
        need_grad: bool = True,
        bn_stats=None,
        activations=None,
    ) -> HVP:
        """Exact Hessian-vector product of the per-task loss at φ along u (Pearlmutter R-op).
        `need_grad=False`: the gradient at φ may be left out (`grad` None), saving its weight-gradient work.
        `activations`: what `loss_grad` kept at the same point, reused where present; filled when empty."""

    @abc.abstractmethod
    def forward(self, ops, phi, shared, x, *, bn_stats=None) -> torch.Tensor:
        """Model output per task `[T, N, *out]`; differentiable with ordinary autograd."""

    @abc.abstractmethod
    def batch_stats(self, ops, phi, shared, x):
        """Per-task batch statistics of every BatchNorm layer's input, in `NormPlan` order:
        [(mean [T, C], var [T, C], count) or None for a layer the forward does not call]."""

    def record_stats_of(self, lg: LossGrad, ops, phi, shared, x):
        """`batch_stats(ops, phi, shared, x)` where `lg` is `loss_grad(..., record_stats=True)` on the same
        arguments with batch statistics: the ones it recorded, or a forward of their own."""
        return lg.stats if lg.stats is not None else self.batch_stats(ops, phi, shared, x)

    def evaluate(self, ops, phi, shared, x, y, *, bn_stats=None):
        """(loss `[T]`, output) without gradients."""
        with torch.no_grad():
            out = self.forward(ops, phi, shared, x, bn_stats=bn_stats)
            loss = torch.func.vmap(self.loss.fn)(out, y)
        return loss, out
