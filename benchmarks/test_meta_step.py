"""Time per meta-step of every (workload, implementation) through pytest-benchmark, with the
meta-gradient's error against the float64 autograd loop in `extra_info` (see conftest.py for options).
A fastmaml row whose gradient is WRONG (see `fastmaml.bench.verdicts.verdict`) fails."""

import pytest
import torch

from fastmaml.bench.measure import Runner, rel_err
from fastmaml.bench.suite import sensitivities
from fastmaml.bench.verdicts import verdict

_TRUTH = {}  # (workload, order) -> (float64 gradient, float32 autograd-loop error, the problem's sensitivity)


def _truth(workload, order, device):
    key = (workload.name, order)
    if key not in _TRUTH:
        from fastmaml.bench import impls

        loop = next(i for i in impls.implementations() if i.family == "autograd" and i.order == order)
        base, tasks = workload.make_model(), workload.make_tasks()
        exact = Runner(loop, base, workload, tasks, device, dtype=torch.float64)
        exact.step()
        single = Runner(loop, base, workload, tasks, device)
        single.step()
        draws = sensitivities(workload, base, tasks, device, {order: exact.flat_grad()})[order]
        _TRUTH[key] = (exact.flat_grad(), rel_err(single.flat_grad(), exact.flat_grad()), sum(draws) / len(draws))
    return _TRUTH[key]


def test_meta_step(benchmark, workload, impl, bench_device, request):
    ok, why = impl.available(bench_device)
    if not ok:
        pytest.skip(f"{impl.name} unavailable: {why}")
    runner = Runner(impl, workload.make_model(), workload, workload.make_tasks(), bench_device)
    runner.step()
    truth, ref, sens = _truth(workload, impl.order, bench_device)
    err = rel_err(runner.flat_grad(), truth)
    benchmark.extra_info.update(
        rel_err=err,
        autograd_fp32_err=ref,
        sensitivity=sens,
        verdict=verdict(err, ref, sensitivity=sens),
        workload=workload.description,
    )
    quick = request.config.getoption("--bench-quick")
    rounds = request.config.getoption("--bench-rounds") or (2 if quick else 5)
    benchmark.pedantic(runner.timed_step, rounds=rounds, warmup_rounds=0 if quick else 1, iterations=1)
    if impl.family == "fastmaml":
        assert verdict(err, ref, sensitivity=sens) != "WRONG", (
            f"{impl.name} on {workload.name}: error {err:.2e} vs autograd {ref:.2e}, sensitivity {sens:.2e}"
        )
