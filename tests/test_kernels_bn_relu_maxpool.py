"""BatchNorm2d + ReLU + MaxPool2d as one rule: the C++ CPU kernels (csrc/bn_relu_maxpool.cpp: forward,
backward, and both with tangents) against the torch references (fastmaml/ops/reference/block_tail.py) on odd shapes,
float32 and float64; opcheck; the compiler's fusion; meta_step through the fused rule against the
autograd oracle (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml.ops import registry
from fastmaml.programs.fused import compile_model
from fastmaml.programs.fused.norm_act import BatchNormReLUMaxPoolRule

from models import classification_tasks, small_cnn
from oracle import check_meta_step

DEVICE = torch.device("cpu")
# (T, N, C, H, W, k): T = 1, one image, one channel, odd H and W (a remainder the windows skip but the
# statistics count), k = 3, a 28×28 plane
CASES = [(1, 1, 1, 2, 2, 2), (3, 2, 3, 5, 7, 2), (2, 5, 4, 9, 10, 3), (1, 3, 2, 28, 28, 2), (2, 1, 3, 4, 4, 1)]
IDS = ["T{}N{}C{}H{}W{}k{}".format(*c) for c in CASES]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}


@pytest.fixture(scope="module")
def cpp():
    ok, why = registry.availability("cpp", DEVICE)
    assert ok, f"the C++ extension must build here: {why}"
    return tuple(registry.implementation(f"bn_relu_maxpool_train_{op}", "cpp") for op in ("fwd", "bwd"))


def reference():
    return (registry.reference("bn_relu_maxpool_train_fwd"), registry.reference("bn_relu_maxpool_train_bwd"))


def inputs(case, weights, dtype, seed=0):
    T, N, C, H, W, k = case
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    x = r(T, N, C, H, W) * 2 + 0.5
    w = {"task": r(T, C), "common": r(C), None: None}[weights]
    b = {"task": r(T, C), "common": r(C), None: None}[weights]
    return x, w, b, r


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", ["task", "common", None])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_forward_matches_reference(cpp, case, weights, dtype):
    x, w, b, _ = inputs(case, weights, dtype)
    k = case[-1]
    z, idx, mean, r = cpp[0](x, w, b, 1e-5, k)
    z_ref, idx_ref, mean_ref, r_ref = reference()[0](x, w, b, 1e-5, k)
    assert z.shape == z_ref.shape and idx.dtype == torch.int64
    assert torch.equal(idx, idx_ref)
    for got, ref in ((z, z_ref), (mean, mean_ref), (r, r_ref)):
        assert rel(got, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", ["task", "common", None])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_backward_matches_reference(cpp, case, weights, dtype):
    x, w, b, r = inputs(case, weights, dtype)
    k = case[-1]
    z, idx, mean, invstd = reference()[0](x, w, b, 1e-5, k)
    gz = r(*z.shape)
    T, C = x.shape[0], x.shape[2]
    outs = {}
    for name, (_, bwd) in (("cpp", cpp), ("ref", reference())):
        gw, gb = x.new_full((T, C), float("nan")), x.new_full((T, C), float("nan"))
        gx = bwd(gz, z, idx, x, mean, invstd, w, 1e-5, k, True, gw, gb)
        outs[name] = (gx, gw, gb)
    for got, ref in zip(outs["cpp"], outs["ref"]):
        assert rel(got, ref) < TOL[dtype]
    # no input gradient asked: None, and the parameter gradients still written
    gw, gb = x.new_zeros(T, C), x.new_zeros(T, C)
    assert cpp[1](gz, z, idx, x, mean, invstd, w, 1e-5, k, False, gw, gb) is None
    assert rel(gw, outs["ref"][1]) < TOL[dtype] and rel(gb, outs["ref"][2]) < TOL[dtype]


def tangent_ops(backend):
    return tuple(registry.implementation(f"bn_relu_maxpool_tangent_{op}", backend) for op in ("fwd", "bwd"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weights", ["task", "common", None])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tangent_forward_and_backward_match_reference(cpp, case, weights, dtype):
    x, w, b, r = inputs(case, weights, dtype)
    T, C, k = x.shape[0], x.shape[2], case[-1]
    xd, wd, bd = r(*x.shape), r(T, C), r(T, C) if weights is not None else None
    got = tangent_ops("cpp")[0](x, xd, w, b, wd, bd, 1e-5, k)
    ref = tangent_ops("torch")[0](x, xd, w, b, wd, bd, 1e-5, k)
    assert torch.equal(got[2], ref[2])  # idx
    for g, f in zip(got[:2] + got[3:], ref[:2] + ref[3:]):  # z, ż, mean, r, a, mean(ẋ)
        assert rel(g, f) < TOL[dtype]
    z, _, idx, mean, invstd, a, dmean = ref
    gz, gzd = r(*z.shape), r(*z.shape)
    outs = {}
    for backend in ("cpp", "torch"):
        bufs = [x.new_full((T, C), float("nan")) for _ in range(4)]
        gx, gxd = tangent_ops(backend)[1](gz, gzd, z, idx, x, xd, mean, invstd, a, dmean, w, wd, k, True, *bufs)
        outs[backend] = (gx, gxd, *bufs)
    for g, f in zip(outs["cpp"], outs["torch"]):
        assert rel(g, f) < TOL[dtype]
    bufs = [x.new_zeros(T, C) for _ in range(4)]
    assert tangent_ops("cpp")[1](gz, gzd, z, idx, x, xd, mean, invstd, a, dmean, w, wd, k, False, *bufs) == (None, None)
    for g, f in zip(bufs, outs["torch"][2:]):
        assert rel(g, f) < TOL[dtype]


def test_tangent_without_input_or_weight_directions_runs_the_reference(cpp):
    """ẋ or ẇ zero (None): the kernel's `supports` declines the call and the cpp op table runs the reference,
    with the same results and saved state."""
    x, w, b, r = inputs(CASES[1], "task", torch.float64)
    T, C = x.shape[0], x.shape[2]
    table = registry.resolve("cpp", DEVICE)
    for xd, wd in ((None, r(T, C)), (r(*x.shape), None), (None, None)):
        assert registry.spec("bn_relu_maxpool_tangent_fwd", "cpp").supports(x, xd, w, b, wd, None, 1e-5, 2)
        got = table.bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, None, 1e-5, 2)
        ref = tangent_ops("torch")[0](x, xd, w, b, wd, None, 1e-5, 2)
        for g, f in zip(got, ref):
            assert (g is None and f is None) or torch.equal(g, f)


def test_non_finite_input_propagates(cpp):
    x, w, b, _ = inputs(CASES[1], "task", torch.float64)
    x[1, 0, 2, 3, 3] = float("nan")
    z, _, mean, _ = cpp[0](x, w, b, 1e-5, 2)
    assert torch.isnan(mean[1, 2]) and torch.isnan(z[1, :, 2]).all() and torch.isfinite(z[0]).all()


def test_opcheck(cpp):
    x, w, b, r = inputs(CASES[1], "task", torch.float64)
    lib = torch.ops.fastmaml
    torch.library.opcheck(lib.bn_relu_maxpool_fwd.default, (x, w, b, 1e-5, 2))
    z, idx, mean, invstd = lib.bn_relu_maxpool_fwd(x, w, b, 1e-5, 2)
    gz = r(*z.shape)
    torch.library.opcheck(lib.bn_relu_maxpool_bwd.default, (gz, z, idx, x, mean, invstd, w, True))
    torch.library.opcheck(lib.bn_relu_maxpool_bwd.default, (gz, z, idx, x, mean, invstd, w, False))
    xd, wd, bd = r(*x.shape), r(*w.shape), r(*b.shape)
    torch.library.opcheck(lib.bn_relu_maxpool_tangent_fwd.default, (x, xd, w, b, wd, bd, 1e-5, 2))
    z, zd, idx, mean, invstd, a, dmean = lib.bn_relu_maxpool_tangent_fwd(x, xd, w, b, wd, bd, 1e-5, 2)
    for need_x in (True, False):
        torch.library.opcheck(
            lib.bn_relu_maxpool_tangent_bwd.default,
            (gz, r(*z.shape), z, idx, x, xd, mean, invstd, a, dmean, w, wd, need_x),
        )


def test_bad_arguments_name_the_argument(cpp):
    x, w, b, _ = inputs(CASES[1], "task", torch.float64)
    lib = torch.ops.fastmaml
    with pytest.raises(RuntimeError, match=r"w: expected per-task channel values \[3, 3\]"):
        lib.bn_relu_maxpool_fwd(x, w[:, :2], b, 1e-5, 2)
    with pytest.raises(RuntimeError, match="b: expected dtype Double"):
        lib.bn_relu_maxpool_fwd(x, w, b.float(), 1e-5, 2)
    with pytest.raises(RuntimeError, match=r"x: expected activations \[T, N, C, H, W\]"):
        lib.bn_relu_maxpool_fwd(x[0], w, b, 1e-5, 2)
    with pytest.raises(RuntimeError, match="k: expected a pooling window"):
        lib.bn_relu_maxpool_fwd(x, w, b, 1e-5, 6)
    with pytest.raises(RuntimeError, match="xd: expected the shape"):
        lib.bn_relu_maxpool_tangent_fwd(x, x[:, :1], w, b, w, b, 1e-5, 2)
    with pytest.raises(RuntimeError, match=r"wd: expected per-task channel values"):
        lib.bn_relu_maxpool_tangent_fwd(x, x, w, b, w[0], b, 1e-5, 2)


def test_kernels_only_for_cpu():
    """The C++ block kernel has no CUDA implementation: on CUDA the reference runs."""
    for op in ("train_fwd", "train_bwd", "tangent_fwd", "tangent_bwd"):
        assert registry.spec(f"bn_relu_maxpool_{op}", "cpp").devices == ("cpu",)


def kinds(model):
    return [r.describe() for r in compile_model(model).chain_rules()]


def test_compiler_fuses_non_overlapping_pools_only():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2),  # fused
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(3),  # fused
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2),  # overlapping
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2, padding=1),  # padding
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),  # ceil mode
        nn.BatchNorm2d(2),
        nn.MaxPool2d(2),  # no ReLU
        nn.Flatten(),
    )
    assert kinds(model) == [
        "0 (Conv2d)",
        "1+2+3 (BatchNorm2d+ReLU+MaxPool2d)",
        "4+5+6 (BatchNorm2d+ReLU+MaxPool2d)",
        "7+8 (BatchNorm2d+ReLU)",
        "9 (MaxPool2d)",
        "10+11 (BatchNorm2d+ReLU)",
        "12 (MaxPool2d)",
        "13+14 (BatchNorm2d+ReLU)",
        "15 (MaxPool2d)",
        "16 (BatchNorm2d)",
        "17 (MaxPool2d)",
        "18 (Flatten)",
    ]
    rules = compile_model(model).chain_rules()
    assert isinstance(rules[1], BatchNormReLUMaxPoolRule) and rules[1].k == 2 and rules[2].k == 3
    assert [r.index for r in rules if hasattr(r, "index")] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("order", ["second", "checkpoint", "first"])
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_meta_step_matches_oracle(backend, order, monkeypatch):
    """Conv → BN → ReLU → MaxPool ×2 (both tails fused) through meta_step, float64, ops of `backend`."""
    monkeypatch.setenv(registry.ENV_VAR, backend)
    torch.manual_seed(0)
    model = small_cnn(channels=3, size=10)
    assert sum(isinstance(r, BatchNormReLUMaxPoolRule) for r in compile_model(model).chain_rules()) == 2
    check_meta_step(
        model,
        classification_tasks(T=3, size=10, seed=2),
        loss="cross_entropy",
        loss_fn=F.cross_entropy,
        inner_lr=0.3,
        steps=2,
        order=order,
        tol=1e-9,
    )


def test_explain_names_the_fused_tail():
    e = fastmaml.explain(small_cnn(channels=3), loss="cross_entropy")
    assert e.layers[:2] == ("v1 = 0 (Conv2d)(x)", "v4 = 1+2+3 (BatchNorm2d+ReLU+MaxPool2d)(v1)")
