"""fastmaml.func, the functional API: meta-gradients returned instead of written, adapted parameters that
compose with autograd and torch.func (grad, vjp, vmap, a gradient of a gradient); each against the float64
oracle (tests/oracle.py) or against a create_graph loop written here."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fastmaml
from fastmaml import func

from models import classification_tasks, mlp, regression_tasks, small_cnn
from oracle import assert_grads_close, autograd_meta_grad, rel_err

TOL = 1e-9
LR, K = 0.1, 2


def detached(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_meta_grad_equals_meta_step_and_the_oracle():
    """Conv net with BatchNorm on the fused engine, a head-only inner loop (ANIL) and a learnable rate: the
    returned gradients are `meta_step`'s `.grad`, no `.grad` or buffer is written, every tensor is its own."""
    torch.manual_seed(0)
    model, tasks = small_cnn(), classification_tasks()
    lr = torch.tensor(LR, dtype=torch.float64, requires_grad=True)
    params = detached(model)
    buffers = [b.clone() for b in model.buffers()]
    loss, grads, aux = func.meta_grad(
        model, params, tasks, inner_lr=lr, steps=K, loss="cross_entropy", inner_params=["9"], return_aux=True
    )
    assert all(p.grad is None for p in model.parameters()) and lr.grad is None
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert list(grads) == list(params) and all(g._base is None for g in grads.values())
    assert len(storages(grads.values())) == len(grads)
    _, again = func.meta_grad(model, params, tasks, inner_lr=LR, steps=K, loss="cross_entropy", inner_params=["9"])
    assert not storages(grads.values()) & storages(again.values())

    res = fastmaml.meta_step(
        model, tasks, inner_lr=lr, steps=K, loss="cross_entropy", inner_params=["9"], update_running_stats=False
    )
    assert float(loss) == float(res.meta_loss)
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-12, atol=1e-15), n
    assert torch.allclose(aux.inner_lr_grads, lr.grad, rtol=1e-12, atol=1e-15)
    assert torch.equal(aux.result.accuracy_after, res.accuracy_after)
    ref_loss, ref, (ref_lr,) = autograd_meta_grad(
        model, tasks, inner_lr=lr, steps=K, loss_fn=F.cross_entropy, inner_params=["9.weight", "9.bias"], extra=[lr]
    )
    assert rel_err(loss, ref_loss) < TOL and rel_err(aux.inner_lr_grads, ref_lr) < TOL
    assert_grads_close(grads, ref, TOL)


def test_meta_grad_on_other_tensors_and_a_subset():
    """The tensors passed are used, not the module's; a sequence comes back as a sequence; parameters left
    out of a dict stay fixed (the module's own) and get nothing."""
    torch.manual_seed(1)
    model, tasks = mlp((1, 6, 4, 1)), regression_tasks()
    other = mlp((1, 6, 4, 1))
    values = [p.detach().clone() for p in other.parameters()]
    loss, grads = func.meta_grad(model, values, tasks, inner_lr=LR, steps=K)
    assert isinstance(grads, list) and len(grads) == len(values)
    ref_loss, ref, _ = autograd_meta_grad(other, tasks, inner_lr=LR, steps=K, loss_fn=F.mse_loss)
    assert rel_err(loss, ref_loss) < TOL
    assert_grads_close(dict(zip(ref, grads)), ref, TOL)

    head = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("4.")}
    _, grads = func.meta_grad(model, head, tasks, inner_lr=LR, steps=K)
    frozen = mlp((1, 6, 4, 1))
    frozen.load_state_dict(model.state_dict())
    for n, p in frozen.named_parameters():
        p.requires_grad_(n.startswith("4."))
    _, ref, _ = autograd_meta_grad(frozen, tasks, inner_lr=LR, steps=K, loss_fn=F.mse_loss, inner_params=list(head))
    assert set(grads) == set(head)
    assert_grads_close(grads, {n: ref[n] for n in head}, TOL)


