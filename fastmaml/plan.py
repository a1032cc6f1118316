"""`MetaStep`: a meta-step planned once for one model, one task shape and one set of options, then run on
every batch of that shape; and the small cache of plans through which `meta_step` runs.

What a plan keeps (built by `calls.prepare_meta_step`, the validation `meta_step` runs): the parameter layout,
the resolved loss and op table, the program and its engines with their task chunks, the step weights, the
α_j of a constant inner learning rate, one task's state size. What a call still does: check the task batch
against the planned shapes (compare, no validation), check the model with a `ModelGuard` (a few attribute
reads per module and parameter), refuse autocast, check class indices (cross-entropy), flatten θ, expand
learnable inner rates, run the engine, accumulate into `.grad`. It computes exactly what `meta_step` does:
both run `calls.execute_meta_step` / `calls.finish` on a `calls.StepSetup`.

A plan follows a model that changed (a parameter replaced, resized or moved to another dtype or device, a
module added or removed, an attribute or training flag changed, `requires_grad` toggled) by planning
again, as `meta_step` would on that call, and says what changed (`MetaStep.last_change`); where planning
again fails (e.g. the model moved to another dtype or device than the planned tasks), it raises the
error of that validation, prefixed with what changed. A task batch of other shapes, dtypes or devices
than planned raises an error naming the field.

`meta_step` keeps up to `MAX_PLANS_PER_MODEL` plans per model (least recently used first out), keyed by
the task batch's shapes, dtypes and devices, the model's training flag and the options; the cache holds
models weakly (a plan holds no module: its guard and BatchNorm layers are weak references)."""

from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .batchnorm import NormPlan
from .calls import (
    _COMPILE_REASON,
    StepSetup,
    apply_meta_step,
    as_result,
    constant_inner_lr,
    execute_meta_step,
    outside_compile,
    prepare_meta_step,
    refuse_autocast,
    unplanned_meta_step,
    unwrap_model,
)
from .graphs import (
    CapturedStep,
    CaptureError,
    GraphChoice,
    check_capturable,
    check_cuda_graph_option,
    why_not_capturable,
)
from .inner_lr import learnable_leaves
from .layout import BoundLayout, InnerParams
from .losses import LossLike, resolve_loss
from .ops import resolve
from .programs import ModelGuard
from .result import MetaResult
from .tasks import TaskBatch, TasksLike, as_task_batch

MAX_PLANS_PER_MODEL = 8
_FIELDS = TaskBatch._fields
_PLANS: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class _Planned:
    """One plan of a `MetaStep` (replaced as a whole when the model changes)."""

    __slots__ = ("setup", "guard", "bound", "bn_layers", "norm", "bn_mode", "record")

    def __init__(self, setup: StepSetup, guard: ModelGuard, norm: NormPlan):
        self.setup = setup
        self.guard = guard
        self.bound = BoundLayout(setup.layout)
        self.bn_mode, self.record = norm.mode, norm.record
        self.bn_layers = tuple(weakref.ref(m) for m in norm.layers)
        self.norm = norm if not norm.layers else None  # reused by every call of a model without BatchNorm

    def norm_plan(self) -> NormPlan:
        if self.norm is not None:
            return self.norm
        return NormPlan.of_layers(self.bn_mode, [r() for r in self.bn_layers], self.record)


