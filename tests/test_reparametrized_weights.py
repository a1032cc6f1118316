"""Weights PyTorch computes from other parameters on the fused engine: `torch.nn.utils.parametrize`
(`parametrizations.weight_norm`, a user's own parametrizations, chained, with their own parameters) and the
older weight-norm hook (`torch.nn.utils.weight_norm`, as Baseline++'s cosine classifier applies it), read by
a layer's call or in `forward` (`F.linear(x, self.fc.weight)`). Against the per-task `create_graph` oracle in
float64, every order.

PyTorch's double backward of `torch._weight_norm` is wrong (gradgradcheck fails on it), so the oracle here
computes weight normalization as its definition, v · g / ‖v‖ (the `exact_weight_norm` fixture), and one test
checks the meta-gradient against finite differences of the meta-loss, which needs no second derivative."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import ORDERS, check_ce, check_orders_steps, on_fused, tasks_for
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.weight_norm import WeightNorm

import fastmaml
from fastmaml.programs import reparam

from oracle import autograd_meta_grad, check_float32_error, check_meta_step

pytestmark = pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")


@pytest.fixture
def exact_weight_norm(monkeypatch):
    """The oracle's weight normalization computed as its definition (PyTorch's double backward is wrong)."""
    monkeypatch.setattr(torch, "_weight_norm", reparam.weight_norm)
    monkeypatch.setattr(importlib.import_module("torch.nn.utils.weight_norm"), "_weight_norm", reparam.weight_norm)


class WeightNormed(nn.Module):
    """A conv body and a Linear, each under `parametrizations.weight_norm` (dim 0, and the whole tensor), the
    Linear's weight also read in `forward` through its property."""

    def __init__(self, ways=3):
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv2d(1, 3, 3, padding=1))
        self.fc = parametrizations.weight_norm(nn.Linear(3 * 2 * 2, 5), dim=None)
        self.head = nn.Linear(5, ways)

    def forward(self, x):  # [N, 4]
        h = F.relu(self.conv(x.view(-1, 1, 2, 2))).flatten(1)
        return self.head(torch.tanh(self.fc(h)) + 0.5 * F.linear(h, self.fc.weight))


class DistLinear(nn.Module):
    """Baseline++'s cosine classifier as its code writes it: `WeightNorm.apply(self.L, "weight", dim=0)` and
    the features divided by their norm, after a Linear body."""

    def __init__(self, ways=3):
        super().__init__()
        self.body = nn.Linear(4, 16)
        self.L = nn.Linear(16, ways, bias=False)
        WeightNorm.apply(self.L, "weight", dim=0)
        self.scale_factor = 2.0

    def forward(self, x):
        x = F.relu(self.body(x))
        x_norm = torch.norm(x, p=2, dim=1).unsqueeze(1).expand_as(x)
        x_normalized = x.div(x_norm + 0.00001)
        return self.scale_factor * self.L(x_normalized)


class Symmetric(nn.Module):
    """A symmetric matrix from the upper triangle, the lower one scaled by a plain attribute."""

    def __init__(self):
        super().__init__()
        self.factor = 1.0

    def forward(self, X):
        return X.triu() + self.factor * X.triu(1).transpose(-1, -2)


class Scaled(nn.Module):
    """A parametrization with a learned parameter of its own."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, X):
        return X * self.scale


class Positive(nn.Module):
    def forward(self, X):
        return X.exp()


class OwnParametrizations(nn.Module):
    """A symmetric weight scaled by a learned factor (two parametrizations chained), a LayerNorm whose
    scale is kept positive, and a Linear under the old weight-norm hook whose weight is also read in
    `forward` (the hook's tensor)."""

    def __init__(self, ways=3):
        super().__init__()
        self.square = nn.Linear(4, 4)
        parametrize.register_parametrization(self.square, "weight", Symmetric())
        parametrize.register_parametrization(self.square, "weight", Scaled())
        self.norm = nn.LayerNorm(4)
        parametrize.register_parametrization(self.norm, "weight", Positive())
        self.fc = torch.nn.utils.weight_norm(nn.Linear(4, ways))

    def forward(self, x):
        h = self.norm(torch.tanh(self.square(x)))
        return self.fc(h) + 0.5 * F.linear(h, self.fc.weight)


MODELS = {"weight_norm": WeightNormed, "distlinear": DistLinear, "own": OwnParametrizations}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("order", ORDERS)
def test_every_order(name, order, exact_weight_norm):
    torch.manual_seed(0)
    check_orders_steps(MODELS[name]().double(), tasks_for((4,), ways=3, shots=2), order)


@pytest.mark.parametrize("inner_params", [["L"], ["body"], ["fc"], ["square", "fc"]])
def test_inner_params(inner_params, exact_weight_norm):
    """ANIL-style splits: the reparametrized weight adapted while the body is shared, or the other way."""
    torch.manual_seed(1)
    model = (DistLinear if inner_params[0] in ("L", "body") else OwnParametrizations)().double()
    on_fused(model)
    for order in ("second", "first"):
        check_ce(model, tasks_for((4,), ways=3, shots=2), inner_lr=0.3, steps=2, order=order, inner_params=inner_params)


def test_meta_sgd_rates(exact_weight_norm):
    torch.manual_seed(2)
    model = WeightNormed().double()
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks_for((4,), ways=3, shots=2), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))


