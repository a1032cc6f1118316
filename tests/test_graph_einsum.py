"""`torch.einsum` on the fused engine (einsum.py): one value, two values, a value and a parameter, in
models written as users write them (attention in einsum, per-head weights, a prototype head), against the
per-task `create_graph` oracle in float64, every order; the rules' passes against autograd; what does not
keep the examples apart falls back, named."""

import pytest
import torch
from test_graph_models import (
    ORDERS,
    check_falls_back,
    check_orders_steps,
    check_variants,
    on_fused,
    tasks_for,
)
from torch import nn

from fastmaml.programs.fused.einsum import EinsumParamRule, EinsumRule, EinsumSumRule, Equation


class EinsumAttention(nn.Module):
    """Tokens `[N, L, D]`: attention written in einsum (spaces, implicit output, a list of operands), per-head
    weights `[H, D, E]`, a sum over a label one operand alone carries, an ellipsis, a prototype head."""

    def __init__(self, ways=3, d=4, heads=2):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.heads = nn.Parameter(torch.randn(heads, d, 3) * 0.4)
        self.mix = nn.Parameter(torch.randn(5, 3) * 0.4)
        self.proto = nn.Parameter(torch.randn(ways, heads * 3) * 0.4)

    def forward(self, x):  # [N, L, D]
        q, k, v = self.q(x), self.k(x), self.v(x)
        attn = torch.softmax(torch.einsum("bqd, bkd -> bqk", q, k) / 2.0, dim=-1)
        h = torch.einsum("bqk,bkd->bqd", [attn, v])  # [N, L, D]
        per_head = torch.tanh(torch.einsum("bld,hde->bhle", h, self.heads))  # [N, H, L, E]
        pooled = torch.einsum("...le->...e", per_head)  # [N, H, E]
        scores = torch.einsum("bhe,bld->bhe", pooled, h)  # d and l summed on h's side alone
        f = torch.einsum("bhe->beh", scores).flatten(1) + torch.einsum("ble,le->be", per_head[:, 0], self.mix).repeat(
            1, 2
        )
        head = torch.einsum("bf,cf", f, self.proto)  # implicit output: "bc"
        return head + torch.einsum("ij,nj->n", self.mix, f[:, :3])[:, None]


def token_tasks(seed=0):
    return tasks_for((5, 4), ways=3, shots=2, seed=seed)


@pytest.mark.parametrize("order", ORDERS)
def test_every_order(order):
    torch.manual_seed(0)
    model = EinsumAttention().double()
    assert [n.rule.kind for n in on_fused(model).nodes].count("einsum") >= 9
    check_orders_steps(model, token_tasks(), order)


def test_meta_sgd_rates_anil_and_float32():
    torch.manual_seed(1)
    model = EinsumAttention().double()
    check_variants(model, token_tasks(1), token_tasks(2), inner_params=["proto", "mix"])


def test_equation_parsing():
    assert Equation.parse("ij,jk", 2) == Equation(("ij", "jk"), "ik")
    assert Equation.parse("...ij, ...jk", 2) == Equation((".ij", ".jk"), ".ik")
    eq = Equation.parse("bij,bjk->bi", 2)
    assert eq.summed_alone(1) == "k" and eq.reduced(1) == Equation(("bij", "bj"), "bi") and eq.task not in "bijk"
    for bad, n in (("ij,jk->ik", 1), ("i1->i", 1), ("i...j...->i", 1), ("ij->iz", 1), ("ij->ii", 1)):
        with pytest.raises(ValueError):
            Equation.parse(bad, n)


def _check_passes(rule, inputs, params, f):
    """The four passes of an einsum rule (values `[T, N, ...]`, parameters per task) against torch.func on f:
    the gradients vjp(f)(ȳ), their tangent jvp of that along the directions plus vjp(f)(ġy)."""
    z, n = tuple(inputs + params), len(inputs)
    u = tuple(torch.randn_like(t) for t in z)
    y = f(*z)
    gy, gyd = torch.randn_like(y), torch.randn_like(y)

    def grads(*args):
        return torch.func.vjp(f, *args)[1](gy)

    ref = grads(*z)
    ref_d = [a + b for a, b in zip(torch.func.jvp(grads, z, u)[1], torch.func.vjp(f, *z)[1](gyd))]
    one = n == 1
    xs, xds = (inputs[0], u[0]) if one else (list(inputs), list(u[:n]))
    need = True if one else (True,) * n
    p, v = tuple(params), u[n:]
    outs = tuple(torch.empty_like(t) for t in params)
    out, saved = rule.forward(None, xs, p, True)
    got = rule.backward(None, gy, saved, p, need, outs)
    got = ((got,) if one else tuple(got)) + outs
    assert torch.allclose(out, y) and all(torch.allclose(a, b) for a, b in zip(got, ref))
    _, yd, saved = rule.tangent_forward(None, xs, xds, p, v)
    assert torch.allclose(yd, torch.func.jvp(f, z, u)[1])
    outs, touts = tuple(torch.empty_like(t) for t in params), tuple(torch.empty_like(t) for t in params)
    pairs = rule.tangent_backward(None, gy, gyd, saved, p, v, need, outs, touts)
    pairs = ([pairs] if one else list(pairs)) + list(zip(outs, touts))
    for (g, gd), r, rd in zip(pairs, ref, ref_d):
        assert torch.allclose(g, r) and torch.allclose(gd, rd)


def test_rules_against_autograd():
    """Each rule's forward, backward, tangent forward and tangent backward (the HVP's cross terms) against
    autograd, with broadcasting size-1 dims."""
    torch.manual_seed(3)
    r = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    eq = Equation.parse("bqd,bkd->bqk", 2)
    t = eq.task
    _check_passes(
        EinsumRule("e", "einsum", eq),
        [r(2, 3, 4, 5), r(2, 3, 1, 5)],
        [],
        lambda a, b: torch.einsum(f"{t}bqd,{t}bkd->{t}bqk", a, b),
    )
    eq = Equation.parse("bld,hde->bhle", 2)
    t = eq.task
    _check_passes(
        EinsumParamRule("e", "einsum", eq),
        [r(2, 3, 4, 5)],
        [r(2, 2, 5, 3)],
        lambda x, w: torch.einsum(f"{t}bld,{t}hde->{t}bhle", x, w),
    )
    _check_passes(
        EinsumSumRule("e", "einsum", ".ij", ".j", "t"), [r(2, 3, 4, 5)], [], lambda x: torch.einsum("t...ij->t...j", x)
    )


def test_what_does_not_keep_the_examples_apart_falls_back_and_says_why():
    def model(expr):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 3)
                self.w = nn.Parameter(torch.randn(3, 3))

            def forward(self, x):
                return expr(self.fc(x), self.w)

        return M()

    cases = (
        (lambda h, w: torch.einsum("nd,md->nm", h, h), "does not keep the examples apart"),
        (lambda h, w: torch.einsum("nd,nd", h, h).expand(h.size(0), 3), "does not keep the examples apart"),
        (lambda h, w: torch.einsum("nd,nd,nd->nd", h, h, h), "three or more"),
        (lambda h, w: torch.einsum("nd,dd->nd", h, w), "repeats a label"),
        (lambda h, w: h + torch.einsum("nd,nd->nd", h, w), "gives a parameter the examples' label"),
    )
    for expr, reason in cases:
        check_falls_back(model(expr), reason)
