"""BatchNorm2d + ReLU + MaxPool2d, the C++ CPU kernels at real sizes (84×84 maps, 5 and 75 images: channel
slabs of 35k and 529k values) in float32 against the float64 reference on the same inputs upcast, each
bound by what the float32 reference (PyTorch's own ops) reaches on those inputs; and the property the
fused engine's second order relies on: a step's forward and its recomputation in the Hessian-vector
product pass (the tangent forward) round alike and pick the same elements.

The bound of every output is  err(C++) <= 2 · err(reference, float32) + 2⁻²⁴  (2⁻²⁴: a correctly
rounded float32 output), err = ‖a − b‖/‖b‖ against the float64 reference. The backwards get the
float64 forward's picks, and statistics rounded to float32, so that they differ from the float64 run
by their arithmetic only. Every test runs on contiguous and channels-last activations (the two kernels' layouts)."""

import pytest
import torch

from fastmaml.ops import registry

DEVICE = torch.device("cpu")
OPS = ("train_fwd", "train_bwd", "tangent_fwd", "tangent_bwd")
FLOOR = 2.0**-24
# (T, N, C): 84×84 maps; the support (5 images) and the query (75 images) of a 5-way task
SIZES = [(2, 5, 3), (1, 75, 2)]
# conv outputs centred near 0 (the usual case), and offset from 0 by 30 standard deviations (x − mean
# cancels: the statistics and x̂ need care there)
REGIMES = {"centred": (0.5, 2.0), "offset": (3.0, 0.1)}
EPS, K = 1e-5, 2
LAYOUTS = ["contiguous", "channels_last"]


def in_layout(t, layout):
    """t `[T, N, C, H, W]` with contiguous or channels-last strides (those of a contiguous `[T, N, H, W, C]`)."""
    return t.contiguous() if layout == "contiguous" else t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@pytest.fixture(scope="module")
def impls():
    ok, why = registry.availability("cpp", DEVICE)
    assert ok, f"the C++ extension must build here: {why}"
    return {b: {op: registry._IMPLS[f"bn_relu_maxpool_{op}"][b] for op in OPS} for b in ("cpp", "torch")}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def make(size, regime, seed=0, layout="contiguous"):
    """float32 inputs x, ẋ `[T, N, C, 84, 84]` in `layout`, w, b, ẇ, ḃ `[T, C]`, and a float32 normal sampler."""
    T, N, C = size
    shift, scale = REGIMES[regime]
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).float()  # noqa: E731
    x = in_layout(r(T, N, C, 84, 84) * scale + shift, layout)
    return x, in_layout(r(*x.shape), layout), r(T, C), r(T, C), r(T, C), r(T, C), r


def check_bounded(got, ref32, ref64, names):
    """Each float32 output of the C++ kernel within the bound set by the float32 reference's error."""
    for name, c, f, d in zip(names, got, ref32, ref64):
        err_cpp, err_ref = rel(c, d), rel(f, d)
        assert err_cpp <= 2 * err_ref + FLOOR, (name, err_cpp, err_ref)


def check_picks(idx, idx64, z64, y64):
    """Picks that differ from float64's (where the true pooled value is > 0) are ties within float32's
    resolution: the true values of the two elements within 4·2⁻²³ of each other, relative (a few ulps)."""
    T, N, C = idx.shape[:3]
    bad = (idx != idx64) & (z64 > 0)
    flat = y64.reshape(T, N, C, -1)
    chosen = flat.gather(3, idx.reshape(T, N, C, -1)).reshape(idx.shape)[bad]
    best = z64[bad]
    assert torch.all(best - chosen <= 4 * torch.finfo(torch.float32).eps * best.abs()), (
        int(bad.sum()),
        (best - chosen).max(),
    )
    return int(bad.sum())


