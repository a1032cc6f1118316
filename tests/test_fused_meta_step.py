"""meta_step and adapt on the fused engine against the independent autograd oracle (float64,
rel. error < 1e-9): the sinusoid MLP and the 4-block conv net, all orders, every inner_lr form,
inner_params subsets, odd sizes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
import fastmaml.engine
from fastmaml.layout import ParamLayout
from fastmaml.losses import resolve_loss
from fastmaml.models import conv4
from fastmaml.programs import select_program
from fastmaml.programs.fused import FusedProgram, conv

import conftest
from models import classification_tasks, mlp, regression_tasks
from oracle import assert_grads_close, autograd_meta_grad, check_meta_step, rel_err

TOL = 1e-9
ORDERS = ["second", "checkpoint", "first"]


@pytest.fixture(autouse=True)
def fused_engine_only(monkeypatch):
    """MLPs under MSE would take the whole-inner-loop MLP op (tests/test_kernels_mlp.py): test the
    fused engine here."""
    monkeypatch.setattr(fastmaml.engine, "mlp_plan", conftest.no_mlp_op)


def mse(out, y):
    return F.mse_loss(out, y)


def check(model, tasks, *, loss, inner_params=None, **kwargs):
    """The fused engine runs `model`, and meta_step matches the autograd oracle."""
    assert isinstance(select_program(model, ParamLayout(model, inner_params), resolve_loss(loss)), FusedProgram)
    return check_meta_step(model, tasks, loss=loss, inner_params=inner_params, tol=TOL, **kwargs)


def conv_net(size, hidden=4, ways=5):
    torch.manual_seed(0)
    return conv4(1, ways, hidden=hidden, image_size=size).double()


def conv_tasks(T, size, ways=5, shots=1, query=1, seed=0):
    return classification_tasks(T=T, ways=ways, shots=shots, query=query, size=size, seed=seed)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("steps", [1, 5])
def test_sinusoid_mlp(order, steps):
    torch.manual_seed(0)
    check(
        mlp((1, 40, 40, 1)),
        regression_tasks(T=4, ns=10, nq=10),
        loss="mse",
        loss_fn=mse,
        inner_lr=0.01,
        steps=steps,
        order=order,
    )


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("steps", [1, 2])
def test_conv4_28(order, steps, monkeypatch):
    monkeypatch.setitem(conv.STRATEGY, "cpu", "grouped" if steps == 2 else "loop")
    check(
        conv_net(28),
        conv_tasks(3, 28),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.4,
        steps=steps,
        order=order,
    )


@pytest.mark.parametrize("order", ["second", "checkpoint"])
def test_conv4_84_three_steps(order):
    check(
        conv_net(84, hidden=3),
        conv_tasks(2, 84, ways=3),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.4,
        steps=3,
        order=order,
    )


@pytest.mark.parametrize("model_kind,steps", [("mlp", 7), ("mlp", 10), ("conv", 6)])
def test_checkpoint_replays_long_unrolls(model_kind, steps):
    """ "checkpoint" keeps two snapshots and replays the other inner steps in the reverse sweep; a
    learned per-step learning rate makes every replayed step's α and g_j show in the result."""
    lrs = [
        torch.tensor(
            0.01 + 0.003 * j if model_kind == "mlp" else 0.1 + 0.02 * j, dtype=torch.float64, requires_grad=True
        )
        for j in range(steps)
    ]
    if model_kind == "mlp":
        torch.manual_seed(0)
        model, tasks, loss, loss_fn = mlp((1, 40, 40, 1)), regression_tasks(T=3, ns=10, nq=10), "mse", mse
    else:
        model, tasks, loss, loss_fn = conv_net(28), conv_tasks(2, 28), "cross_entropy", F.cross_entropy
    check(model, tasks, loss=loss, loss_fn=loss_fn, inner_lr=lrs, steps=steps, order="checkpoint", lr_leaves=lrs)


