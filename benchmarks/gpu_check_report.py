"""Writes `gpu_check.md` from what benchmarks/gpu_check.sh left in its output folder:
env.txt (device and versions), build.rc + build.log (the extension build), junit-*.xml (pytest
results per test group) and kernel_bench.json (benchmarks/kernel_bench.py). Missing pieces are
reported as missing, never invented.

    python benchmarks/gpu_check_report.py --out $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List

try:
    from kernel_bench import markdown as bench_markdown
except ModuleNotFoundError:  # imported as a module from elsewhere
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernel_bench import markdown as bench_markdown


def junit_summary(path: Path) -> Dict:
    """Counts and the failing test ids of one pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: List[str] = []
    skipped: List[str] = []
    for suite in suites:
        for case in suite.iter("testcase"):
            counts["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None:
                counts["failures"] += 1
                failed.append(name)
            elif case.find("error") is not None:
                counts["errors"] += 1
                failed.append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
                reason = case.find("skipped").get("message", "")
                skipped.append(f"{name}: {reason}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"counts": counts, "failed": failed, "skipped": skipped}


def report(out: Path) -> str:
    lines = ["# GPU check", ""]
    env = out / "env.txt"
    lines += ["## Machine", "", "```", env.read_text().strip() if env.exists() else "env.txt missing", "```", ""]
    rc_file = out / "build.rc"
    rc = rc_file.read_text().strip() if rc_file.exists() else "missing"
    lines += ["## Extension build", "", f"extension build exit status: {rc}" + (" (ok)" if rc == "0" else ""), ""]
    if rc != "0" and (out / "build.log").exists():
        tail = (out / "build.log").read_text().strip().splitlines()[-30:]
        lines += ["```", *tail, "```", ""]
    lines += ["## Tests", "", "| group | passed | failed | errors | skipped |", "|---|---:|---:|---:|---:|"]
    details: List[str] = []
    groups = sorted(out.glob("junit-*.xml"))
    for xml in groups:
        group = xml.stem[len("junit-"):]
        try:
            s = junit_summary(xml)
        except ET.ParseError as exc:
            lines.append(f"| {group} | unreadable junit file: {exc} | | | |")
            continue
        c = s["counts"]
        lines.append(f"| {group} | {c['passed']} | {c['failures']} | {c['errors']} | {c['skipped']} |")
        details += [f"- FAILED {group}: {name}" for name in s["failed"]]
        details += [f"- skipped {group}: {name}" for name in s["skipped"]]
    if not groups:
        lines.append("| (no junit files: the tests did not run) | | | | |")
    lines += [""] + details + ([""] if details else [])
    bench = out / "kernel_bench.json"
    lines += ["## Benchmark", ""]
    lines += [bench_markdown(json.loads(bench.read_text())) if bench.exists() else "kernel_bench.json missing"]
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
