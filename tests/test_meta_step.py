"""meta_step and adapt against the independent autograd oracle (float64, rel. error < 1e-9)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml

from models import classification_tasks, mlp, regression_tasks, small_cnn
from oracle import assert_grads_close, autograd_meta_grad, check_meta_step, rel_err

TOL = 1e-9
pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines
ORDERS = ["second", "checkpoint", "first"]


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_against_oracle(model, tasks, **kwargs):
    return check_meta_step(model, tasks, tol=TOL, **kwargs)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("steps", [1, 3])
def test_mlp_float(order, steps):
    torch.manual_seed(0)
    check_against_oracle(
        mlp((1, 13, 7, 1)), regression_tasks(), loss="mse", loss_fn=F.mse_loss, steps=steps, order=order
    )


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("track", [True, False])
def test_cnn_batchnorm_maxpool(order, steps, track):
    torch.manual_seed(1)
    model = small_cnn(track_running_stats=track)
    before = [b.clone() for b in model.buffers()]
    res = check_against_oracle(
        model,
        classification_tasks(),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.1,
        steps=steps,
        order=order,
        update_running_stats=False,
    )
    assert res.accuracy_before.shape == (3,) and res.accuracy_after.shape == (3,)
    for b0, b1 in zip(before, model.buffers()):  # running statistics are not updated (opted out)
        assert torch.equal(b0, b1)


@pytest.mark.parametrize("order", ORDERS)
def test_learnable_scalar_lr(order):
    torch.manual_seed(2)
    lr = nn.Parameter(torch.tensor(0.07, dtype=torch.float64))
    check_against_oracle(
        mlp((1, 9, 1)),
        regression_tasks(),
        loss="mse",
        loss_fn=F.mse_loss,
        inner_lr=lr,
        steps=3,
        order=order,
        lr_leaves=[lr],
    )


@pytest.mark.parametrize("order", ORDERS)
def test_meta_sgd_per_parameter_lr(order):
    torch.manual_seed(3)
    model = mlp((1, 9, 5, 1))
    lrs = {n: nn.Parameter(0.02 + 0.05 * torch.rand_like(p)) for n, p in model.named_parameters()}
    check_against_oracle(
        model,
        regression_tasks(),
        loss="mse",
        loss_fn=F.mse_loss,
        inner_lr=lrs,
        steps=3,
        order=order,
        lr_leaves=list(lrs.values()),
    )


def test_per_step_per_layer_lr_cnn():
    """MAML++ style: one dict of per-tensor learnable scalars per step."""
    torch.manual_seed(4)
    model = small_cnn(channels=2)
    per_step = [
        {n: nn.Parameter(torch.tensor(0.05 + 0.01 * j, dtype=torch.float64)) for n, _ in model.named_parameters()}
        for j in range(2)
    ]
    leaves = [p for d in per_step for p in d.values()]
    check_against_oracle(
        model,
        classification_tasks(),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=per_step,
        steps=2,
        lr_leaves=leaves,
    )


@pytest.mark.parametrize("order", ORDERS)
def test_inner_params_subset_mlp(order):
    """ANIL: adapt only the head; the body's meta-gradient includes the mixed second-order term."""
    torch.manual_seed(5)
    model = mlp((1, 11, 6, 1))
    check_against_oracle(
        model, regression_tasks(), loss="mse", loss_fn=F.mse_loss, steps=3, order=order, inner_params=["4"]
    )


def test_inner_params_subset_cnn_predicate():
    torch.manual_seed(6)
    model = small_cnn(channels=2)
    pred = lambda name, p: name.startswith("9.") or name.startswith("1.")  # noqa: E731  head + first BN
    model.zero_grad()
    fastmaml.meta_step(model, classification_tasks(), inner_lr=0.1, steps=2, loss="cross_entropy", inner_params=pred)
    adapted = [n for n, p in model.named_parameters() if pred(n, p)]
    _, ref, _ = autograd_meta_grad(
        model, classification_tasks(), inner_lr=0.1, steps=2, loss_fn=F.cross_entropy, inner_params=adapted
    )
    assert_grads_close(grads_of(model), ref, TOL)


def test_custom_loss_callable():
    torch.manual_seed(7)
    huber = lambda out, y: F.smooth_l1_loss(out, y, beta=0.5)  # noqa: E731
    check_against_oracle(mlp((1, 8, 1), act=nn.Tanh), regression_tasks(), loss=huber, loss_fn=huber, steps=2)


def test_frozen_parameter_gets_no_grad_but_is_used():
    torch.manual_seed(8)
    model = mlp((1, 8, 1))
    model[0].bias.requires_grad_(False)
    res = fastmaml.meta_step(model, regression_tasks(), steps=2)
    assert model[0].bias.grad is None and model[0].weight.grad is not None
    assert torch.isfinite(res.meta_loss)


def test_grad_accumulates_like_backward():
    torch.manual_seed(9)
    model, tasks = mlp((1, 8, 1)), regression_tasks()
    fastmaml.meta_step(model, tasks, steps=1)
    once = grads_of(model)
    fastmaml.meta_step(model, tasks, steps=1)
    for n, g in grads_of(model).items():
        assert torch.allclose(g, 2 * once[n], rtol=1e-12, atol=0)