def bn_relu64(x, w, b):
    """relu(BN(x)) in float64 `[T, N, C, H, W]` (the values the pooling compares)."""
    x = x.double()
    var, mean = torch.var_mean(x, (1, 3, 4), correction=0, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + EPS) * w.double()[:, None, :, None, None] + b.double()[:, None, :, None, None]
    return y.clamp_min(0)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("size", SIZES, ids=["N{}".format(s[1]) for s in SIZES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_at_real_sizes(impls, size, regime, layout):
    x, _, w, b, _, _, _ = make(size, regime, layout=layout)
    z64, idx64, mean64, r64 = impls["torch"]["train_fwd"](x.double(), w.double(), b.double(), EPS, K)
    z, idx, mean, r = impls["cpp"]["train_fwd"](x, w, b, EPS, K)
    zr, idxr, meanr, rr = impls["torch"]["train_fwd"](x, w, b, EPS, K)
    check_bounded((z, mean, r), (zr, meanr, rr), (z64, mean64, r64), ("z", "mean", "invstd"))
    check_picks(idx, idx64, z64, bn_relu64(x, w, b))


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("size", SIZES, ids=["N{}".format(s[1]) for s in SIZES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tangent_forward_at_real_sizes(impls, size, regime, layout):
    x, xd, w, b, wd, bd, _ = make(size, regime, layout=layout)
    d = lambda t: t.double()  # noqa: E731
    ref64 = impls["torch"]["tangent_fwd"](d(x), d(xd), d(w), d(b), d(wd), d(bd), EPS, K)
    got = impls["cpp"]["tangent_fwd"](x, xd, w, b, wd, bd, EPS, K)
    ref32 = impls["torch"]["tangent_fwd"](x, xd, w, b, wd, bd, EPS, K)
    check_picks(got[2], ref64[2], ref64[0], bn_relu64(x, w, b))
    same = got[2] == ref64[2]  # ż is compared where the picks agree (a tie's two elements have unrelated ż)
    for out in (got, ref32):
        out[1].mul_(same)
    names = ("z", "zd", "mean", "invstd", "a", "dmean")
    pick = lambda o: o[:2] + o[3:]  # noqa: E731
    check_bounded(pick(got), pick(ref32), (ref64[0], ref64[1] * same) + ref64[3:], names)


def backward_inputs(impls, size, regime, layout):
    """Inputs of both backwards: float64 forward's picks and pooled z; statistics in float64 and
    rounded to float32; full-size ones in `layout`."""
    x, xd, w, b, wd, bd, r = make(size, regime, layout=layout)
    d = lambda t: t.double()  # noqa: E731
    z64, zd64, idx, mean, invstd, a, dmean = impls["torch"]["tangent_fwd"](
        d(x), d(xd), d(w), d(b), d(wd), d(bd), EPS, K
    )
    gz, gzd, z64, idx = (in_layout(t, layout) for t in (r(*z64.shape), r(*z64.shape), z64, idx))
    return dict(x=x, xd=xd, w=w, wd=wd, gz=gz, gzd=gzd, z=z64, idx=idx, mean=mean, invstd=invstd, a=a, dmean=dmean)


def cast(inp, dtype):
    return {k: v if v.dtype == torch.int64 else v.to(dtype) for k, v in inp.items()}


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("size", SIZES, ids=["N{}".format(s[1]) for s in SIZES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_backward_at_real_sizes(impls, size, regime, layout):
    inp = backward_inputs(impls, size, regime, layout)
    T, C = inp["x"].shape[0], inp["x"].shape[2]

    def run(backend, dtype):
        a = cast(inp, dtype)
        gw, gb = a["x"].new_empty(T, C), a["x"].new_empty(T, C)
        gx = impls[backend]["train_bwd"](
            a["gz"], a["z"], a["idx"], a["x"], a["mean"], a["invstd"], a["w"], EPS, K, True, gw, gb
        )
        return gx, gw, gb

    check_bounded(
        run("cpp", torch.float32), run("torch", torch.float32), run("torch", torch.float64), ("gx", "gw", "gb")
    )


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("size", SIZES, ids=["N{}".format(s[1]) for s in SIZES])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tangent_backward_at_real_sizes(impls, size, regime, layout):
    inp = backward_inputs(impls, size, regime, layout)
    T, C = inp["x"].shape[0], inp["x"].shape[2]

    def run(backend, dtype):
        a = cast(inp, dtype)
        bufs = [a["x"].new_empty(T, C) for _ in range(4)]  # gw, ġw, gb, ġb
        gx, gxd = impls[backend]["tangent_bwd"](
            a["gz"],
            a["gzd"],
            a["z"],
            a["idx"],
            a["x"],
            a["xd"],
            a["mean"],
            a["invstd"],
            a["a"],
            a["dmean"],
            a["w"],
            a["wd"],
            K,
            True,
            *bufs,
        )
        return (gx, gxd, *bufs)

    check_bounded(
        run("cpp", torch.float32),
        run("torch", torch.float32),
        run("torch", torch.float64),
        ("gx", "gxd", "gw", "gwd", "gb", "gbd"),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tangent_forward_recomputes_the_forward_bit_for_bit(impls, backend, dtype, layout):
    """The HVP pass recomputes each step's forward with the tangent forward; its z, picks and statistics
    must be the forward's, bit for bit, or the step's gradient and its Hessian may come from different
    linear pieces of the loss (issue 13: a near-tie picked one way for the gradient, the other way for the
    Hessian)."""
    x, xd, w, b, wd, bd, _ = make(SIZES[0], "centred", seed=3, layout=layout)
    x, xd, w, b, wd, bd = (t.to(dtype) for t in (x, xd, w, b, wd, bd))
    fwd = impls[backend]["train_fwd"](x, w, b, EPS, K)
    tan = impls[backend]["tangent_fwd"](x, xd, w, b, wd, bd, EPS, K)
    for name, f, t in zip(("z", "idx", "mean", "invstd"), fwd, (tan[0], tan[2], tan[3], tan[4])):
        assert torch.equal(f, t), name
