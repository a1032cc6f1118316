"""The whole-inner-loop MLP op (`mlp_meta_step`: the C++/CUDA kernel `fastmaml::mlp_meta_step` and its
plain-PyTorch reference) against the autograd oracle: float64 rel. error < 1e-9; float32 no worse than 4x
the float32 autograd loop's own error (both measured against the float64 oracle). On CPU here; on CUDA too
when there is a GPU (gpu_check.sh)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml.engine
from fastmaml import build
from fastmaml.engine.mlp import MlpEngine
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.ops import registry, resolve
from fastmaml.programs import select_program

from conftest import no_mlp_op
from models import mlp, regression_tasks
from oracle import autograd_meta_grad, rel_err

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
MSE = resolve_loss("mse")
ORDERS = ["second", "checkpoint", "first"]


def exact(order):
    """The oracle's order: "checkpoint" computes the exact ("second") meta-gradient."""
    return "second" if order == "checkpoint" else order


@pytest.fixture(scope="module", autouse=True)
def extension():
    ok, why = build.load()
    assert ok, f"the C++ extension must build on this machine: {why}"


# (device, backend) pairs: the C++ kernel with both CPU builds of its per-task loop (AVX2 + FMA where the CPU
# has it, and the baseline instruction set: $FASTMAML_CPU_ISA, read by the op per call; CPU only), and the
# plain-PyTorch reference
CASES = [(d, b) for d in DEVICES for b in ("cpp", "cpp-baseline", "torch") if d.type == "cpu" or b != "cpp-baseline"]


# with the orders each runs: the C++ kernel keeps every step, so "checkpoint" (memory growing as log K) runs
# the reference
CASE_ORDERS = [(d, b, o) for d, b in CASES for o in ORDERS if not (b.startswith("cpp") and o == "checkpoint")]


def _select(request, monkeypatch, device, name):
    monkeypatch.setenv("FASTMAML_CPU_ISA", "baseline" if name == "cpp-baseline" else "auto")
    return device, name.split("-")[0]


@pytest.fixture(params=CASES, ids=[f"{d}-{b}" for d, b in CASES])
def case(request, monkeypatch):
    """(device, backend) of the op under test."""
    return _select(request, monkeypatch, *request.param)


@pytest.fixture(params=CASE_ORDERS, ids=[f"{d}-{b}-{o}" for d, b, o in CASE_ORDERS])
def case_order(request, monkeypatch):
    """(device, backend, order) of the op under test."""
    device, name, order = request.param
    return (*_select(request, monkeypatch, device, name), order)


def flat(grads, layout):
    return torch.cat([grads[n].reshape(-1) for n in layout.adapted.names])


def why_not(model, layout, loss=MSE):
    """The MLP engine's reason for not running `model` ("" when it does)."""
    return fastmaml.engine.mlp_plan(select_program(model, layout, loss), loss)[1]


def plan_of(model, layout):
    plan, why = fastmaml.engine.mlp_plan(select_program(model, layout, MSE), MSE)
    assert plan is not None, why
    return plan


def kernel_takes(plan, theta, order="second"):
    """Whether the C++ implementation takes these arguments (else the registry runs the reference)."""
    return registry.spec("mlp_meta_step", "cpp").supports(plan, theta, None, None, None, None, [], order) is None


