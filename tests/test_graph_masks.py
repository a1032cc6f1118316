"""Masks on the fused engine: comparisons of values, their logical combinations, `torch.where`,
`masked_fill` (attention's key-padding mask with −inf before a softmax), masks converted to values and
reshaped (masked mean pooling over padded tokens), in models written as users write them: against the
per-task `create_graph` oracle in float64, every order."""

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import ORDERS, check_ce, check_orders_steps, tasks_for
from torch import nn

import fastmaml
from fastmaml.programs.fused.mask import WhereRule

from oracle import check_float32_error


class Gates(nn.Module):
    """where between two values and a value and a number, masked_fill of a combined mask, masks times values
    (cast with `.float()`, `.to(a.dtype)`, and promoted by the product), a mask from the input."""

    def __init__(self, ways=3):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(4, 5)
        self.head = nn.Linear(5, ways)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        h = torch.where(a > b, a * a, torch.tanh(b)) + torch.where(0 < a, a, 0.0)
        h = h.masked_fill((b > 0.5) & ~(a > 0) | (a <= -1), -1.0)
        h = h + a * (x[:, :1] != 0).float() + b * (a > 0).to(a.dtype) + (b >= a) * torch.sigmoid(a)
        return self.head(h)


class PaddedTokens(nn.Module):
    """Tokens `[N, L, D]`, some all zero (padding): attention over the tokens with the padded keys masked to
    −inf before the softmax (`scores.masked_fill(pad.unsqueeze(1), float("-inf"))`), then a masked mean over
    the real tokens (`(h * keep).sum(1) / keep.sum(1)`)."""

    def __init__(self, ways=3, dim=4):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.head = nn.Linear(dim, ways)

    def forward(self, x):  # [N, L, D]
        pad = x.abs().sum(-1) == 0  # [N, L]
        scores = self.q(x) @ self.k(x).transpose(1, 2) / 2.0  # [N, L, L]
        attn = torch.softmax(scores.masked_fill(pad.unsqueeze(1), float("-inf")), dim=-1)
        h = torch.tanh(attn @ self.v(x))
        keep = (~pad).unsqueeze(-1).to(h.dtype)  # [N, L, 1]
        return self.head((h * keep).sum(1) / keep.sum(1))


def padded_tasks(seed=0, T=2, ways=3, shots=2, query=2, L=5, D=4):
    """Tasks of token sequences `[N, L, D]` whose last 0–2 tokens are zeros."""
    tasks = list(tasks_for((L, D), T=T, ways=ways, shots=shots, query=query, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    for i in (0, 2):
        n = tasks[i].shape[1]
        lengths = torch.randint(L - 2, L + 1, (T, n), generator=g)
        tasks[i] = tasks[i] * (torch.arange(L) < lengths[..., None]).unsqueeze(-1)
    return tuple(tasks)


@pytest.mark.parametrize("order", ORDERS)
def test_every_order(order):
    torch.manual_seed(0)
    cases = ((Gates().double(), tasks_for((4,), ways=3, shots=2)), (PaddedTokens().double(), padded_tasks()))
    for model, tasks in cases:
        check_orders_steps(model, tasks, order)


def test_padding_is_in_the_tasks():
    sx = padded_tasks()[0]
    assert ((sx.abs().sum(-1) == 0).sum(-1) > 0).any()


def test_meta_sgd_rates_and_anil():
    torch.manual_seed(1)
    model = PaddedTokens().double()
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, padded_tasks(), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))
    check_ce(model, padded_tasks(), inner_lr=0.3, steps=2, inner_params=["head"])


def test_where_rule_against_autograd():
    """WhereRule's passes (a value and a number, two values broadcast) against autograd."""
    torch.manual_seed(2)
    m = torch.randn(2, 3, 4, 5, dtype=torch.float64) > 0
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 1, 5, dtype=torch.float64, requires_grad=True)
    for rule, inputs, f in (
        (WhereRule("w", "where", b=-2.0), (a,), lambda a: torch.where(m, a, -2.0)),
        (WhereRule("w", "where"), (a, b), lambda a, b: torch.where(m, a, b)),
    ):
        y = f(*inputs)
        gy = torch.randn_like(y)
        out, saved = rule.forward(None, [m, *(t.detach() for t in inputs)], (), True)
        assert torch.equal(out, y.detach())
        grads = torch.autograd.grad(y, inputs, gy)
        got = rule.backward(None, gy, saved, (), (False,) + (True,) * len(inputs), ())
        assert got[0] is None and all(torch.allclose(g, r) for g, r in zip(got[1:], grads))
        ds = [torch.randn_like(t) for t in inputs]
        _, yd, _ = rule.tangent_forward(None, [m, *(t.detach() for t in inputs)], [None, *ds], (), ())
        assert torch.allclose(yd, torch.func.jvp(f, tuple(t.detach() for t in inputs), tuple(ds))[1])


def test_a_mask_read_as_a_value_falls_back_and_says_why():
    class Raw(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) + torch.tanh(x[:, :3] > 0)

    e = fastmaml.explain(Raw(), "cross_entropy")
    assert e.program == "torch.func" and "is a mask" in e.reason, e


def test_float32_error_is_that_of_the_autograd_loop():
    torch.manual_seed(3)
    check_float32_error(
        PaddedTokens().double(), padded_tasks(), inner_lr=0.3, steps=2, loss="cross_entropy", loss_fn=F.cross_entropy
    )
