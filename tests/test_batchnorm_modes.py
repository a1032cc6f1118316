"""BatchNorm modes ("batch", "frozen", "per_step") against the autograd oracle (float64)."""

import pytest
import torch
import torch.nn.functional as F

import fastmaml
from fastmaml.batchnorm import bn_layers

from models import classification_tasks, small_cnn
from oracle import assert_grads_close, autograd_meta_grad

TOL = 1e-9
pytestmark = pytest.mark.usefixtures("engine")  # every test on both engines


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def randomize_stats(model, g):
    for _, m in bn_layers(model):
        m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g, dtype=torch.float64))
        m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g, dtype=torch.float64))
        if hasattr(m, "step_running_mean"):
            m.step_running_mean.copy_(0.3 * torch.randn(m.step_running_mean.shape, generator=g, dtype=torch.float64))
            m.step_running_var.copy_(0.5 + torch.rand(m.step_running_var.shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
def test_frozen_statistics(order):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = small_cnn(channels=3)
    randomize_stats(model, g)
    before = [b.clone() for b in model.buffers()]
    tasks = classification_tasks()
    fastmaml.meta_step(model, tasks, inner_lr=0.1, steps=2, order=order, loss="cross_entropy", batch_norm="frozen")
    _, ref, _ = autograd_meta_grad(
        model, tasks, inner_lr=0.1, steps=2, order=order, loss_fn=F.cross_entropy, train=False
    )
    assert_grads_close(grads_of(model), ref, TOL)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def use_step_stats(model, t, j):
    """Oracle side of per-step statistics in eval mode: step j reads row min(j, S - 1)."""
    for _, m in bn_layers(model):
        S = m.step_running_mean.shape[0]
        m.running_mean = m.step_running_mean[min(j, S - 1)].clone()  # new tensors: the graph keeps the old
        m.running_var = m.step_running_var[min(j, S - 1)].clone()


@pytest.mark.parametrize("order,steps", [("second", 1), ("second", 3), ("checkpoint", 5)])
def test_per_step_statistics_eval_more_steps_than_trained(order, steps):
    torch.manual_seed(1)
    g = torch.Generator().manual_seed(1)
    model = fastmaml.add_per_step_stats(small_cnn(channels=3), steps=1)  # trained with 1 step: rows 0, 1
    randomize_stats(model, g)
    model.eval()
    tasks = classification_tasks()
    before = [b.clone() for b in model.buffers()]
    fastmaml.meta_step(
        model, tasks, inner_lr=0.1, steps=steps, order=order, loss="cross_entropy", batch_norm="per_step"
    )
    _, ref, _ = autograd_meta_grad(
        model, tasks, inner_lr=0.1, steps=steps, loss_fn=F.cross_entropy, train=False, before_forward=use_step_stats
    )
    assert_grads_close(grads_of(model), ref, TOL)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_per_step_statistics_training_updates_each_step():
    torch.manual_seed(2)
    steps, T = 2, 3
    model = fastmaml.add_per_step_stats(small_cnn(channels=3), steps=steps)
    for _, m in bn_layers(model):
        m.momentum = 1.0  # the step statistics become exactly this meta-batch's statistics
    tasks = classification_tasks(T=T)
    fastmaml.meta_step(model, tasks, inner_lr=0.1, steps=steps, loss="cross_entropy", batch_norm="per_step")
    # the meta-gradient is the batch-statistics one
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.1, steps=steps, loss_fn=F.cross_entropy)
    assert_grads_close(grads_of(model), ref, TOL)
    # expected statistics: per step, the mean over tasks of each task's batch mean / unbiased variance
    seen = {}

    def capture(model_copy, t, j):
        for i, (_, m) in enumerate(bn_layers(model_copy)):
            m._forward_pre_hooks.clear()
            m.register_forward_pre_hook(
                lambda mod, inp, i=i, j=j: seen.setdefault((i, j), []).append(
                    (inp[0].mean((0, 2, 3)), inp[0].var((0, 2, 3), unbiased=True))
                )
            )

    autograd_meta_grad(model, tasks, inner_lr=0.1, steps=steps, loss_fn=F.cross_entropy, before_forward=capture)
    for i, (_, m) in enumerate(bn_layers(model)):
        for j in range(steps + 1):
            means, vars_ = zip(*[(a.detach(), b.detach()) for a, b in seen[(i, j)]])
            assert torch.allclose(m.step_running_mean[j], torch.stack(means).mean(0), rtol=1e-10, atol=1e-12)
            assert torch.allclose(m.step_running_var[j], torch.stack(vars_).mean(0), rtol=1e-10, atol=1e-12)


def test_per_step_needs_the_buffers_and_enough_rows():
    model = small_cnn(channels=2)
    tasks = classification_tasks()
    with pytest.raises(ValueError, match=r"layer '1' has no per-step statistics; call fastmaml.add_per_step_stats"):
        fastmaml.meta_step(model, tasks, loss="cross_entropy", batch_norm="per_step")
    fastmaml.add_per_step_stats(model, steps=1)
    with pytest.raises(ValueError, match="training ran inner step 2 but the layers keep statistics for 1 steps"):
        fastmaml.meta_step(model, tasks, steps=3, loss="cross_entropy", batch_norm="per_step")


def test_bad_modes():
    tasks = classification_tasks()
    with pytest.raises(ValueError, match=r"batch_norm: unknown mode 'running'"):
        fastmaml.meta_step(small_cnn(channels=2), tasks, loss="cross_entropy", batch_norm="running")
    with pytest.raises(ValueError, match="batch_norm='frozen': layer '1' has no running statistics"):
        fastmaml.meta_step(
            small_cnn(channels=2, track_running_stats=False), tasks, loss="cross_entropy", batch_norm="frozen"
        )


def test_adapt_per_step_eval_uses_query_row():
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    model = fastmaml.add_per_step_stats(small_cnn(channels=3), steps=2)
    randomize_stats(model, g)
    model.eval()
    sx, sy, qx, qy = classification_tasks()
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.1, steps=2, loss="cross_entropy", batch_norm="per_step")
    logits = adapted(qx)
    torch.stack([F.cross_entropy(logits[t], qy[t]) for t in range(3)]).mean().backward()
    _, ref, _ = autograd_meta_grad(
        model,
        (sx, sy, qx, qy),
        inner_lr=0.1,
        steps=2,
        loss_fn=F.cross_entropy,
        train=False,
        before_forward=use_step_stats,
    )
    assert_grads_close(grads_of(model), ref, TOL)
