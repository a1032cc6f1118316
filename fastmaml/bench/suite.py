"""Runs the benchmark: for each workload, the true meta-gradient (autograd loop in float64) and the
problem's sensitivity (how far that float64 meta-gradient moves under relative weight noise of 1e-6),
then every implementation's gradient error, time per meta-step and peak memory; writes the report.

A row's error is judged against the problem's own conditioning and against the other implementations:
a row whose error is more than 3× both the worst autograd-based row's (the float32 autograd loop,
torch.func, learn2learn, higher, TorchOpt: PyTorch's own double backward) and the sensitivity is
marked WRONG, and gets no speed-up. On an ill-conditioned problem (ReLU and max-pool decisions within
float32 rounding of a tie) every float32 implementation may land far from float64; what float32
rounding does there is what the sensitivity measures. The sensitivity gets the same factor 3 as the
autograd-based rows: the noise may land on the far side of a near-tie just as a float32 run does,
and then a row's error equals the sensitivity up to its own rounding, on either side of it
(benchmarks/RESULTS.md, "Issue 13").

    fastmaml bench [--quick] [--out DIR] [--workloads ...] [--impls ...] [--device cpu|cuda]

Sweep workloads (sweep28-K*) measure peak memory only, for fastmaml and the autograd loop.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..allocator import ENV, allocator_option, apply_allocator, default_allocator
from ..allocator import describe as describe_allocator
from . import flops, impls, memory, report, workloads
from .measure import Runner, rel_err, summarize, time_round_robin
from .verdicts import OUTLIER_FACTOR, SENSITIVITY_FACTOR, tolerance, verdict

SENSITIVITY_NOISE = 1e-6  # the sensitivity: how far the float64 meta-gradient moves under this relative weight noise
SENSITIVITY_DRAWS = 2  # noise draws averaged (quick: 1)
SENSITIVITY_SEED = 1000  # draw d uses torch.Generator().manual_seed(SENSITIVITY_SEED + d)


# the environment that changes how the process allocates memory (glibc's tunables, a preloaded allocator):
# on the CPU, how often large tensors land on freshly mapped pages changes every row's time
# (benchmarks/RESULTS.md)
ALLOCATOR_ENV = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
    "LD_PRELOAD",
)


def machine_info(device: torch.device) -> Dict:
    """CPU model, cores, versions, load average, the allocator's environment, and the GPU name on CUDA."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "load_average_start": os.getloadavg()[0],
        "allocator": describe_allocator(),
        "allocator_env": {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ},
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _truth(w: workloads.Workload, model, tasks, device, order: str) -> torch.Tensor:
    """The true meta-gradient of `order`: the autograd loop in float64 on `model`'s weights and the data."""
    loop = next(i for i in impls.implementations() if i.family == "autograd" and i.order == order and not i.precision)
    r = Runner(loop, model, w, tasks, device, dtype=torch.float64)
    r.step()
    return r.flat_grad()


def _truths(w: workloads.Workload, base, tasks, device, orders) -> Dict[str, torch.Tensor]:
    """The true meta-gradient per order."""
    return {order: _truth(w, base, tasks, device, order) for order in orders}


def perturbed(base, noise: float, seed: int):
    """A float64 copy of `base` with every parameter entry multiplied by (1 + noise · n), n ~ N(0, 1)
    drawn on the CPU from torch.Generator().manual_seed(seed)."""
    model = copy.deepcopy(base).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.device))
    return model


def sensitivities(
    w: workloads.Workload,
    base,
    tasks,
    device,
    truths: Dict[str, torch.Tensor],
    draws: int = SENSITIVITY_DRAWS,
    noise: Optional[float] = None,
) -> Dict[str, List[float]]:
    """Per order, ‖g*(θ ⊙ (1 + noise·n)) − g*(θ)‖/‖g*(θ)‖ for each of `draws` noise draws, in float64
    (noise None: SENSITIVITY_NOISE): how far the problem itself moves under a relative perturbation of
    its weights. Float32 rounding perturbs every activation by ~1e-7 relative and more; an
    implementation whose error stays below this is as good as the problem lets float32 be."""
    noise = SENSITIVITY_NOISE if noise is None else noise
    out = {order: [] for order in truths}
    for d in range(draws):
        model = perturbed(base, noise, SENSITIVITY_SEED + d)
        for order, truth in truths.items():
            out[order].append(rel_err(_truth(w, model, tasks, device, order), truth))
    return out


