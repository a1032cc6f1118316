"""LayerNorm, GroupNorm and InstanceNorm on the fused engine (statistics of each example): the reference ops
against PyTorch's own norms under autograd (gradient, tangent, tangent of the gradient), and models written
as classes against the per-task `create_graph` oracle in float64: every order, K = 0–3, Meta-SGD rates, ANIL,
train and eval mode; running statistics fall back and say why."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_graph_models import check_ce, on_fused, tasks_for
from test_implicit import implicit_oracle
from torch import nn

import fastmaml
from fastmaml.ops.registry import implementation
from fastmaml.programs.fused.example_norm import ExampleNormRule
from fastmaml.programs.fused.memory_format import follows_channels_last

from oracle import assert_grads_close, check_adapt_matches_meta_step, check_float32_error, check_meta_step, rel_err

TOL = 1e-9
ORDERS = ["second", "checkpoint", "first"]


# ------------------------------------------------------------------ the ops against PyTorch's norms


def _torch_norm(kind, x, w, b, groups, eps):
    """PyTorch's own norm of one task's x `[N, *features]`."""
    if kind == "layer":
        return F.layer_norm(x, w.shape, w, b, eps)
    return F.group_norm(x, groups, w, b, eps)


def _view(kind, x, groups, k):
    """One task's x `[N, *features]` as the ops' `[B, G, A, S]`."""
    if kind == "layer":
        return x.reshape(-1, 1, math.prod(x.shape[x.dim() - k :]), 1)
    return x.reshape(x.shape[0], groups, x.shape[1] // groups, -1)


CASES = [
    ("layer", (5, 7), 1, 1),  # [N, D]: a head's features
    ("layer", (3, 4, 6), 1, 1),  # [N, L, D]: tokens, rows N·L
    ("layer", (2, 3, 5, 5), 3, 3),  # over [C, H, W]
    ("layer", (75, 49, 64), 1, 1),  # real sizes: 75 query sequences of 49 tokens (PyTorch's layer-norm kernels)
    ("group", (4, 6, 5, 3), 3, None),  # odd maps
    ("group", (3, 4, 7, 7), 1, None),  # one group (LayerNorm over [C, H, W] with per-channel weights)
    ("group", (5, 6), 2, None),  # [N, C]: no positions
    ("group", (2, 5, 3, 4), 5, None),  # one group per channel: InstanceNorm
    ("group", (5, 16, 84, 84), 4, None),  # real sizes: a first layer at 84×84
    ("group", (75, 32, 21, 21), 8, None),  # 75 query images
]


@pytest.mark.parametrize("kind,shape,groups,k", CASES)
def test_ops_match_pytorch_norms_under_autograd(kind, shape, groups, k):
    """y, gx, gw, gb, ẏ and the tangents of gx, gw, gb of the four ops against autograd through F.layer_norm /
    F.group_norm, per task with per-task weights and directions, float64."""
    g = torch.Generator().manual_seed(sum(shape))
    T, eps = 2, 1e-5
    wshape = shape[len(shape) - k :] if kind == "layer" else (shape[1],)
    x = torch.randn(T, *shape, generator=g, dtype=torch.float64) * 2 + 0.5
    xd, gy, gyd = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(3))
    w, b, wd, bd = (torch.randn(T, *wshape, generator=g, dtype=torch.float64) for _ in range(4))
    op = {n: implementation(f"examplenorm_{n}", "torch") for n in ("fwd", "bwd", "tangent_fwd", "tangent_bwd")}
    for t in range(T):
        view = _view(kind, x[t], groups, k)[None]
        G, A = view.shape[2], view.shape[3]
        pw, pb, pwd, pbd = (p[t].reshape(1, G, A) for p in (w, b, wd, bd))
        y, mean, r = op["fwd"](view, pw, pb, eps)
        xdv, gyv, gydv = (z[t].reshape(view.shape) for z in (xd, gy, gyd))
        gw, gb, gwd, gbd = (torch.empty(1, G, A, dtype=torch.float64) for _ in range(4))
        gx = op["bwd"](gyv, view, mean, r, pw, True, gw, gb)
        yd, xhat, xhd, a = op["tangent_fwd"](view, xdv, mean, r, pw, pwd, pbd)
        gx2, gxd = op["tangent_bwd"](gyv, gydv, xhat, xhd, a, r, pw, pwd, True, gw, gwd, gb, gbd)

        xt, wt, bt = (z[t].clone().requires_grad_() for z in (x, w, b))
        ref_y = _torch_norm(kind, xt, wt, bt, groups, eps)
        assert rel_err(y.reshape(ref_y.shape), ref_y) < 1e-12
        ref_yd = torch.func.jvp(
            lambda x_, w_, b_: _torch_norm(kind, x_, w_, b_, groups, eps), (x[t], w[t], b[t]), (xd[t], wd[t], bd[t])
        )[1]
        assert rel_err(yd.reshape(ref_yd.shape), ref_yd) < 1e-12
        grads = torch.autograd.grad(ref_y, (xt, wt, bt), gy[t], create_graph=True)
        for got, ref in zip((gx, gx2, gw, gb), (grads[0], grads[0], grads[1], grads[2])):
            assert rel_err(got.reshape(ref.shape), ref) < 1e-12
        # the tangent of the gradient along (ẋ, ẇ, ḃ), with ġy the tangent of the incoming gradient
        dot = sum((gr * d).sum() for gr, d in zip(grads, (xd[t], wd[t], bd[t])))
        second = torch.autograd.grad(dot, (xt, wt, bt), retain_graph=True, allow_unused=True)
        gy_lin = torch.autograd.grad(ref_y, (xt, wt, bt), gyd[t])
        for got, s, lin in zip((gxd, gwd, gbd), second, gy_lin):
            ref = lin if s is None else s + lin
            assert rel_err(got.reshape(ref.shape), ref) < 1e-11


def test_ops_without_affine_weights_and_without_a_tangent_of_x():
    """No weight or bias (None), and ẋ None (a layer before any adapted one): the zero terms drop."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 2, 4, 5, generator=g, dtype=torch.float64)
    gy, gyd = (
        torch.randn(x.shape, generator=g, dtype=torch.float64),
        torch.randn(x.shape, generator=g, dtype=torch.float64),
    )
    fwd, bwd = implementation("examplenorm_fwd", "torch"), implementation("examplenorm_bwd", "torch")
    tfwd, tbwd = implementation("examplenorm_tangent_fwd", "torch"), implementation("examplenorm_tangent_bwd", "torch")
    y, mean, r = fwd(x, None, None, 1e-5)
    ref = F.group_norm(x.reshape(6, 8, 5), 2).reshape(x.shape)
    assert rel_err(y, ref) < 1e-12
    yd, xhat, xhd, a = tfwd(x, None, mean, r, None, None, None)
    assert yd is None and xhd is None and a is None
    gx, gxd = tbwd(gy, gyd, xhat, None, None, r, None, None, True, None, None, None, None)
    assert rel_err(gx, bwd(gy, x, mean, r, None, True, None, None)) < 1e-12
    assert rel_err(gxd, bwd(gyd, x, mean, r, None, True, None, None)) < 1e-12  # linear in the incoming gradient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("view", [(3, 75, 2, 16, 49), (3, 75, 1, 16, 1)])  # GroupNorm's; LayerNorm's (its kernels)
