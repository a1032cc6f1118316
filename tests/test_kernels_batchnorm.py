"""Triton BatchNorm kernels (kernels/batchnorm.py via fastmaml/ops/backends/triton_norm.py) against the torch
references (fastmaml/ops/reference/), on CUDA or under the Triton interpreter on CPU; and meta_step
with backend="triton" on a conv net with BatchNorm against the autograd oracle (float64)."""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastmaml  # noqa: E402
from fastmaml.ops import registry  # noqa: E402
from fastmaml.ops.backends import triton_norm  # noqa: E402

from kernel_checks import DEVICE, DTYPES, Case, assert_close, check_outs, directions  # noqa: E402
from models import classification_tasks, small_cnn  # noqa: E402
from oracle import assert_grads_close, autograd_meta_grad, rel_err  # noqa: E402

# (T, N, C, S, weights): N·S = 1 (degenerate batch statistics), odd C and S, two blocks of 1024 values
CASES = [
    (1, 1, 3, 1, "common"),
    (3, 1, 3, 5, "task"),
    (2, 2, 3, 5, None),
    (1, 2, 7, 49, "task"),
    (1, 3, 2, 345, "common"),
]
IDS = [f"T{t}N{n}C{c}S{s}-{w}" for t, n, c, s, w in CASES]
# real sizes, slow under the interpreter (its time grows with T·C): conv4's first BatchNorm at 84×84 (75 query
# images, one of its channels) and ResNet-12's first stage (5 support images, two of its channels)
REAL = [(1, 75, 1, 84 * 84, "task"), (2, 5, 2, 84 * 84, "common")]
PARAMS = [pytest.param(*c, id=i) for c, i in zip(CASES, IDS)] + [
    pytest.param(*c, id=i, marks=pytest.mark.slow) for c, i in zip(REAL, ["conv4-84-query", "resnet12-84-support"])
]


@pytest.fixture(scope="module", autouse=True)
def triton_backend():
    ok, why = registry.availability("triton", DEVICE)
    assert ok, why


def impls(name):
    return registry.implementation(name, "torch"), registry.implementation(name, "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,C,S,weights", PARAMS)
def test_forward(T, N, C, S, weights, dtype):
    case = Case(T, N, C, S, weights, dtype)
    w, b = case.channel(), case.channel()
    up = lambda t: None if t is None else t.double()  # noqa: E731
    for batch in (True, False):
        ref, tri = impls("batchnorm_fwd")
        stats = case.stats(batch)
        # against the reference in float64: with one value per channel (r = 1/√eps) the float32 reference
        # itself (PyTorch's native BatchNorm, y = x·α + β) rounds y far from the exact b
        want = [t.to(dtype) for t in ref(case.x.double(), up(w), up(b), 1e-5, *map(up, stats))]
        got = tri(case.x, w, b, 1e-5, *stats)
        for name, u, v in zip(("y", "xhat", "r"), got, want):
            assert_close(u, v, dtype, (batch, name))
        assert (got[0] is got[1]) == (w is None)
    ref, tri = impls("batchnorm_train_fwd")
    for name, u, v in zip(("y", "mean", "r"), tri(case.x, w, b, 1e-3), ref(case.x, w, b, 1e-3)):
        assert_close(u, v, dtype, ("train", name))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,C,S,weights", PARAMS)
