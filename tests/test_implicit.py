"""order="implicit" (iMAML) against an exact implicit gradient built from the full Hessian (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmaml

from models import mlp, regression_tasks
from oracle import assert_grads_close, rel_err


def implicit_oracle(model, tasks, *, lr, steps, lam, adapted):
    """Proximal GD to φ_K, then u = (I + H_aa/λ)⁻¹ ∇_φ L_q and ∂L/∂ψ = ∇_ψ L_q − H_ψa u / λ, by dense solves."""
    names = [n for n, _ in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    theta = {n: p.detach() for n, p in model.named_parameters()}
    shared = [n for n in names if n not in adapted]

    def unflat(vec, group):
        out, o = {}, 0
        for n in group:
            k = shapes[n].numel()
            out[n] = vec[o : o + k].view(shapes[n])
            o += k
        return out

    def flat(d, group):
        return torch.cat([d[n].reshape(-1) for n in group])

    def loss(a_vec, s_vec, x, y):
        p = {**unflat(a_vec, adapted), **unflat(s_vec, shared)}
        return F.mse_loss(functional_call(model, p, (x,)), y)

    sx, sy, qx, qy = tasks
    T = sx.shape[0]
    th_a, th_s = flat(theta, adapted), (flat(theta, shared) if shared else torch.zeros(0, dtype=torch.float64))
    d_a, d_s = torch.zeros_like(th_a), torch.zeros_like(th_s)
    for t in range(T):
        phi = th_a.clone()
        for _ in range(steps):
            a = phi.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(a, th_s, sx[t], sy[t]), a)
            phi = phi - lr * (g + lam * (phi - th_a))
        full = torch.cat([phi, th_s])
        Pa = phi.numel()
        H = torch.autograd.functional.hessian(lambda z, Pa=Pa, t=t: loss(z[:Pa], z[Pa:], sx[t], sy[t]), full)
        z = full.clone().requires_grad_(True)
        (gq,) = torch.autograd.grad(loss(z[:Pa], z[Pa:], qx[t], qy[t]) / T, z)
        u = torch.linalg.solve(torch.eye(Pa, dtype=torch.float64) + H[:Pa, :Pa] / lam, gq[:Pa])
        d_a += u
        d_s += gq[Pa:] - H[Pa:, :Pa] @ u / lam
    grads = {**unflat(d_a, adapted), **unflat(d_s, shared)}
    return grads


@pytest.mark.parametrize("inner_params,lam", [(None, 1.0), (["2"], 0.5)])
def test_implicit_matches_dense_solve(inner_params, lam):
    torch.manual_seed(0)
    model = mlp((1, 5, 1), act=nn.Tanh)
    tasks = regression_tasks(T=3)
    P = sum(p.numel() for p in model.parameters())
    adapted = [n for n, _ in model.named_parameters() if inner_params is None or n.startswith("2.")]
    fastmaml.meta_step(
        model,
        tasks,
        inner_lr=0.1,
        steps=4,
        order="implicit",
        implicit_lambda=lam,
        cg_steps=2 * P,
        inner_params=inner_params,
    )
    got = {n: p.grad for n, p in model.named_parameters()}
    ref = implicit_oracle(model, tasks, lr=0.1, steps=4, lam=lam, adapted=adapted)
    assert_grads_close(got, ref, 1e-8)


def test_implicit_through_adapt_and_few_cg_steps_converge():
    torch.manual_seed(1)
    model = mlp((1, 6, 1), act=nn.Tanh)
    tasks = regression_tasks(T=2)
    sx, sy, qx, qy = tasks
    ref = implicit_oracle(model, tasks, lr=0.1, steps=3, lam=2.0, adapted=[n for n, _ in model.named_parameters()])
    errors = []
    for cg in (1, 3, 10):
        model.zero_grad()
        adapted = fastmaml.adapt(
            model, sx, sy, inner_lr=0.1, steps=3, order="implicit", implicit_lambda=2.0, cg_steps=cg
        )
        out = adapted(qx)
        ((out - qy) ** 2).mean(dim=(1, 2)).mean().backward()
        errors.append(
            rel_err(
                torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
                torch.cat([ref[n].reshape(-1) for n, _ in model.named_parameters()]),
            )
        )
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6


def test_implicit_arguments_are_checked():
    model, tasks = mlp((1, 4, 1)), regression_tasks()
    with pytest.raises(ValueError, match="implicit_lambda: expected a positive float, got 0"):
        fastmaml.meta_step(model, tasks, order="implicit", implicit_lambda=0)
    with pytest.raises(ValueError, match="cg_steps: expected a positive int, got 0"):
        fastmaml.meta_step(model, tasks, order="implicit", cg_steps=0)
    lr = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
    with pytest.raises(ValueError, match="inner_lr: order='implicit' gives no gradient for a learnable"):
        fastmaml.meta_step(model, tasks, order="implicit", inner_lr=lr)
