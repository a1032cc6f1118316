"""higher's `innerloop_ctx` MAML loop, ported to fastmaml (docs/porting.md).

    python examples/higher_style_loop.py                 # sinusoid regression, a few seconds
    python examples/higher_style_loop.py --iterations 3  # a smoke run

higher's loop, per task (the outer loss is any function of the adapted model)::

    with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(x_spt[i]), y_spt[i]))
        qry_loss = F.mse_loss(fmodel(x_qry[i]), y_qry[i])
        qry_loss.backward()

fastmaml's, for all tasks at once: `adapt` returns a module holding every task's adapted weights; put any outer
loss on its output (here the query MSE plus a penalty on the adapted weights' size) and call `backward()`: the
gradient reaches the model's parameters through the exact second-order reverse sweep, without create_graph::

    adapted = fastmaml.adapt(model, x_spt, y_spt, inner_lr=0.01, steps=steps)   # inner_opt = SGD(lr=0.01)
    outer = F.mse_loss(adapted(x_qry), y_qry) + penalty(adapted.params)
    outer.backward()
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import fastmaml
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastmaml


def sinusoid_tasks(generator: torch.Generator, num_tasks: int, shots: int):
    """MAML's sinusoids: amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]; `shots` support and query points."""
    amplitude = 0.1 + 4.9 * torch.rand(num_tasks, 1, 1, generator=generator)
    phase = math.pi * torch.rand(num_tasks, 1, 1, generator=generator)
    x = 10 * torch.rand(num_tasks, 2 * shots, 1, generator=generator) - 5
    y = amplitude * torch.sin(x - phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--penalty", type=float, default=1e-4, help="weight of the adapted weights' squared norm")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    for iteration in range(1, args.iterations + 1):
        x_spt, y_spt, x_qry, y_qry = sinusoid_tasks(generator, args.meta_batch, args.shots)
        meta_opt.zero_grad()
        adapted = fastmaml.adapt(model, x_spt, y_spt, inner_lr=0.01, steps=args.steps)
        qry_loss = F.mse_loss(adapted(x_qry), y_qry)
        size = sum((w**2).sum() for w in adapted.params.values()) / args.meta_batch
        (qry_loss + args.penalty * size).backward()
        meta_opt.step()
        if iteration % 100 == 0 or iteration == args.iterations:
            loss = float(qry_loss.detach())
            print(f"iteration {iteration}: query loss after {args.steps} steps {loss:.3f}", flush=True)


if __name__ == "__main__":
    main()
