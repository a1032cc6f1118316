"""The public API: `meta_step` (one exact meta-gradient for a batch of tasks) and `adapt` (adapted weights
per task that are differentiable through the fused reverse sweep). Thin: it validates the arguments, asks
an engine (fastmaml/engine) for the meta-gradient, and accumulates it into `.grad`. `fastmaml.func` is the
same without side effects, on parameters held outside the module.

Inside a `torch.compile`d function both run outside the graph (a graph break, `outside_compile`); under
`torch.autocast` they refuse to run (`refuse_autocast`): the sweeps compute in the parameters' dtype."""

from __future__ import annotations

import functools
import math
import numbers
import sys
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

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
from .schedule import check_memory, state_buffers, task_budget_chunks
from .tasks import TaskBatch, TasksLike, as_task_batch, validate

F = TypeVar("F", bound=Callable)
# the support inputs of one task times this bound the statistics pass's activations (a conv net's first
# layers widen 1 or 3 input channels to 32-64): tasks per pass in `update_running_stats`
_STATS_BLOWUP = 64


def outside_compile(reason: str) -> Callable[[F], F]:
    """Marks a function to run outside `torch.compile` graphs: called from a compiled function it is a graph
    break (the rest of the function is compiled around it), and with `fullgraph=True` Dynamo's error quotes
    `reason`. The function runs eagerly, with Dynamo off for everything it calls.

    Without importing Dynamo (a second of import time): the mark is the attribute Dynamo's own `disable`
    sets, and the eager call goes through `torch._dynamo.disable` only once Dynamo is loaded, which it is
    whenever something is being compiled."""

    def wrap(fn: F) -> F:
        eager: list = []

        @functools.wraps(fn)
        def call(*args, **kwargs):
            dynamo = sys.modules.get("torch._dynamo")
            if dynamo is None:
                return fn(*args, **kwargs)
            if not eager:
                try:
                    eager.append(dynamo.disable(fn, reason=reason))
                except TypeError:  # torch without `reason`
                    eager.append(dynamo.disable(fn))
            return eager[0](*args, **kwargs)

        call._torchdynamo_disable = True  # type: ignore[attr-defined]
        call._torchdynamo_disable_msg = reason  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap


_COMPILE_REASON = (
    "fastmaml.{} runs its own sweeps and kernels outside torch.compile graphs (a graph break); "
    "with fullgraph=True, call it outside the compiled function"
)


def _autocast_on(device: torch.device):
    """The autocast dtype active for `device`'s type, or None."""
    kind = device.type
    try:
        on = torch.is_autocast_enabled(kind)
    except TypeError:  # torch < 2.4 takes no device type
        on = torch.is_autocast_cpu_enabled() if kind == "cpu" else kind == "cuda" and torch.is_autocast_enabled()
    if not on:
        return None
    try:
        return torch.get_autocast_dtype(kind)
    except (AttributeError, TypeError):
        return torch.get_autocast_cpu_dtype() if kind == "cpu" else torch.get_autocast_gpu_dtype()


def refuse_autocast(device: torch.device, what: str) -> None:
    """Raises a RuntimeError naming what to do when `torch.autocast` is on for `device`'s type: fastmaml's
    sweeps (hand-derived rules, kernels, the fast weights and adjoints) compute in the parameters' dtype,
    and mixing in autocast's per-op casts would give neither the fp32 nor the low-precision meta-gradient."""
    dtype = _autocast_on(device)
    if dtype is None:
        return
    name = str(dtype).replace("torch.", "")
    raise RuntimeError(
        f"{what} does not run under torch.autocast({device.type!r}, dtype=torch.{name}): its inner loop and "
        "reverse sweep compute in the parameters' dtype. Either call it outside the autocast region (or inside "
        f"`with torch.autocast({device.type!r}, enabled=False):`), which computes in float32, or run the model "
        f"in {name}: `model.to(torch.{name})` and `tasks.to(torch.{name})` (keep a float32 copy of the weights "
        "for the optimizer if you need one)"
    )


