"""Two CPU ranks (gloo): sharded meta_step + all_reduce_grads == one meta_step on the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastmaml
from fastmaml.distributed import all_reduce_grads, shard


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 7), nn.Tanh(), nn.Linear(7, 1)).double()


def _tasks():
    g = torch.Generator().manual_seed(1)
    return fastmaml.TaskBatch(*(torch.randn(4, 5, 1, generator=g, dtype=torch.float64) for _ in range(4)))


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = _model()
    lr = nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
    fastmaml.meta_step(model, shard(_tasks()), inner_lr=lr, steps=2)
    all_reduce_grads(model, extra=[lr])
    torch.save({"grads": [p.grad for p in model.parameters()], "lr": lr.grad}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    out = str(tmp_path / "grads")
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    model = _model()
    lr = nn.Parameter(torch.tensor(0.05, dtype=torch.float64))
    fastmaml.meta_step(model, _tasks(), inner_lr=lr, steps=2)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        for g, p in zip(got["grads"], model.parameters()):
            assert torch.allclose(g, p.grad, rtol=1e-12, atol=1e-15)
        assert torch.allclose(got["lr"], lr.grad, rtol=1e-12)


def test_shard_checks_divisibility():
    with pytest.raises(ValueError, match="T=4 tasks do not split evenly over 3 ranks"):
        shard(_tasks(), rank=0, world_size=3)
    part = shard(_tasks(), rank=1, world_size=2)
    assert isinstance(part, fastmaml.TaskBatch) and part.support_x.shape[0] == 2
