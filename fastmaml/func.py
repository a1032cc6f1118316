"""`fastmaml.func`: the functional API, for libraries that hold a model's parameters themselves.

`meta_grad(model, params, tasks)` returns the meta-loss and the exact meta-gradient as a dict with the keys of
`params`, and `adapt(model, params, support)` the adapted parameters of every task, differentiable through
the same reverse sweep as `fastmaml.adapt` (also under `torch.func.grad`, `vjp`, `jacrev`, `vmap`). Both
compute with `params` in place of the module's parameters, the way `torch.func.functional_call` does, and have
no side effects: no `.grad`, no running statistics, no state shared between calls (every returned tensor is
its own).

`params` is a mapping {parameter name: tensor} (a subset of `model.named_parameters()`: the parameters left
out are the module's own, held fixed: neither adapted nor differentiated) or a sequence of tensors in
`model.parameters()` order (what `higher` and TorchOpt's functional modules hold).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .api import _COMPILE_REASON, as_result, outside_compile, refuse_autocast, run_adapt, run_meta_step, unwrap_model
from .batchnorm import STAT_BUFFERS, NormPlan
from .engine import program_for
from .inner_lr import learnable_leaves
from .layout import InnerParams, ParamLayout
from .losses import LossLike, resolve_loss
from .ops import resolve
from .result import MetaResult
from .tasks import TasksLike

ParamsLike = Union[Mapping[str, torch.Tensor], Sequence[torch.Tensor]]

__all__ = ["Aux", "ParamsLike", "adapt", "forward", "meta_grad"]


class Aux(NamedTuple):
    """What `meta_grad(..., return_aux=True)` adds.

    Attributes:
        result: the `MetaResult` of the step (per-task losses and accuracies before and after adaptation).
        inner_lr_grads: `inner_lr` with each tensor that requires grad replaced by its meta-gradient and
            everything else by None (same nesting: a tensor, a dict, a per-step list); None when `inner_lr`
            has no such tensor.
    """

    result: MetaResult
    inner_lr_grads: Any


@dataclass
class _Named:
    """The user's parameters by name, and how to give results back in the user's structure."""

    tensors: Dict[str, torch.Tensor]
    sequence: Optional[type] = None  # tuple/list when given in model.parameters() order

    def rebuild(self, values: Dict[str, torch.Tensor]):
        if self.sequence is not None:
            return self.sequence(values[n] for n in self.tensors)
        return {n: values[n] for n in self.tensors}


def _named(model: nn.Module, params: ParamsLike, strict: bool) -> _Named:
    names = [n for n, _ in model.named_parameters()]
    if isinstance(params, Mapping):
        unknown = [k for k in params if k not in names]
        if unknown:
            raise ValueError(f"params: {unknown} are not parameters of the model; its parameters are {names}")
        missing = [n for n in names if n not in params]
        if strict and missing:
            raise ValueError(
                f"params: no tensor for {missing} (strict=True); pass strict=False to keep the "
                "module's own tensors for them, fixed"
            )
        named = _Named({n: params[n] for n in names if n in params})
    elif isinstance(params, (tuple, list)):
        if len(params) != len(names):
            raise ValueError(
                f"params: a sequence must hold one tensor per parameter in model.parameters() order "
                f"({len(names)}: {names}), got {len(params)}"
            )
        named = _Named(dict(zip(names, params)), type(params))
    else:
        raise TypeError(
            f"params: expected a dict {{name: tensor}} or a sequence of tensors in model.parameters() "
            f"order, got {type(params).__name__}"
        )
    if not named.tensors:
        raise ValueError("params: empty; expected at least one of the model's parameters")
    own = dict(model.named_parameters())
    for n, t in named.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"params[{n!r}]: expected a tensor, got {type(t).__name__}")
        if t.shape != own[n].shape:
            raise ValueError(
                f"params[{n!r}]: shape {tuple(t.shape)} differs from the parameter's {tuple(own[n].shape)}"
            )
        if not t.is_floating_point():
            raise TypeError(f"params[{n!r}]: expected a floating-point tensor, got {t.dtype}")
        if t.dtype != own[n].dtype or t.device != own[n].device:
            raise ValueError(
                f"params[{n!r}]: {t.dtype} on {t.device}, but the model's parameter is "
                f"{own[n].dtype} on {own[n].device}; convert the model (model.to(...)) or the tensors"
            )
    return named


def _select(named: Dict[str, torch.Tensor], inner_params: InnerParams) -> set:
    """The names among `named` that adapt (default: all of them)."""
    if inner_params is None:
        return set(named)
    if callable(inner_params) and not isinstance(inner_params, str):
        chosen = {n for n, t in named.items() if inner_params(n, t)}
    else:
        wanted = [inner_params] if isinstance(inner_params, str) else list(inner_params)
        chosen = set()
        for w in wanted:
            if not isinstance(w, str):
                raise TypeError(f"inner_params: expected parameter names (str), got {w!r}")
            hits = {n for n in named if n == w or n.startswith(w + ".")}
            if not hits:
                raise ValueError(f"inner_params: {w!r} names none of the parameters in params: {list(named)}")
            chosen |= hits
    if not chosen:
        raise ValueError(f"inner_params: selects no parameter among {list(named)}")
    return chosen


def _bound_layout(model: nn.Module, named: _Named, inner_params: InnerParams):
    """The model's layout (names and slots; the program cache keys on it) and `() -> (theta_a, theta_s)` from
    the user's tensors: the adapted ones are those `inner_params` selects among `params`; the rest of `params`
    are shared (with a meta-gradient); parameters not in `params` are the module's own, shared and fixed."""
    chosen = _select(named.tensors, inner_params)
    layout = ParamLayout(model, lambda n, p: n in chosen)
    own = layout.params

    def theta():
        bound = [named.tensors.get(n, own[n].detach()) for n in layout.adapted.names]
        shared = [named.tensors.get(n, own[n].detach()) for n in layout.shared.names]
        first = next(iter(named.tensors.values()))
        return layout.adapted.flatten(bound), layout.shared.flatten(shared) if shared else first.new_zeros(0)

    return layout, theta


