"""TorchOpt's `MetaSGD` MAML loop, ported to fastmaml, with Meta-SGD's learnable per-parameter rates
(docs/porting.md).

    python examples/torchopt_style_loop.py                 # sinusoid regression, a few seconds
    python examples/torchopt_style_loop.py --iterations 3  # a smoke run

TorchOpt's loop, per task: a differentiable SGD steps the module in place, the outer loss backpropagates
through the steps, and the module is reset to its initial state::

    inner_opt = torchopt.MetaSGD(net, lr=0.01)
    state = torchopt.extract_state_dict(net)
    for i in range(tasks):
        for _ in range(steps):
            inner_opt.step(F.mse_loss(net(x_spt[i]), y_spt[i]))
        (F.mse_loss(net(x_qry[i]), y_qry[i]) / tasks).backward()
        torchopt.recover_state_dict(net, state)
    meta_opt.step()

fastmaml's: one call for the meta-batch; the module is never modified (nothing to extract or recover), `.grad`
holds the gradient of the mean over tasks (no `/ tasks`), and learnable rates (here one per weight: Meta-SGD)
get their meta-gradient like any parameter::

    fastmaml.meta_step(net, (x_spt, y_spt, x_qry, y_qry), inner_lr=rates, steps=steps)
    meta_opt.step()
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
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
    parser.add_argument("--steps", type=int, default=1)
    args = parser.parse_args()

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    rates = {name: nn.Parameter(torch.full_like(p, 0.01)) for name, p in net.named_parameters()}  # Meta-SGD
    meta_opt = torch.optim.Adam([*net.parameters(), *rates.values()], lr=1e-3)
    generator = torch.Generator().manual_seed(1)
    for iteration in range(1, args.iterations + 1):
        tasks = sinusoid_tasks(generator, args.meta_batch, args.shots)
        meta_opt.zero_grad()
        result = fastmaml.meta_step(net, tasks, inner_lr=rates, steps=args.steps)
        meta_opt.step()
        if iteration % 100 == 0 or iteration == args.iterations:
            mean_rate = torch.cat([r.detach().reshape(-1) for r in rates.values()]).mean()
            print(
                f"iteration {iteration}: query loss before {float(result.query_loss_before.mean()):.3f}, after "
                f"{float(result.meta_loss):.3f}; mean inner rate {float(mean_rate):.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
