"""The Triton task-batched convolutions (kernels/conv.py, through fastmaml/ops/backends/triton_conv.py)
against PyTorch's convolutions, task by task: the forward, the input gradient and the weight and bias
gradients, each with its tangent form (two products in one kernel), in float64 (to ~1e-15) and
float32 (within a bound derived from PyTorch's own float32 error on the same input), bfloat16 with
float32 accumulation; odd sizes, stride, padding, 1×1 and asymmetric kernels, dilation, real layer sizes
(slow: 84×84 maps of 5 images, 75 images of 10×10), per-task and common weights (views of flat buffers),
outputs written in place through their strides; opcheck; the BatchNorm statistics of the forward's
epilogue against `var_mean` of the reference output (several row tiles, a partial column block), and a
BatchNorm normalizing with them; and meta-steps of conv nets with the Conv2d rule's strategy "triton"
against the autograd oracle (float64, BatchNorms taking the convolutions' statistics) and against strategy
"loop" (float32). On CUDA, or under the Triton interpreter on CPU."""

import inspect
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastmaml  # noqa: E402
from fastmaml.errors import BackendUnavailable  # noqa: E402
from fastmaml.ops.backends import triton_conv  # noqa: E402
from fastmaml.programs.fused import conv  # noqa: E402

from models import classification_tasks, small_cnn  # noqa: E402
from oracle import check_meta_step  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
aten = torch.ops.aten

# T, N, C, H, W, O, kernel, stride, padding, dilation, weights ("task": a view of a flat [T, P] buffer,
# "common": [O, C, kh, kw]), bias ("task" [T, O], "common" [O], None)
CASES = [
    (1, 1, 3, 5, 7, 4, 3, 1, 1, 1, "task", "task"),  # one task, one image, 3×3 "same"
    (3, 5, 2, 9, 9, 3, 3, 2, 0, 1, "common", "common"),  # stride 2, no padding, common weights
    (3, 2, 5, 7, 5, 6, 1, 1, 0, 1, "task", None),  # 1×1 (split-K weight gradient under the interpreter)
    (1, 5, 3, 9, 7, 2, 3, 1, 1, 2, "task", "common"),  # dilation 2
    (3, 1, 4, 5, 9, 5, 1, 2, 1, 1, "common", None),  # 1×1, stride 2, padding 1 (a border of zeros)
    (2, 3, 17, 6, 5, 33, (3, 1), (1, 2), (1, 0), (2, 1), "task", "task"),  # several channel blocks, asymmetric
]
IDS = ["T{}N{}C{}H{}W{}O{}".format(*c[:6]) + f"-k{c[6]}s{c[7]}p{c[8]}d{c[9]}-{c[10]}-b{c[11]}" for c in CASES]
FP32_CASES = [0, 1, 2, 5]  # float32: a subset (the interpreter is slow)
BF16_CASES = [0, 2]


def pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


class Conv:
    """One case's random inputs (float64 masters) and its per-task PyTorch references."""

    def __init__(self, case, seed=0):
        T, N, C, H, W, OC, k, s, p, d, weights, bias = case
        self.T, self.N, self.C, self.OC = T, N, C, OC
        self.k, self.geo = pair(k), (pair(s), pair(p), pair(d))
        self.g = torch.Generator().manual_seed(seed + T * 100 + C * 10 + OC)
        self.x, self.xd = self.randn(T, N, C, H, W), self.randn(T, N, C, H, W)
        shape = (OC, C, *self.k)
        self.w = self.weight(shape, weights)
        self.wd = self.weight(shape, "task")  # a weight direction is per task
        self.b = None if bias is None else self.randn(T, OC) if bias == "task" else self.randn(OC)
        self.bd = self.randn(T, OC)
        y = self.conv(self.x, self.w, None)
        self.gy, self.gyd = self.randn(*y.shape), self.randn(*y.shape)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g, dtype=torch.float64)

    def weight(self, shape, form):
        if form == "common":
            return self.randn(*shape)
        P = int(torch.tensor(shape).prod())
        flat = self.randn(self.T, P + 3)  # per-task weights: a view of a flat [T, P] buffer, task stride P + 3
        return flat[:, 2 : 2 + P].view(self.T, *shape)

    @staticmethod
    def task(v, t):
        return None if v is None else v[t] if v.dim() in (2, 5) else v

    def conv(self, x, w, b):
        s, p, d = self.geo
        return torch.stack([F.conv2d(x[t], self.task(w, t), self.task(b, t), s, p, d) for t in range(self.T)])

    def bwd(self, gy, x, w, which):
        """∂x (which 0) or ∂w (which 1) of conv(x, w) against gy, per task."""
        s, p, d = self.geo
        mask = [which == 0, which == 1, False]
        return torch.stack(
            [
                aten.convolution_backward(gy[t], x[t], self.task(w, t), None, s, p, d, False, [0, 0], 1, mask)[which]
                for t in range(self.T)
            ]
        )

    def references(self):
        """Every output of the three ops with full tangents, from PyTorch (in the masters' dtype)."""
        x, xd, w, wd, gy, gyd = self.x, self.xd, self.w, self.wd, self.gy, self.gyd
        return {
            "y": self.conv(x, w, self.b),
            "yd": self.conv(xd, w, self.bd) + self.conv(x, wd, None),
            "gx": self.bwd(gy, x, w, 0),
            "gxd": self.bwd(gyd, x, w, 0) + self.bwd(gy, x, wd, 0),
            "gw": self.bwd(gy, x, w, 1),
            "gwd": self.bwd(gyd, x, w, 1) + self.bwd(gy, xd, w, 1),
            "gb": gy.sum((1, 3, 4)),
            "gbd": gyd.sum((1, 3, 4)),
        }

    def cast(self, dtype):
        """A copy with every input in `dtype` on DEVICE (views stay views, with the same strides)."""
        out = object.__new__(Conv)
        out.__dict__.update(self.__dict__)
        for name in ("x", "xd", "w", "wd", "b", "bd", "gy", "gyd"):
            v = getattr(self, name)
            if v is not None:
                c = torch.empty_strided(v.shape, v.stride(), dtype=dtype, device=DEVICE)
                c.copy_(v)
                setattr(out, name, c)
        return out


