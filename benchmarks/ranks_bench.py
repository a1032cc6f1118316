"""Meta-steps per second on 1 and on several CPU ranks (torchrun, gloo): what data parallelism over the
tasks of a meta-batch buys on one machine.

Each configuration is R ranks × t torch threads: by default, on a 2-core machine, 1 rank of 2 threads
against 2 ranks of 1 thread (the same cores). A step is what a data-parallel training step does on every
rank: `shard` of a fixed meta-batch, `fastmaml.meta_step` on the share, `all_reduce_grads` weighted by task
count (skipped with one rank, as the training jobs do), Adam. Task sampling is left out (it is the same
work in both). Workloads:

    sinusoid   MLP 1-40-40-1, T=25 tasks (13 + 12 on 2 ranks), 10 + 10 points, K=1, exact second order
    conv       conv4-64, 28×28, 5-way 1-shot, 15 queries per class, T=32 tasks, K=1, exact second order
               (the Omniglot preset of `fastmaml train omniglot`)

The 1-rank configurations run as one plain process; the others under
`python -m torch.distributed.run --standalone --nproc_per_node R` (this script's --worker mode). Each
reports the mean step time after --warmup steps, over --steps steps, and the part of it rank 0 spent in
the all-reduce. The full run (a quiet machine, ~10 minutes on 2 cores):

    .venv/bin/python benchmarks/ranks_bench.py --out benchmarks/results/ranks

writes ranks.json and ranks.md into --out and prints the table. A quick smoke run:
`--steps 3 --warmup 1`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

REPO = Path(__file__).resolve().parent.parent
try:
    import fastmaml
except ModuleNotFoundError:  # run from a source checkout without installing
    sys.path.insert(0, str(REPO))
    import fastmaml

# workload: (default steps, default warmup)
STEPS = {"sinusoid": (300, 20), "conv": (12, 2)}


def sinusoid_workload():
    from fastmaml.train.sinusoid import SinusoidSampler, sinusoid_mlp

    torch.manual_seed(0)
    tasks = SinusoidSampler(1).sample(25, 10, 10)
    return sinusoid_mlp(), tasks, dict(inner_lr=0.01, steps=1, order="second", loss="mse")


def conv_workload():
    from fastmaml.models import conv4

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    T, ways, shots, query = 32, 5, 1, 15
    labels = torch.arange(ways)
    tasks = fastmaml.TaskBatch(
        torch.rand(T, ways * shots, 1, 28, 28, generator=g),
        labels.repeat_interleave(shots).expand(T, -1).contiguous(),
        torch.rand(T, ways * query, 1, 28, 28, generator=g),
        labels.repeat_interleave(query).expand(T, -1).contiguous(),
    )
    return (
        conv4(1, ways, hidden=64, image_size=28),
        tasks,
        dict(inner_lr=0.4, steps=1, order="second", loss="cross_entropy"),
    )


WORKLOADS = {"sinusoid": sinusoid_workload, "conv": conv_workload}


def worker(args) -> None:
    """One rank of one configuration: times --steps data-parallel meta-steps; rank 0 writes --json."""
    import torch.distributed as dist

    from fastmaml.distributed import all_reduce_grads, shard, task_count

    torch.set_num_threads(args.threads)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    model, tasks, kwargs = WORKLOADS[args.workload]()
    mine = shard(tasks, rank, world) if world > 1 else tasks
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    reducing = [0.0]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        result = fastmaml.meta_step(model, mine, **kwargs)
        if world > 1:
            t0 = time.perf_counter()
            all_reduce_grads(model, num_tasks=task_count(mine), values=[result.meta_loss])
            reducing[0] += time.perf_counter() - t0
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if launched:
        dist.barrier()
    reducing[0] = 0.0
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    if launched:
        dist.barrier()
    seconds = time.perf_counter() - started
    if rank == 0:
        Path(args.json).write_text(
            json.dumps(
                {
                    "workload": args.workload,
                    "ranks": world,
                    "threads": args.threads,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "tasks": tasks.num_tasks,
                    "tasks_per_rank": mine.num_tasks,
                    "seconds": seconds,
                    "steps_per_second": args.steps / seconds,
                    "allreduce_fraction": reducing[0] / seconds,
                }
            )
        )
    if launched:
        dist.destroy_process_group()
        gc.collect()  # frees the gloo process group now, not during interpreter shutdown (which can abort)


def run_config(workload: str, ranks: int, threads: int, steps: int, warmup: int) -> Dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker_args = [
            str(Path(__file__).resolve()),
            "--worker",
            "--workload",
            workload,
            "--threads",
            str(threads),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--json",
            str(out),
        ]
        if ranks == 1:
            command = [sys.executable, *worker_args]
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(ranks),
                *worker_args,
            ]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        env["OMP_NUM_THREADS"] = str(threads)
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise SystemExit(f"{workload}, {ranks} ranks x {threads} threads failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def table(rows: List[Dict], configs) -> str:
    head = ["workload"] + [f"{r} rank{'s' if r > 1 else ''} × {t} thread{'s' if t > 1 else ''}" for r, t in configs]
    lines = ["| " + " | ".join(head + [f"speed-up of {head[-1]}"]) + " |", "|" + "---|" * (len(head) + 1)]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        cells, rates = [], []
        for r, t in configs:
            row = next(x for x in rows if x["workload"] == workload and x["ranks"] == r and x["threads"] == t)
            rates.append(row["steps_per_second"])
            extra = f" (all-reduce {100 * row['allreduce_fraction']:.1f}%)" if r > 1 else ""
            cells.append(f"{row['steps_per_second']:.3g} steps/s{extra}")
        lines.append("| " + " | ".join([workload, *cells, f"{rates[-1] / rates[0]:.2f}×"]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="meta-steps per second on 1 and several CPU ranks")
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["1x2", "2x1"],
        metavar="RANKSxTHREADS",
        help="configurations, ranks x threads per rank (default: 1x2 2x1)",
    )
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: sinusoid 300, conv 12)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 20, 2)")
    parser.add_argument("--out", type=Path, default=None, help="folder for ranks.json and ranks.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workload", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.configs]
    rows = []
    for workload in args.workloads:
        steps, warmup = STEPS[workload]
        steps = args.steps if args.steps is not None else steps
        warmup = args.warmup if args.warmup is not None else warmup
        for ranks, threads in configs:
            row = run_config(workload, ranks, threads, steps, warmup)
            print(
                f"{workload}: {ranks} rank(s) x {threads} thread(s): {row['steps_per_second']:.3g} steps/s "
                f"({row['steps']} steps, {row['tasks_per_rank']} of {row['tasks']} tasks on rank 0, all-reduce "
                f"{100 * row['allreduce_fraction']:.1f}%)",
                flush=True,
            )
            rows.append(row)
    text = table(rows, configs)
    print("\n" + text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "rows": rows}
        (args.out / "ranks.json").write_text(json.dumps(meta, indent=2))
        (args.out / "ranks.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
