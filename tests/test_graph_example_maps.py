"""Per-example linear maps on the fused engine (example_maps.py): resampling, padding by reflection,
replication and wrapping, pixel shuffle, flip, roll, cumsum, tril/triu, unfold/fold, written as a user
writes a small U-Net-like model (sizes from the skip connection's shape), against the per-task
`create_graph` oracle in float64, every order; conversions to the parameters' dtype; what would map across
the examples falls back or raises, named."""

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import (
    ORDERS,
    check_ce,
    check_falls_back,
    check_orders_steps,
    check_variants,
    on_fused,
    tasks_for,
)
from torch import nn

import fastmaml
from fastmaml.programs.fused.shape import PadRule

from oracle import check_adapt_matches_meta_step


class UpDown(nn.Module):
    """Down with a strided conv, reflect-pad and convolve, up again to the skip's size, pixel (un)shuffle,
    and per-example flips, rolls, cumulative sums, triangles and patches."""

    def __init__(self, ways=3):
        super().__init__()
        self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.pad = nn.ReflectionPad2d(1)
        self.mid = nn.Conv2d(4, 4, 3)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.shuffle = nn.PixelShuffle(2)
        self.zero_pad = nn.ZeroPad2d((0, 1, 1, 0))  # constant padding: the F.pad rule
        self.fuse = nn.Conv2d(2 + 4 + 4 + 1, 4, 1)
        self.head = nn.Linear(16 + 3 + 3, ways)

    def forward(self, x):  # [N, 2, 6, 6]
        h = torch.relu(self.down(x))  # [N, 4, 3, 3]
        h = torch.tanh(self.mid(self.pad(h)))
        u = F.interpolate(h, size=x.shape[-2:], mode="nearest")  # [N, 4, 6, 6]
        b = self.up(h)
        p = self.shuffle(F.pad(h, (1, 1, 1, 1), mode="replicate")[:, :, 1:-1, 1:-1])  # [N, 1, 6, 6]
        z = torch.relu(self.fuse(torch.cat([x, u, b, p], 1)))
        z = F.pixel_unshuffle(z.flip(-1), 2)  # [N, 16, 3, 3]
        z = torch.roll(z, shifts=1, dims=2).cumsum(-1)
        z = F.adaptive_avg_pool2d(self.zero_pad(F.pad(z, (1, 0, 0, 1), mode="circular")), 1).flatten(1)
        tri = torch.triu(torch.tanh(h[:, 0]), diagonal=1).sum(-1)  # [N, 3]
        folded = F.fold(F.unfold(h, 2), (3, 3), 2).mean((1, 2))  # [N, 3]
        return self.head(torch.cat([z, tri, folded], 1)) + torch.flip(x, [1, 2])[:, 0, 0, :3].sum(1, keepdim=True)


def image_tasks(seed=0):
    return tasks_for((2, 6, 6), ways=3, shots=2, seed=seed)


@pytest.mark.parametrize("order", ORDERS)
def test_every_order(order):
    torch.manual_seed(0)
    model = UpDown().double()
    nodes = on_fused(model).nodes
    kinds = {n.rule.kind for n in nodes}
    assert any(isinstance(n.rule, PadRule) and n.rule.kind == "ZeroPad2d" for n in nodes)
    assert {"interpolate", "Upsample", "ReflectionPad2d", "PixelShuffle", "pad", "flip", "roll", "cumsum"} <= kinds
    assert {"triu", "unfold", "fold", "pixel_unshuffle"} <= kinds
    check_orders_steps(model, image_tasks(), order)


def test_meta_sgd_rates_and_float32():
    torch.manual_seed(1)
    model = UpDown().double()
    check_variants(model, image_tasks(1), image_tasks(2))


class Casts(nn.Module):
    """Conversions a model makes to be safe (`x.float()` in a float32 model, `.to(x.device)`, `.type_as(w)`,
    `.to(self.fc.weight.dtype)`): the value itself."""

    def __init__(self, dtype):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.dtype = dtype

    def forward(self, x):
        x = x.to(self.dtype).to(x.device)
        h = self.fc(x.type_as(self.fc.weight)).to(self.fc.weight.dtype)
        return h * (h > 0).to(h.dtype) + h.to(dtype=self.dtype, copy=True)


def test_conversions_to_the_parameters_dtype_compile_and_others_fall_back():
    torch.manual_seed(2)
    tasks = tasks_for((4,), ways=3, shots=2)
    check_ce(Casts(torch.float64).double(), tasks, inner_lr=0.3, steps=2)
    assert fastmaml.explain(Casts(torch.float32), "cross_entropy").program == "fused"
    check_falls_back(Casts(torch.float32).double(), "only conversions to it compile")


def test_maps_across_the_examples_fall_back_or_raise_and_say_why():
    def model(expr):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)

            def forward(self, x):
                return expr(self.fc(x))

        return M()

    for expr, reason in (
        (lambda h: h.flip(0), "not the examples' dim 0"),
        (lambda h: torch.roll(h, 1), "without dims"),
        (lambda h: h.cumsum(1, dtype=torch.float64), "cumsum with a dtype"),
        (lambda h: h.type(), "returns the type's name"),
    ):
        check_falls_back(model(expr), reason)
    tasks = tasks_for((4,), ways=3, shots=2)
    for expr in (lambda h: h.flip(-2), lambda h: torch.tril(h)):  # [N, 3]: dim -2 and the matrix are the examples'
        with pytest.raises(ValueError, match="mapping the examples' dim 0 would mix them"):
            fastmaml.meta_step(model(expr).double(), tasks, inner_lr=0.3, steps=1, loss="cross_entropy")


def test_adapt_matches_meta_step():
    """`fastmaml.adapt`'s outputs are differentiable through the maps (their forward under autograd)."""
    torch.manual_seed(3)
    check_adapt_matches_meta_step(
        UpDown().double(), image_tasks(3), loss_fn=F.cross_entropy, loss="cross_entropy", inner_lr=0.3, steps=2
    )
