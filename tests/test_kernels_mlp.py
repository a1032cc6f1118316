"""The whole-inner-loop MLP kernel (`fastmaml::mlp_meta_step`) against the autograd oracle: float64
rel. error < 1e-9; float32 no worse than 4x the float32 autograd loop's own error (both measured
against the float64 oracle). On CPU here; on CUDA too when there is a GPU (gpu_check.sh)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmaml import build
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.ops.mlp_kernel import mlp_meta_step, mlp_plan, supports_device, why_not
from models import mlp, regression_tasks
from oracle import autograd_meta_grad, rel_err

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
MSE = resolve_loss("mse")


@pytest.fixture(scope="module", autouse=True)
def extension():
    ok, why = build.load()
    assert ok, f"the C++ extension must build on this machine: {why}"


@pytest.fixture(autouse=True, params=["auto", "baseline"])
def cpu_isa(request, monkeypatch):
    """Every test runs with both CPU builds of the per-task loop: AVX2 + FMA where the CPU has it
    ("auto") and the baseline instruction set ($FASTMAML_CPU_ISA, read by the op per call)."""
    device = getattr(request.node, "callspec", None) and request.node.callspec.params.get("device")
    if request.param == "baseline" and device is not None and device.type == "cuda":
        pytest.skip("the instruction-set choice applies to the CPU op only (the CUDA case runs under 'auto')")
    monkeypatch.setenv("FASTMAML_CPU_ISA", request.param)
    return request.param


def flat(grads, layout):
    return torch.cat([grads[n].reshape(-1) for n in layout.adapted.names])


def run_kernel(model, tasks, inner_lr, steps, order, device):
    layout = ParamLayout(model)
    plan = mlp_plan(model, layout, MSE)
    assert plan is not None, why_not(model, layout, MSE)
    ok, why = supports_device(plan, device)
    assert ok, why
    theta, _ = layout.theta()
    lrs = inner_lr if isinstance(inner_lr, list) else [inner_lr] * steps
    alphas = [(lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=theta.dtype)).to(device)
              for lr in lrs]
    lr_grad = [a.requires_grad for a in alphas]
    out = mlp_meta_step(plan, theta.detach().to(device), *[t.to(device) for t in tasks], alphas,
                        order=order, lr_grad=lr_grad)
    return layout, out


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize("order", ["second", "first"])
@pytest.mark.parametrize("widths,T,steps", [
    ((1, 40, 40, 1), 4, 1), ((1, 40, 40, 1), 3, 5), ((1, 13, 7, 1), 1, 2), ((3, 5, 2), 2, 3),
    ((2, 1), 3, 4), ((4, 9, 11, 6, 3), 2, 2),
])
def test_float64_matches_oracle(device, act, order, widths, T, steps):
    torch.manual_seed(sum(widths) + T + steps)
    model = mlp(widths, act=act)
    tasks = regression_tasks(T=T, ns=7, nq=5, din=widths[0], dout=widths[-1], seed=steps)
    layout, out = run_kernel(model, tasks, 0.07, steps, order, device)
    ref_loss, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.07, steps=steps, order=order,
                                          loss_fn=F.mse_loss)
    assert rel_err(out.grad.cpu(), flat(ref, layout)) < 1e-9
    assert rel_err(out.query_loss_after.mean().cpu(), ref_loss) < 1e-12


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("order", ["second", "first"])
def test_learned_and_per_parameter_learning_rates(device, order):
    model = mlp((1, 11, 6, 1))
    tasks = regression_tasks(T=3, ns=6, nq=4)
    P = sum(p.numel() for p in model.parameters())
    scalar = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    vector = (torch.rand(P, dtype=torch.float64) * 0.1).requires_grad_()
    layout, out = run_kernel(model, tasks, [scalar, vector, scalar], 3, order, device)
    # the oracle needs the per-parameter vector split like the parameters
    split = dict(zip(layout.adapted.names, layout.adapted.unflatten(vector).values()))
    ref_loss, ref, (d_scalar, d_vector) = autograd_meta_grad(
        model, tasks, inner_lr=[scalar, split, scalar], steps=3, order=order, loss_fn=F.mse_loss,
        extra=(scalar, vector))
    assert rel_err(out.grad.cpu(), flat(ref, layout)) < 1e-9
    assert out.d_alphas[0].shape == () and out.d_alphas[1].shape == (P,)
    assert rel_err((out.d_alphas[0] + out.d_alphas[2]).cpu(), d_scalar) < 1e-9
    assert rel_err(out.d_alphas[1].cpu(), d_vector) < 1e-9


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_losses_before_and_after(device):
    model = mlp((1, 8, 1))
    tasks = regression_tasks(T=2)
    sx, sy, qx, qy = tasks
    _, out = run_kernel(model, tasks, 0.1, 2, "second", device)
    with torch.no_grad():
        q_before = ((model(qx) - qy) ** 2).mean(dim=(1, 2))
        s_before = ((model(sx) - sy) ** 2).mean(dim=(1, 2))
    assert rel_err(out.query_loss_before.cpu(), q_before) < 1e-12
    assert rel_err(out.support_loss_before.cpu(), s_before) < 1e-12
    q_after = []
    for t in range(2):  # two plain SGD steps per task, by hand
        fast = dict(model.named_parameters())
        for _ in range(2):
            L = F.mse_loss(torch.func.functional_call(model, fast, (sx[t],)), sy[t])
            fast = {n: p - 0.1 * g for (n, p), g in zip(fast.items(), torch.autograd.grad(L, list(fast.values())))}
        q_after.append(F.mse_loss(torch.func.functional_call(model, fast, (qx[t],)), qy[t]).detach())
    assert rel_err(out.query_loss_after.cpu(), torch.stack(q_after)) < 1e-12


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("steps", [1, 5])
def test_float32_error_like_autograd_loop(device, steps):
    model64 = mlp((1, 40, 40, 1))
    tasks64 = regression_tasks(T=25, ns=10, nq=10, seed=11)
    _, ref64, _ = autograd_meta_grad(model64, tasks64, inner_lr=0.01, steps=steps, loss_fn=F.mse_loss)
    model32 = mlp((1, 40, 40, 1)).float()
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    tasks32 = [t.float() for t in tasks64]
    _, loop32, _ = autograd_meta_grad(model32, tasks32, inner_lr=0.01, steps=steps, loss_fn=F.mse_loss)
    layout, out = run_kernel(model32, tasks32, 0.01, steps, "second", device)
    want = flat(ref64, layout)
    loop_err = rel_err(flat(loop32, layout), want)
    assert rel_err(out.grad.cpu(), want) <= 4 * max(loop_err, 1e-7)


def test_why_not_names_the_reason():
    assert why_not(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double(),
                   ParamLayout(nn.Sequential(nn.Linear(2, 3))), resolve_loss("cross_entropy")).startswith("loss")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Linear(2, 1))
    assert "nn.Linear" in why_not(conv, ParamLayout(conv), MSE)
    mixed = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    assert "one activation" in why_not(mixed, ParamLayout(mixed), MSE)
    anil = mlp((1, 4, 1))
    assert "not adapted" in why_not(anil, ParamLayout(anil, ["2"]), MSE)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: dict(a, theta=a["theta"][:-1]), "theta: sizes .* need 13 parameters"),
    (lambda a: dict(a, sizes=[1, 4, 0]), "sizes: expected 2 to 9 positive layer widths"),
    (lambda a: dict(a, sy=a["sy"][:, :3]), "sy: expected Ns=5"),
    (lambda a: dict(a, qx=a["qx"][:1]), "qx: expected T=2 tasks"),
    (lambda a: dict(a, qy=a["qy"].float()), "qy: expected dtype Double"),
    (lambda a: dict(a, alpha=a["alpha"][:, :3]), "alpha: expected \\[K, P=13\\]"),
    (lambda a: dict(a, activation=7), "activation: expected 0 \\(ReLU\\) or 1 \\(Tanh\\)"),
])
def test_bad_arguments_name_the_argument(mutate, match):
    sx, sy, qx, qy = regression_tasks(T=2, ns=5, nq=4)
    args = dict(theta=torch.zeros(13, dtype=torch.float64), sizes=[1, 4, 1], sx=sx, sy=sy, qx=qx, qy=qy,
                alpha=torch.full((2, 13), 0.1, dtype=torch.float64), second_order=True, lr_grad=False,
                activation=0)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastmaml.mlp_meta_step(**mutate(args))


def test_opcheck():
    sx, sy, qx, qy = regression_tasks(T=2, ns=5, nq=4)
    theta = torch.randn(13, dtype=torch.float64)
    alpha = torch.full((2, 13), 0.1, dtype=torch.float64)
    for lr_grad in (True, False):
        torch.library.opcheck(torch.ops.fastmaml.mlp_meta_step.default,
                              (theta, [1, 4, 1], sx, sy, qx, qy, alpha, True, lr_grad, 0))


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_try_meta_step_agrees_with_the_general_path(device, monkeypatch):
    """What meta_step gets from the kernel equals meta_step's own torch-backend result."""
    import fastmaml
    from fastmaml.inner_lr import expand_inner_lr
    from fastmaml.ops import mlp_kernel

    model = mlp((1, 12, 9, 1)).to(device)
    tasks = [t.to(device) for t in regression_tasks(T=5, ns=6, nq=8)]
    lr = torch.tensor(0.03, dtype=torch.float64, device=device, requires_grad=True)
    model.zero_grad()
    res = fastmaml.meta_step(model, tasks, inner_lr=lr, steps=3, backend="torch")
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    layout = ParamLayout(model)
    theta, _ = layout.theta()
    alphas = expand_inner_lr(lr, 3, layout.adapted, like=theta)
    out = mlp_kernel.try_meta_step(model, layout, MSE, tasks, alphas, order="second", backend="auto",
                                   lr_grad=[True] * 3)
    assert out is not None
    assert rel_err(out.grad, flat(want, layout)) < 1e-9
    assert rel_err(sum(out.d_alphas), lr.grad) < 1e-9
    assert rel_err(out.query_loss_after, res.query_loss_after) < 1e-12
    assert rel_err(out.query_loss_before, res.query_loss_before) < 1e-12
    assert rel_err(out.support_loss_before, res.support_loss_before) < 1e-12
    assert mlp_kernel.try_meta_step(model, layout, MSE, tasks, alphas, order="second", backend="torch",
                                    lr_grad=[False] * 3) is None
    monkeypatch.setenv("FASTMAML_BACKEND", "torch")
    assert mlp_kernel.try_meta_step(model, layout, MSE, tasks, alphas, order="second", backend="auto",
                                    lr_grad=[False] * 3) is None