def test_backward(T, N, C, S, weights, dtype):
    case = Case(T, N, C, S, weights, dtype)
    w = case.channel()
    gy = torch.cat([case.act(), case.act()], dim=-1)[..., ::2]  # a non-contiguous gradient
    _, xhat, r = impls("batchnorm_fwd")[0](case.x, w, case.channel(), 1e-5)
    _, mean, r_train = impls("batchnorm_train_fwd")[0](case.x, w, case.channel(), 1e-5)
    for need_x, n_outs in ((True, 2), (False, 1), (True, 0)):
        for batch in (True, False):
            pairs, flat = case.outs(2)
            gw, gb = pairs[:n_outs] + [(None, None)] * (2 - n_outs)
            ref, tri = impls("batchnorm_bwd")
            want = ref(gy, xhat, r, w, batch, need_x, gw[1], gb[1])
            got = tri(gy, xhat, r, w, batch, need_x, gw[0], gb[0])
            assert_close(got, want, dtype, ("gx", batch, need_x))
            check_outs([gw, gb], flat, dtype)
        (gw, gb), flat = case.outs(2)
        ref, tri = impls("batchnorm_train_bwd")
        want = ref(gy, case.x, mean, r_train, w, 1e-5, need_x, gw[1], gb[1])
        got = tri(gy, case.x, mean, r_train, w, 1e-5, need_x, gw[0], gb[0])
        assert_close(got, want, dtype, ("train gx", need_x))
        check_outs([gw, gb], flat, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,C,S,weights", PARAMS)
def test_tangent_forward(T, N, C, S, weights, dtype):
    case = Case(T, N, C, S, weights, dtype)
    w = case.channel()
    ref, tri = impls("batchnorm_tangent_fwd")
    for batch in (True, False):
        _, xhat, r = impls("batchnorm_fwd")[0](case.x, w, case.channel(), 1e-5, *case.stats(batch))
        for i in range(3):
            xd, wd, bd = directions(case, w, i)
            want = ref(xd, xhat, r, w, wd, bd, batch)
            got = tri(xd, xhat, r, w, wd, bd, batch)
            for name, u, v in zip(("yd", "xhd", "a"), got, want):
                assert_close(u, v, dtype, (batch, i, name))
    assert tri(None, xhat, r, w, None, None, True) == (None, None, None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,C,S,weights", PARAMS)
def test_tangent_backward(T, N, C, S, weights, dtype):
    case = Case(T, N, C, S, weights, dtype)
    w = case.channel()
    gy, gyd = case.act(), case.act()
    ref, tri = impls("batchnorm_tangent_bwd")
    for batch in (True, False):
        _, xhat, r = impls("batchnorm_fwd")[0](case.x, w, case.channel(), 1e-5, *case.stats(batch))
        for i in range(3):
            xd, wd, bd = directions(case, w, i)
            _, xhd, a = impls("batchnorm_tangent_fwd")[0](xd, xhat, r, w, wd, bd, batch)
            for need_x in (True, False) if i == 0 else (True,):
                outs, flat = case.outs(4)
                if i == 2:  # a shared affine part: no gw, ġw outputs
                    outs[0] = outs[1] = (None, None)
                want = ref(gy, gyd, xhat, xhd, a, r, w, wd, batch, need_x, *(o[1] for o in outs))
                got = tri(gy, gyd, xhat, xhd, a, r, w, wd, batch, need_x, *(o[0] for o in outs))
                for name, u, v in zip(("gx", "gxd"), got, want):
                    assert_close(u, v, dtype, (batch, i, need_x, name))
                check_outs(outs, flat, dtype)


def test_opcheck():
    """Schemas, fake implementations and declared mutations of the custom ops."""
    triton_norm._bn()  # imports kernels/batchnorm.py
    lib = torch.ops.fastmaml_triton
    case = Case(2, 2, 3, 5, "task", torch.float64)
    x, w, b = case.x, case.channel(), case.channel(per_task=False)
    (gw, _), (gb, _) = case.outs(2)[0]
    torch.library.opcheck(lib.batchnorm_fwd.default, (x, w, b, None, None, 1e-5, True))
    torch.library.opcheck(lib.batchnorm_fwd.default, (x, None, None, *case.stats(False), 1e-5, False))
    _, xhat, mean, r = lib.batchnorm_fwd(x, w, b, None, None, 1e-5, True)
    torch.library.opcheck(lib.batchnorm_bwd.default, (x, xhat, None, r, w, True, True, gw, gb))
    torch.library.opcheck(lib.batchnorm_bwd.default, (x, x, mean, r, None, True, False, None, gb))
    torch.library.opcheck(lib.batchnorm_tangent_fwd.default, (x, xhat, r, w, w, w, True))
    torch.library.opcheck(lib.batchnorm_tangent_fwd.default, (x, xhat, r, None, None, None, True))
    _, xhd, a = lib.batchnorm_tangent_fwd(x, xhat, r, w, w, w, True)
    torch.library.opcheck(
        lib.batchnorm_tangent_bwd.default, (x, x, xhat, xhd, a, r, w, w, True, True, gw, None, gb, None)
    )
    torch.library.opcheck(
        lib.batchnorm_tangent_bwd.default, (x, x, xhat, None, None, r, None, None, False, False, None, gw, None, gb)
    )


def test_bad_inputs_name_the_argument():
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    _, tri = impls("batchnorm_fwd")
    with pytest.raises(ValueError, match="w: expected a per-channel tensor"):
        tri(x, torch.ones(3, device=DEVICE), None, 1e-5)
    with pytest.raises(ValueError, match="x: expected a floating-point"):
        tri(x[0], None, None, 1e-5)
    _, xhat, r = tri(x, None, None, 1e-5)
    with pytest.raises(ValueError, match="gw_out: expected a torch.float32 output of shape"):
        impls("batchnorm_bwd")[1](xhat, xhat, r, None, True, True, torch.empty(4, 2, device=DEVICE), None)
    with pytest.raises(ValueError, match="gy: expected"):
        impls("batchnorm_bwd")[1](xhat.double(), xhat, r, None, True, True, None, None)


@pytest.mark.parametrize("batch_norm,steps", [("batch", 1), ("batch", 2), ("frozen", 2)])
def test_meta_step_conv_bn_matches_oracle(batch_norm, steps):
    torch.manual_seed(0)
    model = small_cnn(channels=2, ways=3, size=4).to(DEVICE)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(2, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(2, generator=g, dtype=torch.float64))
    tasks = [t.to(DEVICE) for t in classification_tasks(T=2, ways=3, size=4)]
    model.zero_grad()
    res = fastmaml.meta_step(
        model, tasks, inner_lr=0.1, steps=steps, loss="cross_entropy", batch_norm=batch_norm, backend="triton"
    )
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    ref_loss, ref_grads, _ = autograd_meta_grad(
        model, tasks, inner_lr=0.1, steps=steps, loss_fn=F.cross_entropy, train=batch_norm == "batch"
    )
    assert rel_err(res.meta_loss, ref_loss) < 1e-9
    assert_grads_close(grads, ref_grads, 1e-9)
