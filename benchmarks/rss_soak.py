"""Process memory (RSS) over many meta-steps: does anything grow step after step? (issue 14)

Workloads (CPU, second order, one inner step, each meta-step followed by an Adam step):
    sinusoid     the sinusoid MLP 1-40-40-1 (nn.Sequential), T=25 tasks, 10 support / 10 query, MSE; 5000 steps
    conv4        fastmaml.models.conv4(1, 5, hidden=32, image_size=28), 5-way 1-shot, 15 query per class,
                 T=4, cross-entropy; 500 steps
    conv4-class  the same network written as a class with its own forward (features, view, classifier):
                 not an nn.Sequential, so meta_step may take another program for it; 500 steps
each in two modes:
    same         one model (and optimizer) for every step, as a training run
    fresh        a new model and optimizer every step, as hyperparameter sweeps do (anything cached per
                 model must go with the model)

RSS is read from /proc/self/status (VmRSS; VmHWM is the peak) after `gc.collect()`, every N/20 steps,
each case in a fresh interpreter (`--in-process`: all in this one). The table gives the RSS after the
first sample interval (caches warm), at the end, and the growth in between per 1000 steps; the JSON
(--out) has every sample.

    python benchmarks/rss_soak.py --out /tmp/rss_soak.json                  # full length: ~15-20 min on 2 cores
    python benchmarks/rss_soak.py --steps-scale 0.02 --out /tmp/rss.json    # a quick check
    python benchmarks/rss_soak.py --workloads conv4-class --modes fresh     # one case

Run it on a quiet machine; the ms/step column is only indicative.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

try:
    import fastmaml
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import fastmaml

import fastmaml.models

MODES = ("same", "fresh")


def rss_mb() -> Tuple[float, Optional[float]]:
    """(current RSS, peak RSS) in MiB; without /proc, the peak from getrusage for both."""
    try:
        fields = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024  # kB
        return fields["VmRSS"], fields.get("VmHWM")
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        return peak, peak


def sinusoid_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def conv4_sequential() -> nn.Module:
    return fastmaml.models.conv4(1, 5, hidden=32, image_size=28)


class Net(nn.Module):
    """conv4 written as a class: 4 × [Conv 3×3 → BatchNorm → ReLU → MaxPool 2], view, Linear."""

    def __init__(self, in_channels: int = 1, num_classes: int = 5, hidden: int = 32):
        super().__init__()
        blocks = []
        for i in range(4):
            blocks += [
                nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1),
                nn.BatchNorm2d(hidden),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(hidden, num_classes)  # 28 → 14 → 7 → 3 → 1

    def forward(self, x):
        x = self.features(x)
        x = x.view(x.size(0), -1)
        return self.classifier(x)


def sinusoid_batches(count: int, T: int = 25, shots: int = 10, queries: int = 10) -> List[tuple]:
    """`count` batches of sinusoid tasks (amplitude 0.1–5, phase 0–π, x in [-5, 5])."""
    out = []
    for _ in range(count):
        amp = torch.empty(T, 1, 1).uniform_(0.1, 5.0)
        phase = torch.empty(T, 1, 1).uniform_(0, torch.pi)
        sx = torch.empty(T, shots, 1).uniform_(-5, 5)
        qx = torch.empty(T, queries, 1).uniform_(-5, 5)
        out.append((sx, amp * torch.sin(sx - phase), qx, amp * torch.sin(qx - phase)))
    return out


def fewshot_batches(
    count: int, T: int = 4, ways: int = 5, shots: int = 1, queries: int = 15, size: int = 28
) -> List[tuple]:
    """`count` batches of random N-way K-shot image tasks (labels 0..ways-1, class-major)."""
    out = []
    for _ in range(count):
        sx = torch.randn(T, ways * shots, 1, size, size)
        qx = torch.randn(T, ways * queries, 1, size, size)
        sy = torch.arange(ways).repeat_interleave(shots).expand(T, -1).contiguous()
        qy = torch.arange(ways).repeat_interleave(queries).expand(T, -1).contiguous()
        out.append((sx, sy, qx, qy))
    return out


# name: (model factory, batches factory, loss, full-length steps)
WORKLOADS: Dict[str, Tuple[Callable[[], nn.Module], Callable[[int], List[tuple]], str, int]] = {
    "sinusoid": (sinusoid_mlp, sinusoid_batches, "mse", 5000),
    "conv4": (conv4_sequential, fewshot_batches, "cross_entropy", 500),
    "conv4-class": (Net, fewshot_batches, "cross_entropy", 500),
}


def soak(workload: str, mode: str, steps: int, backend: str, pool: int = 4) -> dict:
    make_model, make_batches, loss, _ = WORKLOADS[workload]
    torch.manual_seed(0)
    batches = make_batches(pool)
    every = max(1, steps // 20)
    model = optimizer = None
    samples: List[dict] = []

    def sample(step: int) -> None:
        gc.collect()
        rss, peak = rss_mb()
        samples.append(
            {
                "step": step,
                "rss_mb": round(rss, 2),
                "peak_mb": None if peak is None else round(peak, 2),
                "seconds": round(time.perf_counter() - start, 3),
            }
        )

    start = time.perf_counter()
    sample(0)
    for step in range(1, steps + 1):
        if model is None or mode == "fresh":
            model = make_model()
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        optimizer.zero_grad(set_to_none=True)
        fastmaml.meta_step(model, batches[step % pool], inner_lr=0.01, steps=1, loss=loss, backend=backend)
        optimizer.step()
        if step % every == 0 or step == steps:
            sample(step)
    model = optimizer = None
    gc.collect()

    # growth after the first interval (the first steps fill caches, the allocator's pools, the extension)
    warm = samples[1] if len(samples) > 2 else samples[0]
    last = samples[-1]
    span = max(1, last["step"] - warm["step"])
    growth = last["rss_mb"] - warm["rss_mb"]
    return {
        "workload": workload,
        "mode": mode,
        "steps": steps,
        "sample_every": every,
        "rss_start_mb": samples[0]["rss_mb"],
        "rss_warm_mb": warm["rss_mb"],
        "rss_end_mb": last["rss_mb"],
        "peak_mb": last["peak_mb"],
        "growth_mb": round(growth, 2),
        "growth_mb_per_1000_steps": round(growth * 1000 / span, 2),
        "seconds_first_interval": warm["seconds"],
        "seconds_per_step": round((last["seconds"] - warm["seconds"]) / span, 5)
        if last is not warm
        else round(last["seconds"] / max(1, steps), 5),
        "samples": samples,
    }


def table(results: List[dict]) -> str:
    head = (
        f"{'workload':12s} {'mode':5s} {'steps':>6s} {'start':>8s} {'warm':>8s} {'end':>8s} {'peak':>8s} "
        f"{'growth':>8s} {'/1k steps':>10s} {'ms/step':>8s}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
        lines.append(
            f"{r['workload']:12s} {r['mode']:5s} {r['steps']:6d} {r['rss_start_mb']:8.1f} "
            f"{r['rss_warm_mb']:8.1f} {r['rss_end_mb']:8.1f} {peak:>8s} {r['growth_mb']:+8.2f} "
            f"{r['growth_mb_per_1000_steps']:+10.2f} {1000 * r['seconds_per_step']:8.2f}"
        )
    lines.append(
        "(MiB of RSS after gc.collect(); warm: after the first of 20 intervals; growth: end − warm; "
        "ms/step: after warm)"
    )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        help="multiply every workload's steps (e.g. 0.02 for a quick check; default 1)",
    )
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--backend", default="auto", help="meta_step's backend (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the results (with every sample) as JSON")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every case in this process (default: each in a fresh interpreter, so that one "
        "case's memory does not count in the next one's)",
    )
    parser.add_argument("--case", nargs=3, metavar=("WORKLOAD", "MODE", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps_scale <= 0:
        parser.error("--steps-scale must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:  # (the child of a run without --in-process)
        workload, mode, steps = args.case
        print("RESULT " + json.dumps(soak(workload, mode, int(steps), args.backend)))
        return 0

    from fastmaml.ops import registry

    results = []
    for workload in args.workloads:
        for mode in args.modes:
            steps = max(1, round(WORKLOADS[workload][3] * args.steps_scale))
            print(f"{workload} / {mode}: {steps} steps ...", file=sys.stderr, flush=True)
            if args.in_process:
                results.append(soak(workload, mode, steps, args.backend))
                continue
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--case",
                workload,
                mode,
                str(steps),
                "--backend",
                args.backend,
            ] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{workload} / {mode} failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            results.append(json.loads(lines[-1][len("RESULT ") :]))
    print(table(results))

    cpp_ok, cpp_why = registry.availability("cpp", torch.device("cpu"))
    report = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastmaml": getattr(fastmaml, "__version__", "?"),
        "threads": torch.get_num_threads(),
        "backend": args.backend,
        "cpp_extension": {"available": cpp_ok, "why": cpp_why},
        "steps_scale": args.steps_scale,
        "results": results,
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