def _query_loss(model, adapted, qx, qy, loss_fn):
    out = func.forward(model, adapted, qx)
    return sum(loss_fn(out[t], qy[t]) for t in range(qx.shape[0])) / qx.shape[0]


def _oracle_loss(model, params, tasks, loss_fn):
    """The meta-loss as a create_graph loop over tasks, differentiable twice."""
    sx, sy, qx, qy = tasks
    total = 0.0
    for t in range(sx.shape[0]):
        fast = dict(params)
        for _ in range(K):
            gs = torch.autograd.grad(
                loss_fn(functional_call(model, fast, (sx[t],)), sy[t]), list(fast.values()), create_graph=True
            )
            fast = {n: w - LR * g for (n, w), g in zip(fast.items(), gs)}
        total = total + loss_fn(functional_call(model, fast, (qx[t],)), qy[t]) / sx.shape[0]
    return total


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_adapt_under_torch_func_transforms(kind):
    """torch.func.grad, vjp and vmap(grad) of an outer loss through func.adapt equal the oracle."""
    torch.manual_seed(2)
    if kind == "mlp":
        model, tasks, loss, loss_fn = mlp((1, 6, 4, 1)), regression_tasks(), "mse", F.mse_loss
    else:
        model, tasks, loss, loss_fn = small_cnn(channels=2), classification_tasks(T=2), "cross_entropy", F.cross_entropy
    sx, sy, qx, qy = tasks
    params = detached(model)

    def outer(p):
        adapted = func.adapt(model, p, (sx, sy), inner_lr=LR, steps=K, loss=loss)
        return _query_loss(model, adapted, qx, qy, loss_fn)

    _, ref, _ = autograd_meta_grad(model, tasks, inner_lr=LR, steps=K, loss_fn=loss_fn)
    assert_grads_close(torch.func.grad(outer)(params), ref, TOL)
    _, pullback = torch.func.vjp(outer, params)
    assert_grads_close(pullback(torch.tensor(1.0, dtype=torch.float64))[0], ref, TOL)
    if kind == "mlp":
        shifted = {n: t + 0.05 * torch.randn_like(t) for n, t in params.items()}
        both = torch.func.vmap(torch.func.grad(outer))({n: torch.stack([params[n], shifted[n]]) for n in params})
        assert_grads_close({n: g[0] for n, g in both.items()}, ref, TOL)
        _, ref2, _ = autograd_meta_grad(_with(model, shifted), tasks, inner_lr=LR, steps=K, loss_fn=loss_fn)
        assert_grads_close({n: g[1] for n, g in both.items()}, ref2, TOL)


def _with(model, values):
    copy = mlp((1, 6, 4, 1))
    copy.load_state_dict(values)
    return copy


@pytest.mark.parametrize("order", ["second", "checkpoint"])
def test_double_backward_through_adapt(order):
    """A Hessian-vector product of the meta-loss (create_graph=True, and torch.func.grad of a gradient):
    the backward runs as an unrolled autograd graph; equals the oracle's double backward."""
    torch.manual_seed(3)
    model, tasks = mlp((1, 5, 1), act=nn.Tanh), regression_tasks()
    sx, sy, qx, qy = tasks
    params = detached(model)
    direction = {n: torch.randn_like(t) for n, t in params.items()}

    def outer(p):
        adapted = func.adapt(model, p, (sx, sy), inner_lr=LR, steps=K, order=order)
        return _query_loss(model, adapted, qx, qy, F.mse_loss)

    def hvp(loss_of):
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        g = torch.autograd.grad(loss_of(p), list(p.values()), create_graph=True)
        return dict(zip(p, torch.autograd.grad(sum((a * direction[n]).sum() for a, n in zip(g, p)), list(p.values()))))

    ref = hvp(lambda p: _oracle_loss(model, p, tasks, F.mse_loss))
    assert_grads_close(hvp(outer), ref, TOL)
    nested = torch.func.grad(lambda p: sum((g * direction[n]).sum() for n, g in torch.func.grad(outer)(p).items()))
    assert_grads_close(nested(params), ref, TOL)


