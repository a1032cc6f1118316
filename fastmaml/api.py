"""The public API: `meta_step` (one exact meta-gradient for a batch of tasks) and `adapt`
(adapted weights per task that are differentiable through the fused reverse sweep)."""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import nn

from .batchnorm import NormPlan
from .errors import NonFiniteError
from .inner_loop import (ORDERS, TASK_STATE_BYTES, Implicit, InnerLoop, InnerLoopSpec, forward_sweep,
                         reverse_sweep, state_buffers, task_chunks)
from .inner_lr import expand_inner_lr, learnable_leaves
from .layout import InnerParams, ParamLayout
from .losses import LossLike, accuracy, resolve_loss
from .ops import mlp_step, resolve
from .programs import Program, select_program
from .result import MetaResult
from .tasks import TaskBatch, TasksLike, as_task_batch, validate


def _check_common(model, steps, order):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps: expected a non-negative int, got {steps!r}")
    if steps < 0:
        raise ValueError(f"steps: expected a non-negative number of inner steps, got {steps}")
    if order not in ORDERS:
        raise ValueError(f"order: unknown order {order!r}; expected one of {ORDERS}")


def _implicit(order, implicit_lambda, cg_steps, inner_lr) -> Optional[Implicit]:
    if order != "implicit":
        return None
    if isinstance(implicit_lambda, bool) or not isinstance(implicit_lambda, numbers.Real) or not implicit_lambda > 0:
        raise ValueError(f"implicit_lambda: expected a positive float, got {implicit_lambda!r}")
    if isinstance(cg_steps, bool) or not isinstance(cg_steps, numbers.Integral) or cg_steps < 1:
        raise ValueError(f"cg_steps: expected a positive int, got {cg_steps!r}")
    if learnable_leaves(inner_lr):
        raise ValueError("inner_lr: order='implicit' gives no gradient for a learnable inner learning rate "
                         "(the implicit gradient does not depend on the path to φ_K); pass a float")
    return Implicit(float(implicit_lambda), int(cg_steps))


def _check_inputs(layout: ParamLayout, x: torch.Tensor, field: str) -> None:
    p = next(iter(layout.params.values()))
    if not x.is_floating_point():
        raise TypeError(f"{field}: expected floating-point inputs, got {x.dtype}")
    if x.dtype != p.dtype:
        raise TypeError(
            f"{field}: dtype {x.dtype} differs from the model's parameters ({p.dtype}); "
            "convert one of them (e.g. model.to(x.dtype))"
        )
    if x.device != p.device:
        raise ValueError(f"{field}: on {x.device} but the model's parameters are on {p.device}")


def _setup(model, inputs, *, steps, order, loss, inner_params, backend):
    _check_common(model, steps, order)
    layout = ParamLayout(model, inner_params)
    for field, x in inputs:
        _check_inputs(layout, x, field)
    loss_obj = resolve_loss(loss)
    ops = resolve(backend, inputs[0][1].device)
    return layout, loss_obj, ops


