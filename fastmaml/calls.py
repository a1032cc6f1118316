"""What the public calls share: graph breaks under `torch.compile`, the refusal under `torch.autocast`, the
model behind a wrapper, the validation of a meta-step's arguments and its run in two halves:
`prepare_meta_step` (everything that depends only on the model's structure, the task shapes and the
options: the layout, the loss, the op table, the program and its engines with their task chunks) and
`execute_meta_step` (what depends on values: θ, the inner learning rates, the engine's run). `meta_step`,
`MetaStep` (fastmaml/plan.py) and `fastmaml.func` all run through these two, so a plan computes exactly what
an unplanned call does."""

from __future__ import annotations

import functools
import math
import numbers
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
from torch import nn

from .batchnorm import NormPlan
from .engine import INNER_SOLVERS, ORDERS, Engines, Implicit, MetaGrad, MetaStepRequest, engines_for, program_for
from .errors import NonFiniteError
from .inner_lr import expand_inner_lr, learnable_leaves
from .layout import ParamLayout
from .losses import Loss, resolve_loss
from .ops import OpTable, resolve
from .precision import Precision, resolve_precision
from .programs import Program
from .result import MetaResult
from .schedule import check_memory, state_buffers, task_budget_chunks
from .tasks import TaskBatch, as_task_batch

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
        f"`with torch.autocast({device.type!r}, enabled=False):`), which computes in float32"
        + (
            " (meta_step, MetaStep and fastmaml.func.meta_grad take precision='bf16': bf16 activations, float32 "
            "weights and meta-gradient)"
            if dtype == torch.bfloat16
            else ""
        )
        + f", or run the model in {name}: `model.to(torch.{name})` and `tasks.to(torch.{name})` (keep a float32 "
        "copy of the weights for the optimizer if you need one)"
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


def _implicit(order, implicit_lambda, cg_steps, inner_lr, inner_solver) -> Optional[Implicit]:
    if inner_solver not in INNER_SOLVERS:
        raise ValueError(f"inner_solver: expected one of {INNER_SOLVERS}, got {inner_solver!r}")
    if order != "implicit":
        if inner_solver != "sgd":
            raise ValueError(
                f"inner_solver={inner_solver!r} applies to order='implicit' only: the {order!r} meta-gradient "
                "differentiates the inner steps themselves, and steps chosen from loss values would change what "
                "it is the gradient of; use inner_solver='sgd' (fixed steps at inner_lr)"
            )
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
    return Implicit(float(implicit_lambda), int(cg_steps), inner_solver)


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
    program: Optional[Program] = None,
) -> None:
    """The BatchNorm running statistics after one train-mode pass over every task's support set at θ (see
    `NormPlan.update_running`), for the layers in training mode that track them. Not differentiated: the
    meta-gradient does not depend on it. program: the model's program (None: looked up)."""
    if not norm.updates_running_stats:
        return
    if program is None:
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


@dataclass
class StepSetup:
    """A validated meta-step: everything that depends only on the model's structure, the task shapes and the
    options (see the module docstring). Holds no module: the program and engines hold none, the layout holds
    the parameters.

    alphas: the α_j of a constant `inner_lr` (Python floats), expanded once and detached; None where they are
    expanded at every call (tensors: learned or changed in place). state_bytes: one task's state, for the
    memory check of every call."""

    layout: ParamLayout
    loss: Loss
    ops: OpTable
    engines: Engines
    steps: int
    order: str
    weights: Optional[List[float]]
    implicit: Optional[Implicit]
    learnable: bool
    shared_grad: bool
    lr_grad: bool
    state_bytes: int
    alphas: Optional[List[torch.Tensor]]
    evaluate_before: bool
    check_finite: bool
    task_chunk: Optional[int]
    precision: Optional[Precision] = None

    @property
    def program(self) -> Program:
        return self.engines.program


def constant_inner_lr(inner_lr) -> bool:
    """Whether `inner_lr` is made of Python numbers only (a float, a dict of floats, a per-step list of those):
    its α_j can be expanded once."""
    if isinstance(inner_lr, (list, tuple)):
        return all(constant_inner_lr(lr) and not isinstance(lr, (list, tuple)) for lr in inner_lr)
    if isinstance(inner_lr, dict):
        return all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in inner_lr.values())
    return isinstance(inner_lr, numbers.Real) and not isinstance(inner_lr, bool)


