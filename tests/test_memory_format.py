"""Channels-last image activations in the fused engine (fastmaml/programs/fused/memory_format.py): the format
helpers; "auto"'s choice; the meta-gradient with channels-last activations against the per-task autograd
oracle in float64 (class-written conv nets, ResNet-12 fully adapted and ANIL, concatenation, every order,
Meta-SGD rates, fixed BatchNorm statistics, both backends); the format kept from layer to layer."""

import pytest
import torch
import torch.nn.functional as F

import fastmaml
from fastmaml.programs.fused import conv
from fastmaml.programs.fused import memory_format as mf

from class_models import Concat, ConvClassNet, MiniImagenetCNN, ResNet12
from models import classification_tasks
from oracle import check_meta_step

TOL = 1e-9


def tasks_for(shape, seed=0):
    return classification_tasks(T=2, ways=3, shape=shape, seed=seed)


@pytest.fixture
def channels_last(monkeypatch):
    """The CPU's format forced to channels-last (the models here are below "auto"'s threshold); the
    convolutions' inputs recorded as (follows channels-last, shape)."""
    monkeypatch.setitem(mf.FORMAT, "cpu", "channels_last")
    seen = []
    forward = conv.conv_forward

    def spy(x, *args):
        seen.append((mf.follows_channels_last(x), tuple(x.shape)))
        return forward(x, *args)

    monkeypatch.setattr(conv, "conv_forward", spy)
    return seen


# ---------------------------------------------------------------- helpers


def test_choose():
    x = torch.zeros(2, 3, 3, 32, 32)
    assert mf.choose("auto", x) == "channels_last"
    assert mf.choose("auto", x.double()) == "contiguous"  # measured in float32 only
    assert mf.choose("auto", x.bfloat16()) == "contiguous"
    assert mf.choose("auto", x, norm_kernels=False) == "contiguous"  # PyTorch's BatchNorm: slower channels-last
    assert mf.choose("auto", torch.zeros(2, 3, 1, 28, 28)) == "contiguous"
    assert mf.choose("channels_last", torch.zeros(2, 3, 1, 8, 8)) == "channels_last"
    assert mf.choose("channels_last", torch.zeros(2, 3, 40)) == "contiguous"  # not images
    with pytest.raises(ValueError, match="memory format.*'nhwc'"):
        mf.choose("nhwc", x)


@pytest.mark.parametrize("C", [1, 3])
def test_to_format_and_dense_as(C):
    x = torch.randn(2, 3, C, 5, 7)
    cl = mf.to_format(x, "channels_last")
    assert torch.equal(cl, x) and mf.follows_channels_last(cl)
    assert cl.permute(0, 1, 3, 4, 2).is_contiguous() and cl.stride(2) == 1
    assert not mf.follows_channels_last(x)  # also for C = 1, where the layouts coincide
    assert mf.to_format(cl, "channels_last") is cl
    back = mf.to_format(cl, "contiguous")
    assert back.is_contiguous() and torch.equal(back, x)
    assert mf.follows_channels_last(mf.dense_as(x, cl)) and torch.equal(mf.dense_as(x, cl), x)
    assert mf.dense_as(cl, x).is_contiguous()
    assert mf.dense_as(None, x) is None
    assert mf.to_format(torch.randn(2, 3, 4), "channels_last").is_contiguous()


def test_empty_as_and_cat():
    x = mf.to_format(torch.randn(2, 3, 4, 5, 6), "channels_last")
    e = mf.empty_as((2, 3, 7, 5, 6), x)
    assert e.shape == (2, 3, 7, 5, 6) and mf.follows_channels_last(e)
    assert mf.empty_as((2, 3, 7, 5, 6), x.contiguous()).is_contiguous()
    a, b = torch.randn(2, 3, 4, 5, 6), torch.randn(2, 3, 2, 5, 6)
    got = mf.cat([mf.to_format(a, "channels_last"), b], 2, x)
    assert mf.follows_channels_last(got) and torch.equal(got, torch.cat([a, b], 2))
    assert mf.cat([a, b], 2, a).is_contiguous()