class MetaStep:
    """A meta-step planned once for `model`, the shapes of `example_tasks` and the options; `plan(tasks)` then
    does exactly what `meta_step(model, tasks, **options)` does (the same returned values, `.grad`
    accumulation, BatchNorm statistics and `NonFiniteError`, bit for bit) without validating and planning
    again.

    The plan keeps what depends only on shapes and options (the parameter layout, the program and its
    engines, the task chunks, the op table, the resolved options, the α_j of a float `inner_lr`); every call
    checks the tasks against the planned shapes and the model against what the plan was built on (a few
    attribute reads). A changed model (a parameter replaced, resized or moved to another dtype or device, a
    module added or removed, an attribute, training flag or `requires_grad` changed) is planned again, as
    `meta_step` would, and `last_change` says what changed; where that fails (the model now disagrees with
    the planned tasks) the error says what changed. Tasks of other shapes, dtypes or devices raise: build
    another plan for them (`meta_step` keeps one per shape).

    Options are read once, when the plan is built: a float or a list or dict of floats as `inner_lr`, and the
    `FASTMAML_BACKEND` environment variable behind `backend="auto"`. Tensors in `inner_lr` (learned or
    scheduled rates) are read at every call.

    The other keyword arguments (`inner_lr`, `steps`, `order`, `loss`, `inner_params`, `backend`,
    `batch_norm`, `implicit_lambda`, `cg_steps`, `inner_solver`, `evaluate_before`, `check_finite`,
    `task_chunk`, `step_weights`, `update_running_stats`, `precision`) are those of `meta_step`.

    Args:
        model: any `nn.Module`, as for `meta_step`. The plan holds it weakly.
        example_tasks: a task batch of the shapes, dtypes and device the plan runs (its values are not read).
        cuda_graph: True: capture the meta-step in a CUDA graph and replay it (CUDA only; see `fastmaml.graphs`;
            not yet run on a GPU). Not with `inner_solver="backtracking"`, whose steps the host chooses.
            "auto": time the first calls uncaptured and captured and keep the faster (`graph_choice`); off
            CUDA or with backtracking, uncaptured. False (default): uncaptured.

    Attributes:
        rebuilds: how many times the plan was built again because the model changed.
        last_change: what changed the last time (None before any).
        graph_choice: with `cuda_graph="auto"`, the `fastmaml.graphs.GraphChoice` (`decision`: "captured",
            "uncaptured" or None while measuring; `reason`: the times or what rules capture out); else None.

    Raises:
        ValueError, TypeError, RuntimeError, MemoryError, BackendUnavailable: as `meta_step`, when the plan
            is built (bad options, tasks that do not fit the model) and when called (tasks of other shapes
            than planned, a model that changed beyond what the plan can follow).
        NonFiniteError: when called, as `meta_step`.
    """

    def __init__(
        self,
        model: nn.Module,
        example_tasks: TasksLike,
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
        cuda_graph: Union[bool, str] = False,
    ):
        options = dict(
            steps=steps,
            order=order,
            loss=loss,
            backend=backend,
            batch_norm=batch_norm,
            implicit_lambda=implicit_lambda,
            cg_steps=cg_steps,
            inner_solver=inner_solver,
            evaluate_before=evaluate_before,
            check_finite=check_finite,
            task_chunk=task_chunk,
            step_weights=step_weights,
            precision=precision,
        )
        check_cuda_graph_option(cuda_graph)
        batch = as_task_batch(example_tasks)
        device = batch.support_x.device
        if cuda_graph is True:
            check_capturable(device, inner_solver)
        self._init(unwrap_model(model), batch, inner_lr, inner_params, options)
        self.update_running_stats = bool(update_running_stats)
        if cuda_graph == "auto":
            why = why_not_capturable(device, inner_solver)
            self.graph_choice = GraphChoice.decided("uncaptured", why) if why else _measuring(device)
        if cuda_graph is True or (self.graph_choice is not None and self.graph_choice.decision is None):
            self._graph = CapturedStep(device)
        self._refuse_capturing_masks()

    def _refuse_capturing_masks(self) -> None:
        """A program with dropout in training mode is not captured: a graph would replay one call's masks at
        every call (cuda_graph=True raises; "auto" decides "uncaptured")."""
        if self._graph is None or not self._plan.setup.program.draws_masks:
            return
        why = (
            "the model has dropout in training mode, whose masks a CUDA graph would replay unchanged at every "
            "call; use cuda_graph=False, or call .eval() on the dropout layers"
        )
        if self.graph_choice is None:
            raise ValueError(f"{self._what}: cuda_graph=True: {why}")
        self.graph_choice = GraphChoice.decided("uncaptured", why)
        self._graph = None

    def _init(self, model: nn.Module, batch: TaskBatch, inner_lr, inner_params, options: dict, what="MetaStep"):
        self._what = what
        self._options = options
        self._constant_lr = constant_inner_lr(inner_lr)
        self._inner_lr = copy.deepcopy(inner_lr) if self._constant_lr else inner_lr
        self._inner_params = inner_params
        self._signature = tuple((t.shape, t.dtype, t.device) for t in batch)
        self._model = weakref.ref(model)
        self.rebuilds = 0
        self.last_change: Optional[str] = None
        self._predicate = None
        self._graph: Optional[CapturedStep] = None
        self.graph_choice: Optional[GraphChoice] = None
        self._plan = self._build(model, batch, self._inner_lr, inner_params)

    def _build(self, model: nn.Module, batch: TaskBatch, inner_lr, inner_params) -> _Planned:
        setup, norm, _, _ = prepare_meta_step(
            model,
            None,
            batch,
            inner_lr=inner_lr,
            inner_params=inner_params,
            shared_grad=None,
            lr_grad=True,
            what=self._what,
            **self._options,
        )
        return _Planned(setup, ModelGuard(model, data_ptrs=True), norm)

    @property
    def model(self) -> Optional[nn.Module]:
        """The model (None once it no longer exists)."""
        return self._model()

    @property
    def engine(self) -> str:
        """Which engine runs the step: "mlp op" (the whole-inner-loop MLP op) or the program's name."""
        return self._plan.setup.engines.name

    @outside_compile(_COMPILE_REASON.format("MetaStep.__call__"))
    def __call__(self, tasks: TasksLike) -> MetaResult:
        """One meta-step on `tasks` (the planned shapes), accumulated into `.grad`; returns the `MetaResult`."""
        return self._run(self._tasks(tasks), self._inner_lr, self._inner_params, self.update_running_stats)

    def _tasks(self, tasks) -> TaskBatch:
        """`tasks` as a `TaskBatch` of the planned shapes, dtypes and devices, or an error naming the field."""
        if isinstance(tasks, TaskBatch):
            batch = tasks
        elif isinstance(tasks, (tuple, list)) and len(tasks) == 4 and all(isinstance(t, torch.Tensor) for t in tasks):
            batch = TaskBatch(*tasks)
        else:
            batch = as_task_batch(tasks)
        for field, t, (shape, dtype, device) in zip(_FIELDS, batch, self._signature):
            if not isinstance(t, torch.Tensor):
                return as_task_batch(batch)  # raises the TypeError naming the field
            if t.shape != shape or t.dtype != dtype or t.device != device:
                raise _mismatch(self._what, field, t, shape, dtype, device)
        return batch

    def _run(self, batch: TaskBatch, inner_lr, inner_params, update_running_stats: bool) -> MetaResult:
        model = self._model()
        if model is None:
            raise ReferenceError(f"{self._what}: the model this plan was built for no longer exists")
        plan = self._plan
        if not plan.guard._same(model):
            plan = self._rebuild(model, batch, inner_lr, inner_params, plan.guard.describe(model))
        elif not self._constant_lr and bool(learnable_leaves(inner_lr)) != plan.setup.learnable:
            plan = self._rebuild(
                model, batch, inner_lr, inner_params, "inner_lr: a rate started or stopped requiring grad"
            )
        setup = plan.setup
        x = batch.support_x
        refuse_autocast(x.device, self._what)
        if setup.loss.checks_values:
            setup.loss.check_targets(batch.support_y, "tasks.support_y", like=x)
            setup.loss.check_targets(batch.query_y, "tasks.query_y", like=x)
        args = (model, plan, batch, inner_lr, update_running_stats)
        choice, graph = self.graph_choice, self._graph
        if graph is None:
            return self._uncaptured(*args)
        if choice is None:
            return graph.run(*args)
        if choice.mode() == "uncaptured":
            return choice.run("uncaptured", lambda: self._uncaptured(*args))
        try:
            return choice.run("captured", lambda: graph.run(*args))
        except CaptureError as exc:
            choice.fail(exc)
            return self._uncaptured(*args)
        finally:
            if choice.decision == "uncaptured":
                self._graph = None  # its graph and memory pool go with it

    def _uncaptured(self, model, plan: _Planned, batch: TaskBatch, inner_lr, update_running_stats: bool) -> MetaResult:
        setup = plan.setup
        x = batch.support_x
        norm = plan.norm_plan()
        out, lr_grads = execute_meta_step(setup, model, batch, norm, inner_lr, thetas=plan.bound.theta())
        apply_meta_step(model, setup, norm, out, lr_grads, x, update_running_stats, plan.bound.accumulate)
        return as_result(out)

    def _rebuild(self, model, batch, inner_lr, inner_params, why: str) -> _Planned:
        try:
            plan = self._build(model, batch, inner_lr, inner_params)
        except (ValueError, TypeError) as exc:
            if type(exc) not in (ValueError, TypeError):
                raise
            raise type(exc)(f"{self._what}: the plan no longer fits ({why}) and planning again failed: {exc}") from exc
        self.rebuilds += 1
        self.last_change = why
        self._plan = plan
        if self._graph is not None:
            self._graph.reset()
            if self.graph_choice is not None and self.graph_choice.decision is None:
                self.graph_choice = _measuring(self._signature[0][2])  # what was timed ran another plan
        self._refuse_capturing_masks()
        return plan

    def __repr__(self) -> str:
        shapes = ", ".join(f"{f}={tuple(s)}" for f, (s, _, _) in zip(_FIELDS, self._signature))
        o = self._options
        return f"MetaStep({shapes}, order={o['order']!r}, steps={o['steps']}, engine={self.engine!r})"


