"""Triton linear-layer kernels (kernels/linear.py) against the fused engine's torch references
(fastmaml/ops/reference/), on CUDA or under the Triton interpreter on CPU; and meta_step with them."""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmaml.ops import registry  # noqa: E402

from kernel_checks import run  # noqa: E402
from models import mlp, regression_tasks  # noqa: E402
from oracle import assert_grads_close, autograd_meta_grad, rel_err  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SHAPES = [(1, 1, 1, 1), (2, 5, 40, 37), (3, 2, 65, 40)]  # T, N, I, O: widths not powers of two
# real sizes (slow under the interpreter): the sinusoid's hidden layer (T=25, 10 points), conv4-64's head on
# 75 query images (28×28: 64 features), ResNet-12's head (640 features), OmniglotFC's second layer (256 → 128)
REAL = [(25, 10, 40, 40), (32, 75, 64, 5), (4, 75, 640, 5), (4, 25, 256, 128)]
PARAMS = SHAPES + [pytest.param(*s, marks=pytest.mark.slow, id="real-T{}N{}I{}O{}".format(*s)) for s in REAL]


@pytest.fixture(scope="module", autouse=True)
def triton_backend():
    ok, why = registry.availability("triton", DEVICE)
    assert ok, why


def both(name):
    return registry.implementation(name, "triton"), registry.implementation(name, "torch")