@pytest.mark.parametrize("form", ["learned-scalar", "meta-sgd", "per-step-list"])
def test_conv4_inner_lr_forms(form):
    model = conv_net(28)
    names = [n for n, _ in model.named_parameters()]
    g = torch.Generator().manual_seed(1)
    if form == "learned-scalar":
        lr = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        inner_lr, leaves = lr, [lr]
    elif form == "meta-sgd":
        inner_lr = {
            n: (0.2 + 0.2 * torch.rand(p.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
            for n, p in model.named_parameters()
        }
        leaves = list(inner_lr.values())
    else:
        steps_lr = [
            {
                n: torch.tensor(0.1 + 0.05 * i + 0.01 * j, dtype=torch.float64, requires_grad=True)
                for j, n in enumerate(names)
            }
            for i in range(2)
        ]
        inner_lr, leaves = steps_lr, [t for d in steps_lr for t in d.values()]
    check(
        model,
        conv_tasks(2, 28),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=inner_lr,
        steps=1 if form != "per-step-list" else 2,
        lr_leaves=leaves,
    )


@pytest.mark.parametrize("order", ORDERS)
def test_mlp_inner_lr_forms_and_head_only(order):
    torch.manual_seed(1)
    model = mlp((1, 13, 7, 1), act=nn.Tanh)
    tasks = regression_tasks(T=3, ns=5, nq=4)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    check(model, tasks, loss="mse", loss_fn=mse, inner_lr=lr, steps=3, order=order, lr_leaves=[lr])
    meta_sgd = {
        n: torch.full(p.shape, 0.03, dtype=torch.float64, requires_grad=True)
        for n, p in model.named_parameters()
        if n.startswith("4.")
    }
    check(
        model,
        tasks,
        loss="mse",
        loss_fn=mse,
        inner_lr=meta_sgd,
        steps=2,
        order=order,
        inner_params=["4"],
        lr_leaves=list(meta_sgd.values()),
    )


def test_conv4_head_only_and_odd_sizes():
    """ANIL (head adapts, body shared), T=1, one shot, 7 filters, 28×28."""
    check(
        conv_net(28, hidden=7),
        conv_tasks(1, 28, ways=3, query=2),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.5,
        steps=2,
        inner_params=["17"],
    )
    check(
        conv_net(28, hidden=7),
        conv_tasks(2, 28, ways=2),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.5,
        steps=1,
        inner_params=["12", "17"],
    )


def test_mlp_width_40_one_shot_single_task():
    torch.manual_seed(2)
    check(mlp((1, 40, 13, 1)), regression_tasks(T=1, ns=1, nq=3), loss="mse", loss_fn=mse, inner_lr=0.02, steps=4)


def test_adapt_outer_loss_through_fused_program():
    """adapt() + a user outer loss on adapted(query_x): autograd through the fused forward and the
    InnerLoop reverse sweep equals the oracle."""
    model = conv_net(28)
    sx, sy, qx, qy = conv_tasks(2, 28)
    model.zero_grad()
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.4, steps=2, loss="cross_entropy")
    assert isinstance(adapted.program, FusedProgram)
    out = adapted(qx)
    loss = sum(F.cross_entropy(out[t], qy[t]) for t in range(2)) / 2
    loss.backward()
    ref_loss, ref_grads, _ = autograd_meta_grad(model, (sx, sy, qx, qy), inner_lr=0.4, steps=2, loss_fn=F.cross_entropy)
    assert rel_err(loss, ref_loss) < TOL
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, ref_grads, TOL)


def test_one_task_per_chunk_gives_the_same_meta_gradient(monkeypatch):
    """Large activations run in chunks of tasks (FusedProgram.chunk_bytes); here one task per chunk."""
    monkeypatch.setattr(FusedProgram, "chunk_bytes", {"cpu": 1, "cuda": 1})
    check(
        conv_net(28),
        conv_tasks(3, 28),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.4,
        steps=2,
        order="second",
    )