def test_list_of_tasks_and_tuple_inputs_agree():
    torch.manual_seed(10)
    model, tasks = mlp((1, 8, 1)), regression_tasks()
    r1 = fastmaml.meta_step(model, fastmaml.TaskBatch(*tasks))
    g1 = grads_of(model)
    model.zero_grad()
    per_task = [tuple(t[i] for t in tasks) for i in range(tasks[0].shape[0])]
    r2 = fastmaml.meta_step(model, per_task)
    assert torch.equal(r1.meta_loss, r2.meta_loss)
    for n, g in grads_of(model).items():
        assert torch.allclose(g, g1[n], rtol=1e-13, atol=0)


def test_steps_zero_is_plain_query_loss():
    torch.manual_seed(11)
    model, tasks = mlp((1, 8, 1)), regression_tasks()
    res = fastmaml.meta_step(model, tasks, steps=0)
    got = grads_of(model)
    model.zero_grad()
    sx, sy, qx, qy = tasks
    torch.stack([F.mse_loss(model(qx[t]), qy[t]) for t in range(3)]).mean().backward()
    for n, p in model.named_parameters():
        assert rel_err(got[n], p.grad) < TOL
    assert torch.equal(res.query_loss_before, res.query_loss_after)


def test_evaluate_before_off_skips_only_the_before_fields():
    torch.manual_seed(16)
    model = small_cnn(channels=2)
    tasks = classification_tasks()
    res = fastmaml.meta_step(model, tasks, inner_lr=0.1, loss="cross_entropy", evaluate_before=False)
    g = grads_of(model)
    assert res.query_loss_before is None and res.accuracy_before is None and res.accuracy_after is not None
    model.zero_grad()
    res2 = fastmaml.meta_step(model, tasks, inner_lr=0.1, loss="cross_entropy")
    assert torch.equal(res.meta_loss, res2.meta_loss) and res2.query_loss_before is not None
    assert_grads_close(grads_of(model), g, 1e-12)


def test_result_fields_regression():
    torch.manual_seed(12)
    res = fastmaml.meta_step(mlp((1, 8, 1)), regression_tasks(T=4), steps=2)
    assert res.query_loss_before.shape == res.query_loss_after.shape == res.support_loss_before.shape == (4,)
    assert res.accuracy_before is None and res.accuracy_after is None
    assert torch.allclose(res.meta_loss, res.query_loss_after.mean())
    assert set(res.summary()) >= {"meta_loss", "query_loss_before", "query_loss_after"}


@pytest.mark.parametrize("order", ORDERS)
def test_adapt_outer_loss_matches_oracle(order):
    """adapt + any outer loss + backward() == the oracle (here the same query MSE)."""
    torch.manual_seed(13)
    model = small_cnn(channels=2)
    sx, sy, qx, qy = classification_tasks()
    lr = nn.Parameter(torch.tensor(0.1, dtype=torch.float64))
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=lr, steps=2, order=order, loss="cross_entropy")
    logits = adapted(qx)
    assert logits.shape == (3, 10, 5)
    loss = torch.stack([F.cross_entropy(logits[t], qy[t]) for t in range(3)]).mean()
    loss.backward()
    _, ref, (ref_lr,) = autograd_meta_grad(
        model, (sx, sy, qx, qy), inner_lr=lr, steps=2, order=order, loss_fn=F.cross_entropy, extra=[lr]
    )
    assert_grads_close(grads_of(model), ref, TOL)
    assert rel_err(lr.grad, ref_lr) < TOL


def test_adapt_params_and_anil_shared_gradient():
    torch.manual_seed(14)
    model = mlp((1, 7, 5, 1))
    sx, sy, qx, qy = regression_tasks()
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.05, steps=2, inner_params=["4"])
    params = adapted.params
    assert params["4.weight"].shape == (3, 1, 5) and params["0.weight"].shape == (3, 7, 1)
    # shared weights are the model's own, broadcast over tasks
    assert torch.equal(params["0.weight"][1], model[0].weight)
    # outer loss on the adapted parameters directly (a user-defined functional forward)
    out = torch.func.vmap(lambda p, x: torch.func.functional_call(model, p, (x,)))(params, qx)
    ((out - qy) ** 2).mean(dim=(1, 2)).mean().backward()
    _, ref, _ = autograd_meta_grad(
        model, (sx, sy, qx, qy), inner_lr=0.05, steps=2, loss_fn=F.mse_loss, inner_params=["4.weight", "4.bias"]
    )
    assert_grads_close(grads_of(model), ref, TOL)


def test_float32_close_to_float64_oracle():
    torch.manual_seed(15)
    model = mlp((1, 40, 40, 1))
    tasks = regression_tasks(T=5, ns=10, nq=10)
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.01, steps=5, loss_fn=F.mse_loss)
    m32 = model.float()
    fastmaml.meta_step(m32, tuple(t.float() for t in tasks), inner_lr=0.01, steps=5)
    assert_grads_close(grads_of(m32), ref, 1e-4)


def test_engine_fixture_selects_the_program(engine):
    from fastmaml.layout import ParamLayout
    from fastmaml.losses import resolve_loss
    from fastmaml.programs import FusedProgram, TorchFuncProgram, select_program

    model = small_cnn(channels=2)
    program = select_program(model, ParamLayout(model), resolve_loss("cross_entropy"))
    assert isinstance(program, TorchFuncProgram if engine == "torch.func" else FusedProgram)