def test_double_backward_of_first_order_is_refused():
    torch.manual_seed(4)
    model, (sx, sy, qx, qy) = mlp((1, 4, 1)), regression_tasks()
    p = {n: t.requires_grad_() for n, t in detached(model).items()}
    adapted = func.adapt(model, p, (sx, sy), inner_lr=LR, steps=K, order="first")
    loss = _query_loss(model, adapted, qx, qy, F.mse_loss)
    with pytest.raises(NotImplementedError, match="order='first'.*use order='second' or 'checkpoint'"):
        torch.autograd.grad(loss, list(p.values()), create_graph=True)
    # a plain gradient (torch.func.grad too) is the first-order one
    first_order = lambda q: func.adapt(model, q, (sx, sy), inner_lr=LR, steps=K, order="first")  # noqa: E731
    first = torch.func.grad(lambda q: _query_loss(model, first_order(q), qx, qy, F.mse_loss))(detached(model))
    _, ref, _ = autograd_meta_grad(model, (sx, sy, qx, qy), inner_lr=LR, steps=K, order="first", loss_fn=F.mse_loss)
    assert_grads_close(first, ref, TOL)


def test_functional_arguments_are_checked():
    model, tasks = mlp((1, 4, 1)), regression_tasks()
    params = detached(model)
    with pytest.raises(ValueError, match=r"params: \['nope'\] are not parameters of the model"):
        func.meta_grad(model, {"nope": torch.zeros(1)}, tasks)
    with pytest.raises(ValueError, match=r"params\['0.weight'\]: shape \(2, 2\)"):
        func.meta_grad(model, {**params, "0.weight": torch.zeros(2, 2, dtype=torch.float64)}, tasks)
    with pytest.raises(ValueError, match="params: no tensor for .*strict=True"):
        func.meta_grad(model, {"0.weight": params["0.weight"]}, tasks, strict=True)
    with pytest.raises(ValueError, match="params: a sequence must hold one tensor per parameter"):
        func.meta_grad(model, list(params.values())[:2], tasks)
    with pytest.raises(TypeError, match="params: expected a dict"):
        func.meta_grad(model, 3, tasks)
    with pytest.raises(TypeError, match="support: expected a pair"):
        func.adapt(model, params, tasks)
    with pytest.raises(ValueError, match="inner_params: 'head' names none of the parameters"):
        func.meta_grad(model, params, tasks, inner_params=["head"])


def test_double_backward_with_batchnorm_shared_weights_and_a_learnable_rate():
    """The unrolled backward on the conv net (BatchNorm on batch statistics), adapting the head only, with a
    learnable rate: the second derivatives w.r.t. the body, the head and the rate equal the oracle's."""
    torch.manual_seed(5)
    model, (sx, sy, qx, qy) = small_cnn(channels=2), classification_tasks(T=2)
    head = ["9.weight", "9.bias"]
    params = detached(model)
    direction = {n: torch.randn_like(t) for n, t in params.items()}

    def outer(p, lr):
        adapted = func.adapt(model, p, (sx, sy), inner_lr=lr, steps=K, loss="cross_entropy", inner_params=head)
        return _query_loss(model, adapted, qx, qy, F.cross_entropy)

    def oracle(p, lr):
        total = 0.0
        for t in range(sx.shape[0]):
            fast = dict(p)
            for _ in range(K):
                out = functional_call(model, fast, (sx[t],))
                gs = torch.autograd.grad(F.cross_entropy(out, sy[t]), [fast[n] for n in head], create_graph=True)
                fast.update({n: fast[n] - lr * g for n, g in zip(head, gs)})
            total = total + F.cross_entropy(functional_call(model, fast, (qx[t],)), qy[t]) / sx.shape[0]
        return total

    def second(loss_of):
        p = {n: t.clone().requires_grad_() for n, t in params.items()}
        lr = torch.tensor(LR, dtype=torch.float64, requires_grad=True)
        g = torch.autograd.grad(loss_of(p, lr), [*p.values(), lr], create_graph=True)
        directional = sum((a * direction[n]).sum() for a, n in zip(g, p)) + g[-1]
        return dict(zip([*p, "lr"], torch.autograd.grad(directional, [*p.values(), lr])))

    assert_grads_close(second(outer), second(oracle), TOL)