def unwrap_model(model) -> nn.Module:
    """The user's own module inside a `torch.compile` wrapper (its parameter names and engine are the
    uncompiled model's). A DistributedDataParallel wrapper is refused: its gradient hooks would not see the
    meta-gradient, which fastmaml writes into `.grad` directly."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "model: a DistributedDataParallel wrapper does not synchronize the gradients meta_step "
            "writes; pass model.module, each rank on fastmaml.distributed.shard(tasks), then call "
            "fastmaml.distributed.all_reduce_grads(model.module)"
        )
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
    if (
        isinstance(implicit_lambda, bool)
        or not isinstance(implicit_lambda, numbers.Real)
        or not (implicit_lambda > 0 and math.isfinite(implicit_lambda))
    ):
        raise ValueError(f"implicit_lambda: expected a positive float, got {implicit_lambda!r}")
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, numbers.Integral) or cg_steps < 1:
        raise ValueError(f"cg_steps: expected a positive int, got {cg_steps!r}")
    if learnable_leaves(inner_lr):
        raise ValueError(
            "inner_lr: order='implicit' gives no gradient for a learnable inner learning rate "
            "(the implicit gradient does not depend on the path to φ_K); pass a float"
        )
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
    if task_chunk is not None and (
        isinstance(task_chunk, bool) or not isinstance(task_chunk, numbers.Integral) or task_chunk < 1
    ):
        raise ValueError(f"task_chunk: expected None or a positive int (tasks per chunk), got {task_chunk!r}")


def _setup(model, inputs, targets, *, steps, order, loss, inner_params, backend, layout=None, what="meta_step"):
    _check_common(model, steps, order)
    layout = ParamLayout(model, inner_params) if layout is None else layout
    for field, x in inputs:
        _check_inputs(layout, x, field)
    refuse_autocast(inputs[0][1].device, what)
    loss_obj = resolve_loss(loss)
    for field, y in targets:
        loss_obj.check_targets(y, field, like=inputs[0][1])
    ops = resolve(backend, inputs[0][1].device)
    return layout, loss_obj, ops


def update_bn_running_stats(
    model: nn.Module,
    layout: ParamLayout,
    loss_obj,
    ops: OpTable,
    norm: NormPlan,
    support_x: torch.Tensor,
    task_chunk: Optional[int] = None,
) -> None:
    """The BatchNorm running statistics after one train-mode pass over every task's support set at θ (see
    `NormPlan.update_running`), for the layers in training mode that track them. Not differentiated: the
    meta-gradient does not depend on it."""
    if not norm.updates_running_stats:
        return
    program = program_for(model, layout, loss_obj)
    with torch.no_grad():
        theta_a, theta_s = layout.theta()
        per_task = support_x[0].numel() * support_x.element_size() * _STATS_BLOWUP
        parts = [
            program.batch_stats(ops, theta_a, theta_s, support_x[sl])
            for sl in task_budget_chunks(support_x.shape[0], per_task, support_x.device, task_chunk)
        ]
    norm.update_running(
        [
            None if p[0] is None else (torch.cat([c[0] for c in p]), torch.cat([c[1] for c in p]), p[0][2])
            for p in zip(*parts)
        ]
    )


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
    evaluate_before: bool = True,
    check_finite: bool = True,
    task_chunk: Optional[int] = None,
    step_weights: Optional[Sequence[float]] = None,
    update_running_stats: bool = True,
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

    Returns:
        A `MetaResult`: the meta-loss and per-task `[T]` losses (and accuracies) before and after adaptation.

    Raises:
        ValueError, TypeError: a bad argument (the message names it).
        RuntimeError: called under `torch.autocast` (the message says what to do instead).
        MemoryError: the call's state cannot fit the device's free memory (names `steps` or `task_chunk`).
        NonFiniteError: a non-finite loss or meta-gradient (with `check_finite`).
        BackendUnavailable: an explicitly requested backend cannot run on the device.
    """
    model = unwrap_model(model)
    out, lr_grads, norm, ctx = run_meta_step(
        model,
        None,
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
        evaluate_before=evaluate_before,
        check_finite=check_finite,
        task_chunk=task_chunk,
        step_weights=step_weights,
        shared_grad=None,
        lr_grad=True,
    )
    layout, loss_obj, ops, batch = ctx
    _accumulate(layout, out.d_a, out.d_s)
    for leaf, g in lr_grads:
        leaf.grad = g if leaf.grad is None else leaf.grad + g
    if out.recorded is not None:
        for j, stats in enumerate(out.recorded):
            norm.update(j, stats)
    if update_running_stats:
        update_bn_running_stats(model, layout, loss_obj, ops, norm, batch.support_x, task_chunk)
    return as_result(out)


def as_result(out) -> MetaResult:
    """The `MetaResult` of an engine's answer."""
    return MetaResult(
        meta_loss=out.meta_loss,
        query_loss_after=out.query_loss_after,
        query_loss_before=out.query_loss_before,
        support_loss_before=out.support_loss_before,
        accuracy_before=out.accuracy_before,
        accuracy_after=out.accuracy_after,
    )


