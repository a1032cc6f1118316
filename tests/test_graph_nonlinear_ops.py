"""Variance, standard deviation, logsumexp, the elementwise maximum and minimum, division by a value and Mish
on the fused engine, written in models as users write them: against the per-task `create_graph` oracle in
float64, every order; ties and zero spreads where PyTorch's conventions decide the gradient."""

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import ORDERS, check_ce, on_fused, tasks_for
from torch import nn

import fastmaml
from fastmaml.programs.fused.reduce import LogSumExpRule, VarRule

from oracle import assert_grads_close, autograd_meta_grad, check_float32_error


class Spread(nn.Module):
    """Token features standardized by hand (`(h − mean) / (std + eps)`), a biased variance over two dims
    without keepdim, a variance with correction 2, the spread of a conv map."""

    def __init__(self, ways=3):
        super().__init__()
        self.embed = nn.Linear(2, 4)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(4 + 1 + 3 + 2, ways)

    def forward(self, x):  # x [N, 3, 2]
        h = torch.tanh(self.embed(x))  # [N, 3, 4]
        z = (h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-3)
        whole = torch.var(h, dim=(1, 2), unbiased=False).unsqueeze(1)  # [N, 1]
        per_token = h.var(-1, correction=2)  # [N, 3]
        maps = torch.std(self.conv(x.unsqueeze(1)), (2, 3))  # [N, 2]
        return self.head(torch.cat([z.mean(1), whole, per_token, maps], 1))


class LogSumExp(nn.Module):
    """A log-softmax written by hand, and a logsumexp over two dims pooling a map."""

    def __init__(self, ways=3):
        super().__init__()
        self.embed = nn.Linear(2, 4)
        self.head = nn.Linear(4 + 1, ways)

    def forward(self, x):  # [N, 3, 2]
        h = self.embed(x)
        logp = h - torch.logsumexp(h, dim=-1, keepdim=True)
        pooled = h.logsumexp((1, 2)).unsqueeze(-1)
        return self.head(torch.cat([logp.sum(1), pooled], 1))


class MaxMin(nn.Module):
    """Elementwise maximum and minimum of two values (each form), division by a value, a number and a
    parameter divided by a value, Mish (module and functional)."""

    def __init__(self, ways=3):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(4, 5)
        self.s = nn.Parameter(torch.rand(5) + 0.5)
        self.mish = nn.Mish()
        self.head = nn.Linear(5, ways)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        h = torch.maximum(a, b) + torch.min(a, F.mish(b)) - a.minimum(torch.tanh(b))
        h = h + torch.max(self.mish(a), b) / (1 + b * b) + 1 / (2 + a * a) + self.s / (1 + a.square())
        return self.head(h)


MODELS = {"spread": (Spread, (3, 2)), "logsumexp": (LogSumExp, (3, 2)), "maxmin": (MaxMin, (4,))}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("order", ORDERS)
def test_every_order(name, order):
    torch.manual_seed(0)
    cls, shape = MODELS[name]
    model = cls().double()
    on_fused(model)
    for steps in (0, 1, 3) if order == "second" else (2,):
        check_ce(model, tasks_for(shape, ways=3, shots=2), inner_lr=0.3, steps=steps, order=order)


def test_meta_sgd_rates():
    torch.manual_seed(1)
    model = Spread().double()
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks_for((3, 2), ways=3, shots=2), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))


class Ties(nn.Module):
    """max / min of the input's first features and a Linear map of the input that equals them exactly at
    the start (integer inputs, identity weights): every element ties, and PyTorch gives each side half."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(3, 4))
            self.fc.bias.zero_()

    def forward(self, x):
        y = self.fc(x)
        return self.head(torch.cat([torch.maximum(x[:, :3], y), torch.minimum(y, x[:, 1:])], 1))


@pytest.mark.parametrize("steps", [0, 1])
def test_ties_split_the_gradient_as_pytorch_does(steps):
    model = Ties().double()
    g = torch.Generator().manual_seed(2)
    sx, qx = (torch.randint(-3, 4, (2, 6, 4), generator=g).double() for _ in range(2))
    y = torch.arange(3).repeat(2).expand(2, 6).clone()
    for order in ORDERS:
        check_ce(model, (sx, y, qx, y), inner_lr=0.3, steps=steps, order=order)


class ConstantRows(nn.Module):
    """A standard deviation and a variance of rows that are constant (one feature expanded): zero spread,
    where PyTorch's std gradient is 0 (its backward masks there). `zero_std`: the std written as the 0 it is."""

    def __init__(self, zero_std=False):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(12, 3)
        self.zero_std = zero_std

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        flat = h[:, :1].expand(-1, 4)
        spread = torch.zeros_like(flat[:, :1]) if self.zero_std else flat.std(1, keepdim=True)
        both = torch.cat([h[:, :2], flat[:, :2]], 1)
        return self.head(torch.cat([h * spread, both * flat.var(1, keepdim=True), h], 1))


