"""`fastmaml train sinusoid`: MAML on the sinusoid regression family of Finn et al. 2017, beside a
baseline pretrained on all tasks jointly (the MAML paper's comparison).

Tasks: y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]. Model: MLP 1-40-40-1 with ReLU.
Each meta-iteration draws `--meta-batch` tasks with `--shots` support and `--shots` query points,
takes one `fastmaml.meta_step` and one Adam step. The baseline sees the same amount of data per
iteration (the same number of tasks and points, pooled) and is trained by plain regression.
Evaluation: a fixed held-out set of tasks (seed `EVAL_SEED`, independent of `--seed`), query MSE
before adaptation and after k steps of SGD at `--inner-lr` on the support points, for both models.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Dict, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
from fastmaml import distributed
from fastmaml.train import common

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
EVAL_SEED = 2017
FIGURE = "sinusoid.png"
LEARNING_CURVE = "learning_curve.png"
# options that define the training trajectory: a resumed run must use the same values
TRAJECTORY_OPTIONS = ("steps", "order", "inner_lr", "meta_lr", "meta_batch", "shots", "seed")


def sinusoid(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """y = A·sin(x − φ) for x `[T, N, 1]`, amplitude and phase `[T]` -> `[T, N, 1]`."""
    return amplitude.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1))


def stream_seed(seed: int, stream: int) -> int:
    """An independent 63-bit seed for random stream `stream` of run seed `seed`."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class SinusoidSampler:
    """Draws sinusoid tasks from its own seeded CPU `torch.Generator` (device-independent streams).

    The generator's state is what a checkpoint saves (`state_dict` / `load_state_dict`).
    """

    def __init__(self, seed: int, dtype: torch.dtype = torch.float32):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def _uniform(self, shape, low: float, high: float) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, dtype=self.dtype) * (high - low) + low

    def task_params(self, num_tasks: int):
        """(amplitude `[T]`, phase `[T]`)."""
        return self._uniform((num_tasks,), *AMPLITUDE), self._uniform((num_tasks,), *PHASE)

    def inputs(self, num_tasks: int, num_points: int) -> torch.Tensor:
        """x `[T, N, 1]` uniform on `X_RANGE`."""
        return self._uniform((num_tasks, num_points, 1), *X_RANGE)

    def sample_with_params(self, num_tasks: int, support: int, query: int):
        """(TaskBatch with `[T, support, 1]` / `[T, query, 1]` tensors, amplitude `[T]`, phase `[T]`)."""
        for name, value, low in (("num_tasks", num_tasks, 1), ("support", support, 1), ("query", query, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
        amplitude, phase = self.task_params(num_tasks)
        sx, qx = self.inputs(num_tasks, support), self.inputs(num_tasks, query)
        batch = fastmaml.TaskBatch(sx, sinusoid(sx, amplitude, phase), qx, sinusoid(qx, amplitude, phase))
        return batch, amplitude, phase

    def sample(self, num_tasks: int, support: int, query: int) -> fastmaml.TaskBatch:
        """A meta-batch: support `[T, support, 1]`, query `[T, query, 1]`."""
        return self.sample_with_params(num_tasks, support, query)[0]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


def sinusoid_mlp() -> nn.Sequential:
    """The MAML paper's regressor: `[*, 1] -> [*, 1]`, 1-40-40-1 with ReLU."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


class EvalSet(NamedTuple):
    batch: fastmaml.TaskBatch  # support `[T, shots, 1]`, query `[T, eval_query, 1]`
    amplitude: torch.Tensor  # [T]
    phase: torch.Tensor  # [T]


def eval_set(num_tasks: int, shots: int, query: int, seed: int = EVAL_SEED) -> EvalSet:
    """The fixed held-out tasks: the same for every run with the same sizes."""
    return EvalSet(*SinusoidSampler(seed).sample_with_params(num_tasks, shots, query))


def per_task_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`[T, N, 1]`, `[T, N, 1]` -> `[T]`."""
    return ((pred - target) ** 2).flatten(1).mean(1)


@torch.no_grad()
def adapted_predictions(model: nn.Module, support_x, support_y, x, *, inner_lr: float, steps: int):
    """The model after `steps` SGD steps on each task's support set, evaluated at x `[T, N, 1]`."""
    if steps == 0:
        return model(x)
    adapted = fastmaml.adapt(model, support_x, support_y, inner_lr=inner_lr, steps=steps, order="first",
                             loss="mse")
    return adapted(x)


def evaluate(model: nn.Module, tasks: EvalSet, *, inner_lr: float, eval_steps: Sequence[int],
             progress=None) -> Dict[str, list]:
    """{"after_k": per-task query MSE `[T]` as a list} for each k in eval_steps ("before" for k=0).
    progress: a `common.Progress` advanced by one per k (it may raise `common.Interrupted`)."""
    sx, sy, qx, qy = tasks.batch
    out = {}
    for k in sorted({0, *eval_steps}):
        pred = adapted_predictions(model, sx, sy, qx, inner_lr=inner_lr, steps=k)
        out[_step_key(k)] = per_task_mse(pred, qy).tolist()
        if progress is not None:
            progress.update(1)
    return out


def _step_key(k: int) -> str:
    return "before" if k == 0 else f"after_{k}"


def summarize(per_task: Dict[str, list]) -> Dict[str, Dict[str, float]]:
    """{"after_k": {"mean", "ci95"}} from per-task values (`common.mean_ci95`)."""
    table = {}
    for key, values in per_task.items():
        mean, half = common.mean_ci95(values)
        table[key] = {"mean": mean, "ci95": half}
    return table


def format_table(table: Dict[str, Dict[str, Dict[str, float]]], eval_steps: Sequence[int]) -> str:
    """The eval table as text: one row per model, "mean ± 95% CI" per column."""
    steps = sorted({0, *eval_steps})
    headers = ["before" if k == 0 else f"after {k} step" + ("s" if k > 1 else "") for k in steps]
    lines = ["model       " + "".join(f"{h:>20s}" for h in headers)]
    for name, row in table.items():
        cells = "".join(f"{row[_step_key(k)]['mean']:>11.3f} ± {row[_step_key(k)]['ci95']:<6.3f}" for k in steps)
        lines.append(f"{name:12s}{cells}")
    return "\n".join(lines)


def plot_tasks(path: Path, models: Dict[str, nn.Module], tasks: EvalSet, *, inner_lr: float,
               eval_steps: Sequence[int], num_tasks: int = 3) -> None:
    """The MAML paper's sinusoid figure: one row per model, one column per held-out task; true curve,
    support points, and the prediction before adaptation and after each k in eval_steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(num_tasks, tasks.batch.num_tasks)
    sx, sy = tasks.batch.support_x[:n], tasks.batch.support_y[:n]
    device = sx.device
    grid = torch.linspace(*X_RANGE, 200, dtype=sx.dtype).view(1, -1, 1).expand(n, -1, -1).contiguous()
    truth = sinusoid(grid, tasks.amplitude[:n].cpu(), tasks.phase[:n].cpu())
    steps = sorted({0, *eval_steps})
    fig, axes = plt.subplots(len(models), n, figsize=(4.2 * n, 3.2 * len(models)), squeeze=False, dpi=110)
    for row, (name, model) in enumerate(models.items()):
        preds = {k: adapted_predictions(model, sx, sy, grid.to(device), inner_lr=inner_lr, steps=k).cpu()
                 for k in steps}
        for col in range(n):
            ax = axes[row][col]
            ax.plot(grid[col, :, 0], truth[col, :, 0], color="tab:red", lw=2, label="ground truth")
            for i, k in enumerate(steps):
                label = "pre-update" if k == 0 else f"{k} grad step" + ("s" if k > 1 else "")
                ax.plot(grid[col, :, 0], preds[k][col, :, 0], ls=":" if k == 0 else "--",
                        color=plt.cm.Greens(0.4 + 0.6 * i / max(1, len(steps) - 1)), lw=1.8, label=label)
            ax.scatter(sx[col, :, 0].cpu(), sy[col, :, 0].cpu(), marker="^", color="tab:purple", s=40, zorder=3,
                       label="used for grad")
            ax.set_xlim(*X_RANGE)
            ax.set_title(f"{name}, task {col + 1}")
            if col == 0:
                ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        common.save_figure(fig, path)
    finally:
        plt.close(fig)


def _at_least_two(text: str) -> int:
    value = common.positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 tasks (for a confidence interval), got {text!r}")
    return value


# every job's options (common.SHARED_OPTIONS) with this job's defaults
DEFAULTS = dict(iterations=10000, steps=1, order="second", inner_lr=0.01, meta_lr=1e-3, meta_batch=25, shots=10,
                # a checkpoint is a few kB: every 1000 of the default 10,000 iterations costs nothing
                checkpoint_every=1000, threads=1)


def add_arguments(parser: argparse.ArgumentParser, job: str = "sinusoid") -> None:
    common.add_shared_arguments(parser, job, DEFAULTS, helps={
        "shots": "support points per task (K); training also uses K query points",
        "seed": "model initialization and task stream",
        "threads": "torch CPU threads while the job runs (the 1-40-40-1 MLP is too small to gain from more)",
    })
    parser = parser.add_argument_group("options of sinusoid")
    d = " (default: %(default)s)"
    parser.add_argument("--eval-tasks", type=_at_least_two, default=600,
                        help=f"held-out tasks (fixed seed {EVAL_SEED}) for the final evaluation, at least 2" + d)
    parser.add_argument("--eval-query", type=common.positive_int, default=100,
                        help="query points per held-out task" + d)
    parser.add_argument("--eval-steps", type=common.nonnegative_int, nargs="+", default=[1, 10],
                        help="inner steps at which the held-out query MSE is reported" + d)


def _config(args) -> dict:
    return {
        "iterations": args.iterations, "steps": args.steps, "order": args.order, "inner_lr": args.inner_lr,
        "meta_lr": args.meta_lr, "meta_batch": args.meta_batch, "shots": args.shots, "seed": args.seed,
        "eval_tasks": args.eval_tasks, "eval_query": args.eval_query, "eval_steps": list(args.eval_steps),
        "eval_seed": EVAL_SEED, "checkpoint_every": args.checkpoint_every, "device": str(args.device),
        "threads": args.threads,
        "model": "MLP 1-40-40-1 ReLU", "baseline": "same MLP, Adam on pooled points of meta_batch tasks",
    }


def new_state(args, device) -> common.TrainingState:
    """The state at iteration 0: both networks (same initialization), their optimizers, the two task
    streams and empty per-iteration histories."""
    common.seed_everything(args.seed)
    model = sinusoid_mlp().to(device)
    baseline = copy.deepcopy(model)
    return common.TrainingState(
        _config(args), run_keys=TRAJECTORY_OPTIONS,
        parts={"model": model, "optimizer": torch.optim.Adam(model.parameters(), lr=args.meta_lr),
               "baseline": baseline, "baseline_optimizer": torch.optim.Adam(baseline.parameters(), lr=args.meta_lr),
               "sampler": SinusoidSampler(stream_seed(args.seed, 0)),
               "baseline_sampler": SinusoidSampler(stream_seed(args.seed, 1))},
        values={"history": {"meta_loss": [], "query_loss_before": [], "baseline_loss": []}})


def _train_iteration(state: common.TrainingState, args, device) -> None:
    batch = state.sampler.sample(args.meta_batch, args.shots, args.shots).to(device)
    state.optimizer.zero_grad(set_to_none=True)
    result = fastmaml.meta_step(state.model, batch, inner_lr=args.inner_lr, steps=args.steps, order=args.order,
                                loss="mse")
    state.optimizer.step()

    pooled = state.baseline_sampler.sample(args.meta_batch, args.shots, args.shots).to(device)
    x = torch.cat([pooled.support_x, pooled.query_x], 1).reshape(-1, 1)
    y = torch.cat([pooled.support_y, pooled.query_y], 1).reshape(-1, 1)
    state.baseline_optimizer.zero_grad(set_to_none=True)
    baseline_loss = F.mse_loss(state.baseline(x), y)
    baseline_loss.backward()
    state.baseline_optimizer.step()

    state.iteration += 1
    state.history["meta_loss"].append(float(result.meta_loss))
    state.history["query_loss_before"].append(float(result.query_loss_before.mean()))
    state.history["baseline_loss"].append(float(baseline_loss.detach()))


def _train_iteration_ranks(state: common.TrainingState, args, device, job: common.Job) -> None:
    """One meta-iteration on this rank's share of the meta-batch (under torchrun): every rank draws the
    whole meta-batch from the same task stream and keeps its share; the meta-gradient, the baseline's
    gradient, the logged losses and the stop flag are combined in one all-reduce weighted by task count,
    so every rank takes the same Adam steps as one process would (up to float rounding)."""
    rank, size = job.ranks.rank, job.ranks.size
    batch = distributed.shard(state.sampler.sample(args.meta_batch, args.shots, args.shots), rank, size).to(device)
    pooled = distributed.shard(state.baseline_sampler.sample(args.meta_batch, args.shots, args.shots), rank,
                               size).to(device)
    state.optimizer.zero_grad(set_to_none=True)
    result = fastmaml.meta_step(state.model, batch, inner_lr=args.inner_lr, steps=args.steps, order=args.order,
                                loss="mse")
    x = torch.cat([pooled.support_x, pooled.query_x], 1).reshape(-1, 1)
    y = torch.cat([pooled.support_y, pooled.query_y], 1).reshape(-1, 1)
    state.baseline_optimizer.zero_grad(set_to_none=True)
    baseline_loss = F.mse_loss(state.baseline(x), y)  # the mean over this rank's tasks' points (as many per task)
    baseline_loss.backward()
    with job.ranks.collective(f"the all-reduce of iteration {state.iteration + 1}"):
        meta_loss, before, pretrained, stop = distributed.all_reduce_grads(
            state.model, extra=state.baseline, num_tasks=distributed.task_count(batch),
            values=[result.meta_loss, result.query_loss_before.mean(), baseline_loss.detach(), job.stop_flag]).tolist()
    job.agree_stop(stop > 0)
    state.optimizer.step()
    state.baseline_optimizer.step()

    state.iteration += 1
    state.history["meta_loss"].append(meta_loss)
    state.history["query_loss_before"].append(before)
    state.history["baseline_loss"].append(pretrained)


def _evaluate(model: nn.Module, tasks: EvalSet, args, job: common.Job, progress) -> Dict[str, list]:
    """`evaluate` on the held-out tasks; under torchrun each rank evaluates its share of them and the
    per-task values are gathered, so every rank holds those of all the tasks."""
    if not job.distributed:
        return evaluate(model, tasks, inner_lr=args.inner_lr, eval_steps=args.eval_steps, progress=progress)
    total = tasks.batch.num_tasks
    start, stop = distributed.share_range(total, job.ranks.rank, job.ranks.size)
    keys = [_step_key(k) for k in sorted({0, *args.eval_steps})]
    if stop > start:
        share = EvalSet(fastmaml.TaskBatch(*(t[start:stop] for t in tasks.batch)), tasks.amplitude[start:stop],
                        tasks.phase[start:stop])
        mine = evaluate(model, share, inner_lr=args.inner_lr, eval_steps=args.eval_steps, progress=progress)
    else:  # fewer held-out tasks than ranks: this one only takes part in the stop checks and the gathering
        mine = {key: [] for key in keys}
        for _ in keys:
            if progress is not None:
                progress.update(1)
    return {key: job.ranks.gather(torch.tensor(mine[key], dtype=torch.float64), total,
                                  "the gathering of the evaluation").tolist() for key in keys}


def run(args) -> dict:
    """Meta-trains (or resumes), evaluates both models, writes metrics.json, the figures and the
    checkpoint into `args.out`; returns the metrics dict (or, when stopped by SIGINT/SIGTERM, a dict
    with "interrupted"). Runs with `args.threads` torch threads and restores the previous setting after."""
    with common.Job(args, "sinusoid", default_threads=DEFAULTS["threads"]) as job:
        return _run(args, job)


def _where(job: common.Job) -> str:
    """"cpu", or under torchrun "2 processes (gloo; rank 0 on cpu)"."""
    if not job.distributed:
        return str(job.device)
    ranks = job.ranks
    return f"{ranks.size} process{'es' if ranks.size > 1 else ''} ({ranks.backend}; rank 0 on {job.device})"


def _learning_curve(state: common.TrainingState, path: Path) -> None:
    window = max(1, min(100, state.iteration // 20))
    common.plot_curves({
        "MAML query MSE after adaptation (meta-loss)": common.moving_average(state.history["meta_loss"], window),
        "MAML query MSE before adaptation": common.moving_average(state.history["query_loss_before"], window),
        "pretrained training MSE": common.moving_average(state.history["baseline_loss"], window),
    }, path, title=f"sinusoid, moving average over {window} iterations", ylabel="MSE")


def _history(state: common.TrainingState) -> dict:
    return {k: [float(f"{v:.6g}") for v in vs] for k, vs in state.history.items()}  # per iteration


def _run(args, job: common.Job) -> dict:
    device, out = job.device, job.out
    state = new_state(args, device)
    if args.resume:
        state.restore(job.load_checkpoint(state), job.checkpoint_path)
    start = state.iteration
    files = {"checkpoint": job.checkpoint_path, "metrics": out / common.METRICS,
             "learning curve": out / LEARNING_CURVE}

    def write_progress_files() -> None:
        """metrics.json (history so far, no evaluation yet) and the learning curve, with each checkpoint."""
        if not job.main:
            return
        common.write_json(files["metrics"], {
            "job": "sinusoid", "status": "training", "config": state.config, "iteration": state.iteration,
            "resumed_from": start if args.resume else None, "history": _history(state)})
        _learning_curve(state, files["learning curve"])

    job.say(f"sinusoid: {'resuming at' if args.resume else 'starting at'} iteration {start} of {args.iterations} "
            f"on {_where(job)}; checkpoint every {job.checkpoint_every} iterations to {job.checkpoint_path}")
    started = time.perf_counter()
    bar = job.progress("sinusoid", args.iterations, initial=start)
    while state.iteration < args.iterations and not job.stop_requested:
        if job.distributed:
            _train_iteration_ranks(state, args, device, job)
        else:
            _train_iteration(state, args, device)
        bar.update(1, loss=float(np.mean(state.history["meta_loss"][-100:])),
                   pretrained=float(np.mean(state.history["baseline_loss"][-100:])))
        if job.checkpoint_due(state.iteration, args.iterations):
            job.checkpoint(state)
            write_progress_files()
    bar.close()
    train_seconds = time.perf_counter() - started
    if job.saved_iteration != state.iteration:
        job.checkpoint(state)  # stopped between checkpoints, or resumed with nothing left to train
    if job.stop_requested:
        return job.stopped(state)

    tasks = eval_set(args.eval_tasks, args.shots, args.eval_query)
    tasks = EvalSet(tasks.batch.to(device), tasks.amplitude, tasks.phase)
    models = {"MAML": state.model, "pretrained": state.baseline}
    job.say(f"sinusoid: evaluating both networks on {args.eval_tasks} held-out tasks")
    evaluating = job.progress("evaluation", len(models) * len(set([0, *args.eval_steps])), unit="evaluations",
                              leave=False, interruptible=True)
    try:
        per_task = {name: _evaluate(m, tasks, args, job, evaluating) for name, m in models.items()}
    except common.Interrupted:
        evaluating.close()
        return job.stopped(state, " during the evaluation (training is complete)")
    evaluating.close()
    table = {name: summarize(values) for name, values in per_task.items()}

    files["figure"] = out / FIGURE
    metrics = {
        "job": "sinusoid", "status": "done", "config": state.config, "iteration": state.iteration,
        "resumed_from": start if args.resume else None,
        "train_seconds_this_run": train_seconds, "processes": job.ranks.size,
        "eval": table,
        "eval_description": (f"query MSE on {args.eval_tasks} held-out tasks ({args.eval_query} query points each, "
                             f"{args.shots} support points), mean and 95% CI half-width, before adaptation "
                             f"and after k SGD steps at inner lr {args.inner_lr}"),
        "history": _history(state),
        "files": {"figure": FIGURE, "learning_curve": LEARNING_CURVE, "checkpoint": common.CHECKPOINT},
    }
    if not job.main:
        return metrics
    plot_tasks(files["figure"], models, tasks, inner_lr=args.inner_lr, eval_steps=args.eval_steps)
    _learning_curve(state, files["learning curve"])
    common.write_json(files["metrics"], metrics)
    print(f"\nsinusoid, {state.iteration} iterations, {metrics['eval_description']}:")
    print(format_table(table, args.eval_steps))
    job.summary("files:", files)
    return metrics
