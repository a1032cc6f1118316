"""Tensors a model computes from its parameters alone (gates, learned temperatures, LoRA weights, weights
normalized by hand, tied transposed weights) on the fused engine (programs/fused/derived.py): against the
per-task `create_graph` oracle in float64, every order, Meta-SGD rates, ANIL-like subsets that mix adapted
and shared parameters in one expression; what does not compile falls back and says why."""

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import ORDERS, check_ce, check_orders_steps, on_fused, tasks_for
from test_implicit import implicit_oracle
from torch import nn

import fastmaml
from fastmaml.programs import FusedProgram
from fastmaml.programs.fused.derived import Derived
from fastmaml.programs.fused.graph import Ref

from oracle import assert_grads_close, check_adapt_matches_meta_step, check_float32_error


class Gated(nn.Module):
    """A conv net with a sigmoid gate per channel, a learned temperature it divides by, exp of a log-scale,
    a bias made of two parameters, and a softplus-positive scale."""

    def __init__(self, ways=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gate = nn.Parameter(torch.randn(4, 1, 1))
        self.log_scale = nn.Parameter(torch.randn(4) * 0.3)
        self.shift = nn.Parameter(torch.randn(4))
        self.offset = nn.Parameter(torch.randn(4))
        self.raw = nn.Parameter(torch.randn(()))
        self.head = nn.Linear(4, ways)
        self.temperature = nn.Parameter(torch.tensor(1.7))

    def forward(self, x):
        h = torch.tanh(self.conv(x)) * torch.sigmoid(self.gate)  # [N, 4, H, W] * [4, 1, 1]
        h = h.mean((2, 3)) * self.log_scale.exp() + (self.shift + 0.5 * self.offset)
        h = h * F.softplus(self.raw)
        return self.head(h) / self.temperature


class LoRA(nn.Module):
    """A Linear layer with a low-rank update W + A @ B, and a Linear whose weight is the first's
    normalized by hand (weight normalization: g · v / ‖v‖)."""

    def __init__(self, ways=3):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.lora_a = nn.Parameter(torch.randn(5, 2) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(2, 6) * 0.3)
        self.v = nn.Parameter(torch.randn(ways, 5))
        self.g = nn.Parameter(torch.rand(ways) + 0.5)

    def forward(self, x):
        h = F.elu(F.linear(x, self.fc.weight + self.lora_a @ self.lora_b, self.fc.bias))
        w = self.g.unsqueeze(1) * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(h, w)


class TiedAutoencoder(nn.Module):
    """Encoder W, decoder Wᵀ (the same slot read directly and through a transpose), and a derived scale
    read twice."""

    def __init__(self, ways=3):
        super().__init__()
        self.W = nn.Parameter(torch.randn(4, 6) * 0.4)
        self.b = nn.Parameter(torch.zeros(4))
        self.c = nn.Parameter(torch.zeros(6))
        self.s = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, ways)

    def forward(self, x):
        code = torch.tanh(F.linear(x, self.W, self.b))
        scale = torch.sigmoid(self.s)
        recon = F.linear(code, self.W.t(), self.c) * scale
        return self.head(recon * scale + x)


class WeightNormConv(nn.Module):
    """A convolution whose weight is normalized per output channel by hand, and a frozen buffer it divides by."""

    def __init__(self, ways=3):
        super().__init__()
        self.v = nn.Parameter(torch.randn(3, 1, 3, 3))
        self.g = nn.Parameter(torch.rand(3) + 0.5)
        self.bias = nn.Parameter(torch.zeros(3))
        self.register_buffer("norm_by", torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1))
        self.head = nn.Linear(3, ways)

    def forward(self, x):
        w = self.g.view(-1, 1, 1, 1) * self.v / self.v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        h = F.relu(F.conv2d(x, w, self.bias, padding=1)) / self.norm_by
        return self.head(h.mean((2, 3)))


MODELS = {
    "gated": (Gated, (1, 5, 5)),
    "lora": (LoRA, (6,)),
    "tied": (TiedAutoencoder, (6,)),
    "wn": (WeightNormConv, (1, 5, 5)),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("order", ORDERS)
def test_derived_parameters_every_order(name, order):
    torch.manual_seed(0)
    cls, shape = MODELS[name]
    model = cls().double()
    assert on_fused(model).derived, "expected derived tensors"
    check_orders_steps(model, tasks_for(shape, ways=3, shots=2), order, inner_lr=0.2)


@pytest.mark.parametrize(
    "name, inner_params",
    [
        ("gated", ["gate", "temperature"]),  # each expression entirely adapted or entirely shared
        ("gated", ["shift"]),  # shift + 0.5 offset: one adapted leaf, one shared
        ("lora", ["lora_a", "lora_b"]),  # the adapters adapted, the base weight shared
        ("lora", ["fc", "g"]),  # W adapted, A @ B shared; g adapted, v shared (a nonlinear mix)
        ("tied", ["s", "head"]),
    ],
)
def test_expressions_that_mix_adapted_and_shared_parameters(name, inner_params):
    """The shared leaves get the exact mixed second-order term through the expression."""
    torch.manual_seed(1)
    cls, shape = MODELS[name]
    model = cls().double()
    for order in ("second", "first"):
        check_ce(
            model, tasks_for(shape, ways=3, shots=2), inner_lr=0.3, steps=2, order=order, inner_params=inner_params
        )


def test_meta_sgd_rates():
    torch.manual_seed(2)
    model = LoRA().double()
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks_for((6,), ways=3, shots=2), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))


