"""Small models shared by the tests (float64)."""

import torch
from torch import nn


def mlp(widths=(1, 40, 40, 1), act=nn.ReLU):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers).double()


def small_cnn(channels=3, ways=5, track_running_stats=True, size=8):
    """Conv → BatchNorm → ReLU → MaxPool ×2, Flatten, Linear; input [N, 1, size, size]."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.BatchNorm2d(channels, track_running_stats=track_running_stats),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * (size // 4) ** 2, ways),
    ).double()


def regression_tasks(T=3, ns=6, nq=5, din=1, dout=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(T, ns, din), r(T, ns, dout), r(T, nq, din), r(T, nq, dout)


def classification_tasks(T=3, ways=5, shots=1, query=2, size=8, seed=0, shape=None):
    """float64 episodes of per-example `shape` (default one-channel size×size images), labels `[T, N]`."""
    g = torch.Generator().manual_seed(seed)
    ns, nq = ways * shots, ways * query
    shape = (1, size, size) if shape is None else tuple(shape)
    sx = torch.randn(T, ns, *shape, generator=g, dtype=torch.float64)
    qx = torch.randn(T, nq, *shape, generator=g, dtype=torch.float64)
    sy = torch.arange(ways).repeat_interleave(shots).expand(T, ns).clone()
    qy = torch.arange(ways).repeat_interleave(query).expand(T, nq).clone()
    return sx, sy, qx, qy
