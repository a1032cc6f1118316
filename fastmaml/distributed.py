"""Data-parallel meta-training with `torch.distributed`: the task is MAML's unit of parallelism.

Every rank draws the same meta-batch (the same seeded episode stream), keeps its contiguous `shard`,
runs `fastmaml.meta_step` on it (the mean over *its* tasks), then `all_reduce_grads` combines the
meta-gradients in one flat all-reduce, weighting each rank by its task count, so every rank holds the
meta-gradient of the whole meta-batch and takes the same optimizer step::

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")   # under torchrun
    tasks = sample_meta_batch(generator)                  # the same T tasks on every rank
    mine = fastmaml.distributed.shard(tasks)              # this rank's T_r of them (T_r differ by <= 1)
    opt.zero_grad()
    result = fastmaml.meta_step(model, mine, inner_lr=0.4, steps=1, loss="cross_entropy")
    loss, = fastmaml.distributed.all_reduce_grads(model, num_tasks=fastmaml.distributed.task_count(mine),
                                                  values=[result.meta_loss],
                                                  buffers=fastmaml.distributed.batchnorm_statistics(model))
    opt.step()                                            # identical on every rank

`buffers=batchnorm_statistics(model)` keeps the BatchNorm statistics that `meta_step` updates from this
rank's tasks (running statistics; MAML++'s per-step ones) the same on every rank: those of the whole
meta-batch. A model without BatchNorm has none, and the argument changes nothing.

Why not `DistributedDataParallel`: DDP reduces gradients from autograd hooks while `backward()` runs, in
buckets, to overlap communication with the backward pass. `meta_step` writes the whole meta-gradient
into `.grad` at the end of its reverse sweep (no autograd backward over the parameters), so DDP's hooks
never fire and there is nothing left to overlap: one flat all-reduce of the finished gradient is the
fewest collectives and bytes, and needs no wrapper around the model (`meta_step` sees the plain module).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn


def share_sizes(num_tasks: int, world_size: int) -> List[int]:
    """The task count of each rank's share of `num_tasks` tasks: contiguous shares whose sizes differ by at
    most one, the first `num_tasks % world_size` ranks taking one more (a share may be 0 when
    `num_tasks < world_size`; `shard` refuses that)."""
    if world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    if num_tasks < 0:
        raise ValueError(f"num_tasks: expected a non-negative int, got {num_tasks!r}")
    per, extra = divmod(int(num_tasks), int(world_size))
    return [per + (1 if r < extra else 0) for r in range(world_size)]


def share_range(num_tasks: int, rank: int, world_size: int) -> Tuple[int, int]:
    """`(start, stop)`: the tasks `start:stop` of `num_tasks` that rank `rank` of `world_size` holds."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank!r}")
    sizes = share_sizes(num_tasks, world_size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def task_count(tasks) -> int:
    """The number of tasks T of a `TaskBatch`, a 4-tuple of `[T, ...]` tensors or a list of per-task 4-tuples."""
    if _is_task_list(tasks):
        return len(tasks)
    if isinstance(tasks, (tuple, list)) and len(tasks) == 4 and all(isinstance(t, torch.Tensor) for t in tasks):
        return int(tasks[0].shape[0])
    raise TypeError(
        "tasks: expected a TaskBatch, a 4-tuple of tensors [T, N, ...] or a non-empty list of "
        f"per-task 4-tuples; got {type(tasks).__name__}"
    )


def _is_task_list(tasks) -> bool:
    """A list (or tuple) of per-task 4-tuples, as `meta_step` takes (not a 4-tuple of `[T, ...]` tensors)."""
    return (
        isinstance(tasks, (tuple, list))
        and not hasattr(tasks, "_fields")
        and len(tasks) > 0
        and not all(isinstance(t, torch.Tensor) for t in tasks)
        and all(isinstance(t, (tuple, list)) for t in tasks)
    )


def shard(tasks, rank: Optional[int] = None, world_size: Optional[int] = None):
    """This rank's contiguous share of a meta-batch.

    Shares are contiguous and their sizes differ by at most one (`share_sizes`): 10 tasks over 4 ranks
    are 3, 3, 2, 2. `task_count(share)` is this rank's T_r, what `all_reduce_grads(num_tasks=...)` weights by.

    Args:
        tasks: a `TaskBatch`, a 4-tuple of `[T, ...]` tensors or a list of per-task 4-tuples.
        rank: this rank (default: `torch.distributed.get_rank()`).
        world_size: the number of ranks (default: `torch.distributed.get_world_size()`).

    Returns:
        The same type: tensors `[T_r, ...]`, or a list of T_r per-task tuples.

    Raises:
        ValueError: fewer tasks than ranks (every rank needs at least one task), or a bad rank.
    """
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    T = task_count(tasks)
    if T < world_size:
        raise ValueError(
            f"tasks: T={T} tasks cannot be shared by {world_size} ranks (every rank needs at least "
            "one task); use a meta-batch of at least the world size"
        )
    start, stop = share_range(T, rank, world_size)
    if _is_task_list(tasks):
        return tasks[start:stop]
    parts = (t[start:stop] for t in tasks)
    return type(tasks)(*parts) if hasattr(tasks, "_fields") else type(tasks)(parts)


STATISTICS = ("running_mean", "running_var", "step_running_mean", "step_running_var")


def batchnorm_statistics(model: nn.Module) -> List[torch.Tensor]:
    """The BatchNorm statistics that `meta_step` and `adapt` update in place, for `all_reduce_grads(buffers=...)`:
    `running_mean` and `running_var` (`batch_norm="batch"`, `update_running_stats=True`) and MAML++'s
    `step_running_mean` and `step_running_var` (`batch_norm="per_step"`). Each update moves them linearly
    towards statistics of this rank's tasks from the same values on every rank, so the weighted mean over ranks
    is the update of the whole meta-batch (`num_batches_tracked` advances alike on every rank)."""
    return [b for name, b in model.named_buffers() if name.rpartition(".")[2] in STATISTICS]


def _leaves(obj, out: List[torch.Tensor]) -> None:
    """The tensors of `obj`: a tensor, an `nn.Module` (its parameters), a dict or a sequence of them (the
    forms `meta_step`'s `inner_lr` takes: per-step lists of per-layer dicts)."""
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, nn.Module):
        out.extend(obj.parameters())
    elif isinstance(obj, dict):
        for value in obj.values():
            _leaves(value, out)
    elif isinstance(obj, (list, tuple)) or hasattr(obj, "__iter__") and not isinstance(obj, (str, bytes)):
        for value in obj:
            _leaves(value, out)
    elif obj is not None and not isinstance(obj, (int, float)):
        raise TypeError(f"extra: expected tensors, modules, dicts or sequences of them, got {type(obj).__name__}")


