"""The benchmark workloads: a model, a synthetic task batch (fixed seeds, no downloads) and the
MAML hyper-parameters of one meta-step.

    sinusoid-K{1,5}        MLP 1-40-40-1, T=25 tasks, 10 support + 10 query points, MSE
    conv28-{1,5}shot-K{1,5}  4-block conv net, 64 filters, 28×28×1, 5-way, 15 query per class, T=32
    class28-1shot-K{1,5}   the same conv net written as a class (features + classifier, x.view(x.size(0), -1))
    conv84-1shot-K5        4-block conv net, 32 filters, 84×84×3, 5-way 1-shot, 15 query, T=4
    resnet12-84-K5         ResNet-12 16-32-64-128 (a CPU size), 84×84×3, 5-way 1-shot, 15 query, T=4
    resnet12w-84-K5        ResNet-12 64-160-320-640 (MetaOptNet / learn2learn), the same episodes (a GPU size)
    vit32-1shot-K1         ViT as timm writes it: 8×8 patches, d=64, 2 blocks, 4 heads, 32×32×3, 5-way 1-shot, T=16
    sweep28-K{1,2,5,10,20} the 28×28 5-way 1-shot workload for the memory-against-K plot

`quick=True` gives the CI-sized variant of each (fewer tasks; same model and shots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..losses import cross_entropy, mse
from ..models import conv4, resnet12, vit
from ..tasks import TaskBatch

SWEEP_STEPS = (1, 2, 5, 10, 20)


@dataclass(frozen=True)
class Workload:
    """One meta-step problem. `layers` lists the Linear/Conv2d layers for FLOP counting:
    ("linear", in_features, out_features[, rows]) (rows: the tokens it maps per example, 1 by default),
    ("conv", c_in, c_out, kernel, out_h, out_w) or ("matmul", m, k, n), a product of two activations
    `[m, k] @ [k, n]` per example (attention's, its heads together)."""

    name: str
    description: str
    kind: str  # "sinusoid" | "conv" | "conv-class" | "resnet12" | "vit"
    tasks: int  # T
    steps: int  # K
    inner_lr: float
    loss: str  # "mse" | "cross_entropy"
    support: int  # Ns examples per task
    query: int  # Nq examples per task
    config: Dict = field(default_factory=dict)
    sweep: bool = False  # part of the memory-against-K sweep

    @property
    def loss_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return mse if self.loss == "mse" else cross_entropy

    def make_model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        if self.kind == "sinusoid":
            return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
        c = self.config
        if self.kind == "resnet12":
            return resnet12(c["ways"], widths=c["widths"], in_channels=c["channels"])
        if self.kind == "vit":
            sizes = {k: c[k] for k in ("patch", "dim", "depth", "heads", "dropout")}
            return vit(c["ways"], image_size=c["size"], in_channels=c["channels"], **sizes)
        net = conv4(c["channels"], c["ways"], hidden=c["filters"], image_size=c["size"], norm=c.get("norm", "batch"))
        return ConvClassNet(net) if self.kind == "conv-class" else net

    def make_tasks(self, seed: int = 1) -> TaskBatch:
        """The task batch, float32 on CPU: support_x `[T, Ns, ...]`, query_x `[T, Nq, ...]`."""
        g = torch.Generator().manual_seed(seed)
        if self.kind == "sinusoid":
            return _sinusoid_tasks(g, self.tasks, self.support, self.query)
        c = self.config
        return _image_tasks(g, self.tasks, c["ways"], c["shots"], c["query_per_class"], c["channels"], c["size"])

    @property
    def layers(self) -> List[Tuple]:
        if self.kind == "sinusoid":
            return [("linear", 1, 40), ("linear", 40, 40), ("linear", 40, 1)]
        c = self.config
        if self.kind == "resnet12":
            out, side, c_in = [], c["size"], c["channels"]
            for width in c["widths"]:
                out += [
                    ("conv", c_in, width, 3, side, side),
                    ("conv", width, width, 3, side, side),
                    ("conv", width, width, 3, side, side),
                    ("conv", c_in, width, 1, side, side),
                ]
                side //= 2
                c_in = width
            return out + [("linear", c_in, c["ways"])]
        if self.kind == "vit":
            side, dim = c["size"] // c["patch"], c["dim"]
            tokens = side * side + 1
            block = [("linear", dim, 3 * dim, tokens), ("matmul", tokens, dim, tokens), ("matmul", tokens, tokens, dim)]
            block += [("linear", dim, dim, tokens), ("linear", dim, 4 * dim, tokens), ("linear", 4 * dim, dim, tokens)]
            patches = ("conv", c["channels"], dim, c["patch"], side, side)
            return [patches] + block * c["depth"] + [("linear", dim, c["ways"])]
        out, side, c_in = [], c["size"], c["channels"]
        for _ in range(4):
            out.append(("conv", c_in, c["filters"], 3, side, side))
            side //= 2
            c_in = c["filters"]
        out.append(("linear", c["filters"] * side * side, c["ways"]))
        return out


class ConvClassNet(nn.Module):
    """The layers of a conv4 `nn.Sequential` written as users write them (learn2learn's OmniglotCNN, the models
    of higher's and TorchOpt's examples): `self.features` (the blocks), `self.classifier`, and a forward with
    `x.view(x.size(0), -1)`. Same parameters and initialization as the `nn.Sequential` it is built from."""

    def __init__(self, sequential: nn.Sequential):
        super().__init__()
        self.features = nn.Sequential(*list(sequential)[:-2])
        self.classifier = sequential[-1]

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def _sinusoid_tasks(g: torch.Generator, T: int, ns: int, nq: int) -> TaskBatch:
    """y = A sin(x + φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[-5, 5]; x and y `[T, N, 1]`."""
    amp = 0.1 + 4.9 * torch.rand(T, 1, 1, generator=g)
    phase = math.pi * torch.rand(T, 1, 1, generator=g)
    x = -5 + 10 * torch.rand(T, ns + nq, 1, generator=g)
    y = amp * torch.sin(x + phase)
    return TaskBatch(x[:, :ns], y[:, :ns], x[:, ns:], y[:, ns:])


def _image_tasks(
    g: torch.Generator, T: int, ways: int, shots: int, query_per_class: int, channels: int, size: int
) -> TaskBatch:
    """N-way tasks of noisy class prototypes: x `[T, ways·n, C, H, W]`, y `[T, ways·n]` int64."""
    protos = torch.randn(T, ways, channels, size, size, generator=g)

    def draw(n: int):
        labels = torch.arange(ways).repeat_interleave(n)  # [ways·n]
        x = protos[:, labels] + 0.5 * torch.randn(T, ways * n, channels, size, size, generator=g)
        return x, labels.expand(T, -1).contiguous()

    sx, sy = draw(shots)
    qx, qy = draw(query_per_class)
    return TaskBatch(sx, sy, qx, qy)


def _conv(
    name: str,
    description: str,
    *,
    tasks: int,
    steps: int,
    shots: int,
    size: int,
    channels: int,
    filters: int,
    inner_lr: float,
    sweep: bool = False,
    kind: str = "conv",
    widths=None,
    norm: str = "batch",
    extra: Optional[Dict] = None,
) -> Workload:
    ways, query_per_class = 5, 15
    config = dict(
        ways=ways,
        shots=shots,
        query_per_class=query_per_class,
        channels=channels,
        size=size,
        filters=filters,
        norm=norm,
    )
    if widths is not None:
        config["widths"] = tuple(widths)
    config.update(extra or {})
    return Workload(
        name,
        description,
        kind,
        tasks,
        steps,
        inner_lr,
        "cross_entropy",
        ways * shots,
        ways * query_per_class,
        config,
        sweep,
    )


def workloads(quick: bool = False) -> Dict[str, Workload]:
    """All workloads by name, in table order; `quick` gives fewer tasks per meta-batch."""
    t_sin, t_28, t_84 = (4, 2, 1) if quick else (25, 32, 4)
    out: List[Workload] = []
    for k in (1, 5):
        out.append(
            Workload(
                f"sinusoid-K{k}",
                f"sinusoid MLP 1-40-40-1, T={t_sin}, 10+10 shots, K={k}, MSE",
                "sinusoid",
                t_sin,
                k,
                0.01,
                "mse",
                10,
                10,
            )
        )
    for shots in (1, 5):
        for k in (1, 5):
            out.append(
                _conv(
                    f"conv28-{shots}shot-K{k}",
                    f"conv4 64 filters, 28×28×1, 5-way {shots}-shot, 15 query/class, T={t_28}, K={k}",
                    tasks=t_28,
                    steps=k,
                    shots=shots,
                    size=28,
                    channels=1,
                    filters=64,
                    inner_lr=0.4,
                )
            )
    for k in (1, 5):
        out.append(
            _conv(
                f"class28-1shot-K{k}",
                f"conv4 64 filters written as a class, 28×28×1, 5-way 1-shot, 15 query/class, T={t_28}, K={k}",
                tasks=t_28,
                steps=k,
                shots=1,
                size=28,
                channels=1,
                filters=64,
                inner_lr=0.4,
                kind="conv-class",
            )
        )
    out.append(
        _conv(
            "gn28-1shot-K1",
            f"conv4 64 filters with GroupNorm(4) written as a class, 28×28×1, 5-way 1-shot, 15 query/class, "
            f"T={t_28}, K=1",
            tasks=t_28,
            steps=1,
            shots=1,
            size=28,
            channels=1,
            filters=64,
            inner_lr=0.4,
            kind="conv-class",
            norm="group",
        )
    )
    out.append(
        _conv(
            "conv84-1shot-K5",
            f"conv4 32 filters, 84×84×3, 5-way 1-shot, 15 query/class, T={t_84}, K=5",
            tasks=t_84,
            steps=5,
            shots=1,
            size=84,
            channels=3,
            filters=32,
            inner_lr=0.01,
        )
    )
    for name, widths in (("resnet12-84-K5", (16, 32, 64, 128)), ("resnet12w-84-K5", (64, 160, 320, 640))):
        out.append(
            _conv(
                name,
                f"ResNet-12 {'-'.join(map(str, widths))}, 84×84×3, 5-way 1-shot, 15 query/class, T={t_84}, K=5",
                tasks=t_84,
                steps=5,
                shots=1,
                size=84,
                channels=3,
                filters=0,
                inner_lr=0.01,
                kind="resnet12",
                widths=widths,
            )
        )
    t_vit = 2 if quick else 16
    out.append(
        _conv(
            "vit32-1shot-K1",
            f"ViT 8×8 patches, d=64, 2 blocks, 4 heads, 32×32×3, 5-way 1-shot, 15 query/class, T={t_vit}, K=1",
            tasks=t_vit,
            steps=1,
            shots=1,
            size=32,
            channels=3,
            filters=0,
            inner_lr=0.1,
            kind="vit",
            extra=dict(patch=8, dim=64, depth=2, heads=4, dropout=0.0),
        )
    )
    for k in SWEEP_STEPS:
        out.append(
            _conv(
                f"sweep28-K{k}",
                f"memory sweep: conv4 64 filters, 28×28×1, 5-way 1-shot, T={t_28}, K={k}",
                tasks=t_28,
                steps=k,
                shots=1,
                size=28,
                channels=1,
                filters=64,
                inner_lr=0.4,
                sweep=True,
            )
        )
    return {w.name: w for w in out}


def select(names: Optional[List[str]], quick: bool = False) -> List[Workload]:
    """The workloads named (all when None); a name may be a prefix ("conv28" selects all four)."""
    table = workloads(quick)
    if not names:
        return list(table.values())
    chosen = []
    for name in names:
        hits = [table[name]] if name in table else [w for n, w in table.items() if n.startswith(name)]
        if not hits:
            raise ValueError(f"--workloads: unknown workload {name!r}; expected one of {sorted(table)} or a prefix")
        chosen += [w for w in hits if w not in chosen]
    return chosen
