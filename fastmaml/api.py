"""The public API: `meta_step` (one exact meta-gradient for a batch of tasks) and `adapt` (adapted weights
per task that are differentiable through the fused reverse sweep). Thin: it validates the arguments, asks
an engine (fastmaml/engine) for the meta-gradient, and accumulates it into `.grad`. `meta_step` runs through
a cached `MetaStep` plan per model, task shape and options (fastmaml/plan.py); the validation and the run
both live in fastmaml/calls.py. `fastmaml.func` is the same without side effects, on parameters held outside
the module.

Inside a `torch.compile`d function both run outside the graph (a graph break, `outside_compile`); under
`torch.autocast` they refuse to run (`refuse_autocast`): the sweeps compute in the parameters' dtype."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import nn

from .batchnorm import NormPlan
from .calls import (
    _COMPILE_REASON,
    _implicit,
    _setup,
    as_result,
    outside_compile,
    refuse_autocast,
    run_meta_step,
    unwrap_model,
    update_bn_running_stats,
)
from .engine import InnerLoop, InnerLoopSpec, program_for
from .engine.general import check_labels
from .inner_lr import expand_inner_lr
from .layout import InnerParams
from .losses import LossLike
from .ops import OpTable
from .plan import planned_meta_step
from .programs import Program
from .programs.draws import Draws
from .result import MetaResult
from .tasks import TaskBatch, TasksLike, validate

__all__ = [
    "AdaptedModel",
    "adapt",
    "as_result",
    "meta_step",
    "outside_compile",
    "refuse_autocast",
    "run_adapt",
    "run_meta_step",
    "unwrap_model",
]


@outside_compile(_COMPILE_REASON.format("meta_step"))
def meta_step(
    model: nn.Module,
    tasks: TasksLike,
    *,
    inner_lr=0.01,
    steps: int = 1,
    order: str = "second",
    loss: LossLike = "mse",
    inner_params: InnerParams = None,
    backend: Optional[str] = "auto",
    batch_norm: str = "batch",
    implicit_lambda: float = 1.0,
    cg_steps: int = 5,
    inner_solver: str = "sgd",
    evaluate_before: bool = True,
    check_finite: bool = True,
    task_chunk: Optional[int] = None,
    step_weights: Optional[Sequence[float]] = None,
    update_running_stats: bool = True,
    precision: Optional[str] = None,
) -> MetaResult:
    """One exact meta-gradient for a batch of T tasks, accumulated into `.grad` like `loss.backward()`.

    meta-loss = mean_t L_query_t(φ_t,K), φ_t,0 = θ, φ_t,j+1 = φ_t,j − α_j ⊙ ∇L_support_t(φ_t,j). Its gradient
    goes into `p.grad` of every parameter that requires grad (and of the learnable tensors of `inner_lr`);
    the model's weights are not changed. A `.grad` it creates is a tensor of its own (not a view).

    Args:
        model: any `nn.Module` with `forward(x)`: x `[N, *in]` -> `[N, *out]` per task.
        tasks: a `TaskBatch`, a 4-tuple `(support_x [T, Ns, *in], support_y [T, Ns, *out], query_x
            [T, Nq, *in], query_y [T, Nq, *out])` or a list of per-task 4-tuples.
        inner_lr: α: a positive float; a scalar tensor or `nn.Parameter` (learned); a dict {parameter name:
            tensor} shaped like the parameters (Meta-SGD) or of scalars; or a list with one per inner step.
        steps: K, the number of inner SGD steps.
        order: "second" (exact), "checkpoint" (exact; keeps about log2 K fast-weight snapshots and replays
            the rest), "first" (FOMAML) or "implicit" (iMAML: the inner steps minimize
            L_s(φ) + λ/2 ‖φ − θ‖² and the meta-gradient solves (I + H/λ) u = ∇L_q by conjugate gradient).
        loss: "mse", "cross_entropy" (labels int64 `[T, N]`) or a per-task callable
            `(output [N, ...], target [N, ...]) -> scalar`.
        inner_params: names, module prefixes or a predicate `(name, param) -> bool` of the parameters
            adapted in the inner loop (default: all); the others get their exact meta-gradient too (ANIL).
        backend: "auto", "torch", "triton" or "cpp" (see `fastmaml info`).
        batch_norm: "batch" (batch statistics of each set, MAML), "frozen" (running statistics, fixed) or
            "per_step" (MAML++ per-step statistics, see `add_per_step_stats`).
        implicit_lambda: λ of order="implicit".
        cg_steps: conjugate-gradient iterations of order="implicit".
        inner_solver: how order="implicit" takes its K steps: "sgd" (at `inner_lr`) or "backtracking" (per
            task, the rate halves while a step gives a non-finite value or too small a decrease of the
            proximal objective; its meta-gradient depends only on where the steps end). Other orders: "sgd".
        evaluate_before: also evaluate the query set at θ (`query_loss_before`, `accuracy_before`).
        check_finite: raise `NonFiniteError` (naming the inner step) on NaN/inf, leaving `.grad` untouched.
        task_chunk: tasks per chunk (None: sized so each chunk's per-task state fits a per-device budget);
            chunks run one after the other and give the same meta-gradient.
        step_weights: MAML++'s multi-step loss, K non-negative weights: meta-loss =
            Σ_j w_j mean_t L_query_t(φ_t,j) (orders second, checkpoint, first).
        update_running_stats: with `batch_norm="batch"`, every BatchNorm layer in training mode that tracks
            running statistics gets one update from the support sets at θ, as PyTorch's training mode does
            (momentum, unbiased variance, `num_batches_tracked`; the mean over tasks of each task's update),
            so that `model.eval()` afterwards normalizes with meta-trained statistics. False leaves them.
        precision: None (PyTorch's float32 settings: cuDNN convolutions on TF32 by default), "fp32" (true
            FP32), "tf32" (TF32 tensor cores on CUDA, FP32 elsewhere) or "bf16" (bf16 activations and
            products with float32 accumulation; float32 fast weights, gradients and loss), for float32
            models (fastmaml/precision.py).

    Returns:
        A `MetaResult`: the meta-loss and per-task `[T]` losses (and accuracies) before and after adaptation.

    Raises:
        ValueError, TypeError: a bad argument (the message names it).
        RuntimeError: called under `torch.autocast` (the message says what to do instead).
        MemoryError: the call's state cannot fit the device's free memory (names `steps` or `task_chunk`).
        NonFiniteError: a non-finite loss or meta-gradient (with `check_finite`).
        BackendUnavailable: an explicitly requested backend cannot run on the device.
    """
    return planned_meta_step(
        unwrap_model(model),
        tasks,
        inner_lr=inner_lr,
        steps=steps,
        order=order,
        loss=loss,
        inner_params=inner_params,
        backend=backend,
        batch_norm=batch_norm,
        implicit_lambda=implicit_lambda,
        cg_steps=cg_steps,
        inner_solver=inner_solver,
        evaluate_before=evaluate_before,
        check_finite=check_finite,
        task_chunk=task_chunk,
        step_weights=step_weights,
        update_running_stats=update_running_stats,
        precision=precision,
    )


class AdaptedModel(nn.Module):
    """The model with per-task adapted weights, differentiable w.r.t. θ (and learnable `inner_lr`).

    An `nn.Module` without parameters of its own: its weights are the adapted tensors, functions of the
    model's parameters (so `.to()` and `.parameters()` do not apply to them).

    Attributes:
        params: {name: `[T, *shape]`} (adapted weights, and the shared ones broadcast over tasks).
        support_loss_before: support loss at θ `[T]` (None when steps=0).

    `adapted(x)` runs the model on `x [T, N, *in]` with each task's weights -> `[T, N, *out]`. BatchNorm
    in `adapted(x)` follows the `batch_norm` mode of `adapt` as the query pass (step K); in "per_step"
    mode with `model.training`, each call updates step K's running statistics. Its backward runs the
    reverse sweep with the op table of the `adapt` call that made it.
    """

    def __init__(
        self,
        program: Program,
        ops: OpTable,
        phi: torch.Tensor,
        theta_s: torch.Tensor,
        support_loss_before,
        norm: NormPlan,
        steps: int,
        bound: bool = False,
    ):
        super().__init__()
        self.program = program
        self.ops = ops
        self.phi = phi
        self.theta_s = theta_s
        self.support_loss_before = support_loss_before
        self.norm = norm
        self.steps = steps
        self.bound = bound  # made by fastmaml.func.adapt: no side effects (per-step statistics not updated)

    @property
    def params(self) -> Dict[str, torch.Tensor]:
        T = self.phi.shape[0]
        layout = self.program.layout
        params = layout.adapted.unflatten(self.phi)
        for name, p in layout.shared.unflatten(self.theta_s).items():
            params[name] = p.expand(T, *p.shape)
        return params

    @outside_compile(_COMPILE_REASON.format("AdaptedModel.forward"))
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model on `x [T, N, *in]` with each task's adapted weights -> `[T, N, *out]`."""
        if x.dim() < 2 or x.shape[0] != self.phi.shape[0]:
            raise ValueError(f"x: expected [T={self.phi.shape[0]}, N, ...], got shape {tuple(x.shape)}")
        refuse_autocast(x.device, "AdaptedModel.forward")
        if self.norm.record and not self.bound:
            stats = self.program.batch_stats(self.ops, self.phi.detach(), self.theta_s.detach(), x)
            self.norm.update(self.steps, stats)
        return self.program.forward(self.ops, self.phi, self.theta_s, x, bn_stats=self.norm.stats(self.steps))

    def extra_repr(self) -> str:
        return f"tasks={self.phi.shape[0]}, steps={self.steps}, program={self.program.name!r}"


@outside_compile(_COMPILE_REASON.format("adapt"))
def adapt(
    model: nn.Module,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    *,
    inner_lr=0.01,
    steps: int = 1,
    order: str = "second",
    loss: LossLike = "mse",
    inner_params: InnerParams = None,
    backend: Optional[str] = "auto",
    batch_norm: str = "batch",
    implicit_lambda: float = 1.0,
    cg_steps: int = 5,
    inner_solver: str = "sgd",
    check_finite: bool = True,
    update_running_stats: bool = True,
) -> AdaptedModel:
    """Adapts `model` to every task's support set; returns an `AdaptedModel`.

    Put any outer loss on `adapted(query_x)` (or on `adapted.params`) and call `backward()`: the gradient
    reaches the model's parameters and learnable `inner_lr` through the exact reverse sweep of `order`
    (no `create_graph`). `backward(create_graph=True)` (double backward, hypergradients), `torch.func.grad`
    of such a gradient, and a support set that requires grad run the backward as an unrolled autograd
    graph instead (exact; orders "second" and "checkpoint").

    The other arguments (`inner_lr`, `steps`, `order`, `loss`, `inner_params`, `backend`, `batch_norm`,
    `implicit_lambda`, `cg_steps`, `inner_solver`, `check_finite`, `update_running_stats`) are those of
    `meta_step`.

    Args:
        model: any `nn.Module` with `forward(x)`.
        support_x: `[T, Ns, *in]`.
        support_y: `[T, Ns, *out]` (class indices `[T, Ns]` for cross-entropy).

    Returns:
        An `AdaptedModel` holding φ_K `[T, Pa]`.

    Raises:
        ValueError, TypeError, RuntimeError, NonFiniteError, BackendUnavailable: as `meta_step`.
    """
    model = unwrap_model(model)
    adapted, ctx = run_adapt(
        model,
        None,
        support_x,
        support_y,
        inner_lr=inner_lr,
        steps=steps,
        order=order,
        loss=loss,
        inner_params=inner_params,
        backend=backend,
        batch_norm=batch_norm,
        implicit_lambda=implicit_lambda,
        cg_steps=cg_steps,
        inner_solver=inner_solver,
        check_finite=check_finite,
    )
    if update_running_stats:
        layout, loss_obj, ops = ctx
        update_bn_running_stats(model, layout, loss_obj, ops, adapted.norm, support_x)
    return adapted


def run_adapt(
    model,
    layout,
    support_x,
    support_y,
    *,
    inner_lr,
    steps,
    order,
    loss,
    inner_params,
    backend,
    batch_norm,
    implicit_lambda,
    cg_steps,
    inner_solver,
    check_finite,
    norm_buffers=None,
    what="adapt",
    theta=None,
):
    """Validates an adaptation and runs `InnerLoop`. layout, theta: as `run_meta_step` (given: fastmaml.func,
    and nothing is written to the model). Returns (the `AdaptedModel`, (layout, loss, op table))."""
    bound = theta is not None
    validate(TaskBatch(support_x, support_y, support_x, support_y))
    layout, loss_obj, ops = _setup(
        model,
        [("support_x", support_x)],
        [("support_y", support_y)],
        steps=steps,
        order=order,
        loss=loss,
        inner_params=inner_params,
        backend=backend,
        layout=layout,
        what=what,
    )
    program = program_for(model, layout, loss_obj)
    theta_a, theta_s = (layout.theta if theta is None else theta)()
    if loss_obj.classification:
        check_labels(program, ops, theta_a.detach(), theta_s.detach(), support_x, [("support_y", support_y)])
    alphas = expand_inner_lr(inner_lr, steps, layout.adapted, like=theta_a)
    norm = NormPlan(model, batch_norm, buffers=norm_buffers)
    implicit = _implicit(order, implicit_lambda, cg_steps, inner_lr, inner_solver)
    recorded = [] if norm.record and not bound else None
    spec = InnerLoopSpec(
        program,
        ops,
        order,
        check_finite,
        norm,
        recorded,
        implicit,
        keep_grads=any(a.requires_grad for a in alphas),
        draws=Draws.fresh() if program.draws_masks else None,
    )
    phi, support_before, *_ = InnerLoop.apply(spec, theta_a, theta_s, support_x, support_y, *alphas)
    for j, stats in enumerate(recorded or []):
        norm.update(j, stats)
    adapted = AdaptedModel(program, ops, phi, theta_s, support_before if steps else None, norm, steps, bound)
    return adapted, (layout, loss_obj, ops)