def all_reduce_grads(
    model: Optional[nn.Module],
    extra: Any = (),
    *,
    num_tasks: Optional[int] = None,
    values: Optional[Sequence] = None,
    buffers: Iterable[torch.Tensor] = (),
    group=None,
) -> Optional[torch.Tensor]:
    """Combines the meta-gradients of the ranks into the meta-gradient of the whole meta-batch, in one flat
    all-reduce (one per device and dtype when the tensors mix them).

    `meta_step` on a rank's T_r tasks gives g_r, the gradient of the mean over *its* tasks. With
    `num_tasks=T_r`, every rank ends with sum_r (T_r / T) g_r, T = sum_r T_r: the gradient of the mean over
    all T tasks, for uneven shares too (each rank's g_r is scaled by T_r before a SUM all-reduce that also
    adds up the T_r, then divided by T). Without `num_tasks`, the plain mean over ranks (1/W) sum_r g_r,
    which is the same for equal shares. With one rank nothing changes (not even rounding).

    Args:
        model: the model whose parameters' `.grad` (written by `meta_step` on this rank's tasks) are combined
            (None: only `extra`). A tensor without a gradient on this rank counts as zero there; one without
            a gradient on every rank keeps `.grad = None`.
        extra: more tensors whose `.grad` is combined the same way: learnable inner learning rates (a tensor,
            a dict of them, MAML++'s per-step list of dicts: the `inner_lr` you passed), another module...
        num_tasks: this rank's task count T_r (`task_count(share)`); None: equal weights.
        values: numbers each rank computed as a mean over its tasks (meta-loss, accuracy...), combined with
            the same weights in the same collective and returned.
        buffers: tensors whose *values* are combined the same way, in place: the BatchNorm statistics
            that `meta_step` moved towards this rank's tasks' statistics (`batchnorm_statistics(model)`: the
            update is linear in them, so the combination is the update of the whole meta-batch).
        group: the process group (default: the world). Every tensor must be on a device its backend takes
            (CPU for gloo, this rank's GPU for NCCL).

    Returns:
        `values` combined (a 1-D tensor), or None without `values`.

    Raises:
        RuntimeError: torch.distributed is not initialized (or the collective failed: a rank died...).
        ValueError: `num_tasks` < 1.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "all_reduce_grads: torch.distributed is not initialized; call torch.distributed.init_process_group first"
        )
    if num_tasks is not None and (isinstance(num_tasks, bool) or int(num_tasks) != num_tasks or num_tasks < 1):
        raise ValueError(f"num_tasks: expected this rank's task count (an int >= 1), got {num_tasks!r}")
    tensors: List[torch.Tensor] = []
    if model is not None:
        tensors.extend(p for p in model.parameters() if p.requires_grad)
    _leaves(extra, tensors)
    seen, unique = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            unique.append(t)
    tensors = unique
    buffers = list(buffers)
    world = dist.get_world_size(group)
    if world == 1:
        return None if values is None else _as_values(values, tensors, buffers)

    # one flat buffer per (device, dtype): grads, then buffers; the first float32/float64 group also carries
    # [values..., weight, one presence flag per tensor]
    groups: Dict[Tuple[torch.device, torch.dtype], List[Tuple[str, torch.Tensor]]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(("grad", t))
    for b in buffers:
        groups.setdefault((b.device, b.dtype), []).append(("buffer", b))
    meta_key = next((k for k in groups if k[1] in (torch.float32, torch.float64)), None)
    if meta_key is None:
        device = tensors[0].device if tensors else buffers[0].device if buffers else _default_device(group)
        meta_key = (device, torch.float32)
        groups[meta_key] = []
    vals = None if values is None else _as_values(values, tensors, buffers).to(device=meta_key[0], dtype=meta_key[1])
    weight = 1.0 if num_tasks is None else float(num_tasks)

    reduced_meta = None
    for key, items in groups.items():
        parts = []
        for kind, t in items:
            if kind == "grad":
                parts.append(
                    t.grad.reshape(-1) if t.grad is not None else torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
                )
            else:
                parts.append(t.detach().reshape(-1))
        n = sum(p.numel() for p in parts)
        meta = []
        if key == meta_key:
            if vals is not None:
                meta.append(vals)
            meta.append(
                torch.tensor([weight] + [float(t.grad is not None) for t in tensors], dtype=key[1], device=key[0])
            )
        flat = torch.cat(parts + meta) if parts or meta else None
        if flat is None:
            continue
        if weight != 1.0:
            flat[:n].mul_(weight)
            if vals is not None and key == meta_key:
                flat[n : n + vals.numel()].mul_(weight)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if key == meta_key:
            reduced_meta = flat[n:].clone()
        groups[key] = (items, flat, n)

    nvals = 0 if vals is None else vals.numel()
    total = float(reduced_meta[nvals])  # sum of the weights: T, or the world size
    present = reduced_meta[nvals + 1 :]
    index = {id(t): i for i, t in enumerate(tensors)}
    for packed in groups.values():
        if not isinstance(packed, tuple):
            continue
        items, flat, n = packed
        flat[:n].div_(total)
        offset = 0
        for kind, t in items:
            size = t.numel()
            chunk = flat[offset : offset + size].view_as(t)
            offset += size
            if kind == "buffer":
                with torch.no_grad():
                    t.copy_(chunk)
            elif present[index[id(t)]] > 0:
                if t.grad is None:
                    t.grad = chunk.clone()
                else:
                    t.grad.copy_(chunk)
    if vals is None:
        return None
    return reduced_meta[:nvals] / total


def _as_values(values, tensors, buffers) -> torch.Tensor:
    """`values` (numbers or 0-d tensors) as one 1-D tensor."""
    if isinstance(values, torch.Tensor):
        return values.detach().reshape(-1).clone()
    items = [
        v.detach().reshape(-1).to("cpu", torch.float64)
        if isinstance(v, torch.Tensor)
        else torch.tensor([float(v)], dtype=torch.float64)
        for v in values
    ]
    like = next((t for t in [*tensors, *buffers] if t.dtype in (torch.float32, torch.float64)), None)
    out = torch.cat(items) if items else torch.zeros(0, dtype=torch.float64)
    return out.to(torch.float32 if like is None else like.dtype)


def _default_device(group) -> torch.device:
    backend = dist.get_backend(group)
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_shares(values: torch.Tensor, total: int, *, group=None) -> torch.Tensor:
    """The whole `[total, ...]` tensor on every rank, from each rank's contiguous share `[T_r, ...]` (the
    layout of `share_range`, empty shares included): one SUM all-reduce of a zero-padded buffer, so every
    value arrives exactly as its rank computed it (x + 0 = x). Used to gather per-episode validation
    results: the mean and CI are then those of the whole episode set."""
    world = dist.get_world_size(group)
    if world == 1:
        return values
    rank = dist.get_rank(group)
    start, stop = share_range(total, rank, world)
    if values.shape[0] != stop - start:
        raise ValueError(
            f"values: rank {rank} holds tasks {start}:{stop} of {total} ({stop - start}), got {values.shape[0]} values"
        )
    full = torch.zeros((total, *values.shape[1:]), dtype=values.dtype, device=values.device)
    full[start:stop] = values
    dist.all_reduce(full, op=dist.ReduceOp.SUM, group=group)
    return full


def any_rank(flag: bool, *, device=None, group=None) -> bool:
    """Whether `flag` is true on any rank (one small MAX all-reduce; `flag` itself with one rank)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_default_device(group) if device is None else device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())