def _program(model, layout: ParamLayout, loss_obj, backend) -> Program:
    program = select_program(model, layout, loss_obj)
    program.backend = backend
    return program


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
    """One meta-gradient for a batch of T tasks, accumulated into `.grad` like `loss.backward()`.

    meta-loss = mean_t L_query_t(φ_t,K), φ_t,0 = θ, φ_t,j+1 = φ_t,j − α_j ⊙ ∇L_support_t(φ_t,j).
    d(meta-loss)/dθ goes into `p.grad` of every parameter that requires grad (and into the
    learnable tensors of `inner_lr`); the model's weights are not changed. If anything is non-finite
    (with `check_finite`), `NonFiniteError` says at which inner step and no `.grad` is touched.

    tasks: a `TaskBatch`, a 4-tuple `(support_x [T, Ns, ...], support_y, query_x [T, Nq, ...], query_y)`
    or a list of per-task 4-tuples. order: "second" (exact), "checkpoint" (exact; keeps only the
    fast weights of each step, no activations), "first" (FOMAML), "implicit" (iMAML: the inner steps minimize
    L_s(φ) + implicit_lambda/2 ‖φ − θ‖² and the meta-gradient solves (I + H/λ) u = ∇L_q by `cg_steps`
    of conjugate gradient; path-independent, memory flat in `steps`). loss: "mse", "cross_entropy" or
    a per-task callable `(output [N, ...], target [N, ...]) -> scalar`. inner_params: names/prefixes or a predicate
    `(name, param) -> bool` of the parameters adapted in the inner loop (default: all).
    batch_norm: "batch" (batch statistics, MAML), "frozen" (running statistics, fixed) or "per_step"
    (MAML++ per-step running statistics), see fastmaml/batchnorm.py; running statistics are updated
    only in "per_step" mode with `model.training`. evaluate_before: also run the query set at θ for
    `query_loss_before` / `accuracy_before` (one extra query forward; off for the bare meta-gradient).
    task_chunk: tasks per chunk (None: chunks sized so that each chunk's per-task state, the fast
    weights, gradients and adjoints `[Tc, P]` of the kept steps, stays under
    `inner_loop.TASK_STATE_BYTES` of the device type: 32 MB on CPU, 2 GB on CUDA). Chunks run one
    after the other and sum to the same meta-gradient; smaller chunks save memory, larger ones
    batch more work per call. step_weights: the multi-step loss of MAML++, K non-negative weights w_j:
    meta-loss = Σ_j w_j mean_t L_query_t(φ_t,j), j = 1..K (None: only φ_K, weight 1; see
    `fastmaml.msl_weights` for MAML++'s annealed schedule). Each nonzero w_j, j < K, adds a query pass
    at φ_j to the reverse sweep; orders second, checkpoint and first ("first" then keeps every φ_j).
    """
    if task_chunk is not None and (isinstance(task_chunk, bool) or not isinstance(task_chunk, numbers.Integral)
                                   or task_chunk < 1):
        raise ValueError(f"task_chunk: expected None or a positive int (tasks per chunk), got {task_chunk!r}")
    weights = _step_weights(step_weights, steps, order)
    batch = as_task_batch(tasks)
    layout, loss_obj, ops = _setup(
        model, [("tasks.support_x", batch.support_x), ("tasks.query_x", batch.query_x)],
        steps=steps, order=order, loss=loss, inner_params=inner_params, backend=backend)
    loss_obj.check_targets(batch.support_y, "support_y")
    loss_obj.check_targets(batch.query_y, "query_y")
    norm = NormPlan(model, batch_norm)
    implicit = _implicit(order, implicit_lambda, cg_steps, inner_lr)
    qx, qy = batch.query_x, batch.query_y
    T = batch.num_tasks

    with torch.no_grad():
        theta_a, theta_s = layout.theta()
    alphas = expand_inner_lr(inner_lr, steps, layout.adapted, like=theta_a)
    alphas_d = [a.detach() for a in alphas]
    lr_grad = [a.requires_grad for a in alphas]
    shared_grad = any(layout.params[n].requires_grad for n in layout.shared.names)

    fast = None if weights is not None else mlp_step.try_meta_step(
        model, layout, loss_obj, batch, theta_a, alphas_d, order=order, backend=backend, lr_grad=lr_grad,
        need_before=evaluate_before, task_chunk=task_chunk)
    # (a sum is non-finite if any term is, or, rarely, if it overflows: then the general path reruns for nothing)
    if fast is not None and (not check_finite or math.isfinite(float(fast.grad.sum() + fast.query_loss_after.sum()))):
        # the whole-inner-loop MLP op (non-finite results rerun the general path below, which says at which
        # inner step they appear)
        lr_grads = _inner_lr_grads(inner_lr, alphas, fast.d_alphas)
        _accumulate(layout, fast.grad, None)
        for leaf, g in lr_grads:
            leaf.grad = g if leaf.grad is None else leaf.grad + g
        return MetaResult(meta_loss=fast.query_loss_after.mean(),
                          query_loss_before=fast.query_loss_before if evaluate_before else None,
                          query_loss_after=fast.query_loss_after,
                          support_loss_before=fast.support_loss_before if steps else None)

    program = _program(model, layout, loss_obj, backend)
    state = layout.adapted.size * theta_a.element_size() * state_buffers(order, steps, any(lr_grad),
                                                                         weights is not None)
    chunks = task_chunks(T, state, TASK_STATE_BYTES.get(theta_a.device.type, TASK_STATE_BYTES["cpu"]),
                         task_chunk)
    parts, d_a, d_s, d_alphas = [], None, None, [None] * steps
    for sl in chunks:  # the meta-gradients are summed as the chunks go: one chunk's state alive at a time
        part = _chunk_meta_grad(program, ops, batch, sl, T, theta_a, theta_s, alphas_d, order=order,
                                shared_grad=shared_grad, lr_grad=lr_grad, check_finite=check_finite, norm=norm,
                                implicit=implicit, classification=loss_obj.classification, weights=weights)
        d_a, d_s = _add(d_a, part.d_a), _add(d_s, part.d_s)
        d_alphas = [_add(total, d) for total, d in zip(d_alphas, part.d_alphas)]
        parts.append(part._replace(d_a=None, d_s=None, d_alphas=None))
    if check_finite and d_s is not None and not bool(torch.isfinite(d_s).all()):
        raise NonFiniteError("non-finite meta-gradient of the shared (non-adapted) parameters",
                             where="shared meta-gradient")

    lr_grads = _inner_lr_grads(inner_lr, alphas, d_alphas)
    _accumulate(layout, d_a, d_s)
    for leaf, g in lr_grads:
        leaf.grad = g if leaf.grad is None else leaf.grad + g
    if norm.record:
        for j in range(steps + 1):
            norm.update(j, _cat_stats([p.recorded[j] for p in parts]))

    query_after = torch.cat([p.query_loss for p in parts])
    meta_loss = query_after.mean() if weights is None else torch.cat([p.weighted_loss for p in parts]).mean()
    result = MetaResult(meta_loss=meta_loss, query_loss_after=query_after,
                        support_loss_before=torch.cat([p.support_before for p in parts]) if steps else None)
    if loss_obj.classification:
        result.accuracy_after = torch.cat([p.accuracy for p in parts])
    if evaluate_before:
        if steps == 0:
            result.query_loss_before, result.accuracy_before = result.query_loss_after, result.accuracy_after
        else:
            before_loss, before_out = program.evaluate(theta_a, theta_s, qx, qy, bn_stats=norm.stats(0))
            result.query_loss_before = before_loss.detach()
            if loss_obj.classification:
                result.accuracy_before = accuracy(before_out.detach(), qy)
    return result