def _measuring(device: torch.device) -> GraphChoice:
    return GraphChoice(sync=lambda: torch.cuda.synchronize(device))


def _mismatch(what: str, field: str, t: torch.Tensor, shape, dtype, device) -> Exception:
    planned = f"{tuple(shape)} {str(dtype).replace('torch.', '')} on {device}"
    got = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
    cls = TypeError if t.dtype != dtype else ValueError
    return cls(
        f"tasks.{field}: {got}, but the plan was built for {planned}; a {what} runs the task shapes, dtypes and "
        "device it was built for: build another plan for these tasks (fastmaml.meta_step keeps one per shape)"
    )


# ---- the plans of `meta_step` ---------------------------------------------------------------------------


class _Uncacheable(Exception):
    pass


def _scalar(v):
    """A hashable key of a plain option value that keeps its type (steps=True is not steps=1)."""
    hash(v)
    return (type(v), v)


def _lr_key(inner_lr):
    if constant_inner_lr(inner_lr):
        if isinstance(inner_lr, (list, tuple)):
            return ("steps", tuple(_lr_key(lr)[1] for lr in inner_lr))
        if isinstance(inner_lr, dict):
            return ("const", ("dict", tuple((k, _scalar(v)) for k, v in inner_lr.items())))
        return ("const", _scalar(inner_lr))
    return ("tensors", bool(learnable_leaves(inner_lr)))  # expanded at every call: only learnability is planned


