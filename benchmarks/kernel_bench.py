"""Benchmark of the custom kernels inside one meta-step (speed only; correctness is in tests/).

Workloads (float32, synthetic tasks, fixed seeds):
    sinusoid-K1 / -K5   MLP 1-40-40-1, T=25 tasks, 10 support + 10 query points, MSE
    omniglot-K1         4-block conv net (64 filters, BatchNorm, ReLU, max-pool), 28×28×1, 5-way 1-shot,
                        15 query per class, T=32 (T=4 with --quick)
Methods: the per-task autograd loop (create_graph=True), `meta_step` with backend "torch" (the
reference ops; the baseline of the ratios), "cpp" and "triton" (step kernels), and the
whole-inner-loop MLP kernel (sinusoid only). Each method is timed round-robin; the median is kept.

    python benchmarks/kernel_bench.py --device cpu --quick --out /tmp/bench
writes `kernel_bench.json` and `kernel_bench.md` (a Markdown table naming the device) into --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

try:
    import fastmaml  # noqa: F401
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BASELINE = "meta_step torch"


def sinusoid(T: int, steps: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(T, 1, 1, generator=g) * 4.9 + 0.1
    phase = torch.rand(T, 1, 1, generator=g) * torch.pi
    xs = torch.rand(T, 20, 1, generator=g) * 10 - 5
    ys = amp * torch.sin(xs - phase)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    tasks = [t.to(device) for t in (xs[:, :10], ys[:, :10], xs[:, 10:], ys[:, 10:])]
    return dict(model=model.to(device), tasks=tasks, loss="mse", loss_fn=F.mse_loss, steps=steps, inner_lr=0.01)


def omniglot(T: int, steps: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ways, query = 5, 15
    torch.manual_seed(seed)
    layers, c = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(c, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2)]
        c = 64
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64, ways))
    sx = torch.randn(T, ways, 1, 28, 28, generator=g)
    qx = torch.randn(T, ways * query, 1, 28, 28, generator=g)
    sy = torch.arange(ways).expand(T, ways).clone()
    qy = torch.arange(ways).repeat_interleave(query).expand(T, ways * query).clone()
    tasks = [t.to(device) for t in (sx, sy, qx, qy)]
    return dict(model=model.to(device), tasks=tasks, loss="cross_entropy", loss_fn=F.cross_entropy, steps=steps,
                inner_lr=0.4)


def workloads(quick: bool, device) -> Dict[str, Callable[[], dict]]:
    return {
        "sinusoid-K1": lambda: sinusoid(25, 1, device),
        "sinusoid-K5": lambda: sinusoid(25, 5, device),
        "omniglot-K1": lambda: omniglot(4 if quick else 32, 1, device),
    }


def autograd_loop(w):
    """The textbook per-task loop with create_graph=True."""
    model, (sx, sy, qx, qy) = w["model"], w["tasks"]
    params = dict(model.named_parameters())
    T = sx.shape[0]
    model.zero_grad()
    total = 0.0
    for t in range(T):
        fast = dict(params)
        for _ in range(w["steps"]):
            loss = w["loss_fn"](torch.func.functional_call(model, fast, (sx[t],)), sy[t])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {n: p - w["inner_lr"] * g for (n, p), g in zip(fast.items(), grads)}
        q = w["loss_fn"](torch.func.functional_call(model, fast, (qx[t],)), qy[t]) / T
        q.backward()
        total += float(q.detach())
    return total


def methods(w, device) -> Dict[str, Optional[Callable[[], object]]]:
    import fastmaml
    from fastmaml.inner_lr import expand_inner_lr
    from fastmaml.layout import ParamLayout
    from fastmaml.losses import resolve_loss
    from fastmaml.ops import mlp_kernel, registry

    def meta(backend):
        ok = backend == "torch" or registry.availability(backend, device)[0]
        if not ok:
            return None
        return lambda: fastmaml.meta_step(w["model"], w["tasks"], inner_lr=w["inner_lr"], steps=w["steps"],
                                          loss=w["loss"], backend=backend, evaluate_before=False)

    out = {"autograd loop": lambda: autograd_loop(w), BASELINE: meta("torch"), "meta_step cpp": meta("cpp"),
           "meta_step triton": meta("triton") if device.type == "cuda" else None}
    layout = ParamLayout(w["model"])
    loss = resolve_loss(w["loss"])
    plan = mlp_kernel.mlp_plan(w["model"], layout, loss)
    if plan is not None and mlp_kernel.supports_device(plan, device)[0]:
        theta, _ = layout.theta()
        alphas = expand_inner_lr(w["inner_lr"], w["steps"], layout.adapted, like=theta.detach())
        out["mlp kernel"] = lambda: mlp_kernel.try_meta_step(w["model"], layout, loss, w["tasks"], alphas,
                                                             order="second", backend="cpp",
                                                             lr_grad=[False] * w["steps"])
    return out


def time_round_robin(fns: Dict[str, Callable], device, repeats: int, warmup: int = 2) -> Dict[str, float]:
    def once(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns.values():
        for _ in range(warmup):
            once(fn)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(once(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def markdown(results: dict) -> str:
    """The table: one row per workload and method, ratios against the baseline of the same run."""
    lines = [f"Device: {results['device']}; torch {results['torch']}; {results['note']}", "",
             f"| workload | method | median ms | speed-up vs {BASELINE} | speed-up vs autograd loop |",
             "|---|---|---:|---:|---:|"]
    for wname, rows in results["workloads"].items():
        base, loop = rows.get(BASELINE), rows.get("autograd loop")
        for method, sec in rows.items():
            if sec is None:
                lines.append(f"| {wname} | {method} | n/a | | |")
                continue
            r1 = f"{base / sec:.2f}×" if base else ""
            r2 = f"{loop / sec:.2f}×" if loop else ""
            lines.append(f"| {wname} | {method} | {sec * 1e3:.2f} | {r1} | {r2} |")
    return "\n".join(lines) + "\n"


def run(device: torch.device, quick: bool, repeats: int, only: Optional[List[str]] = None) -> dict:
    results = {"device": device_name(device), "torch": torch.__version__,
               "note": "median of round-robin runs, float32" + (", quick sizes" if quick else ""),
               "workloads": {}}
    for name, make in workloads(quick, device).items():
        if only and name not in only:
            continue
        w = make()
        fns = methods(w, device)
        timed = time_round_robin({k: f for k, f in fns.items() if f is not None}, device, repeats)
        results["workloads"][name] = {k: timed.get(k) for k in fns}
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in timed.items()), file=sys.stderr)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small task batches for the conv workload")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--only", nargs="*", help="workload names to run (default: all)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    results = run(torch.device(args.device), args.quick, args.repeats, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_bench.json").write_text(json.dumps(results, indent=2))
    (args.out / "kernel_bench.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