def test_common_weights_run_once_over_all_tasks(dtype, view):
    """Common weights (step 0, a shared layer) take one kernel call over all tasks' rows: the same y,
    statistics and gx as the per-task calls with those weights given per task (float32: to rounding)."""
    g = torch.Generator().manual_seed(4)
    T, G, A = view[0], view[2], view[3]
    x = torch.randn(view, generator=g, dtype=torch.float64).to(dtype)
    w, b = (torch.randn(G, A, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    gy = torch.randn(view, generator=g, dtype=torch.float64).to(dtype)
    fwd, bwd = implementation("examplenorm_fwd", "torch"), implementation("examplenorm_bwd", "torch")
    once, per_task = fwd(x, w, b, 1e-5), fwd(x, w.expand(T, G, A), b.expand(T, G, A), 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, c in zip(once, per_task):
        assert rel_err(a, c) < tol
    gx_once = bwd(gy, x, *once[1:], w, True, None, None)
    gx_per_task = bwd(gy, x, *per_task[1:], w.expand(T, G, A), True, None, None)
    assert rel_err(gx_once, gx_per_task) < tol


# ------------------------------------------------------------------ models written as classes


class GroupNormNet(nn.Module):
    """conv-GroupNorm-ReLU-pool blocks, a LayerNorm before the head."""

    def __init__(self, hidden=4, groups=2, ways=5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, hidden, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, hidden)
        self.ln = nn.LayerNorm(hidden * 4)
        self.head = nn.Linear(hidden * 4, ways)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.norm1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.norm2(self.conv2(x))), 2)
        return self.head(self.ln(torch.flatten(x, 1)))


class InstanceNormNet(nn.Module):
    """InstanceNorm2d with and without affine weights."""

    def __init__(self, hidden=3, ways=5):
        super().__init__()
        self.conv1 = nn.Conv2d(1, hidden, 3, padding=1)
        self.norm1 = nn.InstanceNorm2d(hidden, affine=True)
        self.conv2 = nn.Conv2d(hidden, hidden, 3)
        self.norm2 = nn.InstanceNorm2d(hidden)
        self.head = nn.Linear(hidden, ways)

    def forward(self, x):
        x = F.leaky_relu(self.norm1(self.conv1(x)), 0.1)
        x = self.norm2(self.conv2(x)).relu()
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TokenMixer(nn.Module):
    """Tokens `[N, L, D]`: pre-LayerNorm residual MLP blocks over the last dim, a mean over the tokens, a
    LayerNorm over [L, D] without affine weights in between (the functional forms)."""

    def __init__(self, tokens=3, dim=4, ways=3):
        super().__init__()
        self.embed = nn.Linear(2, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.g = nn.Parameter(torch.rand(dim) + 0.5)
        self.b = nn.Parameter(torch.randn(dim) * 0.1)
        self.head = nn.Linear(dim, ways)
        self.tokens, self.dim = tokens, dim

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.ln1(h))))
        h = F.layer_norm(h, (self.tokens, self.dim))
        h = F.layer_norm(h, (self.dim,), self.g, self.b, 1e-6)
        return self.head(h.mean(1))


