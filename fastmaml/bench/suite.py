"""Runs the benchmark: for each workload, the true meta-gradient (autograd loop in float64), then
every implementation's gradient error, time per meta-step and peak memory; writes the report.

    fastmaml bench [--quick] [--out DIR] [--workloads ...] [--impls ...] [--device cpu|cuda]

Sweep workloads (sweep28-K*) measure peak memory only, for fastmaml and the autograd loop.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import flops, impls, memory, report, workloads
from .measure import Runner, rel_err, summarize, time_round_robin

WRONG_FACTOR = 10.0  # an exact row this many times worse than the float32 autograd loop ...
WRONG_FLOOR = 1e-4  # ... and above this relative error is wrong
MORE_ACCURATE_FACTOR = 2.0  # a row this many times better than the float32 autograd loop says so


def machine_info(device: torch.device) -> Dict:
    """CPU model, cores, versions, load average, and the GPU name on CUDA."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "load_average_start": os.getloadavg()[0]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def verdict(err: float, ref: float) -> str:
    """"WRONG" for an error >10× the float32 autograd loop's and >1e-4; "more accurate" when ≥2× lower."""
    if err > WRONG_FACTOR * ref and err > WRONG_FLOOR:
        return "WRONG"
    if err * MORE_ACCURATE_FACTOR <= ref:
        return "more accurate"
    return ""


def _truths(w: workloads.Workload, base, tasks, device, orders) -> Dict[str, torch.Tensor]:
    """The true meta-gradient per order: the autograd loop in float64 on the same weights and data."""
    by_order = {i.order: i for i in impls.implementations() if i.family == "autograd"}
    out = {}
    for order in orders:
        r = Runner(by_order[order], base, w, tasks, device, dtype=torch.float64)
        r.step()
        out[order] = r.flat_grad()
    return out