def rel(a, b):
    return float((a.double().cpu() - b.double().cpu()).norm() / b.double().cpu().norm().clamp_min(1e-300))


def bounds(case, dtype):
    """Per output, the relative error allowed against the float64 reference: float64 1e-13; float32 and
    bfloat16 8× PyTorch's own error in that dtype on the same (rounded) inputs, or 8 units of rounding."""
    ref64 = case.references()
    if dtype == torch.float64:
        return ref64, dict.fromkeys(ref64, 1e-13)
    rounded = case.cast(dtype)
    exact = rounded.cast(torch.float64).references()  # what the rounded inputs give, exactly
    with torch.backends.cudnn.flags(allow_tf32=False):  # PyTorch's true float32 on a GPU too
        own = rounded.references()
    unit = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]
    return exact, {k: 8 * max(unit, rel(own[k], exact[k])) for k in exact}


def check(got, want, allowed, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = rel(got, want)
    assert err <= allowed, (what, err, allowed)


def nan_view(T, shape, dtype, offset=1, pad=2):
    """A NaN-filled output `[T, *shape]` that is a view of a wider flat `[T, P + pad]` buffer."""
    P = int(torch.tensor(shape).prod())
    flat = torch.full((T, P + pad), float("nan"), dtype=dtype, device=DEVICE)
    return flat[:, offset : offset + P].view(T, *shape), flat, (offset, P)


def untouched(flat, span):
    offset, P = span
    rest = torch.cat([flat[:, :offset], flat[:, offset + P :]], 1)
    assert torch.isnan(rest).all(), "a kernel wrote outside its output view"


@pytest.fixture(scope="module")
def lib():
    return triton_conv._lib(DEVICE)


def run_all(lib, c, dtype, tf32=False):
    """The three ops with full tangents, outputs as strided views -> {name: output}."""
    T, N, OC, C = c.T, c.N, c.OC, c.C
    s, p, d = c.geo
    ho, wo = c.gy.shape[-2:]
    H, W = c.x.shape[-2:]
    # y in a transposed layout, ẏ contiguous: the kernels write through any strides
    y = torch.empty(T, OC, N, ho, wo, dtype=dtype, device=DEVICE).transpose(1, 2)
    yd = torch.empty(T, N, OC, ho, wo, dtype=dtype, device=DEVICE)
    lib.conv2d_fwd(c.x, c.xd, c.w, c.wd, c.b, c.bd, y, yd, s, p, d, tf32)
    gx = torch.empty(T, N, C, H, W, dtype=dtype, device=DEVICE)
    gxd = torch.empty(T, C, N, H, W, dtype=dtype, device=DEVICE).transpose(1, 2)
    lib.conv2d_bwd_input(c.gy, c.gyd, c.w, c.wd, gx, gxd, s, p, d, tf32)
    gw, flat_w, span_w = nan_view(T, (OC, C, *c.k), dtype)
    gwd, flat_wd, span_wd = nan_view(T, (OC, C, *c.k), dtype, offset=0)
    gb, flat_b, span_b = nan_view(T, (OC,), dtype)
    gbd = torch.empty(OC, T, dtype=dtype, device=DEVICE).t()
    lib.conv2d_bwd_weight(c.gy, c.gyd, c.x, c.xd, gw, gwd, gb, gbd, s, p, d, False, tf32)
    for flat, span in ((flat_w, span_w), (flat_wd, span_wd), (flat_b, span_b)):
        untouched(flat, span)
    return dict(y=y, yd=yd, gx=gx, gxd=gxd, gw=gw, gwd=gwd, gb=gb, gbd=gbd)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernels_float64(lib, case):
    """Every output with full tangents, and the partial forms: value only, one tangent term only,
    bias tangent only, accumulation into the weight gradient, bias gradients only."""
    c = Conv(case).cast(torch.float64)
    ref, tol = bounds(Conv(case), torch.float64)
    got = run_all(lib, c, torch.float64)
    for k in ref:
        check(got[k], ref[k], tol[k], k)

    s, p, d = c.geo
    T = c.T
    # ẏ from ẋ only (ẇ = 0, no ḃ), without y; ẏ from ẇ only with y
    yd = torch.empty_like(got["yd"])
    lib.conv2d_fwd(c.x, c.xd, c.w, None, c.b, None, None, yd, s, p, d, False)
    check(yd, c.conv(c.xd, c.w, None), 1e-13, "yd from xd")
    y = torch.empty_like(yd)
    lib.conv2d_fwd(c.x, None, c.w, c.wd, c.b, None, y, yd, s, p, d, False)
    check(y, ref["y"], 1e-13, "y")
    check(yd, c.conv(c.x, c.wd, None), 1e-13, "yd from wd")
    lib.conv2d_fwd(c.x, None, c.w, None, None, c.bd, None, yd, s, p, d, False)  # ẏ = ḃ
    check(yd, c.bd[:, None, :, None, None].expand_as(yd), 0, "yd = bd")

    # ġx from ẇ only (ġy = 0), without gx
    gxd = torch.empty_like(got["gx"])
    lib.conv2d_bwd_input(c.gy, None, c.w, c.wd, None, gxd, s, p, d, False)
    check(gxd, c.bwd(c.gy, c.x, c.wd, 0), 1e-13, "gxd from wd")

    # gw added to what is there; ġw from ẋ only (ġy = 0) with ġb = 0; bias gradients alone
    gw, gwd = (c.randn(*ref["gw"].shape).to(DEVICE) for _ in range(2))
    start, start_d = gw.clone(), gwd.clone()
    gbd = torch.empty(T, c.OC, dtype=torch.float64, device=DEVICE)
    lib.conv2d_bwd_weight(c.gy, None, c.x, c.xd, gw, gwd, None, gbd, s, p, d, True, False)
    check(gw, start + ref["gw"], 1e-13, "gw accumulated")
    check(gwd, start_d + c.bwd(c.gy, c.xd, c.w, 1), 1e-13, "gwd accumulated, from xd")
    assert (gbd == 0).all()
    gb, gbd = (
        torch.empty(T, c.OC, dtype=torch.float64, device=DEVICE),
        torch.empty(T, c.OC, dtype=torch.float64, device=DEVICE),
    )
    lib.conv2d_bwd_weight(c.gy, c.gyd, c.x, None, None, None, gb, gbd, s, p, d, False, False)
    check(gb, ref["gb"], 1e-13, "gb alone")
    check(gbd, ref["gbd"], 1e-13, "gbd alone")


def test_split_k_is_exercised(lib):
    """The 1×1 case's weight gradient runs split over positions (several partial sums) on the CPU."""
    if DEVICE.type != "cpu":
        pytest.skip("the split depends on the GPU's size")
    from fastmaml.kernels import conv as kernels

    T, N, C, H, W = CASES[2][:5]
    BK = 64 if kernels.INTERPRET else 8  # float64
    assert kernels.weight_split(T, N * H * W, BK, DEVICE) > 1


# real layer sizes (the interpreter's time grows with the positions: 75 images of 84×84 take minutes per launch)
REAL_CASES = [
    (1, 5, 16, 84, 84, 16, 3, 1, 1, 1, "task", "task"),  # ResNet-12's first stage, one task's 5 support images
    (2, 75, 32, 10, 10, 32, 3, 1, 1, 1, "task", "task"),  # conv4-32 at 84×84: the last layer, 75 query images
]


@pytest.mark.slow
@pytest.mark.parametrize("case", REAL_CASES, ids=["resnet12-84-support", "conv4-84-query"])
def test_kernels_real_size(lib, case):
    """Every output with full tangents at a real layer's size, in float64 (about 40-90 s under the
    interpreter)."""
    ref, tol = bounds(Conv(case), torch.float64)
    got = run_all(lib, Conv(case).cast(torch.float64), torch.float64)
    for k in ref:
        check(got[k], ref[k], tol[k], k)


LOW = [(CASES[i], torch.float32) for i in FP32_CASES] + [(CASES[i], torch.bfloat16) for i in BF16_CASES]
LOW_IDS = [f"{IDS[i]}-float32" for i in FP32_CASES] + [f"{IDS[i]}-bfloat16" for i in BF16_CASES]


@pytest.mark.parametrize("case,dtype", LOW, ids=LOW_IDS)
def test_kernels_low_precision(lib, case, dtype):
    master = Conv(case)
    ref, tol = bounds(master, dtype)
    got = run_all(lib, master.cast(dtype), dtype)
    for k in ref:
        assert got[k].dtype == dtype
        check(got[k], ref[k], tol[k], k)


def test_tf32_flag(lib):
    """tf32=True runs (TF32 on tensor cores on a GPU: within TF32's rounding; the interpreter computes in
    FP32 either way)."""
    case = CASES[0]
    master = Conv(case)
    exact = master.cast(torch.float32).cast(torch.float64).references()
    got = run_all(lib, master.cast(torch.float32), torch.float32, tf32=True)
    for k in exact:
        check(got[k], exact[k], 8 * 2.0**-11, k)


def test_opcheck(lib):
    """Schemas, fake implementations and declared mutations of the custom ops."""
    c = Conv((2, 1, 2, 5, 5, 3, 3, 1, 1, 1, "task", "task")).cast(torch.float64)
    s, p, d = c.geo
    y, yd = torch.empty_like(c.gy), torch.empty_like(c.gy)
    torch.library.opcheck(lib.conv2d_fwd.default, (c.x, c.xd, c.w, c.wd, c.b, c.bd, y, yd, s, p, d, False))
    torch.library.opcheck(lib.conv2d_fwd.default, (c.x, None, c.w[0], None, None, None, y, None, s, p, d, False))
    gx, gxd = torch.empty_like(c.x), torch.empty_like(c.x)
    torch.library.opcheck(lib.conv2d_bwd_input.default, (c.gy, c.gyd, c.w, c.wd, gx, gxd, s, p, d, False))
    gw, gwd = torch.zeros_like(c.wd), torch.zeros_like(c.wd)
    gb, gbd = (
        torch.empty(c.T, c.OC, dtype=torch.float64, device=DEVICE),
        torch.empty(c.T, c.OC, dtype=torch.float64, device=DEVICE),
    )
    torch.library.opcheck(
        lib.conv2d_bwd_weight.default, (c.gy, c.gyd, c.x, c.xd, gw, gwd, gb, gbd, s, p, d, True, False)
    )


def test_bad_arguments_name_the_argument(lib):
    c = Conv(CASES[0]).cast(torch.float64)
    s, p, d = c.geo
    y = torch.empty_like(c.gy)
    with pytest.raises(ValueError, match="w: expected"):
        lib.conv2d_fwd(c.x, None, c.w[:, :, :2], None, None, None, y, None, s, p, d, False)
    with pytest.raises(ValueError, match="y: expected shape"):
        lib.conv2d_fwd(c.x, None, c.w, None, None, None, y[..., :1], None, s, p, d, False)
    with pytest.raises(TypeError, match="xd: expected dtype"):
        lib.conv2d_fwd(c.x, c.xd.float(), c.w, None, None, None, y, y, s, p, d, False)
    with pytest.raises(ValueError, match="stride: expected positive"):
        lib.conv2d_fwd(c.x, None, c.w, None, None, None, y, None, [0, 1], p, d, False)
    with pytest.raises(ValueError, match="gx: an input of"):
        lib.conv2d_bwd_input(c.gy, None, c.w, None, c.x[..., 1:], None, s, p, d, False)
    with pytest.raises(ValueError, match="x: expected"):
        lib.conv2d_bwd_weight(c.gy, None, c.x[:, :0], None, None, None, None, None, s, p, d, False, False)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        triton_conv.conv_forward(c.x.requires_grad_(), c.w, None, s, p, d)


def test_unavailable_without_the_interpreter(lib, monkeypatch):
    """On a CPU without the interpreter the strategy says why it cannot run."""
    from fastmaml.ops.backends import triton as triton_backend

    monkeypatch.setitem(triton_backend._state, "interpret", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="conv strategy 'triton' cannot run on cpu"):
        triton_conv._lib(torch.device("cpu"))


# ---------------------------------------------------------------- BatchNorm statistics in the forward's epilogue

STATS_CASES = [
    (2, 5, 3, 9, 9, 5, 3, 1, 1, 1, "task", "task"),  # 405 positions: two row tiles, the second partial
    (3, 3, 17, 7, 6, 20, 3, 2, 1, 1, "common", "common"),  # stride 2, 20 channels: a partial column block
    (2, 7, 4, 9, 7, 3, 1, 1, 0, 1, "task", None),  # 1×1, 441 positions
    (1, 2, 5, 13, 11, 6, 3, 2, 0, 1, "task", "task"),  # one task, stride 2, no padding, odd sizes
    (1, 17, 1, 16, 16, 3, 3, 1, 1, 1, "task", "task"),  # 4352 positions: 17 row tiles, reduced 16 at a time
]
STATS_IDS = ["T{}N{}C{}H{}W{}O{}".format(*c[:6]) + f"-k{c[6]}s{c[7]}" for c in STATS_CASES]


def reference_stats(y, yd):
    """(mean, biased variance, mean(ẏ), mean((y − mean) ẏ)) `[4, T, O]` over (N, H', W'), in float64."""
    y, yd = y.double().cpu(), yd.double().cpu()
    var, mean = torch.var_mean(y, (1, 3, 4), correction=0)
    cov = ((y - mean[:, None, :, None, None]) * yd).mean((1, 3, 4))
    return torch.stack([mean, var, yd.mean((1, 3, 4)), cov])


def check_stats(got, want, allowed, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    for k in range(got.shape[0]):
        check(got[k], want[k], allowed, f"{what}[{k}]")


@pytest.mark.parametrize("case", STATS_CASES, ids=STATS_IDS)
def test_bn_stats_float64(lib, case):
    """The statistics against `var_mean` of PyTorch's output, with the full tangent, value only, from a
    given y (the activation tape's form), with ẏ = ḃ and without a tangent; y and ẏ still right."""
    c = Conv(case).cast(torch.float64)
    ref = Conv(case).references()
    want = reference_stats(ref["y"], ref["yd"])
    s, p, d = c.geo
    T, OC = c.T, c.OC
    if case in (STATS_CASES[0], STATS_CASES[4]):  # the tiles are combined: several row blocks
        from fastmaml.kernels import conv as kernels

        R = ref["y"][0, :, 0].numel()
        BM = kernels.blocks(R, OC, c.C * 9, kernels._precision(torch.float64, False), True)[0]
        assert -(-R // BM) > (1 if case is STATS_CASES[0] else 16)

    y = torch.empty(T, OC, c.N, *ref["y"].shape[-2:], dtype=torch.float64, device=DEVICE).transpose(1, 2)
    yd = torch.empty_like(ref["yd"], device=DEVICE)
    stats = torch.full((4, T, OC), float("nan"), dtype=torch.float64, device=DEVICE)
    lib.conv2d_fwd_bn_stats(c.x, c.xd, c.w, c.wd, c.b, c.bd, y, yd, stats, s, p, d, False, False)
    check(y, ref["y"], 1e-13, "y")
    check(yd, ref["yd"], 1e-13, "yd")
    check_stats(stats, want, 1e-13, "stats")

    y2, st2 = triton_conv.conv_forward(c.x, c.w, c.b, s, p, d, bn_stats=True)
    check(y2, ref["y"], 1e-13, "y, value only")
    check_stats(st2, want[:2], 1e-13, "stats, value only")

    given = ref["y"].to(DEVICE)
    y3, yd3, st3 = triton_conv.conv_value_tangent(
        c.x, c.xd, c.w, c.b, c.wd, c.bd, s, p, d, value=False, bn_stats=True, y=given
    )
    assert y3 is given and torch.equal(given, ref["y"].to(DEVICE))  # read, not written
    check(yd3, ref["yd"], 1e-13, "yd, y given")
    check_stats(st3, want, 1e-13, "stats, y given")

    _, yd4, st4 = triton_conv.conv_value_tangent(c.x, None, c.w, c.b, None, c.bd, s, p, d, bn_stats=True)
    check_stats(st4[:2], want[:2], 1e-13, "stats, yd = bd")
    assert torch.equal(st4[2], c.bd) and (st4[3] == 0).all()
    y5, yd5, st5 = triton_conv.conv_value_tangent(c.x, None, c.w, c.b, None, None, s, p, d, bn_stats=True)
    assert yd5 is None and (st5[2:] == 0).all()
    check_stats(st5[:2], want[:2], 1e-13, "stats, no tangent")


@pytest.mark.slow
def test_bn_stats_real_size(lib):
    """A real layer's size under the interpreter (about 30 s per launch): 75 query images of 84×84, one
    task, the first conv4 layer's 1 input channel (2 outputs, to keep the interpreter's time down); y and
    the statistics against `F.conv2d` and `var_mean` in float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 75, 1, 84, 84, dtype=torch.float64, generator=g).to(DEVICE)
    w = torch.randn(1, 2, 1, 3, 3, dtype=torch.float64, generator=g).to(DEVICE)
    b = torch.randn(1, 2, dtype=torch.float64, generator=g).to(DEVICE)
    y, stats = triton_conv.conv_forward(x, w, b, [1, 1], [1, 1], [1, 1], bn_stats=True)
    ref = F.conv2d(x[0].cpu(), w[0].cpu(), b[0].cpu(), padding=1)[None]
    check(y, ref, 1e-13, "y")
    check_stats(stats, reference_stats(ref, torch.zeros_like(ref))[:2], 1e-13, "stats")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_stats_low_precision(lib, dtype):
    """float32 and bfloat16 (statistics in float32): those of y and ẏ as stored, within 8× PyTorch's own
    float32 error on the same stored values."""
    c = Conv(STATS_CASES[0]).cast(dtype)
    s, p, d = c.geo
    y, yd, stats = triton_conv.conv_value_tangent(c.x, c.xd, c.w, c.b, c.wd, c.bd, s, p, d, bn_stats=True)
    assert y.dtype == yd.dtype == dtype and stats.dtype == torch.float32
    want = reference_stats(y, yd)
    own = reference_stats(y.float(), yd.float())  # the same computation in float32
    for k in range(4):
        check(stats[k], want[k], 8 * max(2.0**-24, rel(own[k].float(), want[k])), f"stats[{k}]")


@pytest.mark.parametrize("slope", [1.0, 0.0, 0.1])
def test_given_statistics_batchnorm_matches_its_own(lib, slope):
    """`batchnorm_act_given_fwd` on the epilogue's statistics of a convolution's output is
    `batchnorm_act_value_tangent_fwd` on that output (z, ż, mean, r, a, mean(ẋ)), float64; its z does not
    depend on the tangent."""
    from fastmaml.ops.reference.batchnorm import batchnorm_act_given_fwd, batchnorm_act_value_tangent_fwd

    c = Conv(STATS_CASES[1]).cast(torch.float64)
    s, p, d = c.geo
    y, yd, stats = triton_conv.conv_value_tangent(c.x, c.xd, c.w, c.b, c.wd, c.bd, s, p, d, bn_stats=True)
    x4, xd4 = y.reshape(*y.shape[:3], -1), yd.reshape(*y.shape[:3], -1)
    w, b, wd, bd = (c.randn(c.T, c.OC).to(DEVICE) for _ in range(4))
    with torch.no_grad():
        want = batchnorm_act_value_tangent_fwd(x4, xd4, w, b, wd, bd, 1e-5, slope)
        got = batchnorm_act_given_fwd(x4, xd4, w, b, wd, bd, stats, 1e-5, slope)
        for k, (u, v) in enumerate(zip(got, want)):
            check(u, v, 1e-13, k)
        z, zd, *_ = batchnorm_act_given_fwd(x4, None, w[0], None, None, None, stats[:2], 1e-5, slope)
        assert zd is None
        assert torch.equal(z, batchnorm_act_given_fwd(x4, xd4, w[0], None, None, None, stats, 1e-5, slope)[0])
        with pytest.raises(ValueError, match="a tangent needs"):
            batchnorm_act_given_fwd(x4, xd4, w, b, None, None, stats[:2], 1e-5, slope)


def test_bn_stats_bad_arguments(lib):
    c = Conv(STATS_CASES[3]).cast(torch.float64)
    s, p, d = c.geo
    y, yd = torch.empty_like(c.gy), torch.empty_like(c.gy)
    st = torch.empty(4, c.T, c.OC, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="stats: expected shape"):
        lib.conv2d_fwd_bn_stats(c.x, None, c.w, None, None, None, y, None, st[:, :, :1], s, p, d, False, False)
    with pytest.raises(TypeError, match="stats: expected torch.float64"):
        lib.conv2d_fwd_bn_stats(c.x, None, c.w, None, None, None, y, None, st.float(), s, p, d, False, False)
    with pytest.raises(ValueError, match="needs yd"):
        lib.conv2d_fwd_bn_stats(c.x, None, c.w, None, None, None, y, None, st, s, p, d, False, False)
    with pytest.raises(ValueError, match="give y"):
        lib.conv2d_fwd_bn_stats(c.x, c.xd, c.w, None, None, None, None, yd, st, s, p, d, False, False)
    with pytest.raises(ValueError, match="needs y"):
        triton_conv.conv_value_tangent(c.x, c.xd, c.w, None, None, None, s, p, d, value=False, bn_stats=True)
    with pytest.raises(ValueError, match="read only with bn_stats and value=False"):
        triton_conv.conv_value_tangent(c.x, c.xd, c.w, None, None, None, s, p, d, bn_stats=True, y=y)


def test_bn_stats_opcheck(lib):
    c = Conv((2, 1, 2, 5, 5, 3, 3, 1, 1, 1, "task", "task")).cast(torch.float64)
    s, p, d = c.geo
    y, yd = torch.empty_like(c.gy), torch.empty_like(c.gy)
    st = torch.empty(4, c.T, c.OC, dtype=torch.float64, device=DEVICE)
    op = lib.conv2d_fwd_bn_stats.default
    torch.library.opcheck(op, (c.x, c.xd, c.w, c.wd, c.b, c.bd, y, yd, st, s, p, d, False, False))
    torch.library.opcheck(op, (c.x, None, c.w[0], None, None, None, y, None, st[:2], s, p, d, False, False))
    torch.library.opcheck(op, (c.x, c.xd, c.w, None, None, None, y, yd, st, s, p, d, True, False))


# ---------------------------------------------------------------- the Conv2d rule's strategy "triton"


def test_rule_strategy_triton_matches_loop(lib):
    """The rule's four passes (forward, backward, value-and-tangent forward, tangent backward) with
    strategy "triton" against "loop", per-task and common weights."""
    c = Conv(CASES[5]).cast(torch.float64)
    geo = conv.Geometry(c.k, *c.geo)
    rule = conv.ConvRule("0", "Conv2d", geo, c.C)
    for w in (c.w, c.w[0]):
        outs = {}
        for strategy in ("loop", "triton"):
            rule.strategy = strategy
            y, saved = rule.forward(None, c.x, (w, c.b), True)
            bufs = [torch.full(c.wd.shape, float("nan"), dtype=torch.float64, device=DEVICE) for _ in range(2)]
            bbufs = [torch.full((c.T, c.OC), float("nan"), dtype=torch.float64, device=DEVICE) for _ in range(2)]
            gx = rule.backward(None, c.gy, saved, (w, c.b), True, (bufs[0], bbufs[0]))
            y2, yd, saved2 = rule.tangent_forward(None, c.x, c.xd, (w, c.b), (c.wd, c.bd))
            gx2, gxd = rule.tangent_backward(
                None, c.gy, c.gyd, saved2, (w, c.b), (c.wd, c.bd), True, (bufs[0], bbufs[0]), (bufs[1], bbufs[1])
            )
            outs[strategy] = [y, gx, *bufs, *bbufs, y2, yd, gx2, gxd]
            if w is c.w and "y" in inspect.signature(rule.tangent_forward).parameters:  # the tape's forms
                y3, yd3, _ = rule.tangent_forward(None, c.x, c.xd, (w, c.b), (c.wd, c.bd), y=y)
                gx3, gxd3 = rule.tangent_backward(
                    None, c.gy, c.gyd, saved2, (w, c.b), (c.wd, c.bd), True, (None,) * 2, (None,) * 2, gx=gx
                )
                assert y3 is y and gx3 is gx
                outs[strategy] += [yd3, gxd3]
        for i, (a, b) in enumerate(zip(outs["triton"], outs["loop"])):
            check(a, b, 1e-13, i)


def test_rule_differentiable_forward_falls_back(lib):
    """Under autograd (AdaptedModel) the "triton" strategy's forward is PyTorch's grouped convolution."""
    c = Conv(CASES[0]).cast(torch.float64)
    w = c.w.clone().requires_grad_()
    y = conv.conv_forward(c.x, w, c.b, conv.Geometry(c.k, *c.geo), "triton")
    (g,) = torch.autograd.grad((y * c.gy).sum(), w)
    check(y.detach(), c.conv(c.x, c.w, c.b), 1e-13, "y")
    check(g, c.bwd(c.gy, c.x, c.w, 1), 1e-13, "gw")


def test_meta_step_strategy_triton(lib, monkeypatch):
    """A conv net's second-order meta-gradient with every Conv2d on strategy "triton": against the
    autograd oracle in float64, and equal to strategy "loop" in float32."""
    monkeypatch.setitem(conv.STRATEGY, DEVICE.type, "triton")
    torch.manual_seed(0)
    model = small_cnn(channels=2, ways=3).to(DEVICE)
    tasks = [t.to(DEVICE) for t in classification_tasks(T=2, ways=3, shots=1, query=2, size=8)]
    check_meta_step(model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=0.4, tol=1e-9)

    model32 = model.float()
    tasks32 = [t.float() if t.is_floating_point() else t for t in tasks]
    grads = {}
    for strategy in ("triton", "loop"):
        monkeypatch.setitem(conv.STRATEGY, DEVICE.type, strategy)
        model32.zero_grad()
        res = fastmaml.meta_step(model32, tasks32, inner_lr=0.4, steps=1, order="second", loss="cross_entropy")
        grads[strategy] = ({n: p.grad.clone() for n, p in model32.named_parameters()}, float(res.meta_loss))
    assert abs(grads["triton"][1] - grads["loop"][1]) <= 1e-5 * abs(grads["loop"][1])
    got, want = grads["triton"][0], grads["loop"][0]
    total = float(torch.cat([g.reshape(-1) for g in want.values()]).double().norm())
    for n in want:  # (a conv bias before BatchNorm: true gradient 0, float32 rounding both ways)
        err = float((got[n].double() - want[n].double()).norm())
        assert err <= 1e-4 * float(want[n].double().norm()) + 1e-6 * total, (n, err, total)


def conv_bn_net(ways=3):
    """Conv → BatchNorm → ReLU, Conv (stride 2) → BatchNorm → LeakyReLU, Conv 1×1 → BatchNorm, Linear: each
    BatchNorm the only reader of a convolution (the three rules that take given statistics); 7×7 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 3, 3, stride=2),
        nn.BatchNorm2d(3),
        nn.LeakyReLU(0.1),
        nn.Conv2d(3, 2, 1),
        nn.BatchNorm2d(2),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, ways),
    ).double()