def run_workload(
    w: workloads.Workload,
    chosen: List[impls.Impl],
    *,
    device: torch.device,
    quick: bool,
    warmup: int,
    repeats: int,
    budget_s: Optional[float],
    measure_memory: Union[bool, Sequence[str]],
    sensitivity_draws: int = SENSITIVITY_DRAWS,
    log=print,
    stats: Optional[Dict] = None,
) -> List[Dict]:
    """All rows of one workload; `stats` (a dict), when given, receives the sensitivity draws per order."""
    base, tasks = w.make_model(), w.make_tasks()
    if w.sweep:
        chosen = [i for i in chosen if i.family in ("fastmaml", "autograd")]
    rows: Dict[str, Dict] = {}
    runners: Dict[str, Runner] = {}
    for impl in chosen:
        row = {
            "workload": w.name,
            "impl": impl.name,
            "family": impl.family,
            "order": impl.order,
            "precision": impl.precision,
            "mode": impl.mode,
            "status": "ok",
            "reason": "",
        }
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
        sens = {}
        if sensitivity_draws > 0:
            log(f"  sensitivity {w.name}: {sensitivity_draws} draw(s) of relative weight noise {SENSITIVITY_NOISE:g}")
            draws = sensitivities(w, base, tasks, device, truths, sensitivity_draws)
            sens = {order: sum(v) / len(v) for order, v in draws.items()}
            if stats is not None:
                stats["sensitivity_draws"] = draws
        times, errors = time_round_robin(runners, warmup=warmup, repeats=repeats, budget_s=budget_s)
        for name in runners:
            row = rows[name]
            if name in errors:
                row.pop("grad")
                row.update(status="failed", reason=errors[name])
                continue
            row["rel_err"] = rel_err(row.pop("grad"), truths[row["order"]])
            if row["order"] in sens:
                row["sensitivity"] = sens[row["order"]]
            row.update(summarize(times[name]))
            if runners[name].page_faults:
                row["page_faults"] = int(statistics.median(runners[name].page_faults))
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
    """Adds the autograd loop's error, the worst autograd-based row's error (same order and precision
    policy), the tolerance, the verdict and the speed-up vs the autograd loop of the same order and policy
    (no speed-up for a WRONG row)."""

    def kind(r):
        return r["order"], r.get("precision", "")

    baseline = {kind(r): r for r in rows.values() if r["family"] == "autograd" and "median_s" in r}
    worst: Dict[tuple, Dict] = {}
    for r in rows.values():
        if r["family"] in impls.AUTOGRAD_BASED and "median_s" in r:
            if kind(r) not in worst or r["rel_err"] > worst[kind(r)]["rel_err"]:
                worst[kind(r)] = r
    for row in rows.values():
        ref = baseline.get(kind(row))
        if "median_s" not in row or ref is None:
            continue
        row["ref_err"] = ref["rel_err"]
        row["worst_autograd"] = worst[kind(row)]["impl"]
        row["worst_autograd_err"] = worst[kind(row)]["rel_err"]
        row["tolerance"] = tolerance(row["worst_autograd_err"], row.get("sensitivity"))
        row["verdict"] = (
            ""
            if row is ref
            else verdict(row["rel_err"], ref["rel_err"], row["worst_autograd_err"], row.get("sensitivity"))
        )
        row["baseline"] = ref["impl"]
        row["speedup"] = None if row["verdict"] == "WRONG" else ref["median_s"] / row["median_s"]


