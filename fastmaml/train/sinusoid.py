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
from typing import Dict, List, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fastmaml
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


def evaluate(model: nn.Module, tasks: EvalSet, *, inner_lr: float, eval_steps: Sequence[int]) -> Dict[str, list]:
    """{"after_k": per-task query MSE `[T]` as a list} for each k in eval_steps ("before" for k=0)."""
    sx, sy, qx, qy = tasks.batch
    out = {}
    for k in sorted({0, *eval_steps}):
        pred = adapted_predictions(model, sx, sy, qx, inner_lr=inner_lr, steps=k)
        out[_step_key(k)] = per_task_mse(pred, qy).tolist()
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
    fig, axes = plt.subplots(len(models), n, figsize=(4.2 * n, 3.2 * len(models)), squeeze=False)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _device(text: str) -> str:
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected a torch device such as 'cpu' or 'cuda', got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} requested but CUDA is not available here")
    return text


def _at_least_two(text: str) -> int:
    value = common.positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 tasks (for a confidence interval), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = " (default: %(default)s)"
    parser.add_argument("--iterations", type=common.nonnegative_int, default=10000,
                        help="meta-iterations in total (a resumed run continues up to this number)" + d)
    parser.add_argument("--steps", type=common.nonnegative_int, default=1, help="inner SGD steps in training" + d)
    parser.add_argument("--order", choices=fastmaml.ORDERS, default="second", help="meta-gradient mode" + d)
    parser.add_argument("--inner-lr", type=common.positive_float, default=0.01,
                        help="inner SGD learning rate (training and evaluation)" + d)
    parser.add_argument("--meta-lr", type=common.positive_float, default=1e-3, help="Adam learning rate" + d)
    parser.add_argument("--meta-batch", type=common.positive_int, default=25, help="tasks per meta-iteration" + d)
    parser.add_argument("--shots", type=common.positive_int, default=10,
                        help="support points per task (K); training also uses K query points" + d)
    parser.add_argument("--seed", type=int, default=0, help="model initialization and task stream" + d)
    parser.add_argument("--out", type=Path, default=Path("runs/sinusoid"), help="output folder" + d)
    parser.add_argument("--eval-tasks", type=_at_least_two, default=600,
                        help=f"held-out tasks (fixed seed {EVAL_SEED}) for the final evaluation, at least 2" + d)
    parser.add_argument("--eval-query", type=common.positive_int, default=100,
                        help="query points per held-out task" + d)
    parser.add_argument("--eval-steps", type=common.nonnegative_int, nargs="+", default=[1, 10],
                        help="inner steps at which the held-out query MSE is reported" + d)
    parser.add_argument("--checkpoint-every", type=common.positive_int, default=500,
                        help="write out/checkpoint.pt every this many iterations and at the end" + d)
    parser.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt")
    parser.add_argument("--device", type=_device, default="cpu", help="torch device (cpu, cuda, cuda:1, ...)" + d)
    parser.add_argument("--threads", type=common.positive_int, default=1,
                        help="torch CPU threads while the job runs (the 1-40-40-1 MLP is too small to gain "
                             "from more)" + d)
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")


def _config(args) -> dict:
    return {
        "iterations": args.iterations, "steps": args.steps, "order": args.order, "inner_lr": args.inner_lr,
        "meta_lr": args.meta_lr, "meta_batch": args.meta_batch, "shots": args.shots, "seed": args.seed,
        "eval_tasks": args.eval_tasks, "eval_query": args.eval_query, "eval_steps": list(args.eval_steps),
        "eval_seed": EVAL_SEED, "checkpoint_every": args.checkpoint_every, "device": str(args.device),
        "threads": args.threads,
        "model": "MLP 1-40-40-1 ReLU", "baseline": "same MLP, Adam on pooled points of meta_batch tasks",
    }