@pytest.mark.parametrize("order", ["second", "checkpoint"])
def test_meta_step_batchnorm_takes_the_conv_statistics(lib, monkeypatch, order):
    """With strategy "triton" every BatchNorm of a conv-BatchNorm net normalizes with the statistics of its
    convolution's epilogue (counted), and the second-order meta-gradient matches the autograd oracle in
    float64: with the activation tape (order "second": the HVP reuses y and its statistics) and without
    ("checkpoint": recomputed)."""
    from fastmaml.programs.fused import norm

    monkeypatch.setitem(conv.STRATEGY, DEVICE.type, "triton")
    calls = {"forward": 0, "tangent": 0, "stats": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(norm.BatchNormRule, "_given_forward", counted("forward", norm.BatchNormRule._given_forward))
    monkeypatch.setattr(
        norm.BatchNormRule, "_given_tangent_forward", counted("tangent", norm.BatchNormRule._given_tangent_forward)
    )
    monkeypatch.setattr(norm.BatchNormRule, "_act_forward", counted("stats", norm.BatchNormRule._act_forward))
    taped = []  # per tangent forward of a convolution: whether it reused the tape's y and statistics
    tangent_forward_stats = conv.ConvRule.tangent_forward_stats

    def recorded(self, ops, x, xd, p, v, y=None, stats=None):
        taped.append(y is not None and stats is not None)
        return tangent_forward_stats(self, ops, x, xd, p, v, y=y, stats=stats)

    monkeypatch.setattr(conv.ConvRule, "tangent_forward_stats", recorded)
    torch.manual_seed(0)
    model = conv_bn_net().to(DEVICE)
    tasks = [t.to(DEVICE) for t in classification_tasks(T=2, ways=3, shots=1, query=2, size=7)]
    check_meta_step(model, tasks, loss="cross_entropy", loss_fn=F.cross_entropy, inner_lr=0.4, order=order, tol=1e-9)
    assert calls["forward"] >= 3 and calls["tangent"] >= 3, calls
    assert calls["stats"] == 0, calls  # no BatchNorm reduced its input itself
    assert taped and all(taped) == (order == "second"), taped


# ---------------------------------------------------------------- benchmarks/conv_triton_bench.py


def _bench():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "conv_triton_bench.py"
    spec = importlib.util.spec_from_file_location("benchmarks_conv_triton_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_passes_agree_and_table_renders(lib, capsys):
    """The GPU bench's six passes, run here on a tiny layer: Triton and grouped agree, and so do the fused
    and unfused BatchNorm statistics; the tables render; without CUDA the script stops with "needs CUDA"."""
    bench = _bench()
    assert len(bench.layer_shapes()) == 20
    c = Conv((2, 2, 3, 5, 5, 4, 3, 1, 1, 1, "task", "task")).cast(torch.float64)
    t = dict(x=c.x, xd=c.xd, w=c.w, wd=c.wd, b=c.b, bd=c.bd, gy=c.gy, gyd=c.gyd)
    geo = conv.Geometry(3, 1, 1, 1)
    with torch.no_grad():
        grouped, triton = bench.passes("grouped", t, geo), bench.passes("triton", t, geo)
        for name in bench.PASSES:
            assert bench.agreement(triton[name](), grouped[name]()) < 1e-13, name
        for name, fns in bench.stats_passes(t, geo).items():
            fused, unfused = fns["fused"](), fns["unfused"]()
            assert fused.shape == unfused.shape == (2 if name == "fwd_stats" else 4, 2, 4), name
            assert bench.agreement(fused, unfused) < 1e-13, name
    ms = dict(grouped_ms=1.0, triton_ms=0.5, triton_tflops=1.0)
    row = dict(
        net="n", C=3, O=4, k=3, H=5, N=2, T=2, precision="fp32", agreement=1e-7, **dict.fromkeys(bench.PASSES, ms)
    )
    row.update(dict.fromkeys(bench.STATS_PASSES, dict(unfused_ms=0.3, fused_ms=0.2)), stats_agreement=1e-7)
    results = dict(device="d", torch="t", triton="tr", T=2, repeats=1, precisions=["fp32"], budget=1, rows=[row])
    results["not_reached"] = [("fp32", "n", 3, 4, 3, 5, 75)]
    md = bench.markdown(results)
    assert "| n | 3→4 | 3 | 5 | 2 | 1.000 / 0.500 = 2.00× (1.0)" in md and "Not reached" in md
    assert "| n | 3→4 | 3 | 5 | 2 | 0.300 / 0.200 = 1.50× | 0.300 / 0.200 = 1.50× | 1.0e-07 |" in md
    if not torch.cuda.is_available():
        assert bench.main(["--out", "unused"]) == 2
        assert "needs CUDA" in capsys.readouterr().err


COMPILE_SCRIPT = r"""
import importlib, importlib.util, json, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location(
    "fastmaml.kernels", root + "/__init__.py", submodule_search_locations=[root]
)
package = importlib.util.module_from_spec(spec)
sys.modules["fastmaml.kernels"] = package
spec.loader.exec_module(package)
kc = importlib.import_module("fastmaml.kernels.conv")
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget

def build(jf, consts, warps):
    sig = {n: "constexpr" if n in consts else "*fp32" if n.endswith("_ptr") else "i32" for n in jf.arg_names}
    src = triton.compiler.ASTSource(jf, sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=3))
    return len(k.asm["cubin"])

def compile_(jf, flags, BM, BN, BK, warps):
    return build(jf, dict(flags, USE_DOT=True, CAST=False, PREC="tf32", ACC=tl.float32, BM=BM, BN=BN, BK=BK), warps)

on = dict(HAS_B=True, HAS_BD=True)
sizes = [
    compile_(kc._fwd_kernel, dict(Y_ON=True, YD_ON=True, HAS_XD=True, HAS_WD=True, LOAD_X=True, LOAD_W=True,
                                  STATS=True, TSTATS=True, Y_IN=False, FLAT=True, **on), 128, 64, 16, 8),
    compile_(kc._bwd_input_kernel, dict(GX_ON=True, GXD_ON=True, HAS_GYD=True, HAS_WD=True, LOAD_G=True,
                                        LOAD_W=True), 128, 64, 16, 8),
    compile_(kc._bwd_weight_kernel, dict(GW_ON=True, GWD_ON=True, GB_ON=True, GBD_ON=True, HAS_GYD=True,
                                         HAS_XD=True, LOAD_X=True, LOAD_G=True, LOAD_GD=True, ACCUMULATE=True,
                                         FLAT=False), 128, 64, 16, 8),
    build(kc._stats_kernel, dict(TANGENT=True, ACC=tl.float32, BB=16, BC=64), 4),
]
print(json.dumps(sizes))
"""


def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter does not run Triton's compiler: the tangent kernels (the largest forms, TF32; the
    forward with its BatchNorm-statistics epilogue, and the statistics' reduction) compile for sm_90 without a
    GPU (Triton's bundled ptxas), in a process without TRITON_INTERPRET."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parent.parent / "kernels"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, "-c", COMPILE_SCRIPT, str(root)], capture_output=True, text=True, env=env, timeout=300
    )
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas in this Triton install")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(n > 0 for n in json.loads(proc.stdout.strip().splitlines()[-1]))
