"""Writes `gpu_check.md` from what benchmarks/gpu_check.sh left in its work folder:
env.txt (device and versions), steps.txt (exit status and seconds of each step), build.log,
junit-*.xml (pytest results, summarized per test file), op_bench.md, op_bench_learned_lr.md,
conv_batching.md, conv_triton.md, layout.log (benchmarks/conv_layout.py's tables),
suite/results.md and precision/results.md (`fastmaml bench`) and crash/ (benchmarks/crash_check.sh). Missing pieces are
reported as missing, never invented.

    python benchmarks/gpu_check_report.py --out $WORK
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path
from typing import Dict, List


def junit_summary(path: Path) -> Dict[str, Dict]:
    """Per test file (the module of each case's classname): counts, failing and skipped test ids."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    files: Dict[str, Dict] = defaultdict(
        lambda: {"passed": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skipped_ids": []}
    )
    for suite in suites:
        for case in suite.iter("testcase"):
            module = case.get("classname", "").split(".")
            module = ".".join(module[:2]) if module[:1] == ["tests"] else ".".join(module[:1])
            s = files[module or "(no file name: the run was interrupted)"]
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None:
                s["failures"] += 1
                s["failed"].append(name)
            elif case.find("error") is not None:
                s["errors"] += 1
                s["failed"].append(name)
            elif case.find("skipped") is not None:
                s["skipped"] += 1
                s["skipped_ids"].append(f"{name}: {case.find('skipped').get('message', '')}")
            else:
                s["passed"] += 1
    return dict(files)


def _section(title: str, path: Path, what: str) -> List[str]:
    body = path.read_text().strip() if path.exists() else f"{path.name} missing: {what} did not finish"
    return [f"## {title}", "", body, ""]


def _code(path: Path, head: int = 0) -> List[str]:
    if not path.exists():
        return [f"{path.name} missing", ""]
    text = path.read_text().strip().splitlines()
    return ["```", *(text[:head] if head else text), "```", ""]


def report(out: Path) -> str:
    lines = ["# GPU check", "", "## Machine", ""] + _code(out / "env.txt")
    lines += ["## Steps", ""] + _code(out / "steps.txt")
    steps = out / "steps.txt"
    if steps.exists() and "build exit 0 " not in steps.read_text() and (out / "build.log").exists():
        lines += ["Build log (end):", "", "```", *(out / "build.log").read_text().strip().splitlines()[-30:], "```", ""]
    lines += ["## Tests", "", "| test file | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|"]
    details: List[str] = []
    groups = sorted(out.glob("junit-*.xml"))
    for xml in groups:
        try:
            files = junit_summary(xml)
        except ET.ParseError as exc:
            lines.append(f"| {xml.name}: unreadable junit file: {exc} | | | | |")
            continue
        for module, s in sorted(files.items()):
            lines.append(f"| {module} | {s['passed']} | {s['failures']} | {s['errors']} | {s['skipped']} |")
            details += [f"- FAILED {name}" for name in s["failed"]]
            details += [f"- skipped {name}" for name in s["skipped_ids"]]
    if not groups:
        lines.append("| (no junit files: the tests did not run) | | | | |")
    lines += [""] + details + ([""] if details else [])
    lines += _section("Ops: every backend on the arguments of real meta-steps", out / "op_bench.md", "the op bench")
    lines += _section("Ops with a learned inner learning rate", out / "op_bench_learned_lr.md", "the op bench")
    lines += _section("Convolution batching", out / "conv_batching.md", "the conv batching bench")
    lines += _section(
        "Triton task-batched convolutions against grouped cuDNN", out / "conv_triton.md", "the Triton conv bench"
    )
    lines += _section("Benchmark suite (fastmaml bench)", out / "suite" / "results.md", "the suite")
    lines += _section("Precision policies (fastmaml bench)", out / "precision" / "results.md", "the precision rows")
    lines += _section("Memory formats: NCHW against channels-last", out / "layout.log", "the layout bench")
    lines += ["## C++ argument checks (crash check)", ""] + _code(out / "crash" / "repro.txt")
    lines += _code(out / "crash" / "facts.txt", head=20)
    if (out / "crash" / "gdb.txt").exists():
        gdb = [ln for ln in (out / "crash" / "gdb.txt").read_text().splitlines() if ln.startswith("#")]
        lines += ["cuda-gdb backtrace:", "", "```", *gdb[:40], "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    text = report(args.out)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
