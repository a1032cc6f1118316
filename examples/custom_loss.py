"""A loss of your own: any callable `loss(prediction [N, *out], target [N, *out]) -> scalar` works.

    python examples/custom_loss.py                 # sinusoid regression with outliers, a few seconds
    python examples/custom_loss.py --iterations 3  # a smoke run

PyTorch's own losses with their default settings (`nn.MSELoss()`, `F.mse_loss`, `nn.CrossEntropyLoss()`,
`F.cross_entropy`) are recognised as fastmaml's built-in "mse" and "cross_entropy" (fused engine, accuracy for
classification). Any other callable (here a Huber loss, robust to the outliers in the support sets) runs on
the torch.func program: still exact second-order MAML, task-batched with `vmap`, but without the fused
kernels. `fastmaml.explain` says which one a model and loss get, and why.
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


def huber(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber loss with threshold 1, written out (any differentiable expression works)."""
    error = (prediction - target).abs()
    return torch.where(error < 1, 0.5 * error**2, error - 0.5).mean()


def noisy_sinusoids(generator: torch.Generator, num_tasks: int, shots: int):
    """MAML's sinusoids; one support point in five is an outlier (+-10)."""
    amplitude = 0.1 + 4.9 * torch.rand(num_tasks, 1, 1, generator=generator)
    phase = math.pi * torch.rand(num_tasks, 1, 1, generator=generator)
    x = 10 * torch.rand(num_tasks, 2 * shots, 1, generator=generator) - 5
    y = amplitude * torch.sin(x - phase)
    outlier = (torch.rand(num_tasks, shots, 1, generator=generator) < 0.2).float()
    y_support = y[:, :shots] + outlier * 10 * torch.sign(torch.randn(num_tasks, shots, 1, generator=generator))
    return x[:, :shots], y_support, x[:, shots:], y[:, shots:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--shots", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    for name, loss in (("huber", huber), ("F.mse_loss", F.mse_loss)):
        e = fastmaml.explain(model, loss)
        print(f"loss={name}: {e.program} program" + (f" ({e.reason})" if e.reason else ""))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(1)
    for iteration in range(1, args.iterations + 1):
        tasks = noisy_sinusoids(generator, args.meta_batch, args.shots)
        optimizer.zero_grad()
        result = fastmaml.meta_step(model, tasks, inner_lr=0.01, steps=1, loss=huber)
        optimizer.step()
        if iteration % 50 == 0 or iteration == args.iterations:
            print(f"iteration {iteration}: query Huber loss after one step {float(result.meta_loss):.3f}", flush=True)


if __name__ == "__main__":
    main()