def run_suite(
    *,
    out: Path,
    quick: bool = False,
    workload_names: Optional[List[str]] = None,
    impl_names: Optional[List[str]] = None,
    device: str = "cpu",
    warmup: Optional[int] = None,
    repeats: Optional[int] = None,
    budget_s: Optional[float] = None,
    measure_memory: Union[bool, Sequence[str]] = True,
    plots: bool = True,
    sensitivity_draws: Optional[int] = None,
    log=print,
) -> Dict:
    """Runs the suite and writes results.md, results.json and the PNG plots into `out`; returns the
    results dict. measure_memory: True (every row), False, or the implementation names to measure;
    sensitivity_draws: noise draws of the sensitivity (default SENSITIVITY_DRAWS, quick 1; 0: not
    measured, rows are judged against the autograd-based rows alone)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {device!r} requested but torch.cuda.is_available() is False")
    chosen_w = workloads.select(workload_names, quick)
    chosen_i = impls.select(impl_names)
    warmup = (0 if quick else 1) if warmup is None else warmup
    repeats = (2 if quick else 5) if repeats is None else repeats
    budget_s = (None if quick else 120.0) if budget_s is None else budget_s
    sensitivity_draws = (1 if quick else SENSITIVITY_DRAWS) if sensitivity_draws is None else sensitivity_draws
    info = machine_info(dev)
    log(f"fastmaml bench on {info['cpu']} ({info['cores']} cores), torch {info['torch']}, device {dev}")
    info["matmul"] = flops.matmul_rate(dev)
    peaks = flops.card_peaks(info.get("gpu", ""))
    if peaks is not None:
        info["peaks"] = dict(peaks, source=flops.PEAKS_SOURCE)
    start = time.time()
    results = {
        "machine": info,
        "quick": quick,
        "settings": {
            "warmup": warmup,
            "repeats": repeats,
            "budget_s": budget_s,
            "sensitivity_draws": sensitivity_draws,
            "sensitivity_noise": SENSITIVITY_NOISE,
            "sensitivity_factor": SENSITIVITY_FACTOR,
            "outlier_factor": OUTLIER_FACTOR,
        },
        "workloads": {},
        "rows": [],
    }
    for w in chosen_w:
        log(f"workload {w.name}: {w.description}")
        stats: Dict = {}
        rows = run_workload(
            w,
            chosen_i,
            device=dev,
            quick=quick,
            warmup=warmup,
            repeats=repeats,
            budget_s=budget_s,
            measure_memory=measure_memory,
            sensitivity_draws=sensitivity_draws,
            log=log,
            stats=stats,
        )
        for row in rows:
            if "flops_per_s" in row:
                row["matmul_fraction"] = row["flops_per_s"] / info["matmul"]["flops_per_s"]
                if peaks is not None:
                    row["fp32_peak_fraction"] = row["flops_per_s"] / peaks["fp32"]
                    row["tf32_peak_fraction"] = row["flops_per_s"] / peaks["tf32"]
        results["rows"] += rows
        results["workloads"][w.name] = {
            "description": w.description,
            "tasks": w.tasks,
            "steps": w.steps,
            "sweep": w.sweep,
            "flops_second": flops.meta_step_flops(w, "second"),
            "flops_first": flops.meta_step_flops(w, "first"),
            **stats,
        }
        info["load_average_end"] = os.getloadavg()[0]
        info["wall_s"] = time.time() - start
        report.write(results, Path(out), plots=plots)  # after every workload: an interrupted run keeps its rows
    log(f"wrote {Path(out) / 'results.md'} ({info['wall_s']:.0f} s)")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="CI-sized variant: fewer tasks, fewer repeats")
    parser.add_argument("--out", default="bench_results", help="results folder (default: bench_results)")
    parser.add_argument(
        "--workloads",
        nargs="+",
        metavar="NAME",
        help="workloads or name prefixes (default: all): " + ", ".join(workloads.workloads()),
    )
    parser.add_argument(
        "--impls",
        nargs="+",
        metavar="NAME",
        help="implementations or name prefixes (default: all; the autograd loop always runs): "
        + ", ".join(i.name for i in impls.implementations()),
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, help="timed meta-steps per row (default 5, quick 2)")
    parser.add_argument(
        "--warmup", type=int, help="untimed meta-steps per row after the gradient check (default 1, quick 0)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds of timing per workload before stopping early (default 120; at least 2 repeats)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--allocator",
        type=allocator_option,
        metavar="{retain,system}",
        default=default_allocator(),
        help="retain: keep freed CPU memory in the process, so no row's time depends on how often its tensors "
        "land on freshly mapped pages (fastmaml.retain_freed_memory); system: the C library's defaults "
        f"(default: ${ENV}, else retain)",
    )
    parser.add_argument(
        "--sensitivity-draws",
        type=int,
        metavar="N",
        help=f"noise draws of the sensitivity, each one more float64 meta-gradient per order "
        f"(default {SENSITIVITY_DRAWS}, quick 1; 0: not measured)",
    )


def run(args) -> int:
    apply_allocator(args.allocator)
    run_suite(
        out=Path(args.out),
        quick=args.quick,
        workload_names=args.workloads,
        impl_names=args.impls,
        device=args.device,
        warmup=args.warmup,
        repeats=args.repeats,
        budget_s=args.budget,
        measure_memory=not args.no_memory,
        sensitivity_draws=args.sensitivity_draws,
    )
    return 0
