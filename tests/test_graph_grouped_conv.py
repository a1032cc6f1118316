"""Grouped and depthwise convolutions on the fused engine (MobileNet's depthwise-separable block, a grouped
strided conv, `F.conv2d(..., groups=)`, a depthwise Conv1d), every batching strategy, against the per-task
`create_graph` oracle in float64, every order."""

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import ORDERS, check_ce, check_orders_steps, on_fused, tasks_for
from torch import nn

from fastmaml.programs.fused import conv

from oracle import check_float32_error


class DepthwiseSeparable(nn.Module):
    """A 3×3 stem, MobileNet's block (depthwise 3×3 with groups = channels, BN, ReLU, pointwise 1×1, BN,
    ReLU), a grouped strided 3×3 (groups 2, with bias), a functional depthwise conv on the model's own
    weight, global pooling and a Linear head."""

    def __init__(self, ways=3, c=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.grouped = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1, groups=2)
        self.dw_weight = nn.Parameter(torch.randn(2 * c, 1, 3, 3) / 3)
        self.head = nn.Linear(2 * c, ways)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        h = F.relu(self.bn1(self.dw(h)))
        h = F.relu(self.bn2(self.pw(h)))
        h = torch.tanh(self.grouped(h))
        h = F.conv2d(h, self.dw_weight, padding=1, groups=8)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class DepthwiseSequence(nn.Module):
    """A depthwise Conv1d (groups = channels) and a grouped one over a sequence `[N, C, L]`."""

    def __init__(self, ways=3):
        super().__init__()
        self.dw = nn.Conv1d(4, 4, 3, padding=1, groups=4)
        self.grouped = nn.Conv1d(4, 6, 3, groups=2)
        self.head = nn.Linear(6, ways)

    def forward(self, x):  # [N, 4, 6]
        return self.head(torch.tanh(self.grouped(torch.tanh(self.dw(x)))).mean(-1))


@pytest.fixture(params=["loop", "grouped", "triton"])
def strategy(request, monkeypatch):
    """Every task-batching strategy; "triton" (whose kernels have groups 1) runs grouped convolutions as
    "grouped"."""
    monkeypatch.setitem(conv.STRATEGY, "cpu", request.param)
    return request.param


@pytest.mark.parametrize("order", ORDERS)
def test_every_order(order, strategy):
    torch.manual_seed(0)
    model = DepthwiseSeparable().double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert "Conv2d+BatchNorm2d+ReLU+MaxPool2d" not in kinds
    check_orders_steps(model, tasks_for((3, 8, 8), ways=3), order)
    check_ce(DepthwiseSequence().double(), tasks_for((4, 6), ways=3), inner_lr=0.3, steps=2, order=order)


def test_anil_and_meta_sgd_rates():
    torch.manual_seed(1)
    model = DepthwiseSeparable().double()
    tasks = tasks_for((3, 8, 8), ways=3)
    check_ce(model, tasks, inner_lr=0.5, steps=2, inner_params=["head"])
    check_ce(model, tasks, inner_lr=0.5, steps=2, inner_params=["dw", "grouped"])
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks, inner_lr=rates, steps=2, lr_leaves=list(rates.values()))


def test_a_depthwise_first_layer_is_not_the_fused_first_block():
    """The first-block kernels (conv + BN + ReLU + max-pool on the input) have groups 1: a depthwise first
    layer runs its own rule."""
    model = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1, groups=3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten()
    ).double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert kinds[0] == "Conv2d", kinds
    check_ce(model, tasks_for((3, 4, 4), ways=3), inner_lr=0.3, steps=2)


def test_float32_error_is_that_of_the_autograd_loop():
    torch.manual_seed(2)
    tasks = tasks_for((3, 8, 8), ways=3)
    check_float32_error(
        DepthwiseSeparable().double(), tasks, inner_lr=0.3, steps=2, loss="cross_entropy", loss_fn=F.cross_entropy
    )
