"""FusedProgram rules layer by layer against a per-task autograd oracle (create_graph double backward,
float64): loss, gradient, Hessian-vector product (adapted and mixed shared block) and forward."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.ops import resolve
from fastmaml.programs import fused
from fastmaml.programs.fused import conv

from oracle import rel_err

TOL = 1e-9
D = torch.float64
OPS = resolve("torch", "cpu")


def per_task_oracle(model, layout, loss_fn, phi, shared, x, y, u, bn_stats=None):
    """Per task: loss, ∇_a, ∇_s, H_aa u, H_sa u by torch.autograd (BatchNorm on batch statistics, or on
    `bn_stats` as running statistics in eval mode)."""
    model = copy.deepcopy(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for i, m in enumerate(norms):
        if bn_stats is None:
            m.train()
        else:
            m.eval()
            m.running_mean, m.running_var = (t.clone() for t in bn_stats[i])
    T = x.shape[0]
    out = {k: [] for k in ("loss", "ga", "gs", "ha", "hs", "out")}
    for t in range(T):
        pa = (phi[t] if phi.dim() == 2 else phi).detach().clone().requires_grad_(True)
        ps = shared.detach().clone().requires_grad_(True)
        params = layout.adapted.unflatten(pa)
        params.update(layout.shared.unflatten(ps))
        o = functional_call(model, params, (x[t],))
        L = loss_fn(o, y[t])
        ga, gs = torch.autograd.grad(L, [pa, ps], create_graph=True, allow_unused=True)
        gs = torch.zeros_like(ps) if gs is None else gs
        ha, hs = torch.autograd.grad(ga, [pa, ps], grad_outputs=u[t], allow_unused=True)
        hs = torch.zeros_like(ps) if hs is None else hs
        for k, v in zip(out, (L, ga, gs, ha, hs, o)):
            out[k].append(v.detach())
    return {k: torch.stack(v) for k, v in out.items()}


def check_program(model, x, y, *, loss="mse", inner_params=None, bn_stats=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = ParamLayout(model, inner_params)
    loss_obj = resolve_loss(loss)
    program = fused.build(model, layout, loss_obj)
    T = x.shape[0]
    theta_a, theta_s = (t.detach() for t in layout.theta())
    phi = theta_a + 0.3 * torch.randn(T, theta_a.numel(), generator=g, dtype=D)
    u = torch.randn(T, theta_a.numel(), generator=g, dtype=D)
    shared_grad = theta_s.numel() > 0
    for weights in (phi, theta_a):  # per-task fast weights, and θ common to all tasks (step 0)
        ref = per_task_oracle(model, layout, loss_obj.fn, weights, theta_s, x, y, u, bn_stats)
        lg = program.loss_grad(OPS, weights, theta_s, x, y, shared_grad=shared_grad, bn_stats=bn_stats)
        assert rel_err(lg.loss, ref["loss"]) < TOL
        assert rel_err(lg.output, ref["out"]) < TOL
        assert rel_err(lg.grad, ref["ga"]) < TOL
        h = program.hvp(OPS, weights, theta_s, x, y, u, shared_grad=shared_grad, bn_stats=bn_stats)
        assert rel_err(h.grad, ref["ga"]) < TOL
        assert rel_err(h.hu, ref["ha"]) < TOL
        if shared_grad:
            assert rel_err(lg.grad_shared, ref["gs"]) < TOL
            assert rel_err(h.hu_shared, ref["hs"]) < TOL
        else:
            assert lg.grad_shared is None and h.hu_shared is None
        # the same rules without a shared gradient stop earlier in the backward sweep
        h2 = program.hvp(OPS, weights, theta_s, x, y, u, bn_stats=bn_stats)
        assert rel_err(h2.hu, ref["ha"]) < TOL
        # forward is differentiable by ordinary autograd (AdaptedModel): its loss gradient matches
        w = weights.clone().requires_grad_(True)
        out = program.forward(OPS, w, theta_s, x, bn_stats=bn_stats)
        assert rel_err(out, ref["out"]) < TOL
        (gw,) = torch.autograd.grad(sum(loss_obj.fn(out[t], y[t]) for t in range(T)), w)
        assert rel_err(gw, ref["ga"] if weights.dim() == 2 else ref["ga"].sum(0)) < TOL
    return program


def vec_data(T, N, din, dout, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, N, din, generator=g, dtype=D), torch.randn(T, N, dout, generator=g, dtype=D)


def img_data(T, N, C, H, W, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, N, C, H, W, generator=g, dtype=D), torch.randint(0, classes, (T, N), generator=g)


ACTIVATIONS = [
    nn.ReLU(),
    nn.LeakyReLU(0.13),
    nn.Tanh(),
    nn.Sigmoid(),
    nn.ELU(0.7),
    nn.GELU(),
    nn.SiLU(),
    nn.Softplus(beta=2.0, threshold=1.0),
    nn.Hardtanh(-0.5, 0.5),
    nn.ReLU6(),
    nn.Hardswish(),
]  # Hardsigmoid: PyTorch has no double backward for it (the oracle's), tested in test_graph_models.py


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_activation(act):
    model = nn.Sequential(nn.Linear(5, 7), act, nn.Linear(7, 3)).double()
    check_program(model, *vec_data(3, 4, 5, 3))


def test_linear_alone_cross_entropy_and_no_bias():
    check_program(nn.Linear(5, 3).double(), *vec_data(2, 7, 5, 3))
    model = nn.Sequential(nn.Linear(5, 7, bias=False), nn.Tanh(), nn.Linear(7, 4)).double()
    x, _ = vec_data(3, 6, 5, 4)
    y = torch.randint(0, 4, (3, 6))
    check_program(model, x, y, loss="cross_entropy")


def test_linear_on_extra_dims_and_mse_shape_error():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 6, 4, generator=g, dtype=D)  # per example [6, 4]
    y = torch.randn(2, 3, 6, 2, generator=g, dtype=D)
    program = check_program(model, x, y)
    theta_a, theta_s = ParamLayout(model).theta()
    with pytest.raises(ValueError, match="loss='mse'"):
        program.loss_grad(OPS, theta_a.detach(), theta_s, x, y[..., :1])


@pytest.mark.parametrize("shared", [False, True], ids=["adapted", "shared-body"])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm1d(affine, shared):
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7, affine=affine), nn.ReLU(), nn.Linear(7, 2)).double()
    check_program(model, *vec_data(3, 6, 5, 2), inner_params=["3"] if shared else None)


def test_batchnorm_fixed_statistics():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 3)).double()
    g = torch.Generator().manual_seed(5)
    stats = [(torch.randn(3, generator=g, dtype=D), torch.rand(3, generator=g, dtype=D) + 0.5)]
    check_program(model, *img_data(2, 4, 2, 5, 5), loss="cross_entropy", bn_stats=stats)


@pytest.fixture(params=["loop", "grouped"])
def strategy(request, monkeypatch):
    monkeypatch.setitem(conv.STRATEGY, "cpu", request.param)
    return request.param


@pytest.mark.parametrize(
    "geometry",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(2, 3), dilation=2, padding=(1, 0), bias=False),
        dict(kernel_size=3, padding="same"),
    ],
    ids=str,
)
def test_conv2d(geometry, strategy):
    model = nn.Sequential(nn.Conv2d(2, 3, **geometry), nn.Tanh(), nn.Flatten()).double()
    x, _ = img_data(3, 2, 2, 7, 6)
    out = model(x[0]).shape[-1]
    model.append(nn.Linear(out, 3).double())
    check_program(model, x, torch.randint(0, 3, (3, 2)), loss="cross_entropy")


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_one_task(bias, strategy):
    """T = 1 (the CPU's task chunks of large activations): "loop" passes each result through without a copy;
    two layers, so that input gradients, weight gradients (added to in the tangent backward) and biases all
    run."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=bias), nn.Tanh(), nn.Conv2d(3, 2, 3, bias=bias), nn.Flatten()
    ).double()
    model.append(nn.Linear(2 * 5 * 4, 3).double())
    x, _ = img_data(1, 4, 2, 7, 6)
    check_program(model, x, torch.randint(0, 3, (1, 4)), loss="cross_entropy")


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(2),
        nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        nn.AvgPool2d(2),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.AdaptiveAvgPool2d((2, 3)),
        nn.AdaptiveMaxPool2d((2, 3)),
        nn.AdaptiveMaxPool2d(1),
    ],
    ids=str,
)
def test_pooling(pool, strategy):
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), pool, nn.Flatten()).double()
    x, y = img_data(2, 5, 1, 7, 7)
    model.append(nn.Linear(model(x[0]).shape[-1], 3).double())
    check_program(model, x, y, loss="cross_entropy")