def run_op(model, tasks, inner_lr, steps, order, device, backend):
    """The op's `backend` implementation itself (no fallback) on `model`."""
    layout = ParamLayout(model)
    plan = plan_of(model, layout)
    theta, _ = layout.theta()
    if backend == "cpp":
        assert kernel_takes(plan, theta.to(device), order)
    lrs = inner_lr if isinstance(inner_lr, list) else [inner_lr] * steps
    alphas = [(lr if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=theta.dtype)).to(device) for lr in lrs]
    lr_grad = [a.requires_grad for a in alphas]
    op = registry.implementation("mlp_meta_step", backend)
    out = op(
        plan,
        theta.detach().to(device),
        *[t.to(device) for t in tasks],
        [a.detach() for a in alphas],
        order,
        lr_grad,
        True,
    )
    return layout, out


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh])
@pytest.mark.parametrize(
    "widths,T,steps",
    [
        ((1, 40, 40, 1), 4, 1),
        ((1, 40, 40, 1), 3, 5),
        ((1, 13, 7, 1), 1, 2),
        ((3, 5, 2), 2, 3),
        ((2, 1), 3, 4),
        ((4, 9, 11, 6, 3), 2, 2),
        ((2, 5, 3), 2, 0),
    ],
)
def test_float64_matches_oracle(case_order, act, widths, T, steps):
    device, backend, order = case_order
    torch.manual_seed(sum(widths) + T + steps)
    model = mlp(widths, act=act)
    tasks = regression_tasks(T=T, ns=7, nq=5, din=widths[0], dout=widths[-1], seed=steps)
    layout, out = run_op(model, tasks, 0.07, steps, order, device, backend)
    ref_loss, ref, _ = autograd_meta_grad(
        model, tasks, inner_lr=0.07, steps=steps, order=exact(order), loss_fn=F.mse_loss
    )
    assert rel_err(out.grad.cpu(), flat(ref, layout)) < 1e-9
    assert rel_err(out.query_loss_after.mean().cpu(), ref_loss) < 1e-12


def test_learned_and_per_parameter_learning_rates(case_order):
    device, backend, order = case_order
    model = mlp((1, 11, 6, 1))
    tasks = regression_tasks(T=3, ns=6, nq=4)
    P = sum(p.numel() for p in model.parameters())
    scalar = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    vector = (torch.rand(P, dtype=torch.float64) * 0.1).requires_grad_()
    layout, out = run_op(model, tasks, [scalar, vector, scalar], 3, order, device, backend)
    # the oracle needs the per-parameter vector split like the parameters
    split = dict(zip(layout.adapted.names, layout.adapted.unflatten(vector).values()))
    ref_loss, ref, (d_scalar, d_vector) = autograd_meta_grad(
        model,
        tasks,
        inner_lr=[scalar, split, scalar],
        steps=3,
        order=exact(order),
        loss_fn=F.mse_loss,
        extra=(scalar, vector),
    )
    assert rel_err(out.grad.cpu(), flat(ref, layout)) < 1e-9
    assert out.d_alphas[0].shape == () and out.d_alphas[1].shape == (P,)
    assert rel_err((out.d_alphas[0] + out.d_alphas[2]).cpu(), d_scalar) < 1e-9
    assert rel_err(out.d_alphas[1].cpu(), d_vector) < 1e-9


def test_losses_before_and_after(case):
    device, backend = case
    model = mlp((1, 8, 1))
    tasks = regression_tasks(T=2)
    sx, sy, qx, qy = tasks
    _, out = run_op(model, tasks, 0.1, 2, "second", device, backend)
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


@pytest.mark.parametrize("steps", [1, 5])
def test_float32_error_like_autograd_loop(case, steps):
    device, backend = case
    model64 = mlp((1, 40, 40, 1))
    tasks64 = regression_tasks(T=25, ns=10, nq=10, seed=11)
    _, ref64, _ = autograd_meta_grad(model64, tasks64, inner_lr=0.01, steps=steps, loss_fn=F.mse_loss)
    model32 = mlp((1, 40, 40, 1)).float()
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    tasks32 = [t.float() for t in tasks64]
    _, loop32, _ = autograd_meta_grad(model32, tasks32, inner_lr=0.01, steps=steps, loss_fn=F.mse_loss)
    layout, out = run_op(model32, tasks32, 0.01, steps, "second", device, backend)
    want = flat(ref64, layout)
    loop_err = rel_err(flat(loop32, layout), want)
    assert rel_err(out.grad.cpu(), want) <= 4 * max(loop_err, 1e-7)


