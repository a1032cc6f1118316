"""Step kernels of every fast backend ("cpp": csrc/, "triton": kernels/) against the plain-PyTorch
references, on odd shapes (T = 1, P = 1, P not a multiple of any block), float32 and float64
(and bfloat16 with fp32 accumulation on CUDA). Runs on CUDA when there is a GPU, otherwise on CPU
with the Triton interpreter (TRITON_INTERPRET=1, set here before the kernels are imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastmaml import BackendUnavailable, build  # noqa: E402
from fastmaml.ops import registry  # noqa: E402
from fastmaml.ops.reference import step as reference  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(1, 1), (1, 7), (3, 1), (5, 1681), (4, 2049), (2, 4096 + 3), (25, 97)]
DTYPES = [torch.float32, torch.float64] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 1e-2}
BACKENDS = ["cpp", "triton"]


STEP_OPS = ("inner_update", "adjoint_update")


class StepOps:
    """The backend's own implementations of the step ops (not the registry's per-op choice)."""

    def __init__(self, backend):
        for name in STEP_OPS:
            setattr(self, name, registry.implementation(name, backend))


def ops_for(backend):
    ok, why = registry.availability(backend, DEVICE)
    assert ok, f"backend {backend!r} must be available on {DEVICE} here: {why}"
    return StepOps(backend)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def randn(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def alphas(P, dtype, gen):
    return [
        torch.tensor(0.037, dtype=dtype, device=DEVICE),
        (torch.rand(P, generator=gen, dtype=torch.float64) * 0.1).to(DEVICE, dtype),
    ]


def reference_in_fp32(fn, *args):
    """The reference run in float32 (bf16 inputs upcast): what fp32 accumulation should give."""
    up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
    return fn(*up)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P", SHAPES)
def test_inner_update_matches_reference(backend, T, P, dtype):
    ops = ops_for(backend)
    gen = torch.Generator().manual_seed(T * 1000 + P)
    phi, g = randn(gen, T, P, dtype=dtype), randn(gen, T, P, dtype=dtype)
    for alpha in alphas(P, dtype, gen):
        for phi_ in (phi, phi[0].expand(T, P)):  # θ broadcast over tasks at the first step: row stride 0
            got = ops.inner_update(phi_, g, alpha)
            assert got.shape == (T, P) and got.dtype == dtype and got.device.type == DEVICE.type
            assert rel(got, reference_in_fp32(reference.inner_update, phi_, g, alpha)) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,P", SHAPES)
def test_adjoint_update_matches_reference(backend, T, P, dtype):
    ops = ops_for(backend)
    gen = torch.Generator().manual_seed(T * 7 + P)
    v, hu, g = (randn(gen, T, P, dtype=dtype) for _ in range(3))
    for alpha in alphas(P, dtype, gen):
        for hu_ in (hu, None):
            for lr_grad in (True, False):
                got_v, got_d = ops.adjoint_update(v, hu_, g, alpha, lr_grad)
                ref_v, ref_d = reference_in_fp32(reference.adjoint_update, v, hu_, g, alpha, lr_grad)
                assert got_v.dtype == dtype and rel(got_v, ref_v) < TOL[dtype]
                if lr_grad:
                    assert got_d.shape == alpha.shape and got_d.dtype == dtype
                    assert rel(got_d, ref_d) < 10 * TOL[dtype]
                else:
                    assert got_d is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs(backend):
    ops = ops_for(backend)
    gen = torch.Generator().manual_seed(1)
    phi = randn(gen, 6, 10, dtype=torch.float64)
    g = randn(gen, 10, 6, dtype=torch.float64).t()  # stride (1, 6)
    alpha = torch.rand(10, dtype=torch.float64, generator=gen).to(DEVICE)
    assert rel(ops.inner_update(phi, g, alpha), reference.inner_update(phi, g, alpha)) < 1e-15


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_are_deterministic(backend):
    ops = ops_for(backend)
    gen = torch.Generator().manual_seed(0)
    v, hu, g = (randn(gen, 9, 3 * 2048 + 5, dtype=torch.float32) for _ in range(3))
    alpha = torch.tensor(0.1, device=DEVICE)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.adjoint_update(v, hu, g, alpha, True)
        torch.set_num_threads(max(2, before))
        many = ops.adjoint_update(v, hu, g, alpha, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


BAD = [
    (lambda phi, g, a: (phi[0], g, a), "phi: expected a \\[T, P\\] tensor"),
    (lambda phi, g, a: (phi, g[:, :3], a), "g: expected shape"),
    (lambda phi, g, a: (phi, g.double(), a), "g: expected dtype"),
    (lambda phi, g, a: (phi, g, torch.ones(3, device=DEVICE)), "alpha: expected a 0-dim tensor or shape \\[5\\]"),
    (lambda phi, g, a: (phi, g, a.double()), "alpha: expected dtype"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, match", BAD)
def test_bad_inputs_name_the_argument(backend, bad, match):
    ops = ops_for(backend)
    phi, g, a = torch.randn(2, 5, device=DEVICE), torch.randn(2, 5, device=DEVICE), torch.tensor(0.1, device=DEVICE)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        ops.inner_update(*bad(phi, g, a))


@pytest.mark.parametrize("namespace", ["fastmaml", "fastmaml_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(namespace, dtype):
    ops_for("cpp" if namespace == "fastmaml" else "triton")
    lib = getattr(torch.ops, namespace)
    gen = torch.Generator().manual_seed(3)
    v, hu, g = (randn(gen, 3, 11, dtype=dtype) for _ in range(3))
    for alpha in alphas(11, dtype, gen):
        torch.library.opcheck(lib.inner_update.default, (v, g, alpha))
        torch.library.opcheck(lib.adjoint_update.default, (v, hu, g, alpha, True))
        torch.library.opcheck(lib.adjoint_update.default, (v, hu, g, alpha, False))
        torch.library.opcheck(lib.alpha_grad.default, (g, v, alpha))


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_backend_runs_its_step_ops(backend):
    ops_for(backend)
    table = registry.resolve(backend, DEVICE)
    for name in STEP_OPS:
        assert table.chosen[name][0] == backend


def test_auto_picks_the_measured_step_kernels():
    """The C++ step kernels on the CPU; on CUDA the reference (its elementwise ops were faster)."""
    for name in STEP_OPS:
        backend, _, why = registry.resolve("auto", DEVICE).chosen[name]
        assert backend == ("cpp" if DEVICE.type == "cpu" else "torch"), why


def test_unavailable_backend_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.setattr(build, "_state", (False, "compiler exploded (test)"))
    monkeypatch.setattr(registry, "_CACHE", {})
    with pytest.raises(BackendUnavailable, match="compiler exploded"):
        registry.resolve("cpp", DEVICE)
    backend, _, why = registry.resolve("auto", "cpu").chosen["inner_update"]
    assert backend == "torch" and "compiler exploded" in why


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    from fastmaml.ops.backends import triton as triton_backend

    triton_backend._kernels()
    monkeypatch.setitem(triton_backend._state, "interpret", False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = registry.availability("triton", torch.device("cpu"))
    assert not ok and "interpreter" in why


def test_cpp_on_cuda_needs_a_cuda_build():
    from fastmaml.ops.backends import cpp as cpp_backend

    assert registry.availability("cpp", torch.device("cpu"))[0]  # loads the extension
    if cpp_backend._has_kernel("inner_update", "CUDA"):
        assert registry.availability("cpp", torch.device("cuda"))[0]
    else:
        ok, why = registry.availability("cpp", torch.device("cuda"))
        assert not ok and "without CUDA" in why