def _inner_params_key(inner_params):
    if inner_params is None or isinstance(inner_params, str):
        return inner_params
    if isinstance(inner_params, (list, tuple)) and all(isinstance(n, str) for n in inner_params):
        return ("names", tuple(inner_params))
    if callable(inner_params):
        try:
            weakref.ref(inner_params)
        except TypeError:
            raise _Uncacheable from None
        return ("predicate", id(inner_params))  # checked against the plan's weak reference on a hit
    raise _Uncacheable


def _key(model: nn.Module, batch, o: dict) -> tuple:
    """The cache key of a `meta_step` call (raises when the call is not cacheable or its options are bad: the
    unplanned path then raises the error of `meta_step`'s validation, in its order)."""
    sig = tuple((t.shape, t.dtype, t.device) for t in batch)
    weights = o["step_weights"]
    if weights is not None:
        if isinstance(weights, torch.Tensor):
            raise _Uncacheable  # read at every call, like the unplanned path
        weights = tuple(_scalar(w) for w in weights)
    return (
        sig,
        model.training,
        resolve(o["backend"], batch[0].device),  # the op table: FASTMAML_BACKEND and the registry's state
        resolve_loss(o["loss"]),
        _lr_key(o["inner_lr"]),
        _inner_params_key(o["inner_params"]),
        weights,
        _scalar(o["steps"]),
        _scalar(o["order"]),
        _scalar(o["batch_norm"]),
        _scalar(o["implicit_lambda"]),
        _scalar(o["cg_steps"]),
        _scalar(o["inner_solver"]),
        _scalar(o["evaluate_before"]),
        _scalar(o["check_finite"]),
        _scalar(o["task_chunk"]),
        _scalar(o["precision"]),
    )