def test_why_not_names_the_reason():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)).double()
    assert "MSE only" in why_not(model, ParamLayout(model), resolve_loss("cross_entropy"))
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2, 1))
    assert "chain Linear, act" in why_not(conv, ParamLayout(conv))
    mixed = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))
    assert "one activation" in why_not(mixed, ParamLayout(mixed))
    anil = mlp((1, 4, 1))
    assert "not adapted" in why_not(anil, ParamLayout(anil, ["2"]))
    no_bias = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1, bias=False))
    assert "with a bias" in why_not(no_bias, ParamLayout(no_bias))

    class AsClass(nn.Module):  # an MLP written as a class takes the op too
        def __init__(self):
            super().__init__()
            self.hidden, self.out = nn.Linear(1, 8), nn.Linear(8, 1)

        def forward(self, x):
            return self.out(torch.relu(self.hidden(x)))

    as_class = AsClass()
    assert why_not(as_class, ParamLayout(as_class)) == ""


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: dict(a, theta=a["theta"][:-1]), "theta: sizes .* need 13 parameters"),
        (lambda a: dict(a, sizes=[1, 4, 0]), "sizes: expected 2 to 9 positive layer widths"),
        (lambda a: dict(a, sy=a["sy"][:, :3]), "sy: expected Ns=5"),
        (lambda a: dict(a, qx=a["qx"][:1]), "qx: expected T=2 tasks"),
        (lambda a: dict(a, qy=a["qy"].float()), "qy: expected dtype Double"),
        (lambda a: dict(a, alpha=a["alpha"][:, :3]), "alpha: expected \\[K, P=13\\]"),
        (lambda a: dict(a, activation=7), "activation: expected 0 \\(ReLU\\) or 1 \\(Tanh\\)"),
    ],
)
def test_bad_arguments_name_the_argument(mutate, match):
    sx, sy, qx, qy = regression_tasks(T=2, ns=5, nq=4)
    args = dict(
        theta=torch.zeros(13, dtype=torch.float64),
        sizes=[1, 4, 1],
        sx=sx,
        sy=sy,
        qx=qx,
        qy=qy,
        alpha=torch.full((2, 13), 0.1, dtype=torch.float64),
        second_order=True,
        lr_grad=False,
        activation=0,
    )
    with pytest.raises(RuntimeError, match=match):
        torch.ops.fastmaml.mlp_meta_step(**mutate(args))


def test_opcheck():
    sx, sy, qx, qy = regression_tasks(T=2, ns=5, nq=4)
    theta = torch.randn(13, dtype=torch.float64)
    alpha = torch.full((2, 13), 0.1, dtype=torch.float64)
    for lr_grad in (True, False):
        torch.library.opcheck(
            torch.ops.fastmaml.mlp_meta_step.default, (theta, [1, 4, 1], sx, sy, qx, qy, alpha, True, lr_grad, 0)
        )


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("requested", ["auto", "cpp", "torch"])
@pytest.mark.parametrize("task_chunk", [None, 2])
def test_mlp_engine_agrees_with_the_general_engine(device, requested, task_chunk, monkeypatch):
    """What meta_step gets from the MLP engine, from either backend and with the tasks in chunks or not, equals
    the fused engine's result."""
    import fastmaml
    from fastmaml.batchnorm import NormPlan
    from fastmaml.engine import MetaStepRequest
    from fastmaml.inner_lr import expand_inner_lr
    from fastmaml.tasks import TaskBatch

    model = mlp((1, 12, 9, 1)).to(device)
    tasks = [t.to(device) for t in regression_tasks(T=5, ns=6, nq=8)]
    lr = torch.tensor(0.03, dtype=torch.float64, device=device, requires_grad=True)
    model.zero_grad()
    with monkeypatch.context() as m:
        m.setattr(fastmaml.engine, "mlp_plan", no_mlp_op)
        res = fastmaml.meta_step(model, tasks, inner_lr=lr, steps=3, backend="torch")
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    layout = ParamLayout(model)
    theta, theta_s = (t.detach() for t in layout.theta())
    alphas = [a.detach() for a in expand_inner_lr(lr, 3, layout.adapted, like=theta)]
    req = MetaStepRequest(
        model=model,
        layout=layout,
        loss=MSE,
        batch=TaskBatch(*tasks),
        theta_a=theta,
        theta_s=theta_s,
        alphas=alphas,
        lr_grad=[True] * 3,
        order="second",
        ops=resolve(requested, device),
        norm=NormPlan(model, "batch"),
        task_chunk=task_chunk,
    )
    out = MlpEngine(plan_of(model, layout)).run(req)
    assert out is not None
    assert rel_err(out.d_a, flat(want, layout)) < 1e-9
    assert rel_err(sum(out.d_alphas), lr.grad) < 1e-9
    assert rel_err(out.query_loss_after, res.query_loss_after) < 1e-12
    assert rel_err(out.query_loss_before, res.query_loss_before) < 1e-12
    assert rel_err(out.support_loss_before, res.support_loss_before) < 1e-12


