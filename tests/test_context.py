"""CAVIA context parameters (fastmaml.context): the ContextConcat and FiLM rules of the fused engine against
a per-task autograd oracle, and CAVIA's meta-gradient (context adapted from zero, the network meta-learned,
no gradient for the context itself) against the per-task `create_graph` oracle in float64, every order, for
the regression MLP and the conv net with FiLM, through `meta_step` and `adapt`."""

import pytest
import torch
import torch.nn.functional as F
from test_fused_layers import check_program, img_data, vec_data
from torch import nn
from torch.func import functional_call

import fastmaml
from fastmaml.context import (
    ContextConcat,
    FiLM,
    context_conv4,
    context_mlp,
    context_names,
    reset_context,
)
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.programs import FusedProgram, select_program

from models import classification_tasks, regression_tasks
from oracle import assert_grads_close, autograd_meta_grad, rel_err

TOL = 1e-9
ORDERS = ["second", "checkpoint", "first"]


def randomized(model):
    """Context vectors made trainable and nonzero: the rules must not rely on CAVIA's zero start."""
    for m in model.modules():
        if isinstance(m, (ContextConcat, FiLM)):
            m.context.requires_grad_(True)
            with torch.no_grad():
                m.context.normal_()
    return model


def test_layers_compute_what_they_say():
    torch.manual_seed(0)
    cat = ContextConcat(3)
    with torch.no_grad():
        cat.context.copy_(torch.tensor([1.0, 2.0, 3.0]))
    x = torch.randn(4, 2, 5)
    y = cat(x)
    assert y.shape == (4, 2, 8) and torch.equal(y[..., :5], x) and torch.equal(y[1, 1, 5:], cat.context)
    film = FiLM(6, 4)
    h = torch.randn(2, 6, 3, 3)
    assert torch.equal(film(h), h), "at φ = 0 FiLM is the identity"
    with torch.no_grad():
        film.context.normal_()
    z = film.weight @ film.context + film.bias
    torch.testing.assert_close(film(h), h * z[:6].view(1, 6, 1, 1) + z[6:].view(1, 6, 1, 1))
    model = context_mlp()
    assert context_names(model) == ["0.context"] and model[1].in_features == 6
    assert not model[0].context.requires_grad and torch.count_nonzero(model[0].context) == 0
    with pytest.raises(ValueError, match="no context layer"):
        context_names(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="film_block"):
        context_conv4(1, 5, film_block=4)
    randomized(model)
    reset_context(model)
    assert not model[0].context.requires_grad and torch.count_nonzero(model[0].context) == 0


def test_concat_rule_against_the_per_task_oracle():
    torch.manual_seed(1)
    model = randomized(context_mlp((3, 7, 5, 2), num_context=4).double())
    x, y = vec_data(3, 4, 3, 2)
    for inner_params in (None, ["0.context"], ["1", "3"], ["0.context", "5"]):
        check_program(model, x, y, inner_params=inner_params)


def test_film_rule_against_the_per_task_oracle():
    torch.manual_seed(2)
    model = randomized(nn.Sequential(nn.Linear(3, 6), FiLM(6, 4), nn.Tanh(), nn.Linear(6, 2)).double())
    x, y = vec_data(3, 4, 3, 2)
    for inner_params in (None, ["1.context"], ["0", "3"], ["1.weight"], ["1.context", "1.bias"]):
        check_program(model, x, y, inner_params=inner_params)
    conv = randomized(context_conv4(1, 3, hidden=3, image_size=16, num_context=4, film_block=1).double())
    program = check_program(conv, *img_data(2, 3, 1, 16, 16), loss="cross_entropy", inner_params=["6.context", "9"])
    assert "FiLM" in [n.rule.kind for n in program.nodes]


def cavia_step(model, tasks, *, loss, loss_fn, inner_lr, steps, order):
    """meta_step with only the context adapted, checked against the oracle: the same meta-loss and
    meta-gradient of every trainable parameter, no gradient for the context, the context still zero."""
    names = context_names(model)
    program = select_program(model, ParamLayout(model, names), resolve_loss(loss))
    assert isinstance(program, FusedProgram), fastmaml.explain(model, loss)
    model.zero_grad()
    res = fastmaml.meta_step(model, tasks, inner_lr=inner_lr, steps=steps, order=order, loss=loss, inner_params=names)
    ref_loss, ref, _ = autograd_meta_grad(
        model, tasks, inner_lr=inner_lr, steps=steps, order=order, loss_fn=loss_fn, inner_params=names
    )
    assert rel_err(res.meta_loss, ref_loss) < TOL
    for n in names:
        p = model.get_parameter(n)
        assert p.grad is None and torch.count_nonzero(p) == 0, n
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in got.values())
    assert_grads_close(got, {n: ref[n] for n in got}, TOL)
    return res


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("steps", [1, 3])
def test_cavia_mlp_meta_gradient(order, steps):
    torch.manual_seed(3)
    model = context_mlp((1, 9, 7, 1), num_context=3).double()
    res = cavia_step(
        model, regression_tasks(T=4), loss="mse", loss_fn=F.mse_loss, inner_lr=0.7, steps=steps, order=order
    )
    assert (res.query_loss_after < res.query_loss_before).any()


