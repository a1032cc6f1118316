"""Variance, standard deviation, the Euclidean norm, logsumexp, the elementwise maximum and minimum, division
by a value, Mish and PReLU on the fused engine, written in models as users write them: against the per-task
`create_graph` oracle in float64, every order; ties, zero spreads and zero vectors where PyTorch's conventions
decide the gradient."""

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import ORDERS, check_ce, check_falls_back, check_orders_steps, on_fused, tasks_for
from torch import nn

import fastmaml
from fastmaml.programs.fused.pointwise import ELURule, PReLURule
from fastmaml.programs.fused.reduce import LogSumExpRule, NormRule, VarRule

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


class CosineHead(nn.Module):
    """Baseline++'s cosine classifier as its code writes it (`torch.norm(x, p=2, dim=1).unsqueeze(1)
    .expand_as(x)`, `x.div(norm + 1e-5)`, the weight's rows normalized the same way), after a conv body whose
    map is scaled by its norm over (C, H, W) (`torch.linalg.vector_norm`) and whose tokens by `x.norm(dim=-1)`
    and `torch.linalg.norm(dim=...)`."""

    def __init__(self, ways=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.L = nn.Linear(2 * 3 + 3, ways, bias=False)
        self.scale = 10.0

    def forward(self, x):  # [N, 3, 2]
        h = torch.tanh(self.conv(x.unsqueeze(1)))  # [N, 2, 3, 2]
        h = h / (1 + torch.linalg.vector_norm(h, dim=(1, 2, 3), keepdim=True))
        tokens = h.sum(-1).transpose(1, 2)  # [N, 3, 2]
        z = torch.cat([tokens.flatten(1), tokens.norm(dim=-1) * torch.linalg.norm(tokens, dim=2)], 1)
        zn = torch.norm(z, p=2, dim=1).unsqueeze(1).expand_as(z)
        z = z.div(zn + 1e-5)
        wn = torch.norm(self.L.weight, p=2, dim=1).unsqueeze(1).expand_as(self.L.weight)
        return self.scale * F.linear(z, self.L.weight.div(wn + 1e-5))


class PReLUNet(nn.Module):
    """PReLU with a slope per channel after a conv, with one slope after a Linear, with a slope per feature
    on vectors, and `F.prelu` with the model's own parameter (slopes initialized apart, some negative)."""

    def __init__(self, ways=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act_c = nn.PReLU(2)
        self.fc = nn.Linear(2 * 3 * 2, 5)
        self.act_1 = nn.PReLU()
        self.act_f = nn.PReLU(5, init=0.1)
        self.slope = nn.Parameter(torch.tensor([0.3, -0.2, 0.5, 0.05, 0.4]))
        self.head = nn.Linear(10, ways)
        with torch.no_grad():
            self.act_c.weight.copy_(torch.tensor([0.2, -0.1]))

    def forward(self, x):  # [N, 3, 2]
        h = self.act_c(self.conv(x.unsqueeze(1))).flatten(1)
        h = self.act_1(self.fc(h))
        return self.head(torch.cat([self.act_f(h), F.prelu(h * h - 0.1, self.slope)], 1))


MODELS = {
    "spread": (Spread, (3, 2)),
    "prelu": (PReLUNet, (3, 2)),
    "logsumexp": (LogSumExp, (3, 2)),
    "maxmin": (MaxMin, (4,)),
    "norms": (CosineHead, (3, 2)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("order", ORDERS)
def test_every_order(name, order):
    torch.manual_seed(0)
    cls, shape = MODELS[name]
    check_orders_steps(cls().double(), tasks_for(shape, ways=3, shots=2), order)


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
    check_against_twin(ConstantRows().double(), ConstantRows(zero_std=True).double())


def check_against_twin(model, twin):
    """First order on `model` itself; second order and checkpoint against `twin`, the same model with the
    quantity whose double backward PyTorch gives as NaN written as the 0 it is."""
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


@pytest.mark.parametrize("dims, keepdim", [((-1,), True), ((1, 2), False), ((2,), False)])
def test_norm_rule_against_autograd(dims, keepdim):
    torch.manual_seed(7)
    rule = NormRule("n", "norm", dims, keepdim)
    check_rule(rule, lambda x: x.norm(dim=tuple(d + 1 if d > 0 else d for d in dims), keepdim=keepdim))


@pytest.mark.parametrize("channels, shape", [(1, (4, 3, 5)), (4, (4, 3, 5)), (3, (3,)), (1, ())])
@pytest.mark.parametrize("per_task", [True, False])
def test_prelu_rule_against_autograd(channels, shape, per_task):
    """PReLU's four passes against autograd, with the slope per task (adapted, with a direction) or common
    (shared: no direction), on `[T, N, *shape]` values. The gradient at exact zeros takes the slope, as
    PyTorch's backward does; its double backward takes 1 there for the tangent (so does forward mode), so
    the tangent passes are checked away from 0."""
    torch.manual_seed(9)
    rule = PReLURule("p", "PReLU", channels)
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    zeros = x.clone()
    zeros[..., :1] = 0.0
    a = (torch.rand(2, channels, dtype=torch.float64) - 0.3) if per_task else torch.rand(channels).double()
    a.requires_grad_()
    ad = torch.randn_like(a) if per_task else torch.zeros_like(a)

    def f(x, a):
        return torch.stack([F.prelu(x[t], a[t] if per_task else a) for t in range(2)])

    def grads(x, gy):
        x = x.clone().requires_grad_()
        y = f(x, a)
        return (x, y, *torch.autograd.grad(y, (x, a), gy, create_graph=True))

    for point in (zeros, x):
        gy = torch.randn_like(point)
        out, saved = rule.forward(None, point, (a.detach(),), True)
        assert torch.allclose(out, f(point, a).detach(), rtol=1e-12, atol=1e-12)
        _, _, gx, ga = grads(point, gy)
        outs = (torch.empty((2, channels), dtype=torch.float64),)
        assert torch.allclose(rule.backward(None, gy, saved, (a.detach(),), True, outs), gx, rtol=1e-12, atol=1e-12)
        assert torch.allclose(outs[0] if per_task else outs[0].sum(0), ga, rtol=1e-12, atol=1e-12)
    xd, gyd = torch.randn_like(x), torch.randn_like(x)
    v = (ad if per_task else None,)
    y2, yd, saved = rule.tangent_forward(None, x, xd, (a.detach(),), v)
    assert torch.allclose(yd, torch.func.jvp(f, (x, a.detach()), (xd, ad))[1], rtol=1e-12, atol=1e-12)
    touts = (torch.empty((2, channels), dtype=torch.float64),)
    got, got_d = rule.tangent_backward(None, gy, gyd, saved, (a.detach(),), v, True, outs, touts)
    xr, y, gx, ga = grads(x, gy)
    hvp = torch.autograd.grad((gx, ga), (xr, a), (xd, ad), retain_graph=True)
    jt = torch.autograd.grad(y, (xr, a), gyd)
    assert torch.allclose(got, gx.detach(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(got_d, hvp[0] + jt[0], rtol=1e-12, atol=1e-12)
    got_a = touts[0] if per_task else touts[0].sum(0)
    assert torch.allclose(got_a, hvp[1] + jt[1], rtol=1e-12, atol=1e-12)


class ZeroRows(nn.Module):
    """The norm of a difference of two equal maps (zero at every example, with a nonzero direction), where
    PyTorch's norm gradient is 0. `zero_norm`: the norm written as the 0 it is (times the difference, which
    keeps both maps in the graph)."""

    def __init__(self, zero_norm=False):
        super().__init__()
        self.fc, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3), nn.Linear(4, 3)
        self.b.load_state_dict(self.a.state_dict())
        self.head = nn.Linear(4, 3)
        self.zero_norm = zero_norm

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        d = self.a(h) - self.b(h)
        size = 0.0 * d[:, :1] if self.zero_norm else d.norm(dim=1, keepdim=True)
        return self.head(h * (1 + size))


def test_zero_vector_norm_follows_pytorch():
    """As for the zero spread: PyTorch's norm gradient is 0 at a zero vector, its double backward NaN; the
    second-order reference is the model with the norm written as 0."""
    torch.manual_seed(8)
    check_against_twin(ZeroRows().double(), ZeroRows(zero_norm=True).double())


@pytest.mark.parametrize("dims, keepdim", [((-1,), True), ((1, 2), False)])
def test_logsumexp_rule_against_autograd(dims, keepdim):
    torch.manual_seed(5)
    rule = LogSumExpRule("l", "logsumexp", dims, keepdim)
    check_rule(rule, lambda x: torch.logsumexp(x, tuple(d + 1 if d > 0 else d for d in dims), keepdim=keepdim))


@pytest.mark.parametrize(
    "rule, f",
    [
        (ELURule("e", "elu", 0.7), lambda x: F.elu(x, 0.7)),
        (ELURule("e", "selu", 1.6732632423543772848170429916717, 1.0507009873554804934193349852946), F.selu),
        # PyTorch's CELU backward rounds α to float32 (derivatives.yaml: `1.0/alpha.toFloat()`), 1e-8 off its
        # forward's derivative for α = 0.7: the reference is the same map through aten.elu, whose derivative is exact
        (ELURule("e", "celu", 0.7, 1.0, 1 / 0.7), lambda x: torch.ops.aten.elu(x, 0.7, 1.0, 1 / 0.7)),
    ],
)
def test_elu_family_rules_against_autograd(rule, f):
    """ELU, SELU and CELU are one rule (scale, input scale): its passes against autograd."""
    torch.manual_seed(8)
    check_rule(rule, f)


class SelfNormalizing(nn.Module):
    """A SELU MLP (module and functional forms) with CELUs: the activations compile as rules (α exact in float32,
    so that PyTorch's CELU backward, the oracle's, is exact too)."""

    def __init__(self, ways=3):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, ways)
        self.act, self.celu = nn.SELU(), nn.CELU(0.75)

    def forward(self, x):
        return self.head(self.celu(F.selu(self.b(self.act(self.a(x))))) + torch.celu(x[:, :1], 2.0))


@pytest.mark.parametrize("order", ORDERS)
def test_selu_and_celu_every_order(order):
    torch.manual_seed(9)
    model = SelfNormalizing().double()
    assert [n.rule.kind for n in on_fused(model).nodes].count("SELU") == 1
    check_orders_steps(model, tasks_for((4,), ways=3, shots=2), order)


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


def test_reductions_over_the_examples_min_over_a_dim_and_other_norms_fall_back_and_say_why():
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

    class L1Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) / self.fc(x).norm(p=1, dim=1, keepdim=True)

    class SpectralNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 6)

        def forward(self, x):
            h = self.fc(x).view(-1, 2, 3)
            return h.flatten(1) / torch.linalg.norm(h, ord=2, dim=(1, 2)).unsqueeze(1)

    class WholeNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) / torch.norm(self.fc(x))

    cases = (
        (OverExamples, "examples' dim 0"),
        (MinOverDim, "torch.min over a dim"),
        (L1Norm, "p=1"),
        (SpectralNorm, "ord=2"),
        (WholeNorm, "over all dimensions"),
    )
    for cls, why in cases:
        check_falls_back(cls(), why)


def test_float32_error_is_that_of_the_autograd_loop():
    torch.manual_seed(6)
    tasks = tasks_for((3, 2), ways=3, shots=2)
    for model in (Spread().double(), CosineHead().double()):
        check_float32_error(model, tasks, inner_lr=0.3, steps=2, loss="cross_entropy", loss_fn=F.cross_entropy)