def _norm_buffers(model: nn.Module, buffers: Optional[Mapping[str, torch.Tensor]]) -> Optional[Dict[str, Any]]:
    """The BatchNorm statistics among `buffers` (bound for the call); any other buffer must be the module's
    own values: the compiled program reads the others from the module."""
    if buffers is None:
        return None
    if not isinstance(buffers, Mapping):
        raise TypeError(f"buffers: expected a dict {{name: tensor}}, got {type(buffers).__name__}")
    own = dict(model.named_buffers())
    bound = {}
    for name, t in buffers.items():
        if name not in own:
            raise ValueError(f"buffers: {name!r} is not a buffer of the model; its buffers are {list(own)}")
        if not isinstance(t, torch.Tensor) or t.shape != own[name].shape:
            raise ValueError(f"buffers[{name!r}]: expected a tensor of shape {tuple(own[name].shape)}")
        if name.rpartition(".")[2] in STAT_BUFFERS:
            bound[name] = t.detach()
        elif t is not own[name] and not torch.equal(t.detach().to(own[name].device), own[name]):
            raise ValueError(
                f"buffers[{name!r}]: differs from the module's buffer; fastmaml.func binds the "
                "BatchNorm statistics only (other buffers are constants of the compiled model): "
                f"update it in the module (model.get_buffer({name!r}).copy_(...))"
            )
    return bound


def _mirror(inner_lr, grads: Dict[int, torch.Tensor]):
    """`inner_lr` with each learnable tensor replaced by its gradient, everything else by None."""
    if isinstance(inner_lr, (list, tuple)):
        return type(inner_lr)(_mirror(x, grads) for x in inner_lr)
    if isinstance(inner_lr, Mapping):
        return {k: _mirror(v, grads) for k, v in inner_lr.items()}
    if isinstance(inner_lr, torch.Tensor):
        return grads.get(id(inner_lr))
    return None


