"""BatchNorm2d + ReLU + MaxPool2d, the Triton kernels (kernels/bn_relu_maxpool.py via
fastmaml/ops/triton_norm.py) against the torch references (fastmaml/ops/layers.py): forward, backward
and both with tangents, on CUDA or under the Triton interpreter on CPU (small odd sizes, and real sizes as slow
tests); meta_step with backend="triton"
against the autograd oracle (float64)."""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmaml.ops import registry  # noqa: E402

from models import classification_tasks, small_cnn  # noqa: E402
from oracle import check_meta_step  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
# (T, N, C, H, W, k): T = 1, odd H and W (a remainder outside the windows), k = 3, H not a multiple of k
CASES = [(1, 1, 1, 2, 2, 2), (3, 2, 3, 5, 7, 2), (2, 3, 2, 5, 7, 3), (1, 2, 2, 9, 8, 1)]
IDS = ["T{}N{}C{}H{}W{}k{}".format(*c) for c in CASES]
# real sizes (slow under the interpreter): conv4's first block at 84×84 (75 query images, a few of its 32
# channels) and ResNet-12's first stage (5 support images, 16 channels, two tasks)
REAL_CASES = [(1, 75, 3, 84, 84, 2), (2, 5, 16, 84, 84, 2)]
REAL_IDS = ["conv4-84-query", "resnet12-84-support"]
OPS = ("train_fwd", "train_bwd", "tangent_fwd", "tangent_bwd")


@pytest.fixture(scope="module")
def triton_ops():
    ok, why = registry.availability("triton", DEVICE)
    assert ok, why
    return {op: registry._IMPLS[f"bn_relu_maxpool_{op}"]["triton"] for op in OPS}


