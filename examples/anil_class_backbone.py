"""ANIL (Raghu et al. 2020, "almost no inner loop") with a backbone written as a class: only the head adapts.

    python examples/anil_class_backbone.py                                   # the embedded glyph set, ~1 min
    python examples/anil_class_backbone.py --iterations 2 --meta-batch 2 --hidden 8   # a smoke run

`inner_params=["head"]` names the adapted parameters by module (or parameter) name; the backbone is shared
by all tasks and still gets its exact meta-gradient, second-order term included (fastmaml computes the mixed
Hessian block of the backbone and head; it does not hold T copies of the backbone). The model is an ordinary
`nn.Module` with its own `forward`: fastmaml traces it (torch.fx) and runs it on its fused engine;
`fastmaml.explain` says which engine a model gets and why.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

try:
    import fastmaml
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastmaml
from fastmaml.data import EpisodeSampler, glyph_splits


class Backbone(nn.Module):
    """Three conv blocks (3x3 conv, BatchNorm, ReLU, 2x2 max-pool) and a global average: `[N, 1, 28, 28] -> [N, C]`."""

    def __init__(self, hidden: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(), nn.MaxPool2d(2))
            for c in (1, hidden, hidden)
        )

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x.mean(dim=(2, 3))


class Classifier(nn.Module):
    def __init__(self, ways: int, hidden: int):
        super().__init__()
        self.backbone = Backbone(hidden)
        self.head = nn.Linear(hidden, ways)

    def forward(self, x):
        return self.head(self.backbone(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--steps", type=int, default=5, help="inner steps on the head")
    parser.add_argument("--hidden", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    splits = glyph_splits(num_classes=200, val_classes=40, test_classes=40)
    train = EpisodeSampler(splits.train, args.ways, args.shots, 2, rotations=True)
    test = EpisodeSampler(splits.test, args.ways, args.shots, 2)
    generator = torch.Generator().manual_seed(1)
    model = Classifier(args.ways, args.hidden)
    print(fastmaml.explain(model, "cross_entropy", inner_params=["head"]))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    hyper = dict(inner_lr=0.5, steps=args.steps, loss="cross_entropy", inner_params=["head"])
    started = time.perf_counter()
    for iteration in range(1, args.iterations + 1):
        tasks = train.gather(train.sample_indices(args.meta_batch, generator))
        optimizer.zero_grad()
        result = fastmaml.meta_step(model, tasks, **hyper)
        optimizer.step()
        if iteration % 10 == 0 or iteration == args.iterations:
            print(
                f"iteration {iteration}: query accuracy after adapting the head "
                f"{float(result.accuracy_after.mean()):.3f} ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )
    tasks = test.gather(test.sample_indices(args.meta_batch, generator))
    adapted = fastmaml.adapt(model, tasks.support_x, tasks.support_y, **hyper, update_running_stats=False)
    with torch.no_grad():
        accuracy = (adapted(tasks.query_x).argmax(-1) == tasks.query_y).float().mean()
    print(f"meta-test accuracy {float(accuracy):.3f} ({args.ways}-way {args.shots}-shot, chance {1 / args.ways:.2f})")


if __name__ == "__main__":
    main()
