"""The ops registry: backend resolution, the environment override, clear errors."""
import pytest
import torch

import fastmaml
from fastmaml.ops import registry
from fastmaml.ops.reference import adjoint_update, inner_update
from models import mlp, regression_tasks


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.setattr(registry, "_CACHE", {})
    monkeypatch.delenv(registry.ENV_VAR, raising=False)


def test_torch_backend_has_every_op():
    table = registry.resolve("torch", "cpu")
    assert set(table.chosen) == set(registry.op_names())
    assert all(b == "torch" for b, _, _ in table.chosen.values())


def test_env_var_replaces_auto_but_not_an_explicit_choice(monkeypatch):
    monkeypatch.setenv(registry.ENV_VAR, "torch")
    assert registry.requested_backend("auto") == "torch"
    assert registry.requested_backend(None) == "torch"
    monkeypatch.setenv(registry.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"\$FASTMAML_BACKEND: unknown backend 'bogus'"):
        registry.requested_backend("auto")
    assert registry.requested_backend("torch") == "torch"


def test_unavailable_explicit_backend_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(registry._AVAILABILITY, "triton", lambda d: (False, "triton is not installed"))
    monkeypatch.setitem(registry._IMPLS, "inner_update", dict(registry._IMPLS["inner_update"], triton=None))
    with pytest.raises(fastmaml.BackendUnavailable, match="backend='triton' cannot run on cpu: triton is not installed"):
        registry.resolve("triton", "cpu")
    table = registry.resolve("auto", "cpu")
    assert table.chosen["inner_update"][0] != "triton"
    with pytest.raises(fastmaml.BackendUnavailable):
        fastmaml.meta_step(mlp((1, 4, 1)), regression_tasks(), backend="triton")


def test_backend_without_an_op_runs_its_reference(monkeypatch):
    monkeypatch.setitem(registry._AVAILABILITY, "cpp", lambda d: (True, "test"))
    monkeypatch.setitem(registry._IMPLS, "inner_update", {"torch": inner_update})  # no cpp impl of this op
    backend, fn, why = registry.resolve("cpp", "cpu").chosen["inner_update"]
    assert (backend, fn, why) == ("torch", inner_update, "no cpp implementation of this op")


def test_explicit_only_kernels_are_not_chosen_by_auto(monkeypatch):
    """An implementation registered with auto=False runs only when its backend is asked for."""
    monkeypatch.setitem(registry._AVAILABILITY, "cpp", lambda d: (True, "test"))
    monkeypatch.setitem(registry._IMPLS, "test_op", {})
    monkeypatch.setattr(registry, "_EXPLICIT_ONLY", {})
    registry.register("test_op", "torch")(lambda: "reference")
    registry.register("test_op", "cpp", auto=False, why_not_auto="not measured yet")(lambda: "kernel")
    auto = registry.resolve("auto", "cpu")
    assert auto.test_op() == "reference" and "cpp: not measured yet" in auto.describe()["test_op"]
    assert registry.resolve("cpp", "cpu").test_op() == "kernel"


def test_kernels_chosen_by_auto_on_some_devices_only(monkeypatch):
    """auto=("meta",): "auto" picks the kernel on that device type, the reference elsewhere."""
    monkeypatch.setitem(registry._AVAILABILITY, "cpp", lambda d: (True, "test"))
    monkeypatch.setitem(registry.AUTO_ORDER, "meta", ("cpp", "torch"))
    monkeypatch.setitem(registry._IMPLS, "test_op", {})
    monkeypatch.setattr(registry, "_EXPLICIT_ONLY", {})
    monkeypatch.setattr(registry, "_CACHE", {})
    registry.register("test_op", "torch")(lambda: "reference")
    registry.register("test_op", "cpp", auto=("meta",), why_not_auto="slower on the CPU")(lambda: "kernel")
    on_cpu = registry.resolve("auto", "cpu")
    assert on_cpu.test_op() == "reference" and "cpp: slower on the CPU" in on_cpu.describe()["test_op"]
    assert registry.resolve("auto", "meta").test_op() == "kernel"
    assert registry.resolve("cpp", "cpu").test_op() == "kernel"


def test_reference_ops_semantics():
    g = torch.Generator().manual_seed(0)
    T, P = 3, 7
    phi, grad, v, hu = (torch.randn(T, P, generator=g, dtype=torch.float64) for _ in range(4))
    a_vec = torch.rand(P, generator=g, dtype=torch.float64)
    a = torch.tensor(0.3, dtype=torch.float64)
    assert torch.allclose(inner_update(phi, grad, a), phi - 0.3 * grad)
    assert torch.allclose(inner_update(phi, grad, a_vec), phi - a_vec * grad)
    v2, da = adjoint_update(v, hu, grad, a, True)
    assert torch.allclose(v2, v - hu) and torch.allclose(da, -(grad * v).sum())
    v2, da = adjoint_update(v, None, grad, a_vec, True)
    assert v2 is v and torch.allclose(da, -(grad * v).sum(0))
    assert adjoint_update(v, hu, grad, a, False)[1] is None
