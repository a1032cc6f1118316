"""The CPU-runnable pieces of benchmarks/gpu_check.sh: the scripts parse, the op and convolution
benchmarks run and write their tables, and the report writer summarizes what the steps left."""

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _script(name: str):
    """benchmarks/<name>.py as a module (loaded from its path: benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


conv_batching = _script("conv_batching")
conv_layout = _script("conv_layout")
gpu_check_report = _script("gpu_check_report")
op_bench = _script("op_bench")

SCRIPTS = ["gpu_check.sh", "crash_check.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(BENCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_lint(script):
    proc = subprocess.run(["shellcheck", str(BENCH / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_conv_layout_times_both_formats(capsys):
    """Part 2 of benchmarks/conv_layout.py on a quick workload: a row per workload, FORMAT left as it was."""
    from fastmaml.programs.fused import memory_format

    before = dict(memory_format.FORMAT)
    conv_layout.main(["--no-layers", "--quick", "--step-repeats", "1", "--workloads", "conv28-1shot-K1"])
    assert memory_format.FORMAT == before
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| conv28-1shot-K1 |")]
    assert len(row) == 1 and row[0].endswith("× |")


def test_op_bench_compares_every_backend(tmp_path):
    assert (
        op_bench.main(
            ["--device", "cpu", "--quick", "--repeats", "1", "--workloads", "sinusoid-K1", "--out", str(tmp_path)]
        )
        == 0
    )
    rows = json.loads((tmp_path / "op_bench.json").read_text())["rows"]
    ops = {r["op"] for r in rows}
    assert {"inner_update", "adjoint_update", "linear_fwd", "linear_bwd", "mse_grad"} <= ops
    assert not [r for r in rows if "failed" in r]
    assert all(r["error"] < 1e-5 and r["index_mismatch"] == 0 for r in rows)  # against the float32 reference
    assert {r["backend"] for r in rows if r["op"] == "linear_fwd"} == {"torch", "triton"}
    assert sum(r["auto"] for r in rows if r["op"] == "inner_update" and r["args"] == rows[0]["args"]) <= 1
    table = (tmp_path / "op_bench.md").read_text()
    assert "| sinusoid-K1 | linear_fwd |" in table and "1.00×" in table


def test_op_bench_flags_a_wrong_kernel():
    ref = [torch.ones(3), torch.arange(4)]
    assert op_bench.discrepancy([torch.ones(3), torch.arange(4)], ref) == (0.0, 0.0)
    assert op_bench.discrepancy([torch.tensor([1.0, 1.0, 1.5]), torch.arange(4)], ref) == (0.5, 0.0)
    assert op_bench.discrepancy([torch.ones(3), torch.tensor([0, 2, 1, 3])], ref) == (0.0, 0.5)
    assert op_bench.discrepancy([torch.tensor([1.0, float("nan"), 1.0]), torch.arange(4)], ref)[0] == float("inf")
    assert op_bench.discrepancy([torch.ones(3)], ref)[0] == float("inf")


def test_op_bench_learned_rate_reaches_the_alpha_gradient(tmp_path):
    assert (
        op_bench.main(
            [
                "--device",
                "cpu",
                "--quick",
                "--repeats",
                "1",
                "--workloads",
                "sinusoid-K1",
                "--learned-lr",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    rows = json.loads((tmp_path / "op_bench_learned_lr.json").read_text())["rows"]
    assert any(r["op"] == "adjoint_update" and r["args"].endswith("True") for r in rows)
    assert all(r["error"] < 1e-5 and r["index_mismatch"] == 0 for r in rows)


def test_conv_batching_strategies_agree(tmp_path):
    x = torch.randn(3, 2, 4, 7, 7)
    w, b, gy = torch.randn(3, 5, 4, 3, 3), torch.randn(3, 5), torch.randn(3, 2, 5, 7, 7)
    outs = {s: conv_batching.layer_pass(s, x, w, b, gy)() for s in ("loop", "grouped", "unfold")}
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = torch.stack([torch.nn.functional.conv2d(xr[t], wr[t], br[t], padding=1) for t in range(3)])
    gx, gw, gb = torch.autograd.grad(y, (xr, wr, br), gy)
    for s in ("loop", "grouped"):
        torch.testing.assert_close(outs[s], gx)
    for got, want in zip(outs["unfold"], (gx, gw, gb)):
        torch.testing.assert_close(got, want)
    y_unfold, _ = conv_batching.unfold_forward(x, w, b)
    torch.testing.assert_close(y_unfold, y.detach())


def test_conv_batching_writes_tables(tmp_path):
    assert (
        conv_batching.main(
            [
                "--device",
                "cpu",
                "--tasks",
                "1",
                "--repeats",
                "1",
                "--quick",
                "--workloads",
                "conv28-1shot-K1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "conv_batching.json").read_text())
    assert len(results["layers"]) == 24 and all(r["error"] < 1e-5 for r in results["layers"])
    table = (tmp_path / "conv_batching.md").read_text()
    assert "| conv28 | 1 | 5 | 1→64 | 28×28 | 3920 |" in table and "| conv28-1shot-K1 |" in table


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_a" name="test_ok"/>
<testcase classname="tests.test_a" name="test_bad"><failure message="boom">trace</failure></testcase>
<testcase classname="tests.test_a" name="test_skip"><skipped message="no nvcc"/></testcase>
<testcase classname="tests.test_a" name="test_ok2"/>
</testsuite></testsuites>"""


