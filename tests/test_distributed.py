"""`fastmaml.distributed`: shares of a meta-batch, and two CPU ranks (gloo) whose sharded `meta_step` +
`all_reduce_grads` equal one `meta_step` on the whole batch (float64: to 1e-12), for equal and uneven
shares, learnable and MAML++ per-step rates, per-step BatchNorm statistics and the values logged with them.
(atol 1e-13: the bias of the Linear in front of a BatchNorm has an exact gradient of 0, i.e. rounding noise.)
(The training jobs under torchrun: tests/test_distributed_jobs.py.)"""

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastmaml
from fastmaml.distributed import (
    all_gather_shares,
    all_reduce_grads,
    any_rank,
    batchnorm_statistics,
    shard,
    share_range,
    share_sizes,
    task_count,
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 7), nn.Tanh(), nn.Linear(7, 1)).double()


def _bn_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double()
    fastmaml.add_per_step_stats(model, 2)
    return model


def _tasks(T=4, features=1, outputs=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return fastmaml.TaskBatch(
        torch.randn(T, 5, features, generator=g, dtype=torch.float64),
        torch.randn(T, 5, outputs, generator=g, dtype=torch.float64),
        torch.randn(T, 6, features, generator=g, dtype=torch.float64),
        torch.randn(T, 6, outputs, generator=g, dtype=torch.float64),
    )


def _per_step_rates(model):
    """MAML++: one dict of learnable per-layer scalars per inner step."""
    return [
        {
            name: nn.Parameter(torch.tensor(0.05 + 0.01 * (i + j), dtype=torch.float64))
            for i, (name, _) in enumerate(model.named_parameters())
        }
        for j in range(2)
    ]


class _WithUnused(nn.Module):
    """A parameter that no task uses (no gradient on any rank: it must keep `.grad = None`)."""

    def __init__(self):
        super().__init__()
        self.net = _model()
        self.unused = nn.Parameter(torch.zeros(3, dtype=torch.float64))

    def forward(self, x):
        return self.net(x)


def _cases():
    """{name: (model factory, tasks, meta_step keyword arguments for the model)}."""
    return {
        "even": (
            _model,
            _tasks(4),
            lambda m: {"inner_lr": nn.Parameter(torch.tensor(0.05, dtype=torch.float64)), "steps": 2},
        ),
        "uneven_per_step_rates": (_model, _tasks(5), lambda m: {"inner_lr": _per_step_rates(m), "steps": 2}),
        "uneven_per_step_batchnorm": (
            _bn_model,
            _tasks(7, features=3, outputs=2),
            lambda m: {"inner_lr": 0.1, "steps": 2, "batch_norm": "per_step"},
        ),
        "uneven_batchnorm_running_statistics": (
            _bn_model,
            _tasks(5, features=3, outputs=2),
            lambda m: {"inner_lr": 0.1, "steps": 1, "batch_norm": "batch"},
        ),
        "unused_parameter": (_WithUnused, _tasks(3), lambda m: {"inner_lr": 0.05, "steps": 1}),
    }


def _run(model, tasks, kwargs):
    return fastmaml.meta_step(model, tasks, order="second", loss="mse", **kwargs)


def _learnable(inner_lr):
    if isinstance(inner_lr, torch.Tensor):
        return [inner_lr]
    if isinstance(inner_lr, list):
        return [t for step in inner_lr for t in step.values()]
    return []


def _state(model, kwargs):
    return {
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "lr_grads": [t.grad.clone() for t in _learnable(kwargs["inner_lr"])],
        "buffers": [b.clone() for _, b in model.named_buffers()],
    }


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    saved = {}
    for name, (make, tasks, kw) in _cases().items():
        model = make()
        kwargs = kw(model)
        mine = shard(tasks)
        weighted = name != "even"  # the even case also checks the default: equal weights
        result = _run(model, mine, kwargs)
        stats = batchnorm_statistics(model)
        values = all_reduce_grads(
            model,
            extra=kwargs["inner_lr"],
            num_tasks=task_count(mine) if weighted else None,
            values=[result.meta_loss, result.query_loss_after.mean()],
            buffers=stats,
        )
        saved[name] = {**_state(model, kwargs), "values": values, "count": task_count(mine)}
    start, stop = share_range(5, rank, 2)
    saved["gathered"] = all_gather_shares(torch.arange(start, stop, dtype=torch.float32) * 10, 5)
    saved["any"] = (any_rank(rank == 1), any_rank(False))
    torch.save(saved, f"{out}.{rank}")
    dist.destroy_process_group()
    gc.collect()  # free the gloo group now: its threads must not outlive the interpreter (see common.Ranks.close)


def test_two_ranks_match_one_process(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    got = [torch.load(f"{out}.{rank}") for rank in range(2)]
    for name, (make, tasks, kw) in _cases().items():
        model = make()
        kwargs = kw(model)
        result = _run(model, tasks, kwargs)
        want = _state(model, kwargs)
        assert [g[name]["count"] for g in got] == share_sizes(tasks.num_tasks, 2)
        for rank in range(2):
            have = got[rank][name]
            for key in ("grads", "lr_grads", "buffers"):
                assert len(have[key]) == len(want[key]), (name, key)
                for a, b in zip(have[key], want[key]):
                    if b is None:
                        assert a is None, (name, key, "a tensor without a gradient anywhere keeps grad None")
                    else:
                        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13), (name, key, rank)
            before_after = torch.tensor(
                [float(result.meta_loss), float(result.query_loss_after.mean())], dtype=torch.float64
            )
            assert torch.allclose(have["values"], before_after, rtol=1e-12), name
    for rank in range(2):
        assert torch.equal(got[rank]["gathered"], torch.arange(5, dtype=torch.float32) * 10)
        assert got[rank]["any"] == (True, False)


def test_shares_are_contiguous_and_differ_by_at_most_one():
    assert share_sizes(10, 4) == [3, 3, 2, 2] and share_sizes(8, 4) == [2, 2, 2, 2] and share_sizes(3, 4)[-1] == 0
    assert [share_range(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    tasks = _tasks(5)
    parts = [shard(tasks, rank=r, world_size=2) for r in range(2)]
    assert all(isinstance(p, fastmaml.TaskBatch) for p in parts) and [task_count(p) for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p.query_y for p in parts]), tasks.query_y)
    as_tuple = shard(tuple(tasks), rank=1, world_size=2)
    assert type(as_tuple) is tuple and torch.equal(as_tuple[0], tasks.support_x[3:])
    per_task = [tuple(t[i] for t in tasks) for i in range(5)]  # the list-of-task-tuples form of meta_step
    mine = shard(per_task, rank=0, world_size=2)
    assert isinstance(mine, list) and task_count(mine) == 3 and mine[2][0] is per_task[2][0]


def test_shard_needs_a_task_per_rank():
    with pytest.raises(ValueError, match="T=3 tasks cannot be shared by 4 ranks"):
        shard(_tasks(3), rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        shard(_tasks(3), rank=2, world_size=2)
    with pytest.raises(TypeError, match="tasks"):
        task_count(torch.zeros(3))


def test_all_reduce_grads_needs_an_initialized_group():
    with pytest.raises(RuntimeError, match="not initialized"):
        all_reduce_grads(_model())