def _fast_batch(tasks):
    if isinstance(tasks, TaskBatch):
        return tasks
    if isinstance(tasks, (tuple, list)) and len(tasks) == 4 and all(isinstance(t, torch.Tensor) for t in tasks):
        return TaskBatch(*tasks)
    return None


def planned_meta_step(model: nn.Module, tasks, *, update_running_stats: bool, **options) -> MetaResult:
    """`meta_step` through the model's cached plan for this task shape and these options (built on a miss,
    by `MetaStep`'s validation, which is `meta_step`'s); calls that cannot be keyed run unplanned."""
    batch = _fast_batch(tasks)
    try:
        if batch is None:
            raise _Uncacheable
        key = _key(model, batch, options)
        hash(key)
    except Exception:  # noqa: BLE001 - a bad or unkeyable option: the unplanned path validates and raises
        return unplanned_meta_step(model, tasks, update_running_stats=update_running_stats, **options)
    inner_lr, inner_params = options["inner_lr"], options["inner_params"]
    with _LOCK:
        per_model = _PLANS.get(model)
        plan = None if per_model is None else per_model.get(key)
        if plan is not None:
            per_model.move_to_end(key)
    if plan is not None and plan._predicate is not None and plan._predicate() is not inner_params:
        plan = None  # another predicate at a reused id
    if plan is None:
        plan = _cached_plan(model, batch, options)
        with _LOCK:
            per_model = _PLANS.get(model)
            if per_model is None:
                per_model = _PLANS[model] = OrderedDict()
            per_model[key] = plan
            per_model.move_to_end(key)
            while len(per_model) > MAX_PLANS_PER_MODEL:
                per_model.popitem(last=False)
    return plan._run(batch, inner_lr, inner_params, update_running_stats)


def _cached_plan(model: nn.Module, batch: TaskBatch, options: dict) -> MetaStep:
    """A plan for the cache: it keeps neither the call's tensors of `inner_lr` (passed at every call) nor its
    `inner_params` predicate (a weak reference, to tell it from another at the same id)."""
    plan = MetaStep.__new__(MetaStep)
    o = dict(options)
    inner_lr, inner_params = o.pop("inner_lr"), o.pop("inner_params")
    o.pop("update_running_stats", None)
    plan._init(model, batch, inner_lr, inner_params, o, what="meta_step")
    if not plan._constant_lr:
        plan._inner_lr = None
    if callable(inner_params) and not isinstance(inner_params, (str, list, tuple)):
        plan._predicate = weakref.ref(inner_params)
        plan._inner_params = None
    plan.update_running_stats = True
    return plan


def cached_plans(model: nn.Module) -> int:
    """How many plans `meta_step` keeps for `model` (for tests)."""
    with _LOCK:
        return len(_PLANS.get(model, ()))


def clear_plans() -> None:
    """Drops every cached plan (for tests and benchmarks)."""
    with _LOCK:
        _PLANS.clear()


__all__ = ["MAX_PLANS_PER_MODEL", "MetaStep", "cached_plans", "clear_plans", "planned_meta_step"]