class _ChunkGrad(NamedTuple):
    """One chunk's share of the meta-gradient (already divided by the whole batch's T) and of the result."""

    d_a: Optional[torch.Tensor]  # [Pa]
    d_s: Optional[torch.Tensor]  # [Ps]
    d_alphas: Optional[List[Optional[torch.Tensor]]]  # per step
    query_loss: torch.Tensor  # [Tc]
    accuracy: Optional[torch.Tensor]  # [Tc]
    support_before: Optional[torch.Tensor]  # [Tc]
    recorded: Optional[list]  # per step 0..K, the chunk's BatchNorm batch statistics
    weighted_loss: Optional[torch.Tensor]  # [Tc] Σ_j w_j L_query(φ_j) with step weights, else None


def _chunk_meta_grad(program, ops, batch: TaskBatch, sl: slice, T: int, theta_a, theta_s, alphas, *, order,
                     shared_grad, lr_grad, check_finite, norm, implicit, classification, weights=None) -> _ChunkGrad:
    """Forward sweep, query loss and gradient, reverse sweep for the tasks `sl` of the batch; with step
    `weights` w_1..w_K, the query loss after every step j with w_j > 0 (the multi-step loss)."""
    sx, sy, qx, qy = (t[sl] for t in batch)
    steps = len(alphas)
    recorded = [] if norm.record else None
    phi, tape, support_before = forward_sweep(program, ops, theta_a, theta_s, alphas, sx, sy, order=order,
                                              keep_grads=any(lr_grad), check_finite=check_finite, norm=norm,
                                              recorded=recorded, implicit=implicit, keep_phis=weights is not None)
    q = program.loss_grad(phi, theta_s, qx, qy, shared_grad=shared_grad, bn_stats=norm.stats(steps))
    _check_query_loss(q.loss, steps, check_finite)
    last = 1.0 if weights is None else weights[-1]
    weighted = None if weights is None else q.loss.detach() * last

    def batch_share(t, w):  # w × this chunk's share (a sum over its tasks) of the mean over all T tasks
        return t / T if w == 1.0 else t * (w / T)

    shared_terms = [batch_share(q.grad_shared.sum(0), last)] if shared_grad else []

    def step_loss_grad(j, phi_j):  # ∂/∂φ_j of w_j mean_t L_query_t(φ_j), and its loss and ψ-gradient
        nonlocal weighted
        w = weights[j - 1]
        if w == 0:
            return None
        qj = program.loss_grad(phi_j, theta_s, qx, qy, shared_grad=shared_grad, bn_stats=norm.stats(j))
        _check_query_loss(qj.loss, j, check_finite)
        weighted = weighted + qj.loss.detach() * w
        if shared_grad:
            shared_terms.append(batch_share(qj.grad_shared.sum(0), w))
        return batch_share(qj.grad, w)

    d_a, d_s, d_alphas = reverse_sweep(program, ops, tape, batch_share(q.grad, last), theta_s, alphas, sx, sy,
                                       shared_grad=shared_grad, lr_grad=lr_grad, check_finite=check_finite,
                                       norm=norm, step_loss_grad=step_loss_grad if weights is not None else None)
    if shared_grad:
        d_s = d_s + sum(shared_terms)
    if recorded is not None:
        recorded.append(program.batch_stats(phi, theta_s, qx))
    return _ChunkGrad(d_a, d_s, d_alphas, q.loss.detach(),
                      accuracy(q.output.detach(), qy) if classification else None,
                      None if support_before is None else support_before.detach(), recorded, weighted)


