"""`TaskBatch`: a meta-batch of T tasks, each with a support and a query set."""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch


class TaskBatch(NamedTuple):
    """A meta-batch of T tasks, tensors with the task dimension first.

    Attributes:
        support_x: `[T, Ns, *in]`.
        support_y: `[T, Ns, *out]` (class indices `[T, Ns]` for cross-entropy).
        query_x: `[T, Nq, *in]`.
        query_y: `[T, Nq, *out]` (class indices `[T, Nq]`).
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, *args, **kwargs) -> "TaskBatch":
        """The four tensors moved with `Tensor.to(*args, **kwargs)`; a dtype applies to the inputs and to
        floating-point targets only (integer class indices keep int64)."""

        def move(t):
            if t.is_floating_point():
                return t.to(*args, **kwargs)
            dtype_free = [a for a in args if not isinstance(a, torch.dtype)]
            return t.to(*dtype_free, **{k: v for k, v in kwargs.items() if k != "dtype"})

        return TaskBatch(*(move(t) for t in self))


TasksLike = Union[TaskBatch, Sequence[torch.Tensor], Sequence[Sequence[torch.Tensor]]]
_FIELDS = TaskBatch._fields


def as_task_batch(tasks: TasksLike) -> TaskBatch:
    """Accepts a TaskBatch, a 4-tuple of `[T, ...]` tensors or a list of per-task 4-tuples."""
    if isinstance(tasks, TaskBatch):
        batch = tasks
    elif isinstance(tasks, (tuple, list)) and len(tasks) == 4 and all(isinstance(t, torch.Tensor) for t in tasks):
        batch = TaskBatch(*tasks)
    elif isinstance(tasks, (tuple, list)) and len(tasks) > 0 and all(isinstance(t, (tuple, list)) for t in tasks):
        for i, t in enumerate(tasks):
            if len(t) != 4 or not all(isinstance(x, torch.Tensor) for x in t):
                raise TypeError(
                    f"tasks[{i}]: expected a 4-tuple of tensors (support_x, support_y, query_x, query_y), "
                    f"got {type(t).__name__} of length {len(t)}"
                )
        stacked = []
        for k, field in enumerate(_FIELDS):
            shapes = {tuple(t[k].shape) for t in tasks}
            if len(shapes) > 1:
                raise ValueError(
                    f"tasks: {field} has different shapes across tasks {sorted(shapes)}; "
                    "tasks stacked into one batch must have the same shot counts and input shapes"
                )
            stacked.append(torch.stack([t[k] for t in tasks]))
        batch = TaskBatch(*stacked)
    else:
        raise TypeError(
            "tasks: expected a TaskBatch, a 4-tuple of tensors [T, N, ...] "
            "(support_x, support_y, query_x, query_y) or a non-empty list of per-task 4-tuples; "
            f"got {type(tasks).__name__}"
        )
    validate(batch)
    return batch


def validate(batch: TaskBatch, *, classification: bool | None = None) -> None:
    """Checks task counts, shot counts, dtypes and devices; raises ValueError/TypeError naming the field."""
    for field, t in zip(_FIELDS, batch):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tasks.{field}: expected a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(
                f"tasks.{field}: expected at least 2 dims [T, N, ...] (tasks first), got shape {tuple(t.shape)}"
            )
    counts = {f: t.shape[0] for f, t in zip(_FIELDS, batch)}
    if len(set(counts.values())) != 1:
        raise ValueError(f"tasks: the four tensors must have the same number of tasks T (dim 0); got {counts}")
    if counts["support_x"] == 0:
        raise ValueError("tasks: the batch has T=0 tasks; expected at least one")
    sx, sy, qx, qy = batch
    for x, y, name in ((sx, sy, "support"), (qx, qy, "query")):
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"tasks: {name}_x has {x.shape[1]} examples per task but {name}_y has {y.shape[1]} "
                f"(shapes {tuple(x.shape)} and {tuple(y.shape)})"
            )
        if x.shape[1] == 0:
            raise ValueError(f"tasks: {name} set is empty (shape {tuple(x.shape)}); expected at least one example")
    if sx.shape[2:] != qx.shape[2:]:
        raise ValueError(
            f"tasks: support_x and query_x have different example shapes {tuple(sx.shape[2:])} and "
            f"{tuple(qx.shape[2:])}"
        )
    devices = {f: t.device for f, t in zip(_FIELDS, batch)}
    if len(set(devices.values())) != 1:
        raise ValueError(f"tasks: all four tensors must be on one device; got {devices}")
    if sx.dtype != qx.dtype:
        raise TypeError(f"tasks: support_x is {sx.dtype} but query_x is {qx.dtype}; expected the same dtype")
    if sy.dtype != qy.dtype:
        raise TypeError(f"tasks: support_y is {sy.dtype} but query_y is {qy.dtype}; expected the same dtype")
