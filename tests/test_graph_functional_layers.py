"""Layers without a rule of their own on the fused engine (functional.py): nn.LSTM (two layers, its final
states read), a bidirectional nn.GRU, nn.MaxPool1d, nn.Softsign and nn.LocalResponseNorm run their own forward
per task through torch.func inside the fused program (task by task where vmap cannot batch them), the rest
of the model on its rules; against the per-task `create_graph` oracle in float64, every order, with Meta-SGD
rates, shared (common) recurrent weights, float32, and through `fastmaml.adapt`."""

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

from oracle import check_adapt_matches_meta_step, check_float32_error


class Recurrent(nn.Module):
    """Tokens `[N, L, 3]` through a two-layer LSTM (its output, the last layer's h_n and the first layer's c_n
    read), a bidirectional GRU on its output, and pooled, Softsign'd, LRN'd features."""

    def __init__(self, ways=3):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.lstm = nn.LSTM(4, 4, num_layers=2, batch_first=True)
        self.gru = nn.GRU(4, 4, batch_first=True, bidirectional=True)
        self.pool, self.act, self.lrn = nn.MaxPool1d(2), nn.Softsign(), nn.LocalResponseNorm(2)
        self.head = nn.Linear(4 + 4 + 8 + 4, ways)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        out, (h_n, c_n) = self.lstm(h)
        g_out, _ = self.gru(out)
        p = self.act(self.pool(out.transpose(1, 2)))  # [N, 4, 2]
        r = self.lrn(p.unsqueeze(-1)).flatten(1)  # [N, 8]
        return self.head(torch.cat([h_n[-1], c_n[0], g_out[:, -1], r[:, :4]], 1))


def token_tasks(seed=0):
    return tasks_for((5, 3), ways=3, shots=2, seed=seed)


@pytest.mark.parametrize("order", ORDERS)
def test_every_order(order):
    torch.manual_seed(0)
    model = Recurrent().double()
    kinds = {n.rule.kind for n in on_fused(model).nodes}
    assert {"LSTM (torch.func)", "GRU (torch.func)", "MaxPool1d (torch.func)", "Softsign (torch.func)"} <= kinds
    check_orders_steps(model, token_tasks(), order)


def test_meta_sgd_rates_shared_recurrent_weights_float32_and_adapt():
    torch.manual_seed(1)
    model = Recurrent().double()
    check_variants(model, token_tasks(1), token_tasks(2), inner_params=["head", "gru"])
    check_adapt_matches_meta_step(
        model, token_tasks(3), loss_fn=F.cross_entropy, loss="cross_entropy", inner_lr=0.3, steps=2
    )


class Cells(nn.Module):
    """An LSTMCell (its h and c read) and a GRUCell on a value, without initial states."""

    def __init__(self, ways=3):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.lstm, self.gru = nn.LSTMCell(5, 4), nn.GRUCell(4, 4)
        self.head = nn.Linear(8, ways)

    def forward(self, x):
        h, c = self.lstm(torch.tanh(self.inp(x)))
        return self.head(torch.cat([self.gru(h), c], 1))


@pytest.mark.parametrize("order", ORDERS)
def test_recurrent_cells_every_order(order):
    torch.manual_seed(2)
    model = Cells().double()
    kinds = [n.rule.kind for n in on_fused(model).nodes]
    assert kinds.count("LSTMCell (torch.func)") == 2 and "GRUCell (torch.func)" in kinds
    check_orders_steps(model, tasks_for((4,), ways=3, shots=2), order)
    if order == "second":
        check_float32_error(
            model,
            tasks_for((4,), ways=3, shots=2, seed=1),
            inner_lr=0.3,
            steps=2,
            loss="cross_entropy",
            loss_fn=F.cross_entropy,
        )


def test_what_does_not_compile_says_why():
    class States(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            _, h_n = self.gru(x)
            return self.head(h_n.squeeze(0))  # h_n [1, N, 4]: the examples second

    check_falls_back(States(), "h_n[i]")