def test_zero_spread_follows_pytorch():
    """PyTorch's std gradient is 0 at zero spread, but its double backward there is NaN, so the autograd
    oracle cannot do second order through it: the reference is the same model with the std written as 0
    (its value, and its gradient under PyTorch's convention). First order is checked on the model itself."""
    torch.manual_seed(3)
    model, twin = ConstantRows().double(), ConstantRows(zero_std=True).double()
    twin.load_state_dict(model.state_dict())
    tasks = tasks_for((4,), ways=3, shots=2)
    check_ce(model, tasks, inner_lr=0.3, steps=2, order="first")
    for order in ("second", "checkpoint"):
        model.zero_grad()
        fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, order=order, loss="cross_entropy")
        _, ref, _ = autograd_meta_grad(twin, tasks, inner_lr=0.3, steps=2, order=order, loss_fn=F.cross_entropy)
        assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref, 1e-9)


@pytest.mark.parametrize("std", [False, True])
@pytest.mark.parametrize("dims, keepdim", [((-1,), True), ((1, 2), False), ((2,), False)])
def test_var_rule_against_autograd(std, dims, keepdim):
    """The rule's four passes against autograd on random `[T, N, 3, 5]` values."""
    torch.manual_seed(4)
    rule = VarRule("v", "std" if std else "var", dims, 1, keepdim, std)
    check_rule(rule, lambda x: (x.std if std else x.var)(tuple(d + 1 if d > 0 else d for d in dims), keepdim=keepdim))


@pytest.mark.parametrize("dims, keepdim", [((-1,), True), ((1, 2), False)])
def test_logsumexp_rule_against_autograd(dims, keepdim):
    torch.manual_seed(5)
    rule = LogSumExpRule("l", "logsumexp", dims, keepdim)
    check_rule(rule, lambda x: torch.logsumexp(x, tuple(d + 1 if d > 0 else d for d in dims), keepdim=keepdim))


def check_rule(rule, f):
    """forward, backward, tangent forward and tangent backward of a one-input parameter-free rule against
    autograd on f (a function of the per-task value `[T, N, 3, 5]`)."""
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    xd = torch.randn_like(x)
    y = f(x)
    gy, gyd = torch.randn_like(y), torch.randn_like(y)
    out, saved = rule.forward(None, x.detach(), (), True)
    assert torch.allclose(out, y.detach(), rtol=1e-12, atol=1e-12)
    (gx,) = torch.autograd.grad(y, x, gy, create_graph=True)
    assert torch.allclose(rule.backward(None, gy, saved, (), True, ()), gx, rtol=1e-12, atol=1e-12)
    y2, yd, saved = rule.tangent_forward(None, x.detach(), xd, (), ())
    assert torch.allclose(yd, torch.func.jvp(f, (x.detach(),), (xd,))[1], rtol=1e-12, atol=1e-12)
    got, got_d = rule.tangent_backward(None, gy, gyd, saved, (), (), True, (), ())
    (hvp,) = torch.autograd.grad(gx, x, xd, retain_graph=True)
    (jt,) = torch.autograd.grad(y, x, gyd)
    assert torch.allclose(got, gx.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_d, hvp + jt, rtol=1e-12, atol=1e-12)


def test_reductions_over_the_examples_and_min_over_a_dim_fall_back_and_say_why():
    class OverExamples(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) / self.fc(x).std(0, keepdim=True)

    class MinOverDim(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) - torch.min(self.fc(x), 1, keepdim=True)[0]

    for cls, why in ((OverExamples, "examples' dim 0"), (MinOverDim, "torch.min over a dim")):
        e = fastmaml.explain(cls(), "cross_entropy")
        assert e.program == "torch.func" and why in e.reason, e


def test_float32_error_is_that_of_the_autograd_loop():
    torch.manual_seed(6)
    tasks = tasks_for((3, 2), ways=3, shots=2)
    check_float32_error(Spread().double(), tasks, inner_lr=0.3, steps=2, loss="cross_entropy", loss_fn=F.cross_entropy)
