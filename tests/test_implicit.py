"""order="implicit" (iMAML) against an exact implicit gradient built from the full Hessian (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmaml
from fastmaml.errors import NonFiniteError

from models import classification_tasks, mlp, regression_tasks, small_cnn
from oracle import assert_grads_close, rel_err


def backtracking_oracle(objective, phi, *, lr, steps):
    """One task's safeguarded proximal steps, written out: the step at rate s·lr along ∇F is taken when F is
    finite there and decreases by Armijo's 1e-4 s·lr ‖∇F‖² (up to 16 machine epsilons of F), else s halves
    (at most 30 times in all; a step refused at s = 2^-30 is skipped)."""
    s = 1.0
    for _ in range(steps):
        a = phi.clone().requires_grad_(True)
        f = objective(a)
        (d,) = torch.autograd.grad(f, a)
        while True:
            c = (phi - s * lr * d).requires_grad_(True)
            fc = objective(c)
            (gc,) = torch.autograd.grad(fc, c)
            fc = fc.detach()
            bound = f - 1e-4 * s * lr * d.dot(d) + 16 * torch.finfo(f.dtype).eps * f.abs()
            if math.isfinite(fc) and bool(torch.isfinite(gc).all()) and fc <= bound:
                phi = c.detach()
                break
            if s <= 2.0**-30:
                break
            s /= 2
    return phi


def implicit_oracle(model, tasks, *, lr, steps, lam, adapted, solver="sgd", phis=None, loss_fn=F.mse_loss):
    """Proximal GD to φ_K ("sgd", or `backtracking_oracle`), then u = (I + H_aa/λ)⁻¹ ∇_φ L_q and ∂L/∂ψ =
    ∇_ψ L_q − H_ψa u / λ, by dense solves. phis: a list that gets each task's φ_K. The model runs as it is
    (BatchNorm in training mode: batch statistics of each set)."""
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
        return loss_fn(functional_call(model, p, (x,)), y)

    sx, sy, qx, qy = tasks
    T = sx.shape[0]
    th_a, th_s = flat(theta, adapted), (flat(theta, shared) if shared else torch.zeros(0, dtype=torch.float64))
    d_a, d_s = torch.zeros_like(th_a), torch.zeros_like(th_s)
    for t in range(T):
        phi = th_a.clone()
        if solver == "backtracking":
            prox = lambda a, t=t: loss(a, th_s, sx[t], sy[t]) + lam / 2 * (a - th_a).pow(2).sum()  # noqa: E731
            phi = backtracking_oracle(prox, phi, lr=lr, steps=steps)
        for _ in range(steps if solver == "sgd" else 0):
            a = phi.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(a, th_s, sx[t], sy[t]), a)
            phi = phi - lr * (g + lam * (phi - th_a))
        if phis is not None:
            phis.append(phi)
        full = torch.cat([phi, th_s])
        Pa = phi.numel()
        H = torch.autograd.functional.hessian(lambda z, Pa=Pa, t=t: loss(z[:Pa], z[Pa:], sx[t], sy[t]), full)
        z = full.clone().requires_grad_(True)
        (gq,) = torch.autograd.grad(loss(z[:Pa], z[Pa:], qx[t], qy[t]) / T, z)
        system = torch.eye(Pa, dtype=torch.float64) + H[:Pa, :Pa] / lam
        assert torch.linalg.eigvalsh(system).min() > 0  # conjugate gradient's premise
        u = torch.linalg.solve(system, gq[:Pa])
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


def steep_tasks():
    """Three regression tasks; the second one's support inputs ×30: plain proximal steps at rate 0.1 overflow
    on it (its support loss's curvature grows with x²) and converge on the others."""
    sx, sy, qx, qy = regression_tasks(T=3)
    sx = sx.clone()
    sx[1] *= 30
    return sx, sy, qx, qy


@pytest.mark.parametrize("inner_params", [None, ["2"]])
def test_backtracking_meta_gradient_is_the_implicit_one_at_its_solution(inner_params):
    torch.manual_seed(2)
    model = mlp((1, 5, 1), act=nn.Tanh)
    tasks = steep_tasks()
    sx, sy = tasks[0], tasks[1]
    P = sum(p.numel() for p in model.parameters())
    adapted = [n for n, _ in model.named_parameters() if inner_params is None or n.startswith("2.")]
    kw = dict(inner_lr=0.5, steps=10, order="implicit", implicit_lambda=1.0, inner_params=inner_params)
    fastmaml.meta_step(model, tasks, cg_steps=2 * P, inner_solver="backtracking", **kw)
    got = {n: p.grad for n, p in model.named_parameters()}
    phis = []
    ref = implicit_oracle(model, tasks, lr=0.5, steps=10, lam=1.0, adapted=adapted, solver="backtracking", phis=phis)
    assert_grads_close(got, ref, 1e-8)
    phi = fastmaml.adapt(model, sx, sy, inner_solver="backtracking", **kw).phi.detach()
    assert rel_err(phi, torch.stack(phis)) < 1e-10
    # the safeguard took other steps than the plain ones (at rate 0.5 they grow without bound on task 1)
    plain = fastmaml.adapt(model, sx, sy, check_finite=False, **kw).phi.detach()
    assert plain[1].norm() > 10 * phi[1].norm()


@pytest.mark.parametrize("solver", ["sgd", "backtracking"])
def test_implicit_on_a_batchnorm_conv_net_under_cross_entropy(solver):
    """Batch statistics of each set, cross-entropy, every parameter adapted; λ large enough for I + H/λ to be
    positive definite at φ_K (with λ = 2 it is not, and no conjugate-gradient answer matches the solve)."""
    torch.manual_seed(0)
    model = small_cnn(channels=2, ways=5, size=8)
    tasks = classification_tasks(T=2, size=8)
    kw = dict(inner_lr=0.02, steps=5, order="implicit", implicit_lambda=20.0, loss="cross_entropy")
    # I + H/λ is well conditioned here: 30 conjugate-gradient iterations reach the solve to rounding
    fastmaml.meta_step(model, tasks, cg_steps=30, inner_solver=solver, update_running_stats=False, **kw)
    got = {n: p.grad for n, p in model.named_parameters()}
    adapted = [n for n, _ in model.named_parameters()]
    ref = implicit_oracle(
        model, tasks, lr=0.02, steps=5, lam=20.0, adapted=adapted, solver=solver, loss_fn=F.cross_entropy
    )
    assert_grads_close(got, ref, 1e-8)


def test_backtracking_safeguard_triggers_where_plain_steps_overflow():
    torch.manual_seed(2)
    model = mlp((1, 5, 1))
    sx, sy, qx, qy = steep_tasks()
    kw = dict(inner_lr=0.1, steps=10, order="implicit", implicit_lambda=1.0)
    with pytest.raises(NonFiniteError, match="inner step"):
        fastmaml.meta_step(model, (sx, sy, qx, qy), **kw)
    plain = fastmaml.adapt(model, sx, sy, check_finite=False, **kw).phi.detach()
    safe = fastmaml.adapt(model, sx, sy, inner_solver="backtracking", **kw).phi.detach()
    assert not torch.isfinite(plain[1]).all() and torch.isfinite(safe).all()
    # the tasks the plain steps handle take the same steps (no halving); the steep one lowers its objective
    torch.testing.assert_close(safe[[0, 2]], plain[[0, 2]], rtol=1e-12, atol=0)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    names = [n for n, _ in model.named_parameters()]

    def objective(phi, t):
        params, o = {}, 0
        for n, p in model.named_parameters():
            params[n] = phi[o : o + p.numel()].view_as(p)
            o += p.numel()
        out = functional_call(model, {k: params[k] for k in names}, (sx[t],))
        return float(F.mse_loss(out, sy[t]) + 0.5 * (phi - theta).pow(2).sum())

    assert objective(safe[1], 1) < 0.9 * objective(theta, 1)
    model.zero_grad()
    result = fastmaml.meta_step(model, (sx, sy, qx, qy), inner_solver="backtracking", **kw)
    assert torch.isfinite(result.query_loss_after).all()


def test_inner_solver_is_checked():
    model, tasks = mlp((1, 4, 1)), regression_tasks()
    with pytest.raises(ValueError, match=r"inner_solver: expected one of \('sgd', 'backtracking'\), got 'armijo'"):
        fastmaml.meta_step(model, tasks, order="implicit", inner_solver="armijo")
    for order in ("second", "checkpoint", "first"):
        with pytest.raises(ValueError, match="inner_solver='backtracking' applies to order='implicit' only"):
            fastmaml.meta_step(model, tasks, order=order, inner_solver="backtracking")
    sx, sy = tasks[0], tasks[1]
    with pytest.raises(ValueError, match="applies to order='implicit' only"):
        fastmaml.adapt(model, sx, sy, order="second", inner_solver="backtracking")
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="applies to order='implicit' only"):
        fastmaml.func.meta_grad(model, params, tasks, order="first", inner_solver="backtracking")
    with pytest.raises(ValueError, match="cuda_graph=True: inner_solver='backtracking'"):
        fastmaml.MetaStep(model, tasks, order="implicit", inner_solver="backtracking", cuda_graph=True)


