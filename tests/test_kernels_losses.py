"""Triton loss kernels (kernels/cross_entropy.py, kernels/mse.py) against the fused engine's torch
references (fastmaml/ops/reference/), on CUDA or under the Triton interpreter on CPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmaml.ops import registry  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


@pytest.fixture(scope="module", autouse=True)
def triton_backend():
    ok, why = registry.availability("triton", DEVICE)
    assert ok, why


def impl(name, backend):
    return registry.implementation(name, backend)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,N,C", [(1, 1, 1), (1, 5, 5), (3, 7, 37), (2, 4, 130)])
def test_cross_entropy_grad_and_tangent(T, N, C, dtype):
    gen = torch.Generator().manual_seed(T + N + C)
    z = (torch.randn(T, N, C, generator=gen, dtype=torch.float64) * 3).to(DEVICE, dtype)
    y = torch.randint(0, C, (T, N), generator=gen).to(DEVICE)
    zd = torch.randn(T, N, C, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    got = impl("cross_entropy_grad", "triton")(z, y)
    want = impl("cross_entropy_grad", "torch")(z, y)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel(a, b) < TOL[dtype] or float((a - b).abs().max()) < TOL[dtype]
    tg = impl("cross_entropy_grad_tangent", "triton")(got[2], zd)
    tw = impl("cross_entropy_grad_tangent", "torch")(want[2], zd)
    assert rel(tg, tw) < TOL[dtype] or float((tg - tw).abs().max()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 10, 1), (2, 5, 3, 4), (2, 700, 3)])
def test_mse_grad(shape, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    out, y = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for _ in range(2))
    got = impl("mse_grad", "triton")(out, y)
    want = impl("mse_grad", "torch")(out.clone(), y)
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel(a, b) < TOL[dtype]


def test_bad_inputs_name_the_argument():
    z = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="y: expected int64 class indices of shape \\(2, 3\\)"):
        impl("cross_entropy_grad", "triton")(z, torch.zeros(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="z: expected floating-point logits"):
        impl("cross_entropy_grad", "triton")(z[0], torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="y: expected .* \\(as out\\)"):
        impl("mse_grad", "triton")(z, z[:, :2])


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, generator=gen).to(DEVICE)
    y = torch.randint(0, 5, (2, 3), generator=gen).to(DEVICE)
    torch.library.opcheck(torch.ops.fastmaml_triton.cross_entropy_grad.default, (z, y))
    torch.library.opcheck(torch.ops.fastmaml_triton.cross_entropy_grad_tangent.default, (torch.softmax(z, -1), z))
    torch.library.opcheck(torch.ops.fastmaml_triton.mse_grad.default, (z, torch.randn_like(z)))