def test_auto_picks_channels_last_for_large_maps(monkeypatch):
    """On the CPU, "auto" runs float32 32×32 inputs channels-last and 28×28 contiguous, from the first
    convolution on; 32×32 contiguous on the reference backend (PyTorch's BatchNorm)."""
    seen = []
    forward = conv.conv_forward
    monkeypatch.setattr(conv, "conv_forward", lambda x, *a: seen.append(mf.follows_channels_last(x)) or forward(x, *a))
    torch.manual_seed(0)
    for side, backend, want in ((32, "auto", True), (28, "auto", False), (32, "torch", False)):
        seen.clear()
        model = ConvClassNet(ways=3, hidden=3, channels=3, side=side // 4)
        tasks = [t.float() if t.is_floating_point() else t for t in tasks_for((3, side, side))]
        fastmaml.meta_step(model, tasks, inner_lr=0.1, steps=1, loss="cross_entropy", backend=backend)
        assert seen and all(s == want for s in seen), (side, backend, seen)


# ---------------------------------------------------------------- meta-gradients against the oracle


def _ce(model, tasks, **kw):
    return check_meta_step(model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, tol=TOL, **kw)


def _all_channels_last(seen):
    assert seen, "no convolution ran"
    assert all(cl for cl, shape in seen if shape[2] > 1 or shape[3] * shape[4] > 1), seen


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
def test_resnet12(order, backend, channels_last):
    torch.manual_seed(4)
    model = ResNet12(widths=(3, 4, 3, 4)).double()
    _ce(model, tasks_for((3, 16, 16)), inner_lr=0.2, steps=2, order=order, backend=backend)
    _all_channels_last(channels_last)


def test_one_task(channels_last):
    """T = 1: the "loop" convolutions pass the task's results through (no [T, ...] buffer)."""
    torch.manual_seed(7)
    model = ResNet12(widths=(3, 4, 3, 4)).double()
    _ce(model, classification_tasks(T=1, ways=3, shape=(3, 16, 16)), inner_lr=0.2, steps=2)
    _all_channels_last(channels_last)


def test_resnet12_anil_and_learned_rates(channels_last):
    torch.manual_seed(5)
    model = ResNet12(widths=(3, 4, 3, 4)).double()
    _ce(model, tasks_for((3, 16, 16)), inner_lr=0.3, steps=2, inner_params=["classifier"])
    rates = {n: torch.full_like(p, 0.1).requires_grad_() for n, p in model.named_parameters()}
    _ce(model, tasks_for((3, 16, 16), seed=1), inner_lr=rates, steps=2, lr_leaves=list(rates.values()))
    _all_channels_last(channels_last)


@pytest.mark.parametrize("steps", [0, 1, 3])
@pytest.mark.parametrize("order", ["second", "first"])
def test_conv4_block_tail(order, steps, channels_last):
    """conv-BN-ReLU-MaxPool blocks (the fused block tail), odd maps (the pool drops a row and a column)."""
    torch.manual_seed(1)
    model = MiniImagenetCNN(hidden_size=3, side=1).double()
    _ce(model, tasks_for((3, 19, 19)), inner_lr=0.3, steps=steps, order=order)
    _all_channels_last(channels_last)


def test_fixed_batchnorm_statistics(monkeypatch):
    """batch_norm="frozen" (running statistics; the BatchNorm+ReLU and max-pool rules in turn): both formats
    agree to rounding."""
    torch.manual_seed(2)
    model = MiniImagenetCNN(hidden_size=3, side=1).double()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    grads = _grads_in_both_formats(monkeypatch, model, tasks_for((3, 18, 18)), batch_norm="frozen")
    assert (grads["contiguous"] - grads["channels_last"]).norm() <= 1e-12 * grads["contiguous"].norm()


def test_concatenation(channels_last):
    torch.manual_seed(3)
    _ce(Concat().double(), tasks_for((1, 8, 8)), inner_lr=0.3, steps=2)
    _all_channels_last(channels_last)


def _grads_in_both_formats(monkeypatch, model, tasks, **kw):
    grads = {}
    for fmt in ("contiguous", "channels_last"):
        monkeypatch.setitem(mf.FORMAT, "cpu", fmt)
        model.zero_grad()
        fastmaml.meta_step(model, tasks, inner_lr=0.2, steps=2, loss="cross_entropy", **kw)
        grads[fmt] = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return grads


@pytest.mark.parametrize("order", ["second", "implicit"])
def test_same_result_in_both_formats(order, monkeypatch):
    """float64: the two formats agree to rounding (the same products, other summation orders); the implicit
    order too (its oracle, a dense solve, is in test_implicit.py)."""
    torch.manual_seed(6)
    model = ResNet12(widths=(3, 4, 3, 4)).double()
    kw = dict(implicit_lambda=1000.0, cg_steps=60) if order == "implicit" else {}
    grads = _grads_in_both_formats(monkeypatch, model, tasks_for((3, 16, 16)), order=order, **kw)
    tol = 1e-10 if order == "implicit" else 1e-12  # (conjugate gradient carries rounding further)
    assert (grads["contiguous"] - grads["channels_last"]).norm() <= tol * grads["contiguous"].norm()
