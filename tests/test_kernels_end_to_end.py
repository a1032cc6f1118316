"""meta_step / adapt with each fast backend of the step ops against the autograd oracle (float64,
rel. error < 1e-9), and float32 no worse than the float32 autograd loop's own error (×4)."""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastmaml  # noqa: E402
from fastmaml.ops import registry  # noqa: E402

from kernel_checks import DEVICE, grads_of, run  # noqa: E402
from models import classification_tasks, mlp, regression_tasks, small_cnn  # noqa: E402
from oracle import assert_grads_close, autograd_meta_grad, rel_err  # noqa: E402

BACKENDS = ["cpp", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
def test_mlp_matches_oracle(backend, order):
    assert registry.availability(backend, DEVICE)[0]
    model = mlp((1, 13, 7, 1)).to(DEVICE)
    tasks = [t.to(DEVICE) for t in regression_tasks(T=4)]
    scale = torch.tensor(0.05, dtype=torch.float64, device=DEVICE, requires_grad=True)
    res, grads = run(model, tasks, backend, loss="mse", inner_lr=scale, steps=3, order=order)
    scale_grad = scale.grad.clone()
    ref_loss, ref_grads, (ref_scale,) = autograd_meta_grad(
        model, tasks, inner_lr=scale, steps=3, order=order, loss_fn=F.mse_loss, extra=(scale,)
    )
    assert rel_err(res.meta_loss, ref_loss) < 1e-9
    assert_grads_close(grads, ref_grads, 1e-9)
    assert rel_err(scale_grad, ref_scale) < 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_sgd_cnn_matches_oracle(backend):
    torch.manual_seed(0)
    model = small_cnn().to(DEVICE)
    tasks = [t.to(DEVICE) for t in classification_tasks(T=2)]
    lrs = {n: torch.full_like(p, 0.1, requires_grad=True) for n, p in model.named_parameters()}
    res, grads = run(model, tasks, backend, loss="cross_entropy", inner_lr=lrs, steps=2, order="second")
    lr_grads = {n: t.grad.clone() for n, t in lrs.items()}
    ref_loss, ref_grads, ref_lr = autograd_meta_grad(
        model, tasks, inner_lr=lrs, steps=2, order="second", loss_fn=F.cross_entropy, extra=list(lrs.values())
    )
    assert rel_err(res.meta_loss, ref_loss) < 1e-9
    assert_grads_close(grads, ref_grads, 1e-9)
    assert_grads_close(lr_grads, dict(zip(lrs, ref_lr)), 1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_error_like_autograd_loop(backend):
    model64 = mlp((1, 40, 40, 1)).to(DEVICE)
    tasks64 = [t.to(DEVICE) for t in regression_tasks(T=5, ns=10, nq=10, seed=2)]
    _, ref64, _ = autograd_meta_grad(model64, tasks64, inner_lr=0.01, steps=5, loss_fn=F.mse_loss)
    model32 = mlp((1, 40, 40, 1)).float().to(DEVICE)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    tasks32 = [t.float() for t in tasks64]
    _, loop32, _ = autograd_meta_grad(model32, tasks32, inner_lr=0.01, steps=5, loss_fn=F.mse_loss)
    _, got32 = run(model32, tasks32, backend, loss="mse", inner_lr=0.01, steps=5, order="second")
    flat = lambda d: torch.cat([d[n].reshape(-1).double() for n in sorted(d)])  # noqa: E731
    loop_err = rel_err(flat(loop32), flat(ref64))
    assert rel_err(flat(got32), flat(ref64)) <= 4 * max(loop_err, 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_adapt_backward_matches_oracle(backend):
    model = mlp((1, 9, 1)).to(DEVICE)
    sx, sy, qx, qy = [t.to(DEVICE) for t in regression_tasks(T=3)]
    model.zero_grad()
    adapted = fastmaml.adapt(model, sx, sy, inner_lr=0.05, steps=2, backend=backend)
    ((adapted(qx) - qy) ** 2).mean(dim=(1, 2)).mean().backward()
    _, ref, _ = autograd_meta_grad(model, (sx, sy, qx, qy), inner_lr=0.05, steps=2, loss_fn=F.mse_loss)
    assert_grads_close(grads_of(model), ref, 1e-9)
