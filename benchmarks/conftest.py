"""pytest-benchmark options for the meta-step suite (the same workloads and implementations as
`fastmaml bench`):

    pytest benchmarks/ --benchmark-only                      # full-size workloads
    pytest benchmarks/ --benchmark-only --bench-quick        # the CI-sized variant
    pytest benchmarks/ --benchmark-only --bench-workloads conv28 --bench-impls fastmaml
"""

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("fastmaml bench")
    group.addoption("--bench-quick", action="store_true", help="CI-sized workloads (fewer tasks)")
    group.addoption("--bench-workloads", nargs="+", default=None, help="workload names or prefixes")
    group.addoption("--bench-impls", nargs="+", default=None, help="implementation names or prefixes")
    group.addoption("--bench-device", default="cpu", help="cpu or cuda")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per case (default 5, quick 2)")


def pytest_generate_tests(metafunc):
    if {"workload", "impl"} <= set(metafunc.fixturenames):
        from fastmaml.bench import impls, workloads

        cfg = metafunc.config
        ws = [
            w
            for w in workloads.select(cfg.getoption("--bench-workloads"), cfg.getoption("--bench-quick"))
            if not w.sweep
        ]
        chosen = impls.select(cfg.getoption("--bench-impls"))
        metafunc.parametrize("workload", ws, ids=[w.name for w in ws], scope="module")
        metafunc.parametrize("impl", chosen, ids=[i.name for i in chosen])


@pytest.fixture(scope="session")
def bench_device(request):
    import torch

    return torch.device(request.config.getoption("--bench-device"))