def test_implicit_order_matches_the_dense_solve():
    torch.manual_seed(3)
    model = Gated().double()
    tasks = tasks_for((1, 5, 5), ways=3, shots=2)
    kw = dict(inner_lr=0.05, steps=3, implicit_lambda=20.0)
    model.zero_grad()
    fastmaml.meta_step(model, tasks, order="implicit", cg_steps=60, loss="cross_entropy", **kw)
    got = {n: p.grad for n, p in model.named_parameters()}
    adapted = [n for n, _ in model.named_parameters()]
    ref = implicit_oracle(model, tasks, lr=0.05, steps=3, lam=20.0, adapted=adapted, loss_fn=F.cross_entropy)
    assert_grads_close(got, ref, 1e-8)


@pytest.mark.parametrize("order", ORDERS)
def test_adapt_then_an_outer_loss_gives_the_meta_gradient(order):
    """`adapt`'s differentiable forward computes the derived tensors under autograd (vmap over tasks)."""
    torch.manual_seed(4)
    kwargs = dict(inner_lr=0.3, steps=2, order=order, loss="cross_entropy")
    check_adapt_matches_meta_step(
        TiedAutoencoder().double(), tasks_for((6,), ways=3, shots=2), loss_fn=F.cross_entropy, **kwargs
    )


def test_a_buffer_changed_in_place_is_read_at_every_call():
    """Division by a buffer is by its reciprocal computed at every call: a buffer the user updates in place
    (a running scale) is not frozen into the program."""
    torch.manual_seed(5)
    model = WeightNormConv().double()
    tasks = tasks_for((1, 5, 5), ways=3, shots=2)
    check_ce(model, tasks, inner_lr=0.2, steps=1)
    with torch.no_grad():
        model.norm_by.mul_(3.0)
    check_ce(model, tasks, inner_lr=0.2, steps=1)


def test_float32_error_is_that_of_the_autograd_loop():
    torch.manual_seed(6)
    tasks = tasks_for((6,), ways=3, shots=2)
    check_float32_error(LoRA().double(), tasks, inner_lr=0.3, steps=2, loss="cross_entropy", loss_fn=F.cross_entropy)


def test_explain_lists_the_derived_tensors():
    text = str(fastmaml.explain(Gated(), "cross_entropy"))
    assert "d0 = sigmoid(gate)" in text and "with d0" in text
    assert "1 / temperature" in text and "log_scale.exp()" in text


def test_derived_pullbacks_against_autograd():
    """Derived's value, tangent and both pullbacks against autograd on a nonlinear expression of a per-task
    and a common leaf."""
    torch.manual_seed(7)
    d = Derived(
        lambda L: torch.sigmoid(L[0]) * (L[1] @ L[1].t()).sum(0),
        (Ref("a", 0), Ref("s", 0)),
        ((3,), (3, 2)),
        (3,),
        "",
    )
    a = torch.randn(4, 3, dtype=torch.float64)
    s = torch.randn(3, 2, dtype=torch.float64)
    va = torch.randn(4, 3, dtype=torch.float64)
    g, gd = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    grads, tangents = d.pullback_tangent([a, s], [va, None], g, gd)
    (pulled_a, pulled_s) = d.pullback([a, s], g)
    for t in range(4):
        at, st = a[t].clone().requires_grad_(), s.clone().requires_grad_()
        D = d.fn([at, st])
        assert torch.allclose(d.value([a, s])[t], D)
        ga, gs = torch.autograd.grad(D, (at, st), g[t], create_graph=True)
        Dd = torch.autograd.functional.jvp(lambda x: d.fn([x, s]), a[t], va[t])[1]
        assert torch.allclose(d.tangent([a, s], [va, None])[t], Dd)
        # tangent of Jᵀ g along (va, 0), plus Jᵀ gd
        ha, hs = torch.autograd.grad((ga * va[t]).sum(), (at, st), retain_graph=True)
        ja, js = torch.autograd.grad(D, (at, st), gd[t])
        for got, want in ((grads[0][t], ga), (grads[1][t], gs), (pulled_a[t], ga), (pulled_s[t], gs)):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-13)
        assert torch.allclose(tangents[0][t], ha + ja, rtol=1e-12, atol=1e-13)
        assert torch.allclose(tangents[1][t], hs + js, rtol=1e-12, atol=1e-13)


