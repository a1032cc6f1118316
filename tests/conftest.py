"""Shared fixtures."""

import os
import weakref

import pytest

import fastmaml.engine
from fastmaml.programs import fused, select

# the jobs and the bench that tests run in this process leave its allocator as it is (`--allocator retain` is
# process-wide and cannot be undone); tests/test_allocator.py runs the retaining path in subprocesses
os.environ.setdefault("FASTMAML_ALLOCATOR", "system")


def no_mlp_op(program, loss):
    return None, "test: the MLP op is off"


def _torch_func_only(model, layout, loss):
    raise fused.Unsupported("", "", "test: run every model on the torch.func program")


@pytest.fixture(params=["auto", "torch.func"])
def engine(request, monkeypatch):
    """Runs a test twice: with the engine meta_step picks (MLP op / fused / torch.func), and with
    the torch.func program forced for every model (no fused engine, no MLP op)."""
    if request.param == "torch.func":
        monkeypatch.setattr(select, "_CACHE", weakref.WeakKeyDictionary())
        monkeypatch.setattr(select.fused, "build", _torch_func_only)
        monkeypatch.setattr(fastmaml.engine, "mlp_plan", no_mlp_op)
    return request.param
