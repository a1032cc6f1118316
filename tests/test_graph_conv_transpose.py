"""Transposed and 3-d convolutions on the fused engine (conv_nd.py): ConvTranspose1d/2d/3d, Conv3d and
their functional forms, in a small decoder written as a user writes one, against the per-task
`create_graph` oracle in float64, every order, with Meta-SGD rates, and with shared (common) convolution
weights (ANIL)."""

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import (
    ORDERS,
    check_falls_back,
    check_orders_steps,
    check_variants,
    on_fused,
    tasks_for,
)
from torch import nn

from oracle import check_adapt_matches_meta_step


class Decoder(nn.Module):
    """Down with a strided conv, up with transposed convolutions (output_padding, no bias, groups), a
    functional 1-d transposed convolution on the model's own weight, and a 3-d convolution pair."""

    def __init__(self, ways=3):
        super().__init__()
        self.enc = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.up2 = nn.ConvTranspose2d(4, 3, 2, stride=2, bias=False)
        self.seq_weight = nn.Parameter(torch.randn(4, 2, 3) * 0.3)
        self.seq_bias = nn.Parameter(torch.randn(2) * 0.1)
        self.c3 = nn.Conv3d(1, 2, (1, 3, 3), padding=(0, 1, 1))
        self.t3 = nn.ConvTranspose3d(2, 2, (2, 1, 1), groups=2)
        self.head = nn.Linear(3 + 2 + 2, ways)

    def forward(self, x):  # [N, 2, 6, 6]
        h = torch.relu(self.enc(x))  # [N, 4, 3, 3]
        u = torch.tanh(self.up(h))  # [N, 4, 6, 6]
        a = F.adaptive_avg_pool2d(self.up2(u), 1).flatten(1)  # [N, 3]
        seq = F.conv_transpose1d(h.flatten(2), self.seq_weight, self.seq_bias, stride=2)  # [N, 2, 19]
        v = self.t3(torch.relu(self.c3(u[:, :1].unsqueeze(1))))  # [N, 2, 2, 6, 6]
        return self.head(torch.cat([a, seq.mean(-1), v.mean((2, 3, 4))], 1))


def image_tasks(seed=0):
    return tasks_for((2, 6, 6), ways=3, shots=2, seed=seed)


@pytest.mark.parametrize("order", ORDERS)
def test_every_order(order):
    torch.manual_seed(0)
    model = Decoder().double()
    kinds = {n.rule.kind for n in on_fused(model).nodes}
    assert {"ConvTranspose2d", "ConvTranspose3d", "Conv3d", "conv_transpose1d"} <= kinds
    check_orders_steps(model, image_tasks(), order)


def test_meta_sgd_rates_shared_weights_and_float32():
    torch.manual_seed(1)
    model = Decoder().double()
    check_variants(model, image_tasks(1), image_tasks(2), inner_params=["head", "t3", "seq_bias"])


def test_an_output_size_argument_falls_back_and_says_why():
    class OutputSize(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 3, 3, stride=2)
            self.head = nn.Linear(3, 3)

        def forward(self, x):
            return self.head(self.up(x, output_size=[13, 13]).mean((2, 3)))

    check_falls_back(OutputSize(), "more or fewer than one argument")


def test_adapt_matches_meta_step():
    """`fastmaml.adapt`'s outputs are differentiable through the rule (its forward under autograd)."""
    torch.manual_seed(3)
    check_adapt_matches_meta_step(
        Decoder().double(), image_tasks(3), loss_fn=F.cross_entropy, loss="cross_entropy", inner_lr=0.3, steps=2
    )