def test_shared_conv_body_adapted_head(strategy):
    """ANIL-style: only the head adapts; the shared convolution and BatchNorm get the mixed block H_sa u."""
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).double()
    check_program(model, *img_data(2, 3, 1, 6, 6), loss="cross_entropy", inner_params=["7"])
    check_program(model, *img_data(2, 3, 1, 6, 6), loss="cross_entropy", inner_params=["4", "7.bias"])


def test_identity_and_eval_dropout_are_skipped():
    model = nn.Sequential(nn.Linear(3, 5), nn.Identity(), nn.Dropout(0.5), nn.Sequential(nn.ReLU(), nn.Linear(5, 1)))
    model = model.double()
    model[2].eval()
    program = check_program(model, *vec_data(2, 4, 3, 1))
    assert [n.rule.kind for n in program.nodes] == ["Linear", "ReLU", "Linear"]


def test_batch_stats_match_the_layer_inputs():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 1)).double()
    x, _ = vec_data(2, 5, 3, 1)
    layout = ParamLayout(model)
    program = fused.build(model, layout, resolve_loss("mse"))
    theta_a, theta_s = (t.detach() for t in layout.theta())
    [(mean, var, count)] = program.batch_stats(OPS, theta_a, theta_s, x)
    h = model[0](x)
    assert count == 5
    assert rel_err(mean, h.mean(1)) < TOL and rel_err(var, h.var(1, unbiased=False)) < TOL


