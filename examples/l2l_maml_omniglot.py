"""learn2learn's `examples/vision/maml_omniglot.py`, ported to fastmaml (docs/porting.md explains the diff).

    python examples/l2l_maml_omniglot.py                      # the embedded glyph set (no download), ~1 min
    python examples/l2l_maml_omniglot.py --iterations 2 --meta-batch 2 --hidden 8   # a smoke run

learn2learn's loop, per meta-iteration::

    for task in range(meta_batch_size):
        learner = maml.clone()
        batch = tasksets.train.sample()
        evaluation_error, evaluation_accuracy = fast_adapt(batch, learner, loss, adaptation_steps, shots, ways)
        evaluation_error.backward()
    for p in maml.parameters():
        p.grad.data.mul_(1.0 / meta_batch_size)      # <- drop this with fastmaml (see below)
    optimizer.step()

fastmaml's: the whole meta-batch is one call, and `.grad` already holds the gradient of the *mean* over
tasks, so learn2learn's `1 / meta_batch_size` scaling must go (kept, it would scale the step twice)::

    result = fastmaml.meta_step(model, tasks, inner_lr=fast_lr, steps=adaptation_steps, loss="cross_entropy")
    optimizer.step()

The model is learn2learn's `OmniglotCNN` (four conv blocks, BatchNorm in training mode, a linear head),
the data the embedded glyph set (Omniglot-like 28x28 strokes) with 90-degree rotations as new classes.
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


class OmniglotCNN(nn.Module):
    """learn2learn.vision.models.OmniglotCNN: 4 x (conv 3x3, BatchNorm, ReLU, max-pool 2), then a linear head."""

    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4):
        super().__init__()
        blocks, channels = [], 1
        for _ in range(layers):
            blocks += [
                nn.Conv2d(channels, hidden_size, 3, padding=1),
                nn.BatchNorm2d(hidden_size),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = hidden_size
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--meta-lr", type=float, default=0.003)
    parser.add_argument("--fast-lr", type=float, default=0.5)
    parser.add_argument("--meta-batch", type=int, default=8)
    parser.add_argument("--adaptation-steps", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=16, help="filters per conv layer (learn2learn: 64)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    splits = glyph_splits(num_classes=200, val_classes=40, test_classes=40)
    train = EpisodeSampler(splits.train, args.ways, args.shots, args.shots, rotations=True)
    test = EpisodeSampler(splits.test, args.ways, args.shots, args.shots)
    generator = torch.Generator().manual_seed(args.seed)

    model = OmniglotCNN(args.ways, args.hidden)
    optimizer = torch.optim.Adam(model.parameters(), args.meta_lr)
    hyper = dict(inner_lr=args.fast_lr, steps=args.adaptation_steps, loss="cross_entropy")
    started = time.perf_counter()
    for iteration in range(1, args.iterations + 1):
        tasks = train.gather(train.sample_indices(args.meta_batch, generator))
        optimizer.zero_grad()
        result = fastmaml.meta_step(model, tasks, **hyper)  # .grad = gradient of the mean over tasks
        optimizer.step()
        if iteration % 10 == 0 or iteration == args.iterations:
            print(
                f"iteration {iteration}: meta-train error {float(result.meta_loss):.3f}, accuracy "
                f"{float(result.accuracy_after.mean()):.3f} ({time.perf_counter() - started:.1f} s)",
                flush=True,
            )

    # meta-test: adapt on new classes' support sets, score the query sets (no meta-gradient needed)
    tasks = test.gather(test.sample_indices(args.meta_batch, generator))
    adapted = fastmaml.adapt(model, tasks.support_x, tasks.support_y, **hyper, update_running_stats=False)
    with torch.no_grad():
        accuracy = (adapted(tasks.query_x).argmax(-1) == tasks.query_y).float().mean()
    print(f"meta-test accuracy {float(accuracy):.3f} ({args.ways}-way {args.shots}-shot, chance {1 / args.ways:.2f})")


if __name__ == "__main__":
    main()