@outside_compile(_COMPILE_REASON.format("func.meta_grad"))
def meta_grad(
    model: nn.Module,
    params: ParamsLike,
    tasks: TasksLike,
    *,
    buffers: Optional[Mapping[str, torch.Tensor]] = None,
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
    task_chunk: Optional[int] = None,
    step_weights: Optional[Sequence[float]] = None,
    precision: Optional[str] = None,
    strict: bool = False,
    return_aux: bool = False,
) -> Union[Tuple[torch.Tensor, Any], Tuple[torch.Tensor, Any, Aux]]:
    """The exact meta-gradient of `params`, returned instead of written into `.grad`.

    The same meta-step as `fastmaml.meta_step(model, tasks, ...)` with `params` in place of the module's
    parameters: `grads[name]` equals the `.grad` that `meta_step` would accumulate into that parameter.
    Every parameter in `params` gets a meta-gradient (whether or not it requires grad).

    Args:
        model: the `nn.Module` that defines the computation (its own parameters are not read, except those
            left out of `params`, which stay fixed).
        params: {name: tensor} (a subset of `model.named_parameters()` names) or a sequence of tensors in
            `model.parameters()` order.
        tasks: as `meta_step`.
        buffers: {name: tensor} BatchNorm statistics to use instead of the module's (`batch_norm="frozen"` or
            `"per_step"`); other buffers are accepted when they equal the module's.
        inner_lr: as `meta_step`; its learnable tensors get gradients only with `return_aux=True`.
        steps: as `meta_step`.
        order: as `meta_step`.
        loss: as `meta_step`.
        inner_params: names or prefixes among `params`, or a predicate `(name, tensor) -> bool`: the
            parameters adapted in the inner loop (default: every one in `params`).
        backend: as `meta_step`.
        batch_norm: as `meta_step`; running statistics are never updated here.
        implicit_lambda: as `meta_step`.
        cg_steps: as `meta_step`.
        inner_solver: as `meta_step`.
        check_finite: as `meta_step`.
        task_chunk: as `meta_step`.
        step_weights: as `meta_step`.
        precision: as `meta_step`.
        strict: require a tensor for every parameter of the model.
        return_aux: also return an `Aux` (the `MetaResult`, with the query pass at θ, and the gradients of
            the learnable tensors of `inner_lr`).

    Returns:
        `(meta_loss, grads)`, or `(meta_loss, grads, aux)` with `return_aux`: meta_loss a 0-dim tensor, grads
        in the structure of `params` (a dict with its keys, or a sequence in its order), fresh tensors with
        no autograd history.

    Raises:
        ValueError, TypeError: a bad argument (the message names it).
        RuntimeError: called under `torch.autocast`.
        MemoryError, NonFiniteError, BackendUnavailable: as `meta_step`.
    """
    model = unwrap_model(model)
    named = _named(model, params, strict)
    layout, theta = _bound_layout(model, named, inner_params)
    out, lr_grads, _, _ = run_meta_step(
        model,
        layout,
        tasks,
        inner_lr=inner_lr,
        steps=steps,
        order=order,
        loss=loss,
        inner_params=None,
        backend=backend,
        batch_norm=batch_norm,
        implicit_lambda=implicit_lambda,
        cg_steps=cg_steps,
        inner_solver=inner_solver,
        evaluate_before=return_aux,
        check_finite=check_finite,
        task_chunk=task_chunk,
        step_weights=step_weights,
        precision=precision,
        shared_grad=any(n in named.tensors for n in layout.shared.names),
        lr_grad=return_aux,
        norm_buffers=_norm_buffers(model, buffers),
        what="fastmaml.func.meta_grad",
        theta=theta,
    )
    flat = dict(layout.adapted.unflatten(out.d_a))
    if out.d_s is not None:
        flat.update(layout.shared.unflatten(out.d_s))
    grads = {n: flat[n].clone() if n in flat else torch.zeros_like(t) for n, t in named.tensors.items()}
    meta_loss = out.meta_loss.detach().clone()
    if not return_aux:
        return meta_loss, named.rebuild(grads)
    lr = _mirror(inner_lr, {id(leaf): g for leaf, g in lr_grads}) if learnable_leaves(inner_lr) else None
    return meta_loss, named.rebuild(grads), Aux(as_result(out), lr)


@outside_compile(_COMPILE_REASON.format("func.adapt"))
def adapt(
    model: nn.Module,
    params: ParamsLike,
    support: Tuple[torch.Tensor, torch.Tensor],
    *,
    buffers: Optional[Mapping[str, torch.Tensor]] = None,
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
    strict: bool = False,
):
    """The adapted parameters of every task, differentiable w.r.t. `params` (and learnable `inner_lr`)
    through the exact reverse sweep.

    Run the model with them per task with `fastmaml.func.forward(model, adapted, x)` (BatchNorm as in the
    inner loop) or, for models without BatchNorm, `torch.func.vmap(lambda p, x:
    torch.func.functional_call(model, p, (x,)))(adapted, x)`. Works under `torch.func.grad`, `vjp`,
    `jacrev` and `vmap` (one inner loop per vmapped slice); a gradient of a gradient (`create_graph=True`,
    nested `torch.func.grad`) runs the backward as an unrolled autograd graph (orders "second" and
    "checkpoint").

    Args:
        model: the `nn.Module` that defines the computation.
        params: as `meta_grad`.
        support: `(support_x [T, Ns, *in], support_y [T, Ns, *out])`.
        buffers: as `meta_grad`.
        inner_lr: as `meta_step`.
        steps: as `meta_step`.
        order: as `meta_step`.
        loss: as `meta_step`.
        inner_params: as `meta_grad`.
        backend: as `meta_step`.
        batch_norm: as `meta_step`; running statistics are never updated here.
        implicit_lambda: as `meta_step`.
        cg_steps: as `meta_step`.
        inner_solver: as `meta_step`.
        check_finite: as `meta_step`.
        strict: as `meta_grad`.

    Returns:
        The adapted parameters `[T, *shape]` in the structure of `params` (the ones that do not adapt, with
        `inner_params`, broadcast over the tasks).

    Raises:
        ValueError, TypeError, RuntimeError, NonFiniteError, BackendUnavailable: as `meta_grad`.
    """
    return _adapted(
        model,
        params,
        support,
        buffers=buffers,
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
        strict=strict,
    )[0]