def test_bound_batchnorm_statistics():
    """`buffers=` replaces the module's running statistics for the call (batch_norm="frozen"): the same
    meta-gradient as the module holding those statistics, and the module's own are untouched."""
    torch.manual_seed(6)
    model, tasks = small_cnn(channels=2), classification_tasks(T=2)
    stats = {
        n: (b + 0.3 * torch.rand_like(b)) if b.is_floating_point() else b.clone() for n, b in model.named_buffers()
    }
    own = {n: b.clone() for n, b in model.named_buffers()}
    _, grads = func.meta_grad(
        model, detached(model), tasks, buffers=stats, batch_norm="frozen", inner_lr=LR, steps=K, loss="cross_entropy"
    )
    assert all(torch.equal(b, own[n]) for n, b in model.named_buffers())
    holder = small_cnn(channels=2)
    holder.load_state_dict({**model.state_dict(), **stats})
    _, ref, _ = autograd_meta_grad(holder, tasks, inner_lr=LR, steps=K, loss_fn=F.cross_entropy, train=False)
    assert_grads_close(grads, ref, TOL)
    with pytest.raises(ValueError, match="buffers: 'nope' is not a buffer of the model"):
        func.meta_grad(model, detached(model), tasks, buffers={"nope": torch.zeros(1)}, loss="cross_entropy")


def test_gradient_with_respect_to_the_support_set():
    """A support set that requires grad (dataset distillation, attacks): its gradient through adapt equals the
    oracle's (the unrolled backward)."""
    torch.manual_seed(7)
    model, (sx, sy, qx, qy) = mlp((1, 5, 1), act=nn.Tanh), regression_tasks()

    def support_grads(meta_loss):
        x, y = sx.clone().requires_grad_(), sy.clone().requires_grad_()
        return dict(zip("xy", torch.autograd.grad(meta_loss(x, y), [x, y])))

    def fast(x, y):
        adapted = fastmaml.adapt(model, x, y, inner_lr=LR, steps=K)
        out = adapted(qx)
        return sum(F.mse_loss(out[t], qy[t]) for t in range(qx.shape[0])) / qx.shape[0]

    params = dict(model.named_parameters())
    assert_grads_close(
        support_grads(fast), support_grads(lambda x, y: _oracle_loss(model, params, (x, y, qx, qy), F.mse_loss)), TOL
    )


def test_jacobian_of_the_adapted_weights():
    """torch.func.jacrev (the backward under vmap, after vjp's level has ended) equals the Jacobian of a
    create_graph loop."""
    torch.manual_seed(8)
    model, (sx, sy, _, _) = mlp((1, 3, 1), act=nn.Tanh), regression_tasks(T=2)
    params = detached(model)

    def head_bias(p):
        return func.adapt(model, p, (sx, sy), inner_lr=LR, steps=K)["2.bias"]  # [T, 1]

    def loop(*values):
        outs = []
        for t in range(sx.shape[0]):
            fast = dict(zip(params, values))
            for _ in range(K):
                gs = torch.autograd.grad(
                    F.mse_loss(functional_call(model, fast, (sx[t],)), sy[t]), list(fast.values()), create_graph=True
                )
                fast = {n: w - LR * g for (n, w), g in zip(fast.items(), gs)}
            outs.append(fast["2.bias"])
        return torch.stack(outs)

    ref = torch.autograd.functional.jacobian(loop, tuple(params.values()))
    assert_grads_close(torch.func.jacrev(head_bias)(params), dict(zip(params, ref)), TOL)