def test_the_reference_runs_where_the_kernel_does_not():
    """Half precision and (on CUDA) layers wider than the kernel's limit run the plain-PyTorch reference;
    meta_step's result in bfloat16 is near the float64 one."""
    import fastmaml

    model = mlp((1, 16, 1))
    layout = ParamLayout(model)
    plan = plan_of(model, layout)
    theta, _ = layout.theta()
    assert kernel_takes(plan, theta) and kernel_takes(plan, theta.float())
    assert not kernel_takes(plan, theta.bfloat16()) and not kernel_takes(plan, theta, "checkpoint")
    tasks = regression_tasks(T=3, ns=8, nq=8)
    model.zero_grad()
    fastmaml.meta_step(model, tasks, inner_lr=0.05, steps=2)
    want = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    low = mlp((1, 16, 1)).bfloat16()
    low.load_state_dict({k: v.bfloat16() for k, v in model.state_dict().items()})
    fastmaml.meta_step(low, [t.bfloat16() for t in tasks], inner_lr=0.05, steps=2, backend="cpp")
    got = torch.cat([p.grad.reshape(-1) for p in low.parameters()]).double()
    assert rel_err(got, want) < 0.05


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("steps", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("widths", [(1, 40, 40, 1), (2, 37, 70, 3)], ids=str)
def test_tasks_steps_and_dtypes_against_the_oracle(case, dtype, T, steps, widths):
    """One and an odd number of tasks, K = 0..5, widths on and off the vector lanes (the CPU kernel's column
    blocks of 16 and 8 floats, 8 and 4 doubles, and the columns left over), float64 and float32: float64 within
    1e-9 of the oracle, float32 no worse than 4x the float32 autograd loop (both against the float64 oracle)."""
    device, backend = case
    torch.manual_seed(T + steps)
    model64 = mlp(widths, act=nn.Tanh if steps % 2 else nn.ReLU)
    tasks64 = regression_tasks(T=T, ns=10, nq=9, din=widths[0], dout=widths[-1], seed=steps)
    ref_loss, ref64, _ = autograd_meta_grad(model64, tasks64, inner_lr=0.05, steps=steps, loss_fn=F.mse_loss)
    model = mlp(widths, act=nn.Tanh if steps % 2 else nn.ReLU).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in model64.state_dict().items()})
    tasks = [t.to(dtype) for t in tasks64]
    layout, out = run_op(model, tasks, 0.05, steps, "second", device, backend)
    want = flat(ref64, layout)
    assert out.grad.dtype == dtype
    if dtype == torch.float64:
        assert rel_err(out.grad.cpu(), want) < 1e-9
        assert rel_err(out.query_loss_after.mean().cpu(), ref_loss) < 1e-12
    else:
        _, loop32, _ = autograd_meta_grad(model, tasks, inner_lr=0.05, steps=steps, loss_fn=F.mse_loss)
        assert rel_err(out.grad.cpu(), want) <= 4 * max(rel_err(flat(loop32, layout), want), 1e-7)