def prepare_meta_step(
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
    inner_solver,
    evaluate_before,
    check_finite,
    task_chunk,
    step_weights,
    shared_grad,
    lr_grad: bool,
    precision=None,
    norm_buffers=None,
    what: str = "meta_step",
    theta=None,
) -> Tuple[StepSetup, NormPlan, MetaStepRequest, List[torch.Tensor]]:
    """Validates a meta-step (every check of `meta_step`, in its order) and plans it. layout, theta,
    shared_grad, lr_grad: as `run_meta_step`. Returns (the `StepSetup`, the `NormPlan` of this call, the
    request of this call, its α_j as expanded from `inner_lr`, with their autograd history)."""
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
    implicit = _implicit(order, implicit_lambda, cg_steps, inner_lr, inner_solver)
    with torch.no_grad():
        theta_a, theta_s = (layout.theta if theta is None else theta)()
    policy = resolve_precision(precision, theta_a.dtype)
    # one task's state (fast weights, gradients, adjoints of the kept steps) must fit before anything is built
    learnable = bool(learnable_leaves(inner_lr)) and lr_grad
    state_bytes = (
        layout.adapted.size * theta_a.element_size() * state_buffers(order, steps, learnable, weights is not None)
    )
    check_memory(state_bytes, 1, theta_a.device, steps=steps, order=order, chunk_given=False)
    with torch.enable_grad():  # the map from learnable rates to α_j is differentiated even under no_grad
        alphas = expand_inner_lr(inner_lr, steps, layout.adapted, like=theta_a)
    if shared_grad is None:
        shared_grad = any(layout.params[n].requires_grad for n in layout.shared.names)
    setup = StepSetup(
        layout=layout,
        loss=loss_obj,
        ops=ops,
        engines=None,  # type: ignore[arg-type]  (planned from this call's request below)
        steps=steps,
        order=order,
        weights=weights,
        implicit=implicit,
        learnable=learnable,
        shared_grad=shared_grad,
        lr_grad=lr_grad,
        state_bytes=state_bytes,
        alphas=[a.detach() for a in alphas] if constant_inner_lr(inner_lr) else None,
        evaluate_before=evaluate_before,
        check_finite=check_finite,
        task_chunk=task_chunk,
        precision=policy,
    )
    req = request(setup, model, batch, norm, theta_a, theta_s, alphas)
    setup.engines = engines_for(req)
    return setup, norm, req, alphas


def request(setup: StepSetup, model, batch: TaskBatch, norm: NormPlan, theta_a, theta_s, alphas) -> MetaStepRequest:
    """The engine's request of one call of `setup`."""
    return MetaStepRequest(
        model=model,
        layout=setup.layout,
        loss=setup.loss,
        batch=batch,
        theta_a=theta_a,
        theta_s=theta_s,
        alphas=setup.alphas if setup.alphas is not None else [a.detach() for a in alphas],
        lr_grad=[a.requires_grad and setup.lr_grad for a in alphas],
        order=setup.order,
        ops=setup.ops,
        norm=norm,
        implicit=setup.implicit,
        weights=setup.weights,
        shared_grad=setup.shared_grad,
        check_finite=setup.check_finite,
        evaluate_before=setup.evaluate_before,
        task_chunk=setup.task_chunk,
        precision=setup.precision,
    )


def execute_meta_step(
    setup: StepSetup, model, batch: TaskBatch, norm: NormPlan, inner_lr, theta=None, thetas=None
) -> Tuple[MetaGrad, list]:
    """One meta-step of `setup` on `batch` (already checked against the setup's shapes) with the current
    values of θ (or `theta()`, or `thetas` = (theta_a, theta_s) without autograd history) and of `inner_lr`.
    Returns (the engine's `MetaGrad`, [(learnable rate, its gradient)]); nothing is written anywhere."""
    if thetas is not None:
        theta_a, theta_s = thetas
    else:
        with torch.no_grad():
            theta_a, theta_s = (setup.layout.theta if theta is None else theta)()
    check_memory(setup.state_bytes, 1, theta_a.device, steps=setup.steps, order=setup.order, chunk_given=False)
    if setup.alphas is not None:
        alphas = setup.alphas
    else:
        with torch.enable_grad():
            alphas = expand_inner_lr(inner_lr, setup.steps, setup.layout.adapted, like=theta_a)
    req = request(setup, model, batch, norm, theta_a, theta_s, alphas)
    return finish(setup, req, inner_lr, alphas)


