"""The public API: `meta_step` (one exact meta-gradient for a batch of tasks) and `adapt` (adapted weights
per task that are differentiable through the fused reverse sweep). Thin: it validates the arguments, asks
an engine (fastmaml/engine) for the meta-gradient, and accumulates it into `.grad`."""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .batchnorm import NormPlan
from .engine import ORDERS, Implicit, InnerLoop, InnerLoopSpec, MetaStepRequest, meta_grad, program_for
from .engine.general import check_labels
from .errors import NonFiniteError
from .inner_lr import expand_inner_lr, learnable_leaves
from .layout import InnerParams, ParamLayout
from .losses import LossLike, resolve_loss
from .ops import OpTable, resolve
from .programs import Program
from .result import MetaResult
from .schedule import check_memory, state_buffers
from .tasks import TaskBatch, TasksLike, as_task_batch, validate


def unwrap_model(model) -> nn.Module:
    """The user's own module inside a `torch.compile` wrapper (its parameter names and engine are the
    uncompiled model's). A DistributedDataParallel wrapper is refused: its gradient hooks would not see the
    meta-gradient, which fastmaml writes into `.grad` directly."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("model: a DistributedDataParallel wrapper does not synchronize the gradients meta_step "
                        "writes; pass model.module, each rank on fastmaml.distributed.shard(tasks), then call "
                        "fastmaml.distributed.all_reduce_grads(model.module)")
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return model._orig_mod
    return model


def _check_common(model, steps, order):
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps: expected a non-negative int, got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps: expected a non-negative number of inner steps, got {steps}")
    if order not in ORDERS:
        raise ValueError(f"order: unknown order {order!r}; expected one of {ORDERS}")


def _implicit(order, implicit_lambda, cg_steps, inner_lr) -> Optional[Implicit]:
    if order != "implicit":
        return None
    if isinstance(implicit_lambda, bool) or not isinstance(implicit_lambda, numbers.Real) or not (
            implicit_lambda > 0 and math.isfinite(implicit_lambda)):
        raise ValueError(f"implicit_lambda: expected a positive float, got {implicit_lambda!r}")
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, numbers.Integral) or cg_steps < 1:
        raise ValueError(f"cg_steps: expected a positive int, got {cg_steps!r}")
    if learnable_leaves(inner_lr):
        raise ValueError("inner_lr: order='implicit' gives no gradient for a learnable inner learning rate "
                         "(the implicit gradient does not depend on the path to φ_K); pass a float")
    return Implicit(float(implicit_lambda), int(cg_steps))


def _check_inputs(layout: ParamLayout, x: torch.Tensor, field: str) -> None:
    p = next(iter(layout.params.values()))
    if x.device.type == "meta" or p.device.type == "meta":
        which = field if x.device.type == "meta" else "model"
        raise ValueError(f"{which}: on the meta device (shapes only, no data); move it to a real device")
    if not x.is_floating_point():
        raise TypeError(f"{field}: expected floating-point inputs, got {x.dtype}")
    if x.dtype != p.dtype:
        raise TypeError(
            f"{field}: dtype {x.dtype} differs from the model's parameters ({p.dtype}); "
            "convert one of them (e.g. model.to(x.dtype))"
        )
    if x.device != p.device:
        raise ValueError(f"{field}: on {x.device} but the model's parameters are on {p.device}")


def _check_chunk(task_chunk) -> None:
    if task_chunk is not None and (isinstance(task_chunk, bool) or not isinstance(task_chunk, numbers.Integral)
                                   or task_chunk < 1):
        raise ValueError(f"task_chunk: expected None or a positive int (tasks per chunk), got {task_chunk!r}")


def _setup(model, inputs, targets, *, steps, order, loss, inner_params, backend):
    _check_common(model, steps, order)
    layout = ParamLayout(model, inner_params)
    for field, x in inputs:
        _check_inputs(layout, x, field)
    loss_obj = resolve_loss(loss)
    for field, y in targets:
        loss_obj.check_targets(y, field, like=inputs[0][1])
    ops = resolve(backend, inputs[0][1].device)
    return layout, loss_obj, ops


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
    evaluate_before: bool = True,
    check_finite: bool = True,
    task_chunk: Optional[int] = None,
    step_weights: Optional[Sequence[float]] = None,
) -> MetaResult:
    """One exact meta-gradient for a batch of T tasks, accumulated into `.grad` like `loss.backward()`.

    meta-loss = mean_t L_query_t(φ_t,K), φ_t,0 = θ, φ_t,j+1 = φ_t,j − α_j ⊙ ∇L_support_t(φ_t,j). Its gradient
    goes into `p.grad` of every parameter that requires grad (and of the learnable tensors of `inner_lr`);
    the model's weights are not changed.

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
        evaluate_before: also evaluate the query set at θ (`query_loss_before`, `accuracy_before`).
        check_finite: raise `NonFiniteError` (naming the inner step) on NaN/inf, leaving `.grad` untouched.
        task_chunk: tasks per chunk (None: sized so each chunk's per-task state fits a per-device budget);
            chunks run one after the other and give the same meta-gradient.
        step_weights: MAML++'s multi-step loss, K non-negative weights: meta-loss =
            Σ_j w_j mean_t L_query_t(φ_t,j) (orders second, checkpoint, first).

    Returns:
        A `MetaResult`: the meta-loss and per-task `[T]` losses (and accuracies) before and after adaptation.

    Raises:
        ValueError, TypeError: a bad argument (the message names it).
        MemoryError: the call's state cannot fit the device's free memory (names `steps` or `task_chunk`).
        NonFiniteError: a non-finite loss or meta-gradient (with `check_finite`).
        BackendUnavailable: an explicitly requested backend cannot run on the device.
    """
    model = unwrap_model(model)
    _check_chunk(task_chunk)
    weights = _step_weights(step_weights, steps, order)
    batch = as_task_batch(tasks)
    layout, loss_obj, ops = _setup(
        model, [("tasks.support_x", batch.support_x), ("tasks.query_x", batch.query_x)],
        [("tasks.support_y", batch.support_y), ("tasks.query_y", batch.query_y)],
        steps=steps, order=order, loss=loss, inner_params=inner_params, backend=backend)
    norm = NormPlan(model, batch_norm)
    implicit = _implicit(order, implicit_lambda, cg_steps, inner_lr)
    with torch.no_grad():
        theta_a, theta_s = layout.theta()
    # one task's state (fast weights, gradients, adjoints of the kept steps) must fit before anything is built
    check_memory(layout.adapted.size * theta_a.element_size() * state_buffers(
        order, steps, bool(learnable_leaves(inner_lr)), weights is not None), 1, theta_a.device, steps=steps,
        order=order, chunk_given=False)
    with torch.enable_grad():  # the map from learnable rates to α_j is differentiated even under no_grad
        alphas = expand_inner_lr(inner_lr, steps, layout.adapted, like=theta_a)
    lr_grad = [a.requires_grad for a in alphas]
    req = MetaStepRequest(
        model=model, layout=layout, loss=loss_obj, batch=batch, theta_a=theta_a, theta_s=theta_s,
        alphas=[a.detach() for a in alphas], lr_grad=lr_grad, order=order, ops=ops, norm=norm, implicit=implicit,
        weights=weights, shared_grad=any(layout.params[n].requires_grad for n in layout.shared.names),
        check_finite=check_finite, evaluate_before=evaluate_before, task_chunk=task_chunk)
    out = meta_grad(req)

    with torch.enable_grad():
        lr_grads = _inner_lr_grads(inner_lr, alphas, out.d_alphas)
    _accumulate(layout, out.d_a, out.d_s)
    for leaf, g in lr_grads:
        leaf.grad = g if leaf.grad is None else leaf.grad + g
    if out.recorded is not None:
        for j, stats in enumerate(out.recorded):
            norm.update(j, stats)
    return MetaResult(meta_loss=out.meta_loss, query_loss_after=out.query_loss_after,
                      query_loss_before=out.query_loss_before, support_loss_before=out.support_loss_before,
                      accuracy_before=out.accuracy_before, accuracy_after=out.accuracy_after)


def _step_weights(step_weights, steps: int, order: str) -> Optional[List[float]]:
    """The multi-step loss weights as K floats (validated), or None."""
    if step_weights is None:
        return None
    if isinstance(step_weights, torch.Tensor):
        step_weights = step_weights.detach().cpu().tolist()
    try:
        weights = [float(w) for w in step_weights]
    except (TypeError, ValueError):
        raise TypeError(f"step_weights: expected a sequence of {steps} floats (one per inner step), "
                        f"got {step_weights!r}") from None
    if len(weights) != steps:
        raise ValueError(f"step_weights: expected {steps} weights (one per inner step, steps={steps}), "
                         f"got {len(weights)}")
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"step_weights: expected finite non-negative weights, got {weights}")
    if not weights:  # steps=0: the query loss at θ is the only term
        return None
    if order == "implicit":
        raise ValueError("step_weights: order='implicit' has no per-step query losses (its meta-gradient "
                         "depends only on the adapted weights); use 'second', 'checkpoint' or 'first'")
    return weights


def _inner_lr_grads(inner_lr, alphas, d_alphas):
    """Maps ∂L/∂α_j back to the user's learnable tensors in `inner_lr` (a tiny autograd graph)."""
    leaves = learnable_leaves(inner_lr)
    if not leaves:
        return []
    summed: Dict[int, torch.Tensor] = {}
    unique: Dict[int, torch.Tensor] = {}
    for a, d in zip(alphas, d_alphas):
        if d is None:
            continue
        unique[id(a)] = a
        summed[id(a)] = d if id(a) not in summed else summed[id(a)] + d
    if not unique:
        return []
    outs = [unique[k] for k in unique]
    grads = torch.autograd.grad(outs, leaves, grad_outputs=[summed[k] for k in unique], allow_unused=True)
    result = []
    for leaf, g in zip(leaves, grads):
        g = torch.zeros_like(leaf) if g is None else g
        if not bool(torch.isfinite(g).all()):
            raise NonFiniteError("non-finite meta-gradient of inner_lr", where="inner_lr gradient")
        result.append((leaf, g))
    return result


def _accumulate(layout: ParamLayout, d_a: torch.Tensor, d_s: Optional[torch.Tensor]) -> None:
    """Adds the flat meta-gradients (`[Pa]`, `[Ps]`, no autograd history) into `p.grad`; a parameter
    without a gradient yet gets a view of them (they are this call's own buffers)."""
    grads = layout.adapted.unflatten(d_a)
    if d_s is not None:
        grads.update(layout.shared.unflatten(d_s))
    into, add = [], []
    for name, g in grads.items():
        p = layout.params[name]
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = g
        else:
            into.append(p.grad)
            add.append(g)
    if into:
        torch._foreach_add_(into, add)


class AdaptedModel:
    """The model with per-task adapted weights, differentiable w.r.t. θ (and learnable `inner_lr`).

    Attributes:
        params: {name: `[T, *shape]`} (adapted weights, and the shared ones broadcast over tasks).
        support_loss_before: support loss at θ `[T]` (None when steps=0).

    `adapted(x)` runs the model on `x [T, N, *in]` with each task's weights -> `[T, N, *out]`. BatchNorm
    in `adapted(x)` follows the `batch_norm` mode of `adapt` as the query pass (step K); in "per_step"
    mode with `model.training`, each call updates step K's running statistics. Its backward runs the
    reverse sweep with the op table of the `adapt` call that made it.
    """

    def __init__(self, program: Program, ops: OpTable, phi: torch.Tensor, theta_s: torch.Tensor,
                 support_loss_before, norm: NormPlan, steps: int):
        self.program = program
        self.ops = ops
        self.phi = phi
        self.theta_s = theta_s
        self.support_loss_before = support_loss_before
        self.norm = norm
        self.steps = steps

    @property
    def params(self) -> Dict[str, torch.Tensor]:
        T = self.phi.shape[0]
        layout = self.program.layout
        params = layout.adapted.unflatten(self.phi)
        for name, p in layout.shared.unflatten(self.theta_s).items():
            params[name] = p.expand(T, *p.shape)
        return params

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[0] != self.phi.shape[0]:
            raise ValueError(f"x: expected [T={self.phi.shape[0]}, N, ...], got shape {tuple(x.shape)}")
        if self.norm.record:
            stats = self.program.batch_stats(self.ops, self.phi.detach(), self.theta_s.detach(), x)
            self.norm.update(self.steps, stats)
        return self.program.forward(self.ops, self.phi, self.theta_s, x, bn_stats=self.norm.stats(self.steps))


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
    check_finite: bool = True,
) -> AdaptedModel:
    """Adapts `model` to every task's support set; returns an `AdaptedModel`.

    Put any outer loss on `adapted(query_x)` (or on `adapted.params`) and call `backward()`: the gradient
    reaches the model's parameters and learnable `inner_lr` through the exact reverse sweep of `order`
    (no `create_graph`).

    The other arguments (`inner_lr`, `steps`, `order`, `loss`, `inner_params`, `backend`, `batch_norm`,
    `implicit_lambda`, `cg_steps`, `check_finite`) are those of `meta_step`.

    Args:
        model: any `nn.Module` with `forward(x)`.
        support_x: `[T, Ns, *in]`.
        support_y: `[T, Ns, *out]` (class indices `[T, Ns]` for cross-entropy).

    Returns:
        An `AdaptedModel` holding φ_K `[T, Pa]`.

    Raises:
        ValueError, TypeError, NonFiniteError, BackendUnavailable: as `meta_step`.
    """
    model = unwrap_model(model)
    validate(TaskBatch(support_x, support_y, support_x, support_y))
    layout, loss_obj, ops = _setup(model, [("support_x", support_x)], [("support_y", support_y)], steps=steps,
                                   order=order, loss=loss, inner_params=inner_params, backend=backend)
    program = program_for(model, layout, loss_obj)
    theta_a, theta_s = layout.theta()
    if loss_obj.classification:
        check_labels(program, ops, theta_a.detach(), theta_s.detach(), support_x, [("support_y", support_y)])
    alphas = expand_inner_lr(inner_lr, steps, layout.adapted, like=theta_a)
    norm = NormPlan(model, batch_norm)
    implicit = _implicit(order, implicit_lambda, cg_steps, inner_lr)
    recorded = [] if norm.record else None
    spec = InnerLoopSpec(program, ops, support_x, support_y, order, check_finite, norm, recorded, implicit)
    phi, support_before = InnerLoop.apply(spec, theta_a, theta_s, *alphas)
    for j, stats in enumerate(recorded or []):
        norm.update(j, stats)
    return AdaptedModel(program, ops, phi, theta_s, support_before if steps else None, norm, steps)
