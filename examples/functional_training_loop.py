"""fastmaml.func from a small functional training loop: parameters held in a dict, no `.grad`, no module state.

    python examples/functional_training_loop.py                 # sinusoid regression, a few seconds
    python examples/functional_training_loop.py --iterations 3  # a smoke run

The way a library (or a JAX-style training loop) holds a model: the module only defines the computation, the
parameters and optimizer state are plain tensors passed around. Two calls do the meta-learning:

- `fastmaml.func.meta_grad(model, params, tasks, ...) -> (meta_loss, grads)`: the exact meta-gradient as a dict
  with the keys of `params`, nothing written anywhere;
- `fastmaml.func.adapt(model, params, (support_x, support_y), ...)`: every task's adapted parameters, which
  compose with autograd and torch.func (`torch.func.grad`, `vjp`, `vmap`; a gradient of a gradient in orders
  "second" and "checkpoint").

Here Adam is written out on the dict, and every 100 iterations the meta-gradient is checked against
`torch.func.grad` of a meta-loss written with `func.adapt` and `torch.func.functional_call`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, vmap

try:
    import fastmaml.func
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastmaml.func


def sinusoid_tasks(generator: torch.Generator, num_tasks: int, shots: int):
    """MAML's sinusoids: amplitude in [0.1, 5], phase in [0, pi], x in [-5, 5]; `shots` support and query points."""
    amplitude = 0.1 + 4.9 * torch.rand(num_tasks, 1, 1, generator=generator)
    phase = math.pi * torch.rand(num_tasks, 1, 1, generator=generator)
    x = 10 * torch.rand(num_tasks, 2 * shots, 1, generator=generator) - 5
    y = amplitude * torch.sin(x - phase)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def adam(params, grads, state, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """One Adam step on dicts of tensors: returns (new params, new state); nothing is modified in place."""
    step = state.get("step", 0) + 1
    m = {n: betas[0] * state.get("m", {}).get(n, 0) + (1 - betas[0]) * g for n, g in grads.items()}
    v = {n: betas[1] * state.get("v", {}).get(n, 0) + (1 - betas[1]) * g * g for n, g in grads.items()}
    scale = lr * math.sqrt(1 - betas[1] ** step) / (1 - betas[0] ** step)
    new = {n: p - scale * m[n] / (v[n].sqrt() + eps) for n, p in params.items()}
    return new, {"step": step, "m": m, "v": v}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--shots", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}  # the state lives here, not in model
    state: dict = {}
    hyper = dict(inner_lr=0.01, steps=1)
    generator = torch.Generator().manual_seed(1)

    def meta_loss(p, tasks):
        support_x, support_y, query_x, query_y = tasks
        adapted = fastmaml.func.adapt(model, p, (support_x, support_y), **hyper)  # {name: [T, *shape]}
        prediction = vmap(lambda w, x: functional_call(model, w, (x,)))(adapted, query_x)
        return ((prediction - query_y) ** 2).mean()

    for iteration in range(1, args.iterations + 1):
        tasks = sinusoid_tasks(generator, args.meta_batch, args.shots)
        loss, grads = fastmaml.func.meta_grad(model, params, tasks, **hyper)
        if iteration % 100 == 0 or iteration == args.iterations:
            check = torch.func.grad(meta_loss)(params, tasks)
            error = max(float((check[n] - grads[n]).norm() / grads[n].norm().clamp_min(1e-30)) for n in grads)
            print(
                f"iteration {iteration}: meta-loss {float(loss):.3f}; torch.func.grad through func.adapt agrees "
                f"to {error:.1e}",
                flush=True,
            )
        params, state = adam(params, grads, state)
    assert all(p.grad is None for p in model.parameters())  # the module was never written to


if __name__ == "__main__":
    main()
