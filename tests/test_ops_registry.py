"""The ops registry: backend resolution, the environment override, clear errors."""

import pytest
import torch

import fastmaml
from fastmaml.ops import registry
from fastmaml.ops.reference.step import adjoint_update, inner_update

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


@pytest.fixture
def test_op(monkeypatch):
    """A fresh op "test_op" (registry state restored afterwards), with a cpp backend that is available."""
    monkeypatch.setitem(registry._AVAILABILITY, "cpp", lambda d: (True, "test"))
    monkeypatch.setitem(registry._IMPLS, "test_op", {})
    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))
    registry.register("test_op", "torch")(lambda *a: "reference")
    return registry


def test_unavailable_explicit_backend_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(registry._AVAILABILITY, "triton", lambda d: (False, "triton is not installed"))
    with pytest.raises(
        fastmaml.BackendUnavailable, match="backend='triton' cannot run on cpu: triton is not installed"
    ):
        registry.resolve("triton", "cpu")
    table = registry.resolve("auto", "cpu")
    assert table.chosen["inner_update"][0] != "triton"
    with pytest.raises(fastmaml.BackendUnavailable):
        fastmaml.meta_step(mlp((1, 4, 1)), regression_tasks(), backend="triton")


def test_backend_without_an_op_runs_its_reference(test_op):
    backend, fn, why = registry.resolve("cpp", "cpu").chosen["test_op"]
    assert (backend, fn(), why) == ("torch", "reference", "no cpp implementation of this op")


def test_explicit_only_kernels_are_not_chosen_by_auto(test_op):
    """An implementation registered with auto=False runs only when its backend is asked for."""
    registry.register("test_op", "cpp", auto=False, why_not_auto="not measured yet")(lambda *a: "kernel")
    auto = registry.resolve("auto", "cpu")
    assert auto.test_op() == "reference" and "cpp: not measured yet" in auto.describe()["test_op"]
    assert registry.resolve("cpp", "cpu").test_op() == "kernel"


def test_kernels_chosen_by_auto_on_some_devices_only(test_op, monkeypatch):
    """auto=("meta",): "auto" picks the kernel on that device type, the reference elsewhere."""
    monkeypatch.setitem(registry.AUTO_ORDER, "meta", ("cpp", "torch"))
    registry.register("test_op", "cpp", auto=("meta",), why_not_auto="slower on the CPU")(lambda *a: "kernel")
    on_cpu = registry.resolve("auto", "cpu")
    assert on_cpu.test_op() == "reference" and "cpp: slower on the CPU" in on_cpu.describe()["test_op"]
    assert registry.resolve("auto", "meta").test_op() == "kernel"
    assert registry.resolve("cpp", "cpu").test_op() == "kernel"


def test_devices_limit_where_a_kernel_runs(test_op, monkeypatch):
    monkeypatch.setitem(registry.AUTO_ORDER, "meta", ("cpp", "torch"))
    registry.register("test_op", "cpp", devices=("meta",))(lambda *a: "kernel")
    assert registry.resolve("cpp", "cpu").test_op() == "reference"
    assert "no cpp implementation of this op for cpu" in registry.resolve("cpp", "cpu").describe()["test_op"]
    assert registry.resolve("auto", "meta").test_op() == "kernel"


def test_dtypes_and_supports_run_the_reference_per_call(test_op):
    """One mechanism: a call the kernel does not take (dtype, or its own predicate) runs the reference, in
    "auto" and with the backend named."""
    registry.register("test_op", "cpp", dtypes=(torch.float32,), supports=lambda x, flag: None if flag else "flag off")(
        lambda x, flag: "kernel"
    )
    for backend in ("auto", "cpp"):
        table = registry.resolve(backend, "cpu")
        assert table.test_op(torch.zeros(1), True) == "kernel"
        assert table.test_op(torch.zeros(1, dtype=torch.float16), True) == "reference"
        assert table.test_op(torch.zeros(1), False) == "reference"
        assert "dtypes float32, else the reference" in table.describe()["test_op"]


def test_half_precision_conv_net_under_auto_runs():
    """The C++ block-tail kernels take float32/float64: a bfloat16 conv net gets the reference for those ops
    under "auto" instead of an error."""
    from models import classification_tasks, small_cnn

    model = small_cnn(channels=2).to(torch.bfloat16)
    tasks = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in classification_tasks(T=2)]
    res = fastmaml.meta_step(model, tasks, inner_lr=0.1, loss="cross_entropy")
    assert torch.isfinite(res.meta_loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_implementation_lookup():
    assert registry.implementation("inner_update", "torch") is registry.reference("inner_update")
    with pytest.raises(ValueError, match="op: unknown op 'nope'"):
        registry.implementation("nope", "torch")
    with pytest.raises(ValueError, match="has no 'triton' implementation"):
        registry.implementation("mlp_meta_step", "triton")
    assert registry.spec("bn_relu_maxpool_train_fwd", "cpp").devices == ("cpu",)


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