class _State:
    """Everything a checkpoint holds; `capture()` / `restore()` make resumed runs bit-identical."""

    def __init__(self, args, device):
        torch.manual_seed(args.seed)
        self.model = sinusoid_mlp().to(device)
        self.baseline = copy.deepcopy(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.meta_lr)
        self.baseline_optimizer = torch.optim.Adam(self.baseline.parameters(), lr=args.meta_lr)
        self.sampler = SinusoidSampler(stream_seed(args.seed, 0))
        self.baseline_sampler = SinusoidSampler(stream_seed(args.seed, 1))
        self.iteration = 0
        self.history: Dict[str, List[float]] = {"meta_loss": [], "query_loss_before": [], "baseline_loss": []}

    def capture(self, config: dict) -> dict:
        return {
            "config": config, "iteration": self.iteration, "history": copy.deepcopy(self.history),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline.state_dict(), "baseline_optimizer": self.baseline_optimizer.state_dict(),
            "sampler": self.sampler.state_dict(), "baseline_sampler": self.baseline_sampler.state_dict(),
            "rng": common.rng_state(),
        }

    def restore(self, ckpt: dict, config: dict, iterations: int, path: Path) -> None:
        saved = ckpt["config"]
        diff = {k: (saved.get(k), config[k]) for k in TRAJECTORY_OPTIONS if saved.get(k) != config[k]}
        if diff:
            raise ValueError(
                "--resume: options differ from the checkpoint's "
                + ", ".join(f"--{k.replace('_', '-')} {new!r} (checkpoint: {old!r})" for k, (old, new) in diff.items())
                + f"; rerun with the checkpoint's values or without --resume ({path})")
        if ckpt["iteration"] > iterations:
            raise ValueError(f"--iterations: {iterations} is below the checkpoint's iteration {ckpt['iteration']} "
                             f"({path}); expected at least {ckpt['iteration']}")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.baseline.load_state_dict(ckpt["baseline"])
        self.baseline_optimizer.load_state_dict(ckpt["baseline_optimizer"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.baseline_sampler.load_state_dict(ckpt["baseline_sampler"])
        common.set_rng_state(ckpt["rng"])
        self.iteration = ckpt["iteration"]
        self.history = ckpt["history"]


def _train_iteration(state: _State, args, device) -> None:
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


def run(args) -> dict:
    """Meta-trains (or resumes), evaluates both models, writes metrics.json, the figures and the
    checkpoint into `args.out`; returns the metrics dict. Runs with `args.threads` torch threads and
    restores the previous setting afterwards."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run(args) -> dict:
    device = torch.device(args.device)
    out = Path(args.out)
    ckpt_path = out / common.CHECKPOINT
    config = _config(args)
    state = _State(args, device)
    if args.resume:
        state.restore(common.load_checkpoint(ckpt_path), config, args.iterations, ckpt_path)

    start, started = state.iteration, time.perf_counter()
    bar = common.progress(range(start, args.iterations), total=args.iterations, initial=start, desc="sinusoid",
                          disable=True if args.quiet else None)
    for _ in bar:
        _train_iteration(state, args, device)
        if state.iteration % 10 == 0 or state.iteration == args.iterations:
            bar.set_postfix(meta_loss=f"{np.mean(state.history['meta_loss'][-100:]):.3f}",
                            pretrained=f"{np.mean(state.history['baseline_loss'][-100:]):.3f}")
        if state.iteration % args.checkpoint_every == 0 and state.iteration != args.iterations:
            common.save_checkpoint(ckpt_path, state.capture(config))
    train_seconds = time.perf_counter() - started
    common.save_checkpoint(ckpt_path, state.capture(config))

    tasks = eval_set(args.eval_tasks, args.shots, args.eval_query)
    tasks = EvalSet(tasks.batch.to(device), tasks.amplitude, tasks.phase)
    models = {"MAML": state.model, "pretrained": state.baseline}
    per_task = {name: evaluate(m, tasks, inner_lr=args.inner_lr, eval_steps=args.eval_steps)
                for name, m in models.items()}
    table = {name: summarize(values) for name, values in per_task.items()}

    plot_tasks(out / FIGURE, models, tasks, inner_lr=args.inner_lr, eval_steps=args.eval_steps)
    window = max(1, min(100, state.iteration // 20))
    common.plot_curves({
        "MAML query MSE after adaptation (meta-loss)": common.moving_average(state.history["meta_loss"], window),
        "MAML query MSE before adaptation": common.moving_average(state.history["query_loss_before"], window),
        "pretrained training MSE": common.moving_average(state.history["baseline_loss"], window),
    }, out / LEARNING_CURVE, title=f"sinusoid, moving average over {window} iterations", ylabel="MSE")

    metrics = {
        "job": "sinusoid", "config": config, "iteration": state.iteration,
        "resumed_from": start if args.resume else None,
        "train_seconds_this_run": train_seconds,
        "eval": table,
        "eval_description": (f"query MSE on {args.eval_tasks} held-out tasks ({args.eval_query} query points each, "
                             f"{args.shots} support points), mean and 95% CI half-width, before adaptation "
                             f"and after k SGD steps at inner lr {args.inner_lr}"),
        "history": {k: [float(f"{v:.6g}") for v in vs] for k, vs in state.history.items()},  # per iteration
        "files": {"figure": FIGURE, "learning_curve": LEARNING_CURVE, "checkpoint": common.CHECKPOINT},
    }
    common.write_json(out / common.METRICS, metrics)
    if not args.quiet:
        print(f"\nsinusoid, {state.iteration} iterations, {metrics['eval_description']}:")
        print(format_table(table, args.eval_steps))
        print(f"wrote {out / common.METRICS}, {out / FIGURE}, {out / LEARNING_CURVE}, {ckpt_path}")
    return metrics