def test_report_summarizes_everything(tmp_path):
    (tmp_path / "env.txt").write_text("NVIDIA H100 80GB HBM3, 550.0, 81559 MiB\n")
    (tmp_path / "steps.txt").write_text("build exit 0 after 50 s (limit 200s)\nops exit 0 after 9 s (limit 80s)\n")
    (tmp_path / "junit-tests.xml").write_text(JUNIT)
    row = "| sinusoid-K1 | linear_fwd | `1x10x1` | triton | | 5.0 | 2.00× | 1.0e-07 | 0 |\n"
    (tmp_path / "op_bench.md").write_text(row)
    (tmp_path / "suite").mkdir()
    (tmp_path / "suite" / "results.md").write_text("| sinusoid K=1 | autograd loop | 1.00× |\n")
    (tmp_path / "crash").mkdir()
    (tmp_path / "crash" / "repro.txt").write_text("repro on cuda: exit 139\n")
    (tmp_path / "crash" / "gdb.txt").write_text("noise\n#0  0x1 in c10::Error::what() from libc10.so\n")
    assert gpu_check_report.main(["--out", str(tmp_path)]) == 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "build exit 0" in md and "Build log" not in md
    assert "| tests.test_a | 2 | 1 | 0 | 1 |" in md
    assert "FAILED tests.test_a::test_bad" in md and "no nvcc" in md
    assert "| sinusoid-K1 | linear_fwd |" in md and "| sinusoid K=1 | autograd loop |" in md
    assert "exit 139" in md and "#0  0x1 in c10::Error::what()" in md and "noise" not in md
    assert "conv_batching.md missing: the conv batching bench did not finish" in md


def test_report_says_what_is_missing(tmp_path):
    (tmp_path / "steps.txt").write_text("build exit 1 after 5 s (limit 200s)\n")
    (tmp_path / "build.log").write_text("nvcc fatal: something\n")
    md = gpu_check_report.report(tmp_path)
    assert "env.txt missing" in md and "build exit 1" in md and "nvcc fatal" in md
    assert "no junit files" in md and "op_bench.md missing" in md and "repro.txt missing" in md


def _gpu_check_commands():
    """benchmarks/gpu_check.sh's `step` lines, continuation lines joined, each split into words."""
    import shlex

    text = (BENCH / "gpu_check.sh").read_text().replace("\\\n", " ")
    return [shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("step ")]


def _option_values(words, option):
    if option not in words:
        return []
    rest = words[words.index(option) + 1 :]
    return rest[: next((i for i, w in enumerate(rest) if w.startswith("--")), len(rest))]


def test_gpu_check_names_real_tests_workloads_and_rows():
    """A typo in gpu_check.sh would cost a scarce GPU session: every test file and deselected test it names
    exists, and every --workloads / --impls list selects real workloads and rows."""
    from fastmaml.bench import impls, workloads

    commands = _gpu_check_commands()
    names = [c[0] for c in commands]
    assert {"build", "tests", "suite", "precision"} <= set(names), names
    root = BENCH.parent
    for words in commands:
        for w in words:
            path = w.split("::")[0]
            if path.startswith("tests/"):
                assert (root / path).is_file(), (words[0], w)
                if "::" in w:
                    assert f"def {w.split('::')[1]}(" in (root / path).read_text(), (words[0], w)
        wl = _option_values(words, "--workloads")
        if wl:
            assert len(workloads.select(wl)) >= len(wl), (words[0], wl)
        rows = _option_values(words, "--impls")
        if rows:
            impls.select(rows)  # raises on an unknown row
    suite = commands[names.index("suite")]
    rows = {i.name for i in impls.select(_option_values(suite, "--impls"))}
    assert {"fastmaml[auto,second]", "fastmaml-graph[auto,second]", "torch.func-vmap", "autograd-loop"} <= rows
    assert {"conv28-1shot-K1", "conv28-1shot-K5", "resnet12w-84-K5", "sinusoid-K5"} <= set(
        _option_values(suite, "--workloads")
    )
    assert names.index("suite") < names.index("ops")  # the issues' rows before the diagnostic benches
