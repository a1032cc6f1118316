"""Data-parallel meta-training with `torch.distributed`: each rank runs `meta_step` on its share of
the meta-batch, then `all_reduce_grads` averages the meta-gradients (one flat all-reduce), so every
rank holds the meta-gradient of the whole meta-batch (with equal task counts per rank)."""
from __future__ import annotations

from typing import Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn


def all_reduce_grads(model: nn.Module, extra: Iterable[torch.Tensor] = (), *, group=None) -> None:
    """Averages the meta-gradients over the ranks, in one flat all-reduce.

    Args:
        model: the model whose parameters' `.grad` (written by `meta_step` on this rank's tasks) are
            averaged; a parameter without a gradient on this rank counts as zero.
        extra: more tensors whose `.grad` is averaged too (e.g. learnable inner learning rates).
        group: the process group (default: the world).

    Raises:
        RuntimeError: torch.distributed is not initialized.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("all_reduce_grads: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    tensors: List[torch.Tensor] = [p for p in model.parameters() if p.requires_grad] + list(extra)
    if not tensors:
        return
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in tensors]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for t, g in zip(tensors, grads):
        n = g.numel()
        t.grad = flat[offset:offset + n].view_as(g).clone()
        offset += n


def shard(tasks, rank: Optional[int] = None, world_size: Optional[int] = None):
    """This rank's contiguous share of a meta-batch.

    Args:
        tasks: a `TaskBatch` or a 4-tuple of `[T, ...]` tensors.
        rank: this rank (default: `torch.distributed.get_rank()`).
        world_size: the number of ranks (default: `torch.distributed.get_world_size()`).

    Returns:
        The same type, each tensor `[T / world_size, ...]`.

    Raises:
        ValueError: T does not divide evenly by the world size.
    """
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    T = tasks[0].shape[0]
    if T % world_size:
        raise ValueError(f"tasks: T={T} tasks do not split evenly over {world_size} ranks; "
                         "use a meta-batch size divisible by the world size")
    per = T // world_size
    return type(tasks)(*(t[rank * per:(rank + 1) * per] for t in tasks)) if hasattr(tasks, "_fields") \
        else tuple(t[rank * per:(rank + 1) * per] for t in tasks)