def randn(gen, dtype, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def close(got, want, dtype):
    assert (got is None) == (want is None)
    if want is not None:
        assert got.shape == want.shape
        assert rel_err(got, want) < TOL[dtype]


def inputs(T, N, n_in, n_out, dtype, common, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = randn(gen, dtype, *((n_out, n_in) if common else (T, n_out, n_in)))
    b = randn(gen, dtype, *((n_out,) if common else (T, n_out)))
    x, xd = randn(gen, dtype, T, N, n_in), randn(gen, dtype, T, N, n_in)
    gy, gyd = randn(gen, dtype, T, N, n_out), randn(gen, dtype, T, N, n_out)
    wd, bd = randn(gen, dtype, T, n_out, n_in), randn(gen, dtype, T, n_out)
    return dict(x=x, xd=xd, w=w, b=b, wd=wd, bd=bd, gy=gy, gyd=gyd)


def grad_views(T, n_out, n_in, dtype):
    """gw, ġw `[T, O, I]`, gb, ġb `[T, O]`: non-contiguous views into one NaN-filled `[T, P]` buffer, as
    the engine passes them (offset 1, and one spare column to catch stores past the end)."""
    flat = torch.full((T, 1 + 2 * n_out * n_in + 2 * n_out + 1), float("nan"), dtype=dtype, device=DEVICE)
    gw, gwd, gb, gbd, _ = flat[:, 1:].split([n_out * n_in, n_out * n_in, n_out, n_out, 1], 1)
    return flat, [gw.view(T, n_out, n_in), gwd.view(T, n_out, n_in), gb, gbd]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("common", [False, True])
@pytest.mark.parametrize("T,N,n_in,n_out", PARAMS)
def test_forward_value_and_tangent(T, N, n_in, n_out, common, dtype):
    d = inputs(T, N, n_in, n_out, dtype, common)
    for name, args in [
        ("linear_fwd", (d["x"], d["w"], d["b"])),
        ("linear_value_tangent_fwd", (d["x"], d["xd"], d["w"], d["b"], d["wd"], d["bd"])),
    ]:
        got, want = (f(*args) for f in both(name))
        for g, w in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            close(g, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("absent", [("b",), ("xd",), ("wd", "bd"), ("xd", "wd"), ("xd", "wd", "bd")])
def test_forward_with_zero_tangents(absent, dtype):
    d = inputs(2, 3, 37, 40, dtype, common=False, seed=1)
    d.update({k: None for k in absent})
    args = (d["x"], d["xd"], d["w"], d["b"], d["wd"], d["bd"])
    (y, yd), (y_ref, yd_ref) = (f(*args) for f in both("linear_value_tangent_fwd"))
    close(y, y_ref, dtype)
    close(yd, yd_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs(dtype):
    gen = torch.Generator().manual_seed(2)
    x = randn(gen, dtype, 2, 40, 6).transpose(1, 2)  # [T, N, I] with unit stride along N
    w = randn(gen, dtype, 2, 37, 50)[:, :, 5:45]  # a column slice
    b, wd = randn(gen, dtype, 4, 37)[::2], randn(gen, dtype, 37, 2, 40).permute(1, 0, 2)
    args = (x, None, w, b, wd, None)
    for got, want in zip(*(f(*args) for f in both("linear_value_tangent_fwd"))):
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("common", [False, True])
@pytest.mark.parametrize("T,N,n_in,n_out", PARAMS)
def test_tangent_backward(T, N, n_in, n_out, common, dtype):
    d = inputs(T, N, n_in, n_out, dtype, common)
    flat, outs = grad_views(T, n_out, n_in, dtype)
    _, outs_ref = grad_views(T, n_out, n_in, dtype)
    args = (d["gy"], d["gyd"], d["x"], d["xd"], d["w"], d["wd"], True)
    tri, ref = both("linear_tangent_bwd")
    gx, gxd = tri(*args, outs[0], outs[1], outs[2], outs[3])
    gx_ref, gxd_ref = ref(*args, outs_ref[0], outs_ref[1], outs_ref[2], outs_ref[3])
    for got, want in zip([gx, gxd, *outs], [gx_ref, gxd_ref, *outs_ref]):
        close(got, want, dtype)
    assert flat[:, 0].isnan().all() and flat[:, -1].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "absent,need_x",
    [
        (("xd",), True),
        (("wd",), True),
        (("xd", "wd"), False),
        (("gw", "gwd"), True),
        (("gw", "gb"), False),
        (("gw", "gwd", "gbd"), False),
        (("gw", "gwd", "gb", "gbd"), True),
    ],
)
def test_tangent_backward_partial(absent, need_x, dtype):
    T, N, n_in, n_out = 2, 4, 37, 40
    d = inputs(T, N, n_in, n_out, dtype, common=False, seed=3)
    d.update({k: None for k in absent if k in d})
    _, outs = grad_views(T, n_out, n_in, dtype)
    _, outs_ref = grad_views(T, n_out, n_in, dtype)
    keep = [k not in absent for k in ("gw", "gwd", "gb", "gbd")]
    outs, outs_ref = [o if k else None for o, k in zip(outs, keep)], [o if k else None for o, k in zip(outs_ref, keep)]
    args = (d["gy"], d["gyd"], d["x"], d["xd"], d["w"], d["wd"], need_x)
    tri, ref = both("linear_tangent_bwd")
    got, want = tri(*args, *outs), ref(*args, *outs_ref)
    for g, w in zip([*got, *outs], [*want, *outs_ref]):
        close(g, w, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,n_in,n_out", PARAMS)
def test_backward(T, N, n_in, n_out, dtype):
    d = inputs(T, N, n_in, n_out, dtype, common=True)
    flat, (gw, _, gb, _) = grad_views(T, n_out, n_in, dtype)
    _, (gw_ref, _, gb_ref, _) = grad_views(T, n_out, n_in, dtype)
    tri, ref = both("linear_bwd")
    close(tri(d["gy"], d["x"], d["w"], True, gw, gb), ref(d["gy"], d["x"], d["w"], True, gw_ref, gb_ref), dtype)
    close(gw, gw_ref, dtype)
    close(gb, gb_ref, dtype)
    assert tri(d["gy"], d["x"], d["w"], False, None, None) is None


def test_clear_errors():
    d = inputs(2, 3, 4, 5, torch.float64, common=False)
    gemm = torch.ops.fastmaml_triton.linear_gemm
    with pytest.raises(ValueError, match=r"b: expected \[T, N, K\] or \[N, K\] with K = 4"):
        gemm(d["x"], None, d["w"].transpose(1, 2), None, None, None, None, None, None, None)
    with pytest.raises(ValueError, match=r"bias: expected shape \[2, 5\] or \[5\], got \[3\]"):
        gemm(d["x"], None, d["w"], None, d["b"][0, :3], None, None, None, None, None)
    with pytest.raises(TypeError, match="ad: expected dtype torch.float64"):
        gemm(d["x"], d["xd"].float(), d["w"], None, None, None, None, None, None, None)


def test_meta_step_mlp_matches_oracle():
    """meta_step through the fused engine with every linear op on Triton (float64)."""
    chosen = registry.resolve("triton", DEVICE).chosen
    for name in ("linear_fwd", "linear_value_tangent_fwd", "linear_bwd", "linear_tangent_bwd"):
        assert chosen[name][0] == "triton", name
    model = mlp((1, 40, 40, 1)).to(DEVICE)
    tasks = [t.to(DEVICE) for t in regression_tasks(T=3, ns=7, nq=5, seed=4)]
    res, grads = run(model, tasks, "triton", loss="mse", inner_lr=0.01, steps=2, order="second")
    ref_loss, ref_grads, _ = autograd_meta_grad(model, tasks, inner_lr=0.01, steps=2, loss_fn=F.mse_loss)
    assert rel_err(res.meta_loss, ref_loss) < 1e-9
    assert_grads_close(grads, ref_grads, 1e-9)


def test_opcheck():
    """Schema, fake implementation and declared mutations of `fastmaml_triton::linear_gemm`."""
    gen = torch.Generator().manual_seed(7)
    T, M, N, K = 2, 3, 5, 4
    a, ad = randn(gen, torch.float64, T, M, K), randn(gen, torch.float64, T, M, K)
    b, bd = randn(gen, torch.float64, N, K), randn(gen, torch.float64, T, N, K)
    bias, bias_d = randn(gen, torch.float64, N), randn(gen, torch.float64, T, N)
    c, cd = (torch.empty(T, M, N, dtype=torch.float64, device=DEVICE) for _ in range(2))
    ra, rad = (torch.empty(T, M, dtype=torch.float64, device=DEVICE) for _ in range(2))
    lib = torch.ops.fastmaml_triton
    torch.library.opcheck(lib.linear_gemm.default, (a, ad, b, bd, bias, bias_d, c, cd, ra, rad))
    torch.library.opcheck(lib.linear_gemm.default, (a, None, b, None, None, None, c, None, None, None))