def meta_loss_along(model, tasks, u, eps):
    """The meta-loss (the autograd loop's, first-order inner gradients only) at the parameters + eps · u."""
    params = list(model.parameters())
    with torch.no_grad():
        for p, d in zip(params, u):
            p.add_(d, alpha=eps)
    loss = autograd_meta_grad(model, tasks, inner_lr=0.3, steps=2, order="first", loss_fn=F.cross_entropy)[0]
    with torch.no_grad():
        for p, d in zip(params, u):
            p.sub_(d, alpha=eps)
    return float(loss)


@pytest.mark.parametrize("cls", [WeightNormed, DistLinear])
def test_meta_gradient_matches_finite_differences(cls):
    """Independent of every double backward (PyTorch's weight norm's included): the directional derivative
    of the meta-loss, by central differences in float64, against the meta-gradient along the direction."""
    torch.manual_seed(3)
    tasks = tasks_for((4,), ways=3, shots=2)
    model = cls().double()
    model.zero_grad()
    fastmaml.meta_step(model, tasks, inner_lr=0.3, steps=2, order="second", loss="cross_entropy")
    u = [torch.randn_like(p) for p in model.parameters()]
    along = sum(float((p.grad * d).sum()) for p, d in zip(model.parameters(), u))
    eps = 1e-5
    numeric = (meta_loss_along(model, tasks, u, eps) - meta_loss_along(model, tasks, u, -eps)) / (2 * eps)
    assert abs(numeric - along) <= 1e-7 * max(abs(along), 1.0), (numeric, along)


@pytest.mark.parametrize(
    "shape, g_shape, dim", [((5, 4), (5, 1), 0), ((5, 4), (1, 4), 1), ((3, 2, 3, 3), (3, 1, 1, 1), 0), ((5, 4), (), -1)]
)
def test_weight_norm_is_pytorchs_with_a_correct_second_derivative(shape, g_shape, dim):
    torch.manual_seed(4)
    v = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(g_shape, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(reparam.weight_norm(v, g, dim), torch._weight_norm(v, g, dim), rtol=1e-13, atol=1e-13)
    assert torch.autograd.gradgradcheck(lambda v, g: reparam.weight_norm(v, g, dim), (v, g))


def test_explain_names_the_weights_and_spectral_norm_falls_back():
    text = str(fastmaml.explain(WeightNormed(), "cross_entropy"))
    assert "_WeightNorm(conv.parametrizations.weight.original0, conv.parametrizations.weight.original1)" in text
    assert "weight_norm(L.weight_v, L.weight_g, dim=0)" in str(fastmaml.explain(DistLinear(), "cross_entropy"))

    class Spectral(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = parametrizations.spectral_norm(nn.Linear(4, 3))

        def forward(self, x):
            return self.fc(x)

    e = fastmaml.explain(Spectral(), "cross_entropy")
    assert e.program == "torch.func" and "buffers" in e.reason and "_SpectralNorm" in e.reason, e


def test_other_hooks_still_fall_back():
    model = DistLinear()
    model.body.register_forward_hook(lambda m, i, o: o * 2)
    e = fastmaml.explain(model, "cross_entropy")
    assert e.program == "torch.func" and "hooks" in e.reason, e


def test_changes_to_the_parametrizations_recompile(exact_weight_norm):
    """Nothing compiled goes stale: after `remove_parametrizations`, the old hook's `remove_weight_norm`, or a
    change of a parametrization's plain attribute, the next meta-step computes what the model now does."""
    torch.manual_seed(5)
    tasks = tasks_for((4,), ways=3, shots=2)

    def set_scale(m):
        m.square.parametrizations.weight[0].factor = 3.0

    for model, change in (
        (WeightNormed().double(), lambda m: parametrize.remove_parametrizations(m.fc, "weight")),
        (DistLinear().double(), lambda m: torch.nn.utils.remove_weight_norm(m.L)),
        (OwnParametrizations().double(), set_scale),
    ):
        check_ce(model, tasks, inner_lr=0.3, steps=2)
        change(model)
        on_fused(model)
        check_ce(model, tasks, inner_lr=0.3, steps=2)


class Unsupported(nn.Module):
    """Weight norm in a model that falls back (atan2 of two values has no rule): the torch.func program."""

    def __init__(self, ways=3):
        super().__init__()
        self.fc = parametrizations.weight_norm(nn.Linear(4, 5))
        self.old = torch.nn.utils.weight_norm(nn.Linear(5, ways))

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.old(torch.atan2(h, h + 2.0))


@pytest.mark.parametrize("order", ["second", "checkpoint"])
def test_torch_func_program_computes_weight_norm_second_order(order, exact_weight_norm):
    """PyTorch's weight norm has no forward-mode derivative, which the torch.func program's HVP takes: its
    copy of the model computes weight norm as its definition."""
    torch.manual_seed(6)
    model = Unsupported().double()
    assert fastmaml.explain(model, "cross_entropy").program == "torch.func"
    tasks = tasks_for((4,), ways=3, shots=2)
    check_meta_step(model, tasks, inner_lr=0.3, steps=2, order=order, loss="cross_entropy", loss_fn=F.cross_entropy)


def test_float32_error_is_that_of_the_autograd_loop(exact_weight_norm):
    torch.manual_seed(7)
    tasks = tasks_for((4,), ways=3, shots=2)
    for cls in (WeightNormed, DistLinear):
        check_float32_error(cls().double(), tasks, inner_lr=0.3, steps=2, loss="cross_entropy", loss_fn=F.cross_entropy)