def run_meta_step(
    model,
    layout,
    tasks,
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
    evaluate_before,
    check_finite,
    task_chunk,
    step_weights,
    shared_grad,
    lr_grad: bool,
    norm_buffers=None,
    what: str = "meta_step",
    theta=None,
):
    """Validates a meta-step and runs the engine. layout: a `ParamLayout` of `model` (fastmaml.func) or None
    (built from `inner_params`); theta: None, or `() -> (theta_a, theta_s)` from other tensors than the
    module's parameters (fastmaml.func). shared_grad: whether the shared parameters need their meta-gradient
    (None: whether one requires grad). lr_grad: whether learnable tensors of `inner_lr` get a gradient.
    Returns (the engine's `MetaGrad`, [(learnable rate, its gradient)], the `NormPlan`,
    (layout, loss, op table, task batch)); nothing is written anywhere."""
    _check_chunk(task_chunk)
    weights = _step_weights(step_weights, steps, order)
    batch = as_task_batch(tasks)
    layout, loss_obj, ops = _setup(
        model,
        [("tasks.support_x", batch.support_x), ("tasks.query_x", batch.query_x)],
        [("tasks.support_y", batch.support_y), ("tasks.query_y", batch.query_y)],
        steps=steps,
        order=order,
        loss=loss,
        inner_params=inner_params,
        backend=backend,
        layout=layout,
        what=what,
    )
    norm = NormPlan(model, batch_norm, buffers=norm_buffers)
    implicit = _implicit(order, implicit_lambda, cg_steps, inner_lr)
    with torch.no_grad():
        theta_a, theta_s = (layout.theta if theta is None else theta)()
    # one task's state (fast weights, gradients, adjoints of the kept steps) must fit before anything is built
    learnable = bool(learnable_leaves(inner_lr)) and lr_grad
    check_memory(
        layout.adapted.size * theta_a.element_size() * state_buffers(order, steps, learnable, weights is not None),
        1,
        theta_a.device,
        steps=steps,
        order=order,
        chunk_given=False,
    )
    with torch.enable_grad():  # the map from learnable rates to α_j is differentiated even under no_grad
        alphas = expand_inner_lr(inner_lr, steps, layout.adapted, like=theta_a)
    if shared_grad is None:
        shared_grad = any(layout.params[n].requires_grad for n in layout.shared.names)
    req = MetaStepRequest(
        model=model,
        layout=layout,
        loss=loss_obj,
        batch=batch,
        theta_a=theta_a,
        theta_s=theta_s,
        alphas=[a.detach() for a in alphas],
        lr_grad=[a.requires_grad and lr_grad for a in alphas],
        order=order,
        ops=ops,
        norm=norm,
        implicit=implicit,
        weights=weights,
        shared_grad=shared_grad,
        check_finite=check_finite,
        evaluate_before=evaluate_before,
        task_chunk=task_chunk,
    )
    out = meta_grad(req)
    lr_grads = []
    if learnable:
        with torch.enable_grad():
            lr_grads = _inner_lr_grads(inner_lr, alphas, out.d_alphas)
    return out, lr_grads, norm, (layout, loss_obj, ops, batch)


def _step_weights(step_weights, steps: int, order: str) -> Optional[List[float]]:
    """The multi-step loss weights as K floats (validated), or None."""
    if step_weights is None:
        return None
    if isinstance(step_weights, torch.Tensor):
        step_weights = step_weights.detach().cpu().tolist()
    try:
        weights = [float(w) for w in step_weights]
    except (TypeError, ValueError):
        raise TypeError(
            f"step_weights: expected a sequence of {steps} floats (one per inner step), got {step_weights!r}"
        ) from None
    if len(weights) != steps:
        raise ValueError(
            f"step_weights: expected {steps} weights (one per inner step, steps={steps}), got {len(weights)}"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"step_weights: expected finite non-negative weights, got {weights}")
    if not weights:  # steps=0: the query loss at θ is the only term
        return None
    if order == "implicit":
        raise ValueError(
            "step_weights: order='implicit' has no per-step query losses (its meta-gradient "
            "depends only on the adapted weights); use 'second', 'checkpoint' or 'first'"
        )
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
    without a gradient yet gets a copy of its part (a tensor of its own, not a view of the flat buffer)."""
    grads = layout.adapted.unflatten(d_a)
    if d_s is not None:
        grads.update(layout.shared.unflatten(d_s))
    into, add = [], []
    for name, g in grads.items():
        p = layout.params[name]
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = g.clone()
        else:
            into.append(p.grad)
            add.append(g)
    if into:
        torch._foreach_add_(into, add)


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
    `implicit_lambda`, `cg_steps`, `check_finite`, `update_running_stats`) are those of `meta_step`.

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
    implicit = _implicit(order, implicit_lambda, cg_steps, inner_lr)
    recorded = [] if norm.record and not bound else None
    spec = InnerLoopSpec(
        program, ops, order, check_finite, norm, recorded, implicit, keep_grads=any(a.requires_grad for a in alphas)
    )
    phi, support_before, *_ = InnerLoop.apply(spec, theta_a, theta_s, support_x, support_y, *alphas)
    for j, stats in enumerate(recorded or []):
        norm.update(j, stats)
    adapted = AdaptedModel(program, ops, phi, theta_s, support_before if steps else None, norm, steps, bound)
    return adapted, (layout, loss_obj, ops)