def test_input_shape_errors_name_the_layer():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3, 1)).double()
    layout = ParamLayout(model)
    program = fused.build(model, layout, resolve_loss("mse"))
    theta_a, theta_s = (t.detach() for t in layout.theta())
    with pytest.raises(ValueError, match=r"model layer 0 \(Conv2d\): expected per-task inputs \[T, N, 2"):
        program.loss_grad(OPS, theta_a, theta_s, torch.randn(2, 3, 1, 3, 3, dtype=D), torch.randn(2, 3, 1, dtype=D))
    with pytest.raises(ValueError, match=r"model layer 2 \(Linear\): expected inputs with 3 features"):
        program.loss_grad(OPS, theta_a, theta_s, torch.randn(2, 3, 2, 4, 4, dtype=D), torch.randn(2, 3, 1, dtype=D))


def test_batchnorm_ops_batch_statistics_formulas():
    """The by-hand batch-statistics BatchNorm ops (reference for kernels) against autograd."""
    from fastmaml.ops.reference import batchnorm as layers

    g = torch.Generator().manual_seed(7)
    T, N, C, S = 2, 5, 3, 4
    x = torch.randn(T, N, C, S, generator=g, dtype=D, requires_grad=True)
    w = torch.randn(T, C, generator=g, dtype=D, requires_grad=True)
    b = torch.randn(T, C, generator=g, dtype=D)
    gy = torch.randn(T, N, C, S, generator=g, dtype=D)
    y, xhat, r = layers.batchnorm_fwd(x, w, b, 1e-5)
    ref = torch.stack(
        [
            F.batch_norm(x[t].transpose(0, 1).reshape(C, -1).t(), None, None, w[t], b[t], True, 0.0, 1e-5)
            .t()
            .reshape(C, N, S)
            .transpose(0, 1)
            for t in range(T)
        ]
    )
    assert rel_err(y, ref) < TOL
    gx_ref, gw_ref = torch.autograd.grad(ref, [x, w], gy)
    gw = torch.empty(T, C, dtype=D)
    gx = layers.batchnorm_bwd(gy, xhat.detach(), r.detach(), w.detach(), True, True, gw, None)
    assert rel_err(gx, gx_ref) < TOL and rel_err(gw, gw_ref) < TOL
    gx2 = layers.batchnorm_train_bwd(
        gy,
        x.detach(),
        *layers.batchnorm_train_fwd(x.detach(), w.detach(), b, 1e-5)[1:],
        w.detach(),
        1e-5,
        True,
        None,
        None,
    )
    assert rel_err(gx2, gx_ref) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("affine", ["task", "common", None])
def test_batchnorm_reference_tangent_forward_recomputes_the_forward_bit_for_bit(dtype, affine):
    """The Hessian-vector product pass recomputes each step's forward through the value-and-tangent ops; with
    batch statistics their outputs must be the forward ops' bit for bit, or a ReLU decision at a near-tie
    could differ between a step's gradient and its Hessian (issue 13)."""
    from fastmaml.ops.reference import batchnorm as ops

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 5, 4, 49, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    w = {"task": torch.randn(3, 4, generator=g), "common": torch.randn(4, generator=g), None: None}[affine]
    b = None if w is None else torch.randn(w.shape, generator=g)
    w, b = (None if v is None else v.to(dtype) for v in (w, b))
    y, mean, r = ops.batchnorm_train_fwd(x, w, b, 1e-5)
    y2, _, r2 = ops.batchnorm_fwd(x, w, b, 1e-5)
    assert torch.equal(y, y2) and torch.equal(r.view(r2.shape), r2)
    z = ops.batchnorm_relu_train_fwd(x, w, b, 1e-5)[0]
    z2 = ops.batchnorm_relu_value_tangent_fwd(x, torch.randn_like(x), w, b, None, None, 1e-5)[0]
    assert torch.equal(z, z2)