def finish(setup: StepSetup, req: MetaStepRequest, inner_lr, alphas) -> Tuple[MetaGrad, list]:
    """Runs the engines on `req`; maps ∂L/∂α_j back to the learnable tensors of `inner_lr`."""
    out = setup.engines.run(req)
    lr_grads = []
    if setup.learnable:
        with torch.enable_grad():
            lr_grads = _inner_lr_grads(inner_lr, alphas, out.d_alphas)
    return out, lr_grads


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
    inner_solver,
    evaluate_before,
    check_finite,
    task_chunk,
    step_weights,
    shared_grad,
    lr_grad: bool,
    precision=None,
    norm_buffers=None,
    what: str = "meta_step",
    theta=None,
):
    """Validates a meta-step and runs the engine, without a plan. layout: a `ParamLayout` of `model`
    (fastmaml.func) or None (built from `inner_params`); theta: None, or `() -> (theta_a, theta_s)` from other
    tensors than the module's parameters (fastmaml.func). shared_grad: whether the shared parameters need
    their meta-gradient (None: whether one requires grad). lr_grad: whether learnable tensors of `inner_lr`
    get a gradient. Returns (the engine's `MetaGrad`, [(learnable rate, its gradient)], the `NormPlan`,
    (layout, loss, op table, task batch)); nothing is written anywhere."""
    setup, norm, req, alphas = prepare_meta_step(
        model,
        layout,
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
        shared_grad=shared_grad,
        lr_grad=lr_grad,
        precision=precision,
        norm_buffers=norm_buffers,
        what=what,
        theta=theta,
    )
    out, lr_grads = finish(setup, req, inner_lr, alphas)
    return out, lr_grads, norm, (setup.layout, setup.loss, setup.ops, req.batch)


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


def apply_meta_step(
    model, setup: StepSetup, norm: NormPlan, out: MetaGrad, lr_grads, support_x, update_running_stats, accumulate=None
):
    """What `meta_step` writes after a meta-step: the meta-gradient into `.grad` (and the learnable rates'),
    per-step BatchNorm statistics, and (with `update_running_stats`) the running statistics. accumulate: a
    plan's `BoundLayout.accumulate` (None: `_accumulate` on the setup's layout)."""
    if accumulate is None:
        _accumulate(setup.layout, out.d_a, out.d_s)
    else:
        accumulate(out.d_a, out.d_s)
    for leaf, g in lr_grads:
        leaf.grad = g if leaf.grad is None else leaf.grad + g
    if norm.record and out.recorded is not None:
        for j, stats in enumerate(out.recorded):
            norm.update(j, stats)
    if update_running_stats and norm.updates_running_stats and out.recorded:
        norm.update_running(out.recorded[0])  # the engine's statistics of the support sets at θ (step 0)
    elif update_running_stats:
        update_bn_running_stats(
            model, setup.layout, setup.loss, setup.ops, norm, support_x, setup.task_chunk, program=setup.program
        )


def unplanned_meta_step(model: nn.Module, tasks, *, update_running_stats: bool = True, **options) -> MetaResult:
    """`meta_step` without a plan: validates and plans on every call (the reference a `MetaStep` is tested
    against). `model`: unwrapped; `options`: every other option of `meta_step` but `update_running_stats`."""
    setup, norm, req, alphas = prepare_meta_step(model, None, tasks, shared_grad=None, lr_grad=True, **options)
    out, lr_grads = finish(setup, req, options["inner_lr"], alphas)
    apply_meta_step(model, setup, norm, out, lr_grads, req.batch.support_x, update_running_stats)
    return as_result(out)