class FunctionalNorms(nn.Module):
    """F.group_norm without weights, F.instance_norm with the model's own weights."""

    def __init__(self, ways=4):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4) * 0.1)
        self.head = nn.Linear(4 * 16, ways)

    def forward(self, x):
        x = F.group_norm(self.conv(x), 2)
        x = F.instance_norm(torch.tanh(x), weight=self.gamma, bias=self.beta)
        return self.head(x.flatten(1))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("steps", [0, 1, 3])
def test_group_norm_net(order, steps):
    torch.manual_seed(0)
    check_ce(GroupNormNet().double(), tasks_for((1, 8, 8)), inner_lr=0.3, steps=steps, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_instance_norm_net(order):
    torch.manual_seed(1)
    check_ce(InstanceNormNet().double(), tasks_for((1, 7, 7)), inner_lr=0.3, steps=2, order=order)


@pytest.mark.parametrize("order", ORDERS)
def test_layer_norm_over_tokens(order):
    torch.manual_seed(2)
    check_ce(TokenMixer().double(), tasks_for((3, 2), ways=3), inner_lr=0.3, steps=2, order=order)


def test_implicit_order_matches_the_dense_solve():
    torch.manual_seed(7)
    model = InstanceNormNet().double()
    tasks = tasks_for((1, 6, 6), T=2)
    kw = dict(inner_lr=0.05, steps=3, implicit_lambda=20.0)
    fastmaml.meta_step(model, tasks, order="implicit", cg_steps=40, loss="cross_entropy", **kw)
    got = {n: p.grad for n, p in model.named_parameters()}
    adapted = [n for n, _ in model.named_parameters()]
    ref = implicit_oracle(model, tasks, lr=0.05, steps=3, lam=20.0, adapted=adapted, loss_fn=F.cross_entropy)
    assert_grads_close(got, ref, 1e-8)


def test_functional_norms():
    torch.manual_seed(3)
    check_ce(FunctionalNorms().double(), tasks_for((1, 4, 4), ways=4), inner_lr=0.3, steps=2)


def test_instance_norm_1d_over_a_sequence():
    class Sequence(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm, self.head = nn.Linear(5, 3 * 4), nn.InstanceNorm1d(3, affine=True), nn.Linear(12, 3)

        def forward(self, x):
            h = self.norm(self.fc(x).view(x.size(0), 3, 4))
            return self.head(F.elu(h).flatten(1))

    torch.manual_seed(8)
    check_ce(Sequence().double(), tasks_for((5,), ways=3), inner_lr=0.3, steps=2)


def test_meta_sgd_rates_and_anil():
    torch.manual_seed(4)
    model = GroupNormNet().double()
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    check_ce(model, tasks_for((1, 8, 8)), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))
    check_ce(model, tasks_for((1, 8, 8)), inner_lr=0.4, steps=3, inner_params=["head", "ln"])


def test_regression_with_layer_norm_and_eval_mode_is_the_same():
    """A regression MLP with LayerNorm; eval mode changes nothing (no running statistics)."""

    class Regressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.ln, self.fc2 = nn.Linear(1, 8), nn.LayerNorm(8), nn.Linear(8, 1)

        def forward(self, x):
            return self.fc2(torch.tanh(self.ln(self.fc1(x))))

    torch.manual_seed(5)
    model = Regressor().double()
    g = torch.Generator().manual_seed(1)
    tasks = tuple(torch.randn(3, 6, 1, generator=g, dtype=torch.float64) for _ in range(4))
    on_fused(model, loss="mse")
    train = check_meta_step(model, tasks, loss="mse", loss_fn=F.mse_loss, inner_lr=0.2, steps=2, tol=TOL)
    model.eval()
    on_fused(model, loss="mse")
    evaluated = check_meta_step(model, tasks, loss="mse", loss_fn=F.mse_loss, inner_lr=0.2, steps=2, tol=TOL)
    assert torch.equal(train.query_loss_after, evaluated.query_loss_after)


def test_float32_error_is_autograds_own():
    """In float32 the fused engine's meta-gradient is as close to float64 as autograd's own float32 loop."""
    torch.manual_seed(6)
    tasks = tasks_for((1, 8, 8), T=3, query=5)
    check_float32_error(
        GroupNormNet(hidden=8).double(), tasks, inner_lr=0.3, steps=2, loss="cross_entropy", loss_fn=F.cross_entropy
    )


def test_channels_last_is_not_chosen_for_models_with_per_example_norms():
    """ "auto" keeps NCHW where a per-example norm would copy every channels-last map it reads."""
    model = InstanceNormNet()
    program = on_fused(model)
    seen = []
    rule = next(n.rule for n in program.nodes if isinstance(n.rule, ExampleNormRule))
    forward = rule.forward

    def spy(ops, x, p, save):
        seen.append(follows_channels_last(x))
        return forward(ops, x, p, save)

    rule.forward = spy
    sx, sy, qx, qy = tasks_for((1, 32, 32), T=1)
    fastmaml.meta_step(
        model, (sx.float(), sy, qx.float(), qy), inner_lr=0.1, steps=1, order="first", loss="cross_entropy"
    )
    assert seen and not any(seen)


def test_running_statistics_and_bad_shapes_fall_back_or_raise_naming_the_layer():
    tracked = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2, track_running_stats=True), nn.Flatten(), nn.Linear(2 * 4, 2)
    )
    e = fastmaml.explain(tracked)
    assert e.program == "torch.func" and e.kind == "InstanceNorm2d" and "track_running_stats" in e.reason, e

    class RunningInstance(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.zeros(2))
            self.register_buffer("var", torch.ones(2))
            self.conv, self.head = nn.Conv2d(1, 2, 3), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(F.instance_norm(self.conv(x), self.mean, self.var).flatten(1))

    e = fastmaml.explain(RunningInstance())
    assert e.program == "torch.func" and "instance_norm" in e.kind and "running statistics" in e.reason, e
    assert "test_example_norms.py" in e.source and "F.instance_norm" in e.source

    wrong = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(5))
    tasks = (torch.randn(1, 2, 3), torch.randn(1, 2, 5), torch.randn(1, 2, 3), torch.randn(1, 2, 5))
    with pytest.raises(ValueError, match=r"1 \(LayerNorm\).*\[T, N, \.\.\., 5\]"):
        fastmaml.meta_step(wrong, tasks, inner_lr=0.1, steps=1, loss="mse")


@pytest.mark.parametrize("order", ORDERS)
def test_adapt_then_an_outer_loss_gives_the_meta_gradient(order):
    """`adapt` runs the rules' differentiable forward (PyTorch's group-norm kernel under autograd): an outer
    loss on its query logits gives meta_step's meta-gradient."""
    torch.manual_seed(9)
    kwargs = dict(inner_lr=0.3, steps=2, order=order, loss="cross_entropy")
    check_adapt_matches_meta_step(GroupNormNet().double(), tasks_for((1, 8, 8)), loss_fn=F.cross_entropy, **kwargs)