def run_workload(w: workloads.Workload, chosen: List[impls.Impl], *, device: torch.device, quick: bool,
                 warmup: int, repeats: int, budget_s: Optional[float],
                 measure_memory: Union[bool, Sequence[str]], log=print) -> List[Dict]:
    """All rows of one workload."""
    base, tasks = w.make_model(), w.make_tasks()
    if w.sweep:
        chosen = [i for i in chosen if i.family in ("fastmaml", "autograd")]
    rows: Dict[str, Dict] = {}
    runners: Dict[str, Runner] = {}
    for impl in chosen:
        row = {"workload": w.name, "impl": impl.name, "family": impl.family, "order": impl.order,
               "mode": impl.mode, "status": "ok", "reason": ""}
        rows[impl.name] = row
        ok, why = impl.available(device)
        if not ok:
            row.update(status="unavailable", reason=why)
            continue
        row["info"] = why
        if w.sweep:
            continue
        try:
            runner = Runner(impl, base, w, tasks, device)
            runner.step()
            row["grad"] = runner.flat_grad()
            runners[impl.name] = runner
        except Exception as e:  # a row that cannot run is reported with the reason
            row.update(status="failed", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    if runners:
        truths = _truths(w, base, tasks, device, sorted({rows[n]["order"] for n in runners}))
        times, errors = time_round_robin(runners, warmup=warmup, repeats=repeats, budget_s=budget_s)
        for name in runners:
            row = rows[name]
            if name in errors:
                row.pop("grad")
                row.update(status="failed", reason=errors[name])
                continue
            row["rel_err"] = rel_err(row.pop("grad"), truths[row["order"]])
            row.update(summarize(times[name]))
            row["flops"] = flops.meta_step_flops(w, row["order"])
            row["flops_per_s"] = row["flops"] / row["median_s"]
        del runners
    _compare(rows)
    if measure_memory:
        for name, row in rows.items():
            if row["status"] != "ok" or (measure_memory is not True and name not in measure_memory):
                continue
            log(f"  memory {w.name} {name}")
            row.update(memory.measure_in_subprocess(w.name, name, quick=quick, device=str(device)))
    return list(rows.values())


def _compare(rows: Dict[str, Dict]) -> None:
    """Adds the float32 autograd loop's error, the verdict and the speed-up vs the autograd loop of
    the same order (no speed-up for a WRONG row)."""
    baseline = {r["order"]: r for r in rows.values() if r["family"] == "autograd" and "median_s" in r}
    for row in rows.values():
        ref = baseline.get(row["order"])
        if "median_s" not in row or ref is None:
            continue
        row["ref_err"] = ref["rel_err"]
        row["verdict"] = "" if row is ref else verdict(row["rel_err"], ref["rel_err"])
        row["baseline"] = ref["impl"]
        row["speedup"] = None if row["verdict"] == "WRONG" else ref["median_s"] / row["median_s"]


def run_suite(*, out: Path, quick: bool = False, workload_names: Optional[List[str]] = None,
              impl_names: Optional[List[str]] = None, device: str = "cpu", warmup: Optional[int] = None,
              repeats: Optional[int] = None, budget_s: Optional[float] = None,
              measure_memory: Union[bool, Sequence[str]] = True, plots: bool = True, log=print) -> Dict:
    """Runs the suite and writes results.md, results.json and the PNG plots into `out`; returns the
    results dict. measure_memory: True (every row), False, or the implementation names to measure."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} requested but torch.cuda.is_available() is False")
    chosen_w = workloads.select(workload_names, quick)
    chosen_i = impls.select(impl_names)
    warmup = (0 if quick else 1) if warmup is None else warmup
    repeats = (2 if quick else 5) if repeats is None else repeats
    budget_s = (None if quick else 120.0) if budget_s is None else budget_s
    info = machine_info(dev)
    log(f"fastmaml bench on {info['cpu']} ({info['cores']} cores), torch {info['torch']}, device {dev}")
    info["matmul"] = flops.matmul_rate(dev)
    start = time.time()
    results = {"machine": info, "quick": quick, "settings": {"warmup": warmup, "repeats": repeats,
                                                             "budget_s": budget_s},
               "workloads": {}, "rows": []}
    for w in chosen_w:
        log(f"workload {w.name}: {w.description}")
        rows = run_workload(w, chosen_i, device=dev, quick=quick, warmup=warmup, repeats=repeats,
                            budget_s=budget_s, measure_memory=measure_memory, log=log)
        for row in rows:
            if "flops_per_s" in row:
                row["matmul_fraction"] = row["flops_per_s"] / info["matmul"]["flops_per_s"]
        results["rows"] += rows
        results["workloads"][w.name] = {
            "description": w.description, "tasks": w.tasks, "steps": w.steps, "sweep": w.sweep,
            "flops_second": flops.meta_step_flops(w, "second"), "flops_first": flops.meta_step_flops(w, "first")}
        info["load_average_end"] = os.getloadavg()[0]
        info["wall_s"] = time.time() - start
        report.write(results, Path(out), plots=plots)  # after every workload: an interrupted run keeps its rows
    log(f"wrote {Path(out) / 'results.md'} ({info['wall_s']:.0f} s)")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="CI-sized variant: fewer tasks, fewer repeats")
    parser.add_argument("--out", default="bench_results", help="results folder (default: bench_results)")
    parser.add_argument("--workloads", nargs="+", metavar="NAME",
                        help="workloads or name prefixes (default: all): " + ", ".join(workloads.workloads()))
    parser.add_argument("--impls", nargs="+", metavar="NAME",
                        help="implementations or name prefixes (default: all; the autograd loop always runs): "
                             + ", ".join(i.name for i in impls.implementations()))
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, help="timed meta-steps per row (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, help="untimed meta-steps per row after the gradient check "
                                                   "(default 1, quick 0)")
    parser.add_argument("--budget", type=float, help="seconds of timing per workload before stopping early "
                                                     "(default 120; at least 2 repeats)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")


def run(args) -> int:
    run_suite(out=Path(args.out), quick=args.quick, workload_names=args.workloads, impl_names=args.impls,
              device=args.device, warmup=args.warmup, repeats=args.repeats, budget_s=args.budget,
              measure_memory=not args.no_memory)
    return 0
