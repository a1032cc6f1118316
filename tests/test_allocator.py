"""`fastmaml.retain_freed_memory` and the `--allocator` options of the jobs and the bench: freed memory reused
without page faults (in a subprocess: the setting is process-wide and cannot be undone), the option checked,
applied by a job, and named in the bench's report."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastmaml import allocator
from fastmaml.bench import report, suite
from fastmaml.cli import main

GLIBC = allocator.glibc_version() is not None

# 40 MB blocks: above glibc's largest automatic mmap threshold (32 MiB), so with its defaults each one is mapped
# afresh and every page faults in; retained, the heap's pages are used again
_REUSE = """
import json, resource, sys, torch
import fastmaml
from fastmaml import allocator

def faults(n):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(10_000_000).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / n

faults(1)
before, policy_before = faults(4), allocator.describe()
first = fastmaml.retain_freed_memory()
faults(3)  # the heap grows (glibc takes the first two blocks from fresh heap pages)
after = faults(4)
json.dump(dict(before=before, after=after, first=first, again=fastmaml.retain_freed_memory(),
               policy_before=policy_before, policy_after=allocator.describe()), sys.stdout)
"""


@pytest.mark.skipif(not GLIBC, reason="retain_freed_memory acts on glibc only (elsewhere it returns False)")
def test_freed_memory_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", _REUSE], env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["first"] is True and r["again"] is True
    assert r["before"] >= 10, r  # fresh pages for every block (4 KiB pages: ~9800 per block)
    assert r["after"] * 10 <= r["before"], r
    assert r["policy_before"].endswith("its default thresholds"), r
    assert "freed memory retained" in r["policy_after"], r


@pytest.mark.skipif(GLIBC, reason="another C library: retain_freed_memory changes nothing there")
def test_other_c_libraries_are_left_alone():
    assert allocator.retain_freed_memory() is False
    assert allocator.describe().startswith("not glibc")


def test_allocator_option_is_checked(capsys, monkeypatch):
    assert allocator.allocator_option("retain") == "retain"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--allocator", "jemalloc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --allocator: expected one of retain, system, got 'jemalloc'" in err
    monkeypatch.setenv(allocator.ENV, "never")  # a bad default from the environment is named the same way
    with pytest.raises(SystemExit):
        main(["train", "sinusoid", "--iterations", "0"])
    assert "$FASTMAML_ALLOCATOR" in capsys.readouterr().err
    with pytest.raises(ValueError, match="allocator: expected one of retain, system"):
        allocator.apply_allocator("never")


@pytest.mark.parametrize("choice, calls", [("retain", 1), ("system", 0)])
def test_job_applies_its_allocator(tmp_path, monkeypatch, choice, calls):
    called = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: called.append(1) or True)
    args = ["train", "sinusoid", "--out", str(tmp_path), "--iterations", "1", "--meta-batch", "2"]
    assert main([*args, "--eval-tasks", "2", "--eval-query", "4", "--quiet", "--allocator", choice]) == 0
    assert len(called) == calls


def test_bench_report_names_the_allocator(monkeypatch):
    info = suite.machine_info(torch.device("cpu"))
    assert info["allocator"] == allocator.describe()
    monkeypatch.setattr(allocator, "_retained", True)
    info = suite.machine_info(torch.device("cpu"))
    info.update(matmul={"n": 8, "flops_per_s": 1e9}, load_average_end=0.0, wall_s=1.0)
    line = next(x for x in report.markdown(_results(info)).splitlines() if x.startswith("- memory allocator: "))
    assert line == f"- memory allocator: {allocator.describe()}" + (
        f"; environment: {', '.join(f'{k}={v}' for k, v in info['allocator_env'].items())}"
        if info["allocator_env"]
        else ""
    )
    if GLIBC:
        assert "freed memory retained" in line


def _results(info):
    settings = dict(repeats=1, warmup=0, budget_s=None, sensitivity_draws=0, quick=True)
    return {"machine": info, "quick": True, "settings": settings, "rows": [], "workloads": {}}