def test_indefinite_system_is_reported():
    """Below the magnitude of the support Hessian's most negative eigenvalue, I + H/λ is indefinite: conjugate
    gradient cannot solve it, and the call says so (naming implicit_lambda) instead of returning a truncated
    solve silently; at a λ where the system is positive definite it stays quiet."""
    import warnings

    torch.manual_seed(0)
    model = mlp((1, 8, 1), act=nn.Tanh)
    tasks = regression_tasks(T=3)
    kwargs = dict(steps=0, order="implicit", cg_steps=20)  # φ_K = θ: the Hessian below is the system's
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    shapes = [p.shape for p in model.parameters()]

    def loss(vec, t):
        chunks = vec.split([s.numel() for s in shapes])
        params = dict(zip(names, (c.view(s) for c, s in zip(chunks, shapes))))
        return F.mse_loss(functional_call(model, params, (tasks[0][t],)), tasks[1][t])

    lowest = min(
        float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda z, t=t: loss(z, t), flat))[0])
        for t in range(3)
    )
    assert lowest < 0  # a tanh net's support loss is not convex here: the test's premise
    with pytest.warns(RuntimeWarning, match=r"not positive definite .* Raise implicit_lambda"):
        fastmaml.meta_step(model, tasks, implicit_lambda=0.01 * abs(lowest), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fastmaml.meta_step(model, tasks, implicit_lambda=100.0, **kwargs)
