"""Functions and methods without a rule of their own, on the fused engine: the model's own call per task
through torch.func inside the fused program (`torch.sort(...).values`, `topk`, `cumprod`, `cummax`, special
functions, a call with a parameter or a buffer among its arguments), against the per-task `create_graph`
oracle in float64, every order, Meta-SGD rates, float32 within twice the loop's error; what still falls
back (two values, integer results, random or in-place calls) says why."""

import pytest
import torch
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


class Functions(nn.Module):
    """Tokens `[N, 5, 3]` through calls without rules: sorted features, the top two, a running product and
    maximum, `erf`, a lerp towards a parameter, a remainder by a buffer."""

    def __init__(self, ways=3):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.target = nn.Parameter(torch.randn(4) * 0.5)
        self.register_buffer("period", torch.tensor([1.5, 2.0, 2.5, 3.0]))
        self.head = nn.Linear(4 + 2 + 4 + 4 + 4 + 4, ways)

    def forward(self, x):
        h = torch.tanh(self.inp(x))  # [N, 5, 4]
        s = torch.sort(h, dim=-1).values.mean(1)
        top = h.topk(2, dim=-1)[0].sum(1)
        run = torch.cumprod(torch.sigmoid(h), dim=1)[:, -1]
        peak = h.cummax(dim=1).values.mean(1)
        special = torch.special.erf(h).mean(1) + torch.lerp(h, self.target, 0.3).mean(1)
        wrapped = torch.remainder(h + 2.0, self.period).mean(1)
        return self.head(torch.cat([s, top, run, peak, special, wrapped], 1))


def token_tasks(seed=0):
    return tasks_for((5, 3), ways=3, shots=2, seed=seed)


@pytest.mark.parametrize("order", ORDERS)
def test_every_order(order):
    torch.manual_seed(0)
    model = Functions().double()
    kinds = {n.rule.kind for n in on_fused(model).nodes}
    assert {"sort (torch.func)", "topk (torch.func)", "cumprod (torch.func)", "lerp (torch.func)"} <= kinds, kinds
    check_orders_steps(model, token_tasks(), order)


def test_meta_sgd_rates_anil_and_float32():
    torch.manual_seed(1)
    check_variants(Functions().double(), token_tasks(1), token_tasks(2), inner_params=["head", "target"])


def test_explain_marks_the_calls():
    text = str(fastmaml.explain(Functions(), "cross_entropy"))
    assert "sort (torch.func)" in text and "erf (torch.func)" in text, text


class TwoValues(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return torch.atan2(h, h + 1.0)


class Indices(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h * torch.argsort(h, dim=-1).float()


class Flags(Indices):
    def forward(self, x):
        h = self.fc(x)
        return h * torch.isnan(h).to(h.dtype)


class SortIndices(Indices):
    def forward(self, x):
        h = self.fc(x)
        return h * torch.sort(h, dim=-1).indices


class Random(Indices):
    def forward(self, x):
        h = self.fc(x)
        return h + torch.randn_like(h)


class InPlace(Indices):
    def forward(self, x):
        return self.fc(x).exp_()


@pytest.mark.parametrize(
    "cls, reason",
    [
        (TwoValues, "no rule for this operation"),
        (Indices, "argsort returns integers"),
        (Flags, "isnan returns integers, booleans"),
        (SortIndices, "indices sort (torch.func) returns are integers"),
        (Random, "random"),
        (InPlace, "in-place"),
    ],
)
def test_what_does_not_compile_falls_back_and_says_why(cls, reason):
    check_falls_back(cls(), reason)


class TupleIndexedTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return h + torch.special.log1p(h.exp())[1]


def test_a_tensor_indexed_as_a_tuple_raises_a_clear_error():
    """`f(x)[1]` of a function that returns a tensor picks an example, which the fused engine cannot know
    when it compiles: the call says so."""
    tasks = tasks_for((4,), ways=3, shots=2)
    with pytest.raises(ValueError, match="returns a tensor, which the model indexes by 1"):
        fastmaml.meta_step(TupleIndexedTensor().double(), tasks, loss="cross_entropy")


def test_rates_of_a_call_with_a_parameter():
    """The parameter the call reads gets its exact meta-gradient (and its own rates)."""
    torch.manual_seed(3)
    model = Functions().double()
    rates = {n: torch.full_like(p, 0.2).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, token_tasks(3), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))
