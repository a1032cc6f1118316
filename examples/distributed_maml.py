"""Data-parallel MAML in your own training script: the pattern `fastmaml train` uses under torchrun.

    torchrun --standalone --nproc_per_node 2 examples/distributed_maml.py              # 2 CPU ranks (gloo)
    torchrun --standalone --nproc_per_node 8 examples/distributed_maml.py --device cuda  # 8 GPUs (NCCL)
    python examples/distributed_maml.py                                                # one process

Every rank:
  1. draws the *whole* meta-batch from the same seeded generator (so task i of step s is the same task
     whatever the number of ranks),
  2. keeps its contiguous share (`fastmaml.distributed.shard`: sizes differ by at most one),
  3. runs `fastmaml.meta_step` on it (the mean over its T_r tasks),
  4. calls `fastmaml.distributed.all_reduce_grads(..., num_tasks=T_r)`: one all-reduce leaves on every rank
     the meta-gradient of the mean over all T tasks (each rank weighted by T_r / T), with the learnable
     inner rates' gradients (`extra=`) and the logged means (`values=`),
  5. takes the same optimizer step, so the replicas stay identical without broadcasting weights.
Rank 0 alone prints (and would write checkpoints: every rank holds the same global state).

The task family is the MAML paper's sinusoids; the inner rates are MAML++'s learnable per-step,
per-layer scalars, to show `extra=`.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

try:
    import fastmaml
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastmaml
from fastmaml.distributed import all_reduce_grads, shard, task_count


def sinusoid_tasks(generator: torch.Generator, num_tasks: int, shots: int) -> fastmaml.TaskBatch:
    """`num_tasks` sinusoid tasks y = A sin(x - phase): `shots` support and `shots` query points each."""
    amplitude = torch.rand(num_tasks, 1, 1, generator=generator) * 4.9 + 0.1
    phase = torch.rand(num_tasks, 1, 1, generator=generator) * math.pi
    x = torch.rand(num_tasks, 2 * shots, 1, generator=generator) * 10 - 5
    y = amplitude * torch.sin(x - phase)
    return fastmaml.TaskBatch(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--meta-batch", type=int, default=25, help="tasks per step, over all ranks")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="inner steps")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (each rank takes the GPU of its LOCAL_RANK)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ  # set by torchrun
    device = torch.device(args.device)
    if device.type == "cuda" and launched:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if launched:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    if args.meta_batch < world:
        raise SystemExit(f"--meta-batch {args.meta_batch}: every one of the {world} ranks needs a task")

    torch.manual_seed(args.seed)  # the same initialization on every rank
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)).to(device)
    rates = [
        {name: nn.Parameter(torch.tensor(0.01, device=device)) for name, _ in model.named_parameters()}
        for _ in range(args.steps)
    ]  # MAML++: learnable per-step, per-layer inner rates
    optimizer = torch.optim.Adam([*model.parameters(), *(r for step in rates for r in step.values())], lr=1e-3)
    tasks = torch.Generator().manual_seed(args.seed + 1)  # the global task stream: identical on every rank

    started = time.perf_counter()
    for it in range(1, args.iterations + 1):
        mine = shard(sinusoid_tasks(tasks, args.meta_batch, args.shots), rank, world).to(device)
        optimizer.zero_grad(set_to_none=True)
        result = fastmaml.meta_step(model, mine, inner_lr=rates, steps=args.steps, loss="mse")
        if world > 1:
            (loss,) = all_reduce_grads(model, extra=rates, num_tasks=task_count(mine), values=[result.meta_loss])
        else:
            loss = result.meta_loss
        optimizer.step()
        if rank == 0 and (it % 50 == 0 or it == args.iterations):
            print(
                f"iteration {it}: meta-loss {float(loss):.4f} (all {args.meta_batch} tasks, {world} rank"
                f"{'s' if world > 1 else ''}), {it / (time.perf_counter() - started):.1f} it/s",
                flush=True,
            )
    if launched:
        dist.destroy_process_group()
        gc.collect()  # frees the gloo process group now, not during interpreter shutdown (which can abort)


if __name__ == "__main__":
    main()
