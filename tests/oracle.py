"""The independent reference: a per-task loop of `torch.autograd.grad(create_graph=True)` through
the model itself (PyTorch's own BatchNorm double-backward), summed into a meta-gradient."""

from __future__ import annotations

import copy
import numbers

import torch
from torch.func import functional_call

from fastmaml.programs.reparam import copyable


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ (absolute when b is 0)."""
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def _lr(inner_lr, j, name):
    lr = inner_lr[j] if isinstance(inner_lr, (list, tuple)) else inner_lr
    if isinstance(lr, dict):
        return lr[name]
    return lr


def autograd_meta_grad(
    model,
    tasks,
    *,
    inner_lr,
    steps,
    order="second",
    loss_fn,
    inner_params=None,
    extra=(),
    train=True,
    before_forward=None,
    step_weights=None,
):
    """Returns (meta_loss, {param name: grad}, [grads of `extra` tensors]).

    step_weights: the multi-step loss, Σ_j w_j L_query(φ_j) over j = 1..K (None: L_query(φ_K)).

    Works on a deep copy of `model`, in training mode (batch statistics for BatchNorm) unless
    `train=False`; `inner_lr` in any form meta_step accepts (float, tensor, dict, per-step list),
    differentiable where it requires grad. `before_forward(copy, t, j)` runs before task t's forward at
    inner step j (j = steps: the query pass).
    """
    with copyable(model):  # a weight-norm hook's last weight has history, which deepcopy refuses
        model = copy.deepcopy(model).train(train)
    params = dict(model.named_parameters())
    adapted = [n for n in params if inner_params is None or n in inner_params]
    # a frozen parameter (requires_grad=False) that adapts: a differentiable copy for the inner steps; it gets
    # no meta-gradient of its own
    params.update({n: params[n].detach().requires_grad_() for n in adapted if not params[n].requires_grad})
    sx, sy, qx, qy = tasks
    T = sx.shape[0]
    meta_loss = 0.0
    for t in range(T):
        fast = dict(params)
        for j in range(steps):
            if before_forward is not None:
                before_forward(model, t, j)
            out = functional_call(model, fast, (sx[t],))
            L = loss_fn(out, sy[t])
            gs = torch.autograd.grad(L, [fast[n] for n in adapted], create_graph=(order != "first"))
            for n, g in zip(adapted, gs):
                lr = _lr(inner_lr, j, n)
                fast[n] = fast[n] - (lr if isinstance(lr, numbers.Real) else lr) * g
            if step_weights is not None and j < steps - 1 and step_weights[j]:
                if before_forward is not None:
                    before_forward(model, t, j + 1)
                out = functional_call(model, fast, (qx[t],))
                meta_loss = meta_loss + step_weights[j] * loss_fn(out, qy[t]) / T
        if before_forward is not None:
            before_forward(model, t, steps)
        out = functional_call(model, fast, (qx[t],))
        last = 1.0 if step_weights is None or not steps else step_weights[-1]
        meta_loss = meta_loss + last * loss_fn(out, qy[t]) / T
    wrt = [p for p in params.values() if p.requires_grad] + list(extra)
    grads = iter(torch.autograd.grad(meta_loss, wrt, allow_unused=True))
    grads = [next(grads) if w.requires_grad else None for w in list(params.values()) + list(extra)]
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(list(params.values()) + list(extra), grads)]
    names = list(params)
    return meta_loss.detach(), dict(zip(names, grads[: len(names)])), grads[len(names) :]


def assert_grads_close(got: dict, ref: dict, tol: float) -> None:
    """All gradients, concatenated, within `tol` relative error; each tensor within `tol` relative to
    its own norm or, for tensors whose true gradient is ~0 (a conv bias before BatchNorm), to the total."""
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    names = sorted(ref)
    total = torch.cat([ref[n].reshape(-1) for n in names])
    assert rel_err(torch.cat([got[n].reshape(-1) for n in names]), total) < tol
    scale = float(total.double().norm())
    for n in names:
        err = float((got[n].double() - ref[n].double()).norm())
        assert err <= tol * max(float(ref[n].double().norm()), 1e-4 * scale), (n, err)


def check_meta_step(
    model,
    tasks,
    *,
    loss,
    loss_fn,
    inner_lr=0.05,
    steps=1,
    order="second",
    inner_params=None,
    lr_leaves=(),
    tol=1e-9,
    before_forward=None,
    **step_kwargs,
):
    """Runs `fastmaml.meta_step` (with `step_kwargs` besides the arguments named here) and asserts its
    meta-loss, `.grad` of every parameter and of `lr_leaves` match `autograd_meta_grad` (with
    `before_forward`) within `tol`.
    Returns the MetaResult."""
    import fastmaml

    model.zero_grad()
    for leaf in lr_leaves:
        leaf.grad = None
    res = fastmaml.meta_step(
        model, tasks, inner_lr=inner_lr, steps=steps, order=order, loss=loss, inner_params=inner_params, **step_kwargs
    )
    adapted = (
        None
        if inner_params is None
        else [n for n, _ in model.named_parameters() if any(n == w or n.startswith(w + ".") for w in inner_params)]
    )
    ref_loss, ref_grads, ref_extra = autograd_meta_grad(
        model,
        tasks,
        inner_lr=inner_lr,
        steps=steps,
        order=order,
        loss_fn=loss_fn,
        inner_params=adapted,
        extra=lr_leaves,
        step_weights=step_kwargs.get("step_weights"),
        before_forward=before_forward,
    )
    assert rel_err(res.meta_loss, ref_loss) < tol
    assert_grads_close({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, ref_grads, tol)
    if lr_leaves:
        assert all(leaf.grad is not None for leaf in lr_leaves)
        assert_grads_close({i: leaf.grad for i, leaf in enumerate(lr_leaves)}, dict(enumerate(ref_extra)), tol)
    return res


def check_float32_error(model64, tasks64, *, inner_lr, steps, loss, loss_fn) -> None:
    """`fastmaml.meta_step` on a float32 copy of `model64` is as close to the float64 meta-gradient as autograd's
    own float32 loop: within twice its relative error (all gradients concatenated)."""
    import fastmaml

    _, ref, _ = autograd_meta_grad(model64, tasks64, inner_lr=inner_lr, steps=steps, loss_fn=loss_fn)
    with copyable(model64):
        model32 = copy.deepcopy(model64).float()
    tasks32 = tuple(t.float() if t.is_floating_point() else t for t in tasks64)
    model32.zero_grad()
    fastmaml.meta_step(model32, tasks32, inner_lr=inner_lr, steps=steps, loss=loss)
    _, loop32, _ = autograd_meta_grad(model32, tasks32, inner_lr=inner_lr, steps=steps, loss_fn=loss_fn)

    def flat(d):
        return torch.cat([d[n].double().flatten() for n in sorted(d)])

    ours = rel_err(flat({n: p.grad for n, p in model32.named_parameters()}), flat(ref))
    theirs = rel_err(flat(loop32), flat(ref))
    assert ours <= 2 * max(theirs, 1e-7), (ours, theirs)


def check_adapt_matches_meta_step(model, tasks, *, loss_fn, **kwargs) -> None:
    """An outer loss on `fastmaml.adapt`'s query outputs, backpropagated by autograd, gives `meta_step`'s
    meta-gradient (the mean of `loss_fn` over tasks); `kwargs` are both calls' (loss, inner_lr, steps, order)."""
    import fastmaml

    sx, sy, qx, qy = tasks
    model.zero_grad()
    fastmaml.meta_step(model, tasks, **kwargs)
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = fastmaml.adapt(model, sx, sy, **kwargs)(qx)
    sum(loss_fn(out[t], qy[t]) for t in range(sx.shape[0])).div(sx.shape[0]).backward()
    assert_grads_close({n: p.grad for n, p in model.named_parameters()}, want, 1e-10)
