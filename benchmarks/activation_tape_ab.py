"""The activation tape of `order="second"` on and off, against the autograd loop, rows interleaved.

    python benchmarks/activation_tape_ab.py resnet12-84-K5 --rounds 3 --threads 1

One meta-step per row and round of the workload (`fastmaml bench` names): the per-task
`autograd.grad(create_graph=True)` loop of `fastmaml.bench.impls`, `fastmaml.meta_step` with
`schedule.ACTIVATION_TAPE_BYTES` at its default, and with it at 0 (no tape), both through one `MetaStep`
(the budget is read at every call). Prints each row's times, medians and speed-ups over the loop.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastmaml
from fastmaml import schedule
from fastmaml.bench.impls import implementations
from fastmaml.bench.workloads import workloads


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(workloads()))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: usable on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = workloads()[args.workload]
    model, batch = w.make_model(), w.make_tasks()
    tasks = tuple(batch)
    loop = next(i for i in implementations() if i.name == "autograd-loop").build(model, w, torch.device("cpu"))
    default = dict(schedule.ACTIVATION_TAPE_BYTES)

    # the meta-gradient only, as the loop computes (no query pass at θ)
    step = fastmaml.MetaStep(
        model, tasks, inner_lr=w.inner_lr, steps=w.steps, loss=w.loss, order="second", evaluate_before=False
    )

    def with_tape(tape: bool):
        def run():  # the budget is read at every call
            schedule.ACTIVATION_TAPE_BYTES.update(default if tape else {k: 0 for k in default})
            try:
                step(tasks)
            finally:
                schedule.ACTIVATION_TAPE_BYTES.update(default)

        return run

    rows = {"autograd loop": lambda: loop(tasks), "tape": with_tape(True), "no tape": with_tape(False)}
    for run in rows.values():  # warm-up
        run()
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["autograd loop"])
    print(f"{w.name}, {torch.get_num_threads()} thread(s), {args.rounds} rounds")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:14s} median {med:8.3f} s  {base / med:5.3f}x  [{', '.join(f'{t:.2f}' for t in ts)}]")


if __name__ == "__main__":
    main()