class Random(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return F.linear(x, self.fc.weight + 0.01 * torch.randn_like(self.fc.weight), self.fc.bias)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.s = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * self.s.clamp_(min=0.1)


class ToNumber(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.s = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(x) * self.s.argmax()


@pytest.mark.parametrize(
    "cls, reason",
    [
        (Random, "random function of parameters"),
        (InPlace, "in-place operation on a parameter"),
        (ToNumber, "not a floating-point tensor"),
    ],
)
def test_what_does_not_compile_falls_back_and_says_why(cls, reason):
    explanation = fastmaml.explain(cls(), "cross_entropy")
    assert explanation.program == "torch.func" and reason in explanation.reason, explanation


@pytest.mark.parametrize("chunk", ["program", "task_chunk"])
def test_chunks_of_tasks(chunk, monkeypatch):
    """Derived tensors per chunk: the program's activation chunks (one task each here) and `task_chunk`."""
    torch.manual_seed(8)
    model = LoRA().double()
    tasks = tasks_for((6,), T=3, ways=3, shots=2)
    if chunk == "program":
        monkeypatch.setattr(FusedProgram, "chunk_bytes", {"cpu": 1})
        check_ce(model, tasks, inner_lr=0.3, steps=2, inner_params=["lora_a", "lora_b", "g"])
    else:
        check_ce(model, tasks, inner_lr=0.3, steps=2, task_chunk=2)


class CaviaAsWritten(nn.Module):
    """CAVIA as its paper's code writes it: context parameters concatenated to the input with
    `torch.cat((x, self.context_params.expand(x.shape[0], -1)), dim=1)`, and a derived context (its tanh) at
    the hidden layer."""

    def __init__(self, ways=3, context=2):
        super().__init__()
        self.fc1 = nn.Linear(4 + context, 8)
        self.fc2 = nn.Linear(8 + context, ways)
        self.context_params = nn.Parameter(torch.randn(context) * 0.3)

    def forward(self, x):
        h = F.relu(self.fc1(torch.cat((x, self.context_params.expand(x.shape[0], -1)), dim=1)))
        return self.fc2(torch.cat([h, torch.tanh(self.context_params).expand(h.size(0), -1)], -1))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("inner_params", [None, ["context_params"]])
def test_cavia_context_as_written(order, inner_params):
    torch.manual_seed(9)
    model = CaviaAsWritten().double()
    kinds = [n.rule.kind for n in on_fused(model, inner_params=inner_params).nodes]
    assert kinds.count("cat") == 2, kinds
    check_ce(model, tasks_for((4,), ways=3, shots=2), inner_lr=0.5, steps=2, order=order, inner_params=inner_params)


class ContextFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.context = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return self.fc(torch.cat([self.context.expand(x.size(0), -1), x], 1))


class ContextOverTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.context = nn.Parameter(torch.zeros(1))

    def forward(self, x):  # [N, L, 4]
        return self.fc(torch.cat([x, self.context.expand(x.size(0), x.size(1), -1)], -1)).mean(1)


@pytest.mark.parametrize("order", ORDERS)
def test_context_expanded_first_or_over_tokens(order):
    """The context concatenated in front, and expanded over the examples and tokens (`expand(N, L, -1)`)."""
    torch.manual_seed(11)
    check_ce(ContextFirst().double(), tasks_for((4,), ways=3, shots=2), inner_lr=0.5, steps=2, order=order)
    check_ce(ContextOverTokens().double(), tasks_for((3, 4), ways=3, shots=2), inner_lr=0.5, steps=2, order=order)


class NormalizedScale(nn.Module):
    """F.normalize of a parameter read other than as a Linear weight (a unit-norm per-feature scale), and
    of a buffer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.s = nn.Parameter(torch.randn(3))
        self.register_buffer("b", torch.tensor([1.0, 2.0, 2.0]))

    def forward(self, x):
        return self.fc(x) * F.normalize(self.s, dim=0) + F.normalize(self.b, dim=0)


def test_normalized_parameter_as_a_derived_tensor():
    torch.manual_seed(10)
    model = NormalizedScale().double()
    assert "normalize(s)" in str(fastmaml.explain(model, "cross_entropy"))
    for order in ORDERS:
        check_ce(model, tasks_for((4,), ways=3, shots=2), inner_lr=0.3, steps=2, order=order)
