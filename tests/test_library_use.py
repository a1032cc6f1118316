"""fastmaml inside other people's code: the losses people pass, a torch.compile'd model, a DDP wrapper, frozen
parameters; each against the float64 oracle where a gradient is involved."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml

from class_models import ConvClassNet
from models import classification_tasks, mlp, regression_tasks
from oracle import assert_grads_close, autograd_meta_grad, check_meta_step

TOL = 1e-9


@pytest.mark.parametrize("loss, kind", [(nn.CrossEntropyLoss(), "ce"), (F.cross_entropy, "ce"),
                                        (nn.MSELoss(), "mse"), (F.mse_loss, "mse")])
def test_pytorch_losses_are_the_builtin_ones(loss, kind):
    torch.manual_seed(0)
    if kind == "ce":
        model, tasks = ConvClassNet(hidden=3, side=2).double(), classification_tasks()
    else:
        model, tasks = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)).double(), regression_tasks()
    e = fastmaml.explain(model, loss)
    assert e.program == "fused" and (e.mlp_op or kind == "ce")
    res = check_meta_step(model, tasks, loss=loss, loss_fn=F.cross_entropy if kind == "ce" else F.mse_loss,
                          inner_lr=0.3, steps=2, tol=TOL)
    assert (res.accuracy_after is not None) == (kind == "ce")


def test_other_loss_settings_are_custom_and_explained():
    e = fastmaml.explain(ConvClassNet(hidden=3, side=2), nn.CrossEntropyLoss(label_smoothing=0.1))
    assert e.program == "torch.func" and "custom callable" in e.reason


def test_compiled_model_runs_like_the_model():
    """torch.compile's wrapper is unwrapped: same names (inner_params), same engine, same gradient."""
    torch.manual_seed(1)
    model = ConvClassNet(hidden=3, side=2).double()
    compiled = torch.compile(model)
    assert fastmaml.explain(compiled, "cross_entropy").program == "fused"
    tasks = classification_tasks()
    model.zero_grad()
    fastmaml.meta_step(compiled, tasks, inner_lr=0.3, steps=2, loss="cross_entropy", inner_params=["classifier"])
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.3, steps=2, loss_fn=F.cross_entropy,
                                   inner_params=["classifier.weight", "classifier.bias"])
    assert_grads_close(got, ref, TOL)
    sx, sy, qx, qy = tasks
    adapted = fastmaml.adapt(compiled, sx, sy, inner_lr=0.3, loss="cross_entropy")
    assert set(adapted.params) == {n for n, _ in model.named_parameters()}


def test_ddp_wrapper_is_refused_with_a_pointer():
    """A DistributedDataParallel wrapper would leave unsynchronized gradients: a clear error instead."""
    code = textwrap.dedent("""
        import os, tempfile, torch, torch.distributed as dist, fastmaml
        from torch import nn
        dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
        model = nn.parallel.DistributedDataParallel(nn.Linear(1, 1))
        tasks = tuple(torch.randn(2, 3, 1) for _ in range(4))
        try:
            fastmaml.meta_step(model, tasks)
        except TypeError as e:
            print("REFUSED", e)
        dist.destroy_process_group()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "REFUSED model: a DistributedDataParallel wrapper" in out.stdout, out.stderr
    assert "fastmaml.distributed.all_reduce_grads" in out.stdout


def test_frozen_parameters_neither_adapt_nor_get_a_meta_gradient():
    torch.manual_seed(2)
    model = mlp((1, 6, 6, 1))
    model[0].weight.requires_grad_(False)
    tasks = regression_tasks()
    e = fastmaml.explain(model)
    assert e.frozen == ("0.weight",) and "frozen (not adapted, no meta-gradient): 0.weight" in str(e)
    model.zero_grad()
    fastmaml.meta_step(model, tasks, inner_lr=0.2, steps=2)
    assert model[0].weight.grad is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.2, steps=2, loss_fn=F.mse_loss, inner_params=trainable)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert_grads_close(got, {n: ref[n] for n in trainable}, TOL)
    # named one by one, a frozen parameter adapts (and still gets no meta-gradient)
    model.zero_grad()
    names = [n for n, _ in model.named_parameters()]
    fastmaml.meta_step(model, tasks, inner_lr=0.2, steps=2, inner_params=names)
    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=0.2, steps=2, loss_fn=F.mse_loss)
    assert model[0].weight.grad is None
    assert_grads_close({n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                       {n: ref[n] for n in trainable}, TOL)
    with pytest.raises(ValueError, match="inner_params: '0' holds only frozen parameters"):
        fastmaml.meta_step(nn.Sequential(nn.Linear(1, 1).requires_grad_(False), nn.Linear(1, 1)).double(), tasks,
                           inner_params=["0"])
    with pytest.raises(ValueError, match="model: every parameter is frozen"):
        fastmaml.meta_step(mlp((1, 2, 1)).requires_grad_(False), tasks)


def test_task_batch_to_keeps_integer_labels():
    tasks = fastmaml.TaskBatch(*classification_tasks())
    moved = tasks.to(torch.float32)
    assert moved.support_x.dtype == torch.float32 and moved.support_y.dtype == torch.int64
    assert tasks.to("cpu", torch.float16).query_y.dtype == torch.int64


def test_under_no_grad_with_a_learnable_rate():
    torch.manual_seed(3)
    model, tasks = mlp((1, 5, 1)), regression_tasks()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        fastmaml.meta_step(model, tasks, inner_lr=lr, steps=2)
    assert lr.grad is not None and torch.isfinite(lr.grad)