def _sinusoid_inputs(device):
    """(the op's plan, θ `[P]`, tasks) of a 1-40-40-1 MLP on 5 regression tasks of 10 + 10 points."""
    model = mlp((1, 40, 40, 1))
    layout = ParamLayout(model)
    tasks = [t.to(device) for t in regression_tasks(T=5, ns=10, nq=10)]
    return plan_of(model, layout), layout.theta()[0].detach().to(device), tasks


def test_need_before_false_skips_only_the_query_loss_at_theta(case):
    """need_before=False leaves out the query loss at θ (the C++ op then returns an empty tensor for it) and
    changes nothing else, bit for bit."""
    device, backend = case
    plan, theta, tasks = _sinusoid_inputs(device)
    alphas = [torch.tensor(0.03, dtype=theta.dtype, device=device)] * 2
    op = registry.implementation("mlp_meta_step", backend)
    on = op(plan, theta, *tasks, alphas, "second", [True, False], True)
    off = op(plan, theta, *tasks, alphas, "second", [True, False], False)
    assert on.query_loss_before is not None and on.query_loss_before.shape == (5,)
    assert off.query_loss_before is None
    assert torch.equal(on.grad, off.grad) and torch.equal(on.d_alphas[0], off.d_alphas[0])
    assert torch.equal(on.query_loss_after, off.query_loss_after)
    assert torch.equal(on.support_loss_before, off.support_loss_before)
    if backend == "cpp":
        alpha = torch.full((2, theta.numel()), 0.03, dtype=theta.dtype, device=device)
        args = (theta, list(plan.sizes), *tasks, alpha, True, False, plan.activation)
        assert torch.ops.fastmaml.mlp_meta_step(*args, False)[3].shape == (0,)
        assert torch.equal(torch.ops.fastmaml.mlp_meta_step(*args)[3], on.query_loss_before)


def test_alpha_rows_give_the_bits_of_the_alpha_list(case):
    """The α_j as one `[K, P]` tensor of rows (what the engine passes for a plan's constant rates) give the
    same bits as the list of 0-dim and `[P]` rates they expand."""
    device, backend = case
    plan, theta, tasks = _sinusoid_inputs(device)
    alphas = [torch.tensor(0.03, dtype=theta.dtype, device=device), torch.rand_like(theta) * 0.05]
    rows = torch.stack([a.expand(theta.numel()) for a in alphas])
    op = registry.implementation("mlp_meta_step", backend)
    for order in ORDERS:
        listed = op(plan, theta, *tasks, alphas, order, [False, False], True)
        stacked = op(plan, theta, *tasks, rows, order, [False, False], True)
        assert listed.d_alphas == stacked.d_alphas == [None, None]
        for field in ("query_loss_after", "grad", "query_loss_before", "support_loss_before"):
            assert torch.equal(getattr(listed, field), getattr(stacked, field)), (order, field)


@pytest.mark.parametrize("isa", ["auto", "baseline"])
@pytest.mark.parametrize("widths,T", [((1, 40, 40, 1), 25), ((1, 256, 256, 1), 3)], ids=str)
def test_cpu_result_does_not_depend_on_the_thread_count(isa, widths, T, monkeypatch):
    """The per-task results are summed in task order after the tasks ran (split over the parameters when there
    are enough of them, as with 256 wide layers): 1 and 2 threads give the same bits."""
    monkeypatch.setenv("FASTMAML_CPU_ISA", isa)
    model = mlp(widths).float()
    sx, sy, qx, qy = (t.float() for t in regression_tasks(T=T, ns=10, nq=10, seed=3))
    P = sum(p.numel() for p in model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    alpha = torch.rand(3, P) * 0.05
    args = (theta, list(widths), sx, sy, qx, qy, alpha, True, True, 0, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastmaml.mlp_meta_step(*args)
        torch.set_num_threads(2)
        two = torch.ops.fastmaml.mlp_meta_step(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