def _check_query_loss(loss, step: int, check_finite: bool) -> None:
    if check_finite and not bool(torch.isfinite(loss).all()):
        raise NonFiniteError(f"non-finite query loss after {step} inner steps: {loss.mean().item()}",
                             where="query loss", step=step)


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


def _add(total: Optional[torch.Tensor], t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """total + t, where None is nothing yet (or nothing at all: a gradient not asked for)."""
    if t is None:
        return total
    return t if total is None else total.add_(t)


def _cat_stats(chunks):
    """Per-chunk BatchNorm statistics [[(mean [Tc, C], var [Tc, C], count)] per layer] -> one list over
    all tasks."""
    return [(torch.cat([c[i][0] for c in chunks]), torch.cat([c[i][1] for c in chunks]), chunks[0][i][2])
            for i in range(len(chunks[0]))]


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

    params: {name: `[T, *shape]`} (adapted weights, and the shared ones broadcast over tasks).
    `adapted(x)` runs the model on `x [T, N, *in]` with each task's weights -> `[T, N, *out]`.
    support_loss_before: support loss at θ `[T]` (NaN when steps=0).
    BatchNorm in `adapted(x)` follows the `batch_norm` mode of `adapt` as the query pass (step K); in
    "per_step" mode with `model.training`, each call updates step K's running statistics.
    """

    def __init__(self, program: Program, phi: torch.Tensor, theta_s: torch.Tensor, support_loss_before,
                 norm: NormPlan, steps: int):
        self.program = program
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
            self.norm.update(self.steps, self.program.batch_stats(self.phi.detach(), self.theta_s.detach(), x))
        return self.program.forward(self.phi, self.theta_s, x, bn_stats=self.norm.stats(self.steps))


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
    """Adapts `model` to every task's support set `[T, Ns, ...]`; returns an `AdaptedModel`.

    Put any outer loss on `adapted(query_x)` (or on `adapted.params`) and call `backward()`: the
    gradient reaches the model's parameters and learnable `inner_lr` through the exact reverse sweep
    of `order` (no `create_graph`). Arguments as in `meta_step`.
    """
    validate(TaskBatch(support_x, support_y, support_x, support_y))
    layout, loss_obj, ops = _setup(model, [("support_x", support_x)], steps=steps, order=order,
                                   loss=loss, inner_params=inner_params, backend=backend)
    program = _program(model, layout, loss_obj, backend)
    loss_obj.check_targets(support_y, "support_y")
    theta_a, theta_s = layout.theta()
    alphas = expand_inner_lr(inner_lr, steps, layout.adapted, like=theta_a)
    norm = NormPlan(model, batch_norm)
    implicit = _implicit(order, implicit_lambda, cg_steps, inner_lr)
    recorded = [] if norm.record else None
    spec = InnerLoopSpec(program, ops, support_x, support_y, order, check_finite, norm, recorded, implicit)
    phi, support_before = InnerLoop.apply(spec, theta_a, theta_s, *alphas)
    for j, stats in enumerate(recorded or []):
        norm.update(j, stats)
    return AdaptedModel(program, phi, theta_s, support_before, norm, steps)
