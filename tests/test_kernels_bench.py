"""The CPU-runnable pieces of benchmarks/gpu_check.sh: the script parses, the kernel benchmark runs
and writes its table, and the report writer summarizes junit files, the build and the benchmark."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_check_report  # noqa: E402
import kernel_bench  # noqa: E402


def test_gpu_check_script_parses():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_gpu_check_script_lints():
    proc = subprocess.run(["shellcheck", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_kernel_bench_writes_table(tmp_path):
    assert kernel_bench.main(["--device", "cpu", "--repeats", "1", "--only", "sinusoid-K1",
                              "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "kernel_bench.json").read_text())
    rows = results["workloads"]["sinusoid-K1"]
    assert rows[kernel_bench.BASELINE] > 0 and rows["meta_step cpp"] > 0 and rows["mlp kernel"] > 0
    assert rows["meta_step triton"] is None  # not run on CPU
    table = (tmp_path / "kernel_bench.md").read_text()
    assert "| sinusoid-K1 | meta_step torch |" in table and "1.00×" in table and "CPU" in table


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_a" name="test_ok"/>
<testcase classname="tests.test_a" name="test_bad"><failure message="boom">trace</failure></testcase>
<testcase classname="tests.test_a" name="test_skip"><skipped message="no nvcc"/></testcase>
<testcase classname="tests.test_a" name="test_ok2"/>
</testsuite></testsuites>"""


def test_report_summarizes_everything(tmp_path):
    (tmp_path / "env.txt").write_text("NVIDIA H100 80GB HBM3, 550.0, 81559 MiB\n")
    (tmp_path / "build.rc").write_text("0\n")
    (tmp_path / "junit-step_kernels.xml").write_text(JUNIT)
    results = {"device": "NVIDIA H100", "torch": "2.11", "note": "n",
               "workloads": {"sinusoid-K1": {"autograd loop": 0.2, "meta_step torch": 0.02, "mlp kernel": 0.001,
                                             "meta_step triton": None}}}
    (tmp_path / "kernel_bench.json").write_text(json.dumps(results))
    assert gpu_check_report.main(["--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "exit status: 0 (ok)" in md
    assert "| step_kernels | 2 | 1 | 0 | 1 |" in md
    assert "FAILED step_kernels: tests.test_a::test_bad" in md and "no nvcc" in md
    assert "| sinusoid-K1 | mlp kernel | 1.00 | 20.00× | 200.00× |" in md
    assert "| sinusoid-K1 | meta_step triton | n/a | | |" in md


def test_report_says_what_is_missing(tmp_path):
    (tmp_path / "build.rc").write_text("1\n")
    (tmp_path / "build.log").write_text("nvcc fatal: something\n")
    md = gpu_check_report.report(tmp_path)
    assert "env.txt missing" in md and "exit status: 1" in md and "nvcc fatal" in md
    assert "no junit files" in md and "kernel_bench.json missing" in md