def _adapted(model, params, support, *, buffers, inner_params, strict, **kwargs):
    model = unwrap_model(model)
    named = _named(model, params, strict)
    layout, theta = _bound_layout(model, named, inner_params)
    if not isinstance(support, (tuple, list)) or len(support) != 2:
        raise TypeError("support: expected a pair (support_x [T, Ns, *in], support_y [T, Ns, *out])")
    sx, sy = support
    adapted, _ = run_adapt(
        model,
        layout,
        sx,
        sy,
        inner_params=None,
        norm_buffers=_norm_buffers(model, buffers),
        what="fastmaml.func.adapt",
        theta=theta,
        **kwargs,
    )
    per_task = adapted.params
    return named.rebuild({n: per_task[n] for n in named.tensors}), adapted


@outside_compile(_COMPILE_REASON.format("func.forward"))
def forward(
    model: nn.Module,
    params: ParamsLike,
    x: torch.Tensor,
    *,
    buffers: Optional[Mapping[str, torch.Tensor]] = None,
    batch_norm: str = "batch",
    step: int = 0,
    backend: Optional[str] = "auto",
    strict: bool = False,
) -> torch.Tensor:
    """The model on `x [T, N, *in]` with per-task parameters, BatchNorm as in the inner loop.

    Args:
        model: the `nn.Module` that defines the computation.
        params: as `meta_grad`, each tensor `[T, *shape]` (per task, e.g. from `adapt`) or `[*shape]` (the
            same for every task).
        x: `[T, N, *in]`.
        buffers: as `meta_grad`.
        batch_norm: "batch" (each task's batch statistics), "frozen" or "per_step" (statistics of `step`).
        step: the inner step whose per-step statistics `batch_norm="per_step"` uses (the query pass after K
            steps: K).
        backend: as `meta_step`.
        strict: as `meta_grad`.

    Returns:
        `[T, N, *out]`, differentiable w.r.t. `params` with ordinary autograd.

    Raises:
        ValueError, TypeError: a bad argument.
        RuntimeError: called under `torch.autocast`.
    """
    model = unwrap_model(model)
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x: expected a tensor [T, N, *in]")
    T = x.shape[0]
    own = dict(model.named_parameters())
    if isinstance(params, Mapping):
        per_task = {n: t if t.dim() > own[n].dim() else t.expand(T, *t.shape) for n, t in params.items() if n in own}
        heads = {n: t[0] for n, t in per_task.items()}
    elif isinstance(params, (tuple, list)):
        names = list(own)
        per_task = {n: t if t.dim() > own[n].dim() else t.expand(T, *t.shape) for n, t in zip(names, params)}
        heads = {n: t[0] for n, t in per_task.items()}
    else:
        raise TypeError(f"params: expected a dict or a sequence of tensors, got {type(params).__name__}")
    named = _named(model, heads if isinstance(params, Mapping) else [heads[n] for n in own], strict)
    for n, t in per_task.items():
        if t.shape[0] != T:
            raise ValueError(f"params[{n!r}]: {t.shape[0]} tasks, but x has {T}")
    layout = ParamLayout(model, lambda n, p: n in named.tensors)
    refuse_autocast(x.device, "fastmaml.func.forward")
    program = program_for(model, layout, resolve_loss("mse"))
    phi = torch.cat([per_task[n].reshape(T, -1) for n in layout.adapted.names], dim=1)
    shared = [own[n].detach() for n in layout.shared.names]
    theta_s = torch.cat([t.reshape(-1) for t in shared]) if shared else phi.new_zeros(0)
    norm = NormPlan(model, batch_norm, buffers=_norm_buffers(model, buffers))
    return program.forward(resolve(backend, x.device), phi, theta_s, x, bn_stats=norm.stats(step))