def reference(op):
    return registry.reference(f"bn_relu_maxpool_{op}")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def randn(g, *shape, dtype):
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weights", ["task", "common", None])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference(triton_ops, case, weights, dtype):
    check_against_reference(triton_ops, case, weights, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", REAL_CASES, ids=REAL_IDS)
def test_matches_reference_real_size(triton_ops, case, dtype):
    check_against_reference(triton_ops, case, "task", dtype)


def check_against_reference(triton_ops, case, weights, dtype):
    """Every op (with and without the input gradient) against its torch reference on random inputs: the
    picks exactly, the rest within TOL."""
    T, N, C, H, W, k = case
    g = torch.Generator().manual_seed(1)
    x = randn(g, T, N, C, H, W, dtype=dtype) * 2 + 0.5
    shape = {"task": (T, C), "common": (C,), None: None}[weights]
    w, b = (None, None) if shape is None else (randn(g, *shape, dtype=dtype), randn(g, *shape, dtype=dtype))
    xd, wd, bd = randn(g, *x.shape, dtype=dtype), randn(g, T, C, dtype=dtype), randn(g, T, C, dtype=dtype)

    got, ref = triton_ops["train_fwd"](x, w, b, 1e-5, k), reference("train_fwd")(x, w, b, 1e-5, k)
    assert torch.equal(got[1], ref[1])  # idx
    for a, f in zip(got[:1] + got[2:], ref[:1] + ref[2:]):
        assert rel(a, f) < TOL[dtype]
    got, ref = (
        triton_ops["tangent_fwd"](x, xd, w, b, wd, bd, 1e-5, k),
        reference("tangent_fwd")(x, xd, w, b, wd, bd, 1e-5, k),
    )
    assert torch.equal(got[2], ref[2])
    for a, f in zip(got[:2] + got[3:], ref[:2] + ref[3:]):
        assert rel(a, f) < TOL[dtype]

    z, _, idx, mean, r, a, dmean = ref
    gz, gzd = randn(g, *z.shape, dtype=dtype), randn(g, *z.shape, dtype=dtype)
    for need_x in (True, False):
        outs = {}
        for name, fn in (("triton", triton_ops["train_bwd"]), ("torch", reference("train_bwd"))):
            bufs = [x.new_full((T, C), float("nan")) for _ in range(2)]
            outs[name] = (fn(gz, z, idx, x, mean, r, w, 1e-5, k, need_x, *bufs), *bufs)
        for name, fn in (("triton", triton_ops["tangent_bwd"]), ("torch", reference("tangent_bwd"))):
            bufs = [x.new_full((T, C), float("nan")) for _ in range(4)]
            outs[name] += (*fn(gz, gzd, z, idx, x, xd, mean, r, a, dmean, w, wd, k, need_x, *bufs), *bufs)
        for a_, f in zip(outs["triton"], outs["torch"]):
            assert (a_ is None and f is None) or rel(a_, f) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_tangent_forward_recomputes_the_forward_bit_for_bit(triton_ops, dtype):
    """The Hessian-vector product pass recomputes each step's forward with the tangent forward: its z,
    picks and statistics must be the forward's bit for bit (the TANGENT variant of the kernel may not
    round differently), or a step's gradient and its Hessian may come from different linear pieces of
    the loss (issue 13). Real sizes on a GPU, where the compiler may contract the two variants
    differently."""
    g = torch.Generator().manual_seed(4)
    T, N, C, H, W = (2, 5, 4, 84, 84) if DEVICE.type == "cuda" else (2, 3, 2, 8, 6)
    x = randn(g, T, N, C, H, W, dtype=dtype) * 2 + 0.5
    w, b, wd, bd = (randn(g, T, C, dtype=dtype) for _ in range(4))
    xd = randn(g, *x.shape, dtype=dtype)
    fwd = triton_ops["train_fwd"](x, w, b, 1e-5, 2)
    tan = triton_ops["tangent_fwd"](x, xd, w, b, wd, bd, 1e-5, 2)
    for name, f, t in zip(("z", "idx", "mean", "invstd"), fwd, (tan[0], tan[2], tan[3], tan[4])):
        assert torch.equal(f, t), name


def test_opcheck(triton_ops):
    from fastmaml.ops import triton_norm

    lib = triton_norm._bn_relu_pool()
    g = torch.Generator().manual_seed(2)
    x = randn(g, 2, 2, 3, 5, 4, dtype=torch.float64)
    w, b, wd, bd = (randn(g, 2, 3, dtype=torch.float64) for _ in range(4))
    xd = randn(g, *x.shape, dtype=torch.float64)
    torch.library.opcheck(lib.bn_relu_maxpool_fwd, (x, xd, w, b, wd, bd, 1e-5, 2))
    torch.library.opcheck(lib.bn_relu_maxpool_fwd, (x, None, w, b, None, None, 1e-5, 2))
    z, _, idx, mean, r, a, dmean = lib.bn_relu_maxpool_fwd(x, xd, w, b, wd, bd, 1e-5, 2)
    gz = randn(g, *z.shape, dtype=torch.float64)
    torch.library.opcheck(lib.bn_relu_maxpool_bwd, (gz, gz, z, idx, x, xd, mean, r, a, dmean, w, wd, 2, True))
    torch.library.opcheck(lib.bn_relu_maxpool_bwd, (gz, None, z, idx, x, None, mean, r, None, None, w, None, 2, False))


def test_bad_arguments_name_the_argument(triton_ops):
    x = torch.zeros(2, 1, 3, 4, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match=r"w: expected per-channel values \[3\] or \[2, 3\]"):
        triton_ops["train_fwd"](x, torch.zeros(2, 2, dtype=torch.float64, device=DEVICE), None, 1e-5, 2)
    with pytest.raises(ValueError, match="k: expected a pooling window"):
        triton_ops["train_fwd"](x, None, None, 1e-5, 5)


@pytest.mark.parametrize("order", ["second", "first"])
def test_meta_step_matches_oracle(order, monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "triton")
    table = registry.resolve("triton", DEVICE)
    assert {table.chosen[f"bn_relu_maxpool_{op}"][0] for op in OPS} == {"triton"}
    torch.manual_seed(0)
    model = small_cnn(channels=2, size=6).to(DEVICE)
    tasks = [t.to(DEVICE) for t in classification_tasks(T=2, ways=5, shots=1, query=1, size=6, seed=3)]
    check_meta_step(
        model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=0.3, steps=2, order=order, tol=1e-9
    )