@pytest.mark.parametrize("order", ORDERS)
def test_cavia_conv_net_with_film_meta_gradient(order):
    torch.manual_seed(4)
    model = context_conv4(1, 5, hidden=3, image_size=16, num_context=4, film_block=2).double()
    cavia_step(
        model,
        classification_tasks(T=2, size=16),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.9,
        steps=2,
        order=order,
    )


def implicit_oracle(model, tasks, *, loss_fn, lr, steps, lam, adapted):
    """iMAML by dense solves: proximal GD on the adapted parameters to φ_K, then u = (I + H_aa/λ)⁻¹ ∇_a L_q
    and ∂L/∂ψ = ∇_ψ L_q − H_ψa u / λ for the shared ones."""
    names = [n for n, _ in model.named_parameters()]
    shared = [n for n in names if n not in adapted]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def unflat(vec, group):
        out, o = {}, 0
        for n in group:
            out[n] = vec[o : o + shapes[n].numel()].view(shapes[n])
            o += shapes[n].numel()
        return out

    def loss(z, Pa, x, y):
        return loss_fn(functional_call(model, {**unflat(z[:Pa], adapted), **unflat(z[Pa:], shared)}, (x,)), y)

    sx, sy, qx, qy = tasks
    T = sx.shape[0]
    th_a = torch.cat([theta[n].reshape(-1) for n in adapted])
    th_s = torch.cat([theta[n].reshape(-1) for n in shared])
    Pa = th_a.numel()
    d = torch.zeros(Pa + th_s.numel(), dtype=torch.float64)
    for t in range(T):
        phi = th_a.clone()
        for _ in range(steps):
            a = torch.cat([phi, th_s]).requires_grad_(True)
            (g,) = torch.autograd.grad(loss(a, Pa, sx[t], sy[t]), a)
            phi = phi - lr * (g[:Pa] + lam * (phi - th_a))
        full = torch.cat([phi, th_s])
        H = torch.autograd.functional.hessian(lambda z, t=t: loss(z, Pa, sx[t], sy[t]), full)
        z = full.clone().requires_grad_(True)
        (gq,) = torch.autograd.grad(loss(z, Pa, qx[t], qy[t]) / T, z)
        u = torch.linalg.solve(torch.eye(Pa, dtype=torch.float64) + H[:Pa, :Pa] / lam, gq[:Pa])
        d[Pa:] += gq[Pa:] - H[Pa:, :Pa] @ u / lam
    return unflat(d[Pa:], shared)


@pytest.mark.parametrize("kind", ["mlp", "film"])
def test_cavia_implicit_meta_gradient(kind):
    torch.manual_seed(5)
    if kind == "mlp":
        model = context_mlp((1, 6, 1), num_context=3).double()
        tasks, loss, loss_fn = regression_tasks(T=3), "mse", F.mse_loss
    else:
        model = context_conv4(1, 3, hidden=2, image_size=16, num_context=3, film_block=0).double()
        tasks, loss, loss_fn = classification_tasks(T=2, ways=3, size=16), "cross_entropy", F.cross_entropy
    names = context_names(model)
    model.zero_grad()
    fastmaml.meta_step(
        model,
        tasks,
        inner_lr=0.5,
        steps=3,
        order="implicit",
        implicit_lambda=2.0,
        cg_steps=12,
        loss=loss,
        inner_params=names,
    )
    ref = implicit_oracle(model, tasks, loss_fn=loss_fn, lr=0.5, steps=3, lam=2.0, adapted=names)
    assert all(model.get_parameter(n).grad is None for n in names)
    assert_grads_close({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, ref, 1e-8)


@pytest.mark.parametrize("order", ORDERS + ["implicit"])
def test_cavia_through_adapt(order):
    """adapt + an outer loss + backward gives meta_step's meta-gradient (the adapted context per task)."""
    torch.manual_seed(6)
    model = context_conv4(1, 3, hidden=2, image_size=16, num_context=3, film_block=3).double()
    sx, sy, qx, qy = classification_tasks(T=2, ways=3, size=16)
    names = context_names(model)
    kwargs = dict(inner_lr=0.8, steps=2, order=order, loss="cross_entropy", inner_params=names, cg_steps=12)
    model.zero_grad()
    fastmaml.meta_step(model, (sx, sy, qx, qy), **kwargs)
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    adapted = fastmaml.adapt(model, sx, sy, **kwargs)
    assert adapted.params[names[0]].shape == (2, 3) and adapted.params[names[0]].abs().sum() > 0
    logits = adapted(qx)
    sum(F.cross_entropy(logits[t], qy[t]) for t in range(2)).div(2).backward()
    assert model.get_parameter(names[0]).grad is None
    assert_grads_close({n: p.grad for n, p in model.named_parameters() if p.requires_grad}, want, 1e-10)
