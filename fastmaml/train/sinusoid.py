"""`fastmaml train sinusoid`: MAML on the sinusoid regression family of Finn et al. 2017, beside a
baseline pretrained on all tasks jointly (the MAML paper's comparison).

Tasks: y = A·sin(x − φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5]. Model: MLP 1-40-40-1 with ReLU.
Each meta-iteration draws `--meta-batch` tasks with `--shots` support and `--shots` query points,
takes one `fastmaml.meta_step` and one Adam step. The baseline sees the same amount of data per
iteration (the same number of tasks and points, pooled) and is trained by plain regression.
Evaluation: a fixed held-out set of tasks (seed `EVAL_SEED`, independent of `--seed`), query MSE
before adaptation and after k steps of SGD at `--inner-lr` on the support points, for both models.

`--method` (fastmaml.train.methods) trains another member of the family on the same task stream, with
the same evaluation: FOMAML, Meta-SGD, ANIL (the last layer adapts), MAML++, iMAML, CAVIA (a context
vector of `--context` numbers concatenated to the input, `fastmaml.context.context_mlp`) or the
black-box learner (`fastmaml.blackbox.NeuralProcess`: it predicts from the support points, no steps).
Each adapts in evaluation with its own inner loop (its learned rates, its adapted parameters, iMAML's
proximal steps); the pretrained baseline always adapts all its weights by SGD at `--inner-lr`.
"""

from __future__ import annotations

import argparse
import contextlib
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
from fastmaml.blackbox import NeuralProcess
from fastmaml.context import context_mlp
from fastmaml.train import common, methods

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
EVAL_SEED = 2017
FIGURE = "sinusoid.png"
LEARNING_CURVE = "learning_curve.png"
# options that define the training trajectory: a resumed run must use the same values
TRAJECTORY_OPTIONS = (
    "steps",
    "order",
    "inner_lr",
    "meta_lr",
    "meta_batch",
    "shots",
    "seed",
    "method",
    "msl",
    "first_order_until",
    "implicit_lambda",
    "cg_steps",
    "context",
)
# values of trajectory options added later (what a checkpoint written before them ran with)
LATER_KEYS = {"method": "maml", "msl": 0, "first_order_until": 0, "implicit_lambda": 1.0, "cg_steps": 5, "context": 5}


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
    adapted = fastmaml.adapt(
        model, support_x, support_y, inner_lr=inner_lr, steps=steps, order="first", loss="mse", check_finite=False
    )
    return adapted(x)


def predictor(model: nn.Module, *, inner_lr: float = 0.01, learner=None):
    """`predict(support_x, support_y, x, k)`: the predictions at x after k inner steps on the support points
    (None where a model has no such prediction: the black-box learner before it reads the support).

    Plain SGD at `inner_lr` on all weights, or `learner`'s inner loop (a `methods.Learner`), or, for a
    `NeuralProcess`, its mean prediction given the support (the same for every k >= 1: it has no steps)."""
    if isinstance(model, NeuralProcess):
        return lambda sx, sy, x, k: None if k == 0 else model(sx, sy, x)[0]
    if learner is None:
        return lambda sx, sy, x, k: adapted_predictions(model, sx, sy, x, inner_lr=inner_lr, steps=k)
    return lambda sx, sy, x, k: model(x) if k == 0 else learner.adapt(model, sx, sy, k)(x)


def evaluate(
    model: nn.Module, tasks: EvalSet, *, inner_lr: float, eval_steps: Sequence[int], progress=None, predict=None
) -> Dict[str, list]:
    """{"after_k": per-task query MSE `[T]` as a list} for each k in eval_steps ("before" for k=0, left out
    for a model without a prediction there). predict: `predictor(...)` (default: SGD at inner_lr on all
    weights). progress: a `common.Progress` advanced by one per k (it may raise `common.Interrupted`)."""
    sx, sy, qx, qy = tasks.batch
    predict = predict or predictor(model, inner_lr=inner_lr)
    out = {}
    for k in sorted({0, *eval_steps}):
        with torch.no_grad():
            pred = predict(sx, sy, qx, k)
        if pred is not None:
            out[_step_key(k)] = per_task_mse(pred, qy).tolist()
        if progress is not None:
            progress.update(1)
    return out


def _step_key(k: int) -> str:
    return "before" if k == 0 else f"after_{k}"


def summarize(per_task: Dict[str, list]) -> Dict[str, Dict[str, float]]:
    """{"after_k": {"mean", "ci95", "median", "diverged", "tasks"}} from per-task values (`common.mean_ci95`).

    diverged: the tasks whose query MSE is not finite (their adaptation overflowed); with any, the mean and
    its interval are not finite either, and the median (a diverged task counted as +inf) says how the others
    fare."""
    table = {}
    for key, values in per_task.items():
        mean, half = common.mean_ci95(values)
        v = np.asarray(values, dtype=np.float64)
        finite = np.isfinite(v)
        median = float(np.median(np.where(finite, v, np.inf)))
        table[key] = {"mean": mean, "ci95": half, "median": median, "diverged": int((~finite).sum()), "tasks": v.size}
    return table


def format_cell(cell: Dict[str, float]) -> str:
    """ "mean ± ci95", or for a column where some tasks diverged "diverges on n/N tasks (median m)"."""
    if cell.get("diverged") or not math.isfinite(cell["mean"]):
        median = cell.get("median")
        tail = f" (median {median:.3f})" if median is not None and math.isfinite(median) else ""
        if cell.get("diverged") is None:  # a summary written before the count was kept
            return f"non-finite (diverges){tail}"
        return f"diverges on {cell['diverged']}/{cell['tasks']} tasks{tail}"
    return f"{cell['mean']:.3f} ± {cell['ci95']:.3f}"


def format_table(table: Dict[str, Dict[str, Dict[str, float]]], eval_steps: Sequence[int]) -> str:
    """The eval table as text: one row per model, "mean ± 95% CI" per column."""
    steps = sorted({0, *eval_steps})
    headers = ["before" if k == 0 else f"after {k} step" + ("s" if k > 1 else "") for k in steps]
    lines = ["model       " + "".join(f"{h:>20s}" for h in headers)]
    for name, row in table.items():
        lines.append(f"{name:12s}" + "".join(_text_cell(row.get(_step_key(k))) for k in steps))
    return "\n".join(lines)


def _text_cell(cell) -> str:
    if cell is None:
        return f"{'n/a':>20s}"
    if cell.get("diverged") or not math.isfinite(cell["mean"]):
        return f"  {format_cell(cell)}"
    return f"{cell['mean']:>11.3f} ± {cell['ci95']:<6.3f}"


def plot_tasks(
    path: Path,
    models: Dict[str, nn.Module],
    tasks: EvalSet,
    *,
    inner_lr: float,
    eval_steps: Sequence[int],
    num_tasks: int = 3,
) -> None:
    """The MAML paper's sinusoid figure: one row per model, one column per held-out task; true curve,
    support points, and the prediction before adaptation and after each k in eval_steps. `models` values
    are modules (SGD at inner_lr) or `predictor` functions."""
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
        predict = predictor(model, inner_lr=inner_lr) if isinstance(model, nn.Module) else model
        with torch.no_grad():
            preds = {k: predict(sx, sy, grid.to(device), k) for k in steps}
        preds = {k: p.cpu() for k, p in preds.items() if p is not None}
        for col in range(n):
            ax = axes[row][col]
            ax.plot(grid[col, :, 0], truth[col, :, 0], color="tab:red", lw=2, label="ground truth")
            for i, k in enumerate(steps):
                if k not in preds or (k > min(preds) and isinstance(model, NeuralProcess)):
                    continue
                label = (
                    "pre-update"
                    if k == 0
                    else "prediction from the support"
                    if isinstance(model, NeuralProcess)
                    else f"{k} grad step" + ("s" if k > 1 else "")
                )
                ax.plot(
                    grid[col, :, 0],
                    preds[k][col, :, 0],
                    ls=":" if k == 0 else "--",
                    color=plt.cm.Greens(0.4 + 0.6 * i / max(1, len(steps) - 1)),
                    lw=1.8,
                    label=label,
                )
            ax.scatter(
                sx[col, :, 0].cpu(),
                sy[col, :, 0].cpu(),
                marker="^",
                color="tab:purple",
                s=40,
                zorder=3,
                label="used for grad",
            )
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
# every job's options (common.SHARED_OPTIONS) with this job's defaults
DEFAULTS = dict(
    iterations=10000,
    steps=1,
    order="second",
    inner_lr=0.01,
    meta_lr=1e-3,
    meta_batch=25,
    shots=10,
    # a checkpoint is a few kB: every 1000 of the default 10,000 iterations costs nothing
    checkpoint_every=1000,
    threads=1,
    context=5,
)
# the options a --method preset may set (their values come from the method unless given)
METHOD_KEYS = ("steps", "order", "inner_lr", "msl", "first_order_until", "implicit_lambda", "cg_steps", "context")


def add_arguments(parser: argparse.ArgumentParser, job: str = "sinusoid") -> None:
    common.add_shared_arguments(
        parser,
        job,
        DEFAULTS,
        helps={
            "shots": "support points per task (K); training also uses K query points",
            "seed": "model initialization and task stream",
            "threads": "torch CPU threads while the job runs (the 1-40-40-1 MLP is too small to gain from more)",
            "context": "context parameters concatenated to the input by --method cavia (CAVIA: 5)",
        },
        method_choices=methods.METHODS,
    )
    parser = parser.add_argument_group("options of sinusoid")
    d = " (default: %(default)s)"
    parser.add_argument(
        "--eval-tasks",
        type=_at_least_two,
        default=600,
        help=f"held-out tasks (fixed seed {EVAL_SEED}) for the final evaluation, at least 2" + d,
    )
    parser.add_argument(
        "--eval-query", type=common.positive_int, default=100, help="query points per held-out task" + d
    )
    parser.add_argument(
        "--eval-steps",
        type=common.nonnegative_int,
        nargs="+",
        default=[1, 10],
        help="inner steps at which the held-out query MSE is reported" + d,
    )


def resolve(args) -> argparse.Namespace:
    """`args` with the `--method` preset applied to the options the user did not give (checked: a
    `common.UserError` for a combination that contradicts the method)."""
    method = getattr(args, "method", None) or "maml"
    cfg = {k: getattr(args, k, None) for k in METHOD_KEYS}
    for key, default in (
        ("msl", 0),
        ("first_order_until", 0),
        ("implicit_lambda", 1.0),
        ("cg_steps", 5),
        ("context", DEFAULTS["context"]),
    ):
        if cfg[key] is None:
            cfg[key] = default
    baseline_lr = cfg["inner_lr"]  # the pretrained baseline adapts at the rate given, or the job's default
    cfg = methods.apply(cfg, method, "sinusoid", common.given(args), DEFAULTS["iterations"])
    return argparse.Namespace(**{**vars(args), **cfg, "baseline_lr": baseline_lr})


def _config(args) -> dict:
    method = args.method
    return {
        "iterations": args.iterations,
        "steps": args.steps,
        "order": args.order,
        "inner_lr": args.inner_lr,
        "meta_lr": args.meta_lr,
        "meta_batch": args.meta_batch,
        "shots": args.shots,
        "seed": args.seed,
        "method": method,
        "msl": args.msl,
        "first_order_until": args.first_order_until,
        "implicit_lambda": args.implicit_lambda,
        "cg_steps": args.cg_steps,
        "context": args.context,
        "eval_tasks": args.eval_tasks,
        "eval_query": args.eval_query,
        "eval_steps": list(args.eval_steps),
        "eval_seed": EVAL_SEED,
        "checkpoint_every": args.checkpoint_every,
        "device": str(args.device),
        "threads": args.threads,
        "model": {
            "cavia": f"MLP [x, context {args.context}]-40-40-1 ReLU",
            "blackbox": "NeuralProcess (attentive CNP, hidden 64)",
        }.get(method, "MLP 1-40-40-1 ReLU"),
        "baseline": "same MLP, Adam on pooled points of meta_batch tasks",
    }


def build_model(args) -> nn.Module:
    """The network of `args.method` (after `resolve`)."""
    if args.method == "cavia":
        return context_mlp((1, 40, 40, 1), num_context=args.context)
    if args.method == "blackbox":
        return NeuralProcess()
    return sinusoid_mlp()


def new_state(args, device) -> common.TrainingState:
    """The state at iteration 0 (`args` resolved): the method's network and the pretrained baseline (the
    same initialization for every method; MAML's network starts from it too), their optimizers (the
    method's learned inner rates in the first), the two task streams and empty per-iteration histories."""
    common.seed_everything(args.seed)
    baseline = sinusoid_mlp()
    if args.method in ("cavia", "blackbox"):
        model = build_model(args)
    else:
        model = copy.deepcopy(baseline)
    model, baseline = model.to(device), baseline.to(device)
    learner = None if args.method == "blackbox" else methods.Learner(vars(args), model, "mse")
    trainable = [p for p in model.parameters() if p.requires_grad] + (learner.parameters() if learner else [])
    parts = {
        "model": model,
        "optimizer": torch.optim.Adam(trainable, lr=args.meta_lr),
        "baseline": baseline,
        "baseline_optimizer": torch.optim.Adam(baseline.parameters(), lr=args.meta_lr),
        "sampler": SinusoidSampler(stream_seed(args.seed, 0)),
        "baseline_sampler": SinusoidSampler(stream_seed(args.seed, 1)),
    }
    if learner is not None and learner.rates is not None:
        parts["inner_rates"] = learner.rates
    keys = (
        ("meta_loss", "query_loss_after", "baseline_loss")
        if args.method == "blackbox"
        else ("meta_loss", "query_loss_before", "query_loss_after", "baseline_loss")
    )
    state = common.TrainingState(
        _config(args),
        run_keys=TRAJECTORY_OPTIONS,
        legacy=LATER_KEYS,
        parts=parts,
        values={"history": {k: [] for k in keys}, "timing": {"seconds": 0.0, "steps": 0}, "step_memory": None},
    )
    state.learner = learner
    return state


def _blackbox_loss(model: NeuralProcess, batch):
    """(negative log-likelihood of the support and query targets given the support, query MSE of the mean)."""
    sx, sy, qx, qy = batch
    x, y = torch.cat([sx, qx], 1), torch.cat([sy, qy], 1)
    mean, std = model(sx, sy, x)
    nll = (torch.log(std) + 0.5 * ((y - mean) / std) ** 2).mean() + 0.5 * math.log(2 * math.pi)
    return nll, ((mean[:, sx.shape[1] :] - qy) ** 2).mean().detach()


def _method_step(state: common.TrainingState, batch) -> Dict[str, torch.Tensor]:
    """The method's gradient on `batch` into `.grad` (not the optimizer step); its logged means."""
    if state.learner is None:
        nll, mse = _blackbox_loss(state.model, batch)
        nll.backward()
        return {"meta_loss": nll.detach(), "query_loss_after": mse}
    result = state.learner.meta_step(state.model, batch, state.iteration)
    return {
        "meta_loss": result.meta_loss,
        "query_loss_before": result.query_loss_before.mean(),
        "query_loss_after": result.query_loss_after.mean(),
    }


def _clamp_gradients(state: common.TrainingState) -> None:
    """The method's bound on the meta-gradient entries (MAML++: ±10), before the optimizer step."""
    if state.learner is not None:
        state.learner.clamp_gradients(p for group in state.optimizer.param_groups for p in group["params"])


def _timed(state: common.TrainingState, device, step) -> Dict[str, torch.Tensor]:
    """Runs `step()` (gradient and optimizer step of the method). Every step but the first a process runs
    (it warms up: tracing, allocations) adds its time to `state.timing`; the second one's peak memory goes
    to `state.step_memory`."""
    warm = getattr(state, "_warm", False)
    measure = state.step_memory is None and warm
    memory = common.StepMemory(device) if measure else contextlib.nullcontext()
    started = time.perf_counter()
    with memory:
        logged = step()
    if warm:
        state.timing = {
            "seconds": state.timing["seconds"] + time.perf_counter() - started,
            "steps": state.timing["steps"] + 1,
        }
    if measure:
        state.step_memory = memory.bytes
    state._warm = True
    return logged


def _record(state: common.TrainingState, logged: Dict[str, float], baseline_loss: float) -> None:
    state.iteration += 1
    for key, values in state.history.items():
        values.append(baseline_loss if key == "baseline_loss" else float(logged[key]))


def _train_iteration(state: common.TrainingState, args, device) -> None:
    batch = state.sampler.sample(args.meta_batch, args.shots, args.shots).to(device)

    def step():
        state.optimizer.zero_grad(set_to_none=True)
        logged = _method_step(state, batch)
        _clamp_gradients(state)
        state.optimizer.step()
        return logged

    logged = _timed(state, device, step)
    pooled = state.baseline_sampler.sample(args.meta_batch, args.shots, args.shots).to(device)
    x = torch.cat([pooled.support_x, pooled.query_x], 1).reshape(-1, 1)
    y = torch.cat([pooled.support_y, pooled.query_y], 1).reshape(-1, 1)
    state.baseline_optimizer.zero_grad(set_to_none=True)
    baseline_loss = F.mse_loss(state.baseline(x), y)
    baseline_loss.backward()
    state.baseline_optimizer.step()
    _record(state, logged, float(baseline_loss.detach()))


def _train_iteration_ranks(state: common.TrainingState, args, device, job: common.Job) -> None:
    """One meta-iteration on this rank's share of the meta-batch (under torchrun): every rank draws the
    whole meta-batch from the same task stream and keeps its share; the meta-gradient (with the learned
    inner rates), the baseline's gradient, the logged losses and the stop flag are combined in one
    all-reduce weighted by task count, so every rank takes the same Adam steps as one process would (up to
    float rounding)."""
    rank, size = job.ranks.rank, job.ranks.size
    batch = distributed.shard(state.sampler.sample(args.meta_batch, args.shots, args.shots), rank, size).to(device)
    pooled = distributed.shard(state.baseline_sampler.sample(args.meta_batch, args.shots, args.shots), rank, size).to(
        device
    )
    state.optimizer.zero_grad(set_to_none=True)
    logged = _method_step(state, batch)
    x = torch.cat([pooled.support_x, pooled.query_x], 1).reshape(-1, 1)
    y = torch.cat([pooled.support_y, pooled.query_y], 1).reshape(-1, 1)
    state.baseline_optimizer.zero_grad(set_to_none=True)
    baseline_loss = F.mse_loss(state.baseline(x), y)  # the mean over this rank's tasks' points (as many per task)
    baseline_loss.backward()
    keys = list(logged)
    rates = None if state.learner is None else state.learner.rates
    with job.ranks.collective(f"the all-reduce of iteration {state.iteration + 1}"):
        reduced = distributed.all_reduce_grads(
            state.model,
            extra=[state.baseline, rates],
            num_tasks=distributed.task_count(batch),
            values=[logged[k] for k in keys] + [baseline_loss.detach(), job.stop_flag],
        ).tolist()
    job.agree_stop(reduced[-1] > 0)
    _clamp_gradients(state)  # on the all-reduced meta-gradient, as one process clamps its own
    state.optimizer.step()
    state.baseline_optimizer.step()
    _record(state, dict(zip(keys, reduced)), reduced[-2])


def _evaluate(model: nn.Module, tasks: EvalSet, args, job: common.Job, progress, predict=None) -> Dict[str, list]:
    """`evaluate` on the held-out tasks; under torchrun each rank evaluates its share of them and the
    per-task values are gathered, so every rank holds those of all the tasks."""
    if not job.distributed:
        return evaluate(
            model, tasks, inner_lr=args.inner_lr, eval_steps=args.eval_steps, progress=progress, predict=predict
        )
    total = tasks.batch.num_tasks
    start, stop = distributed.share_range(total, job.ranks.rank, job.ranks.size)
    keys = [_step_key(k) for k in sorted({0, *args.eval_steps})]
    if isinstance(model, NeuralProcess):
        keys = [k for k in keys if k != "before"]
    if stop > start:
        share = EvalSet(
            fastmaml.TaskBatch(*(t[start:stop] for t in tasks.batch)),
            tasks.amplitude[start:stop],
            tasks.phase[start:stop],
        )
        mine = evaluate(
            model, share, inner_lr=args.inner_lr, eval_steps=args.eval_steps, progress=progress, predict=predict
        )
    else:  # fewer held-out tasks than ranks: this one only takes part in the stop checks and the gathering
        mine = {key: [] for key in keys}
        for _ in sorted({0, *args.eval_steps}):
            if progress is not None:
                progress.update(1)
    return {
        key: job.ranks.gather(
            torch.tensor(mine[key], dtype=torch.float64), total, "the gathering of the evaluation"
        ).tolist()
        for key in keys
    }


def run(args) -> dict:
    """Meta-trains (or resumes), evaluates both models, writes metrics.json, the figures and the
    checkpoint into `args.out`; returns the metrics dict (or, when stopped by SIGINT/SIGTERM, a dict
    with "interrupted"). Runs with `args.threads` torch threads and restores the previous setting after."""
    args = resolve(args)
    with common.Job(args, "sinusoid", default_threads=DEFAULTS["threads"]) as job:
        return _run(args, job)


def _where(job: common.Job) -> str:
    """ "cpu", or under torchrun "2 processes (gloo; rank 0 on cpu)"."""
    if not job.distributed:
        return str(job.device)
    ranks = job.ranks
    return f"{ranks.size} process{'es' if ranks.size > 1 else ''} ({ranks.backend}; rank 0 on {job.device})"


def _label(args) -> str:
    return methods.LABELS[args.method]


def _learning_curve(state: common.TrainingState, path: Path, label: str = "MAML") -> None:
    window = max(1, min(100, state.iteration // 20))
    h = state.history
    if "query_loss_before" in h:
        curves = {
            f"{label} query MSE after adaptation": common.moving_average(h["query_loss_after"], window),
            f"{label} query MSE before adaptation": common.moving_average(h["query_loss_before"], window),
        }
    else:
        curves = {
            f"{label} query MSE (prediction from the support)": common.moving_average(h["query_loss_after"], window)
        }
    curves["pretrained training MSE"] = common.moving_average(h["baseline_loss"], window)
    common.plot_curves(curves, path, title=f"sinusoid, moving average over {window} iterations", ylabel="MSE")


def _history(state: common.TrainingState) -> dict:
    return {k: [float(f"{v:.6g}") for v in vs] for k, vs in state.history.items()}  # per iteration


def _resources(state: common.TrainingState) -> dict:
    """Time per meta-step (the method's gradient and optimizer step, averaged over the steps this run timed)
    and the peak memory of one."""
    t = state.timing
    return {
        "seconds_per_meta_step": t["seconds"] / t["steps"] if t["steps"] else None,
        "timed_steps": t["steps"],
        "step_memory_bytes": state.step_memory,
    }


def _run(args, job: common.Job) -> dict:
    device, out = job.device, job.out
    state = new_state(args, device)
    if args.resume:
        state.restore(job.load_checkpoint(state), job.checkpoint_path)
        done = len(state.history["meta_loss"])
        for values in state.history.values():  # a series added after the checkpoint was written
            values[:0] = [math.nan] * (done - len(values))
    start = state.iteration
    label = _label(args)
    files = {"checkpoint": job.checkpoint_path, "metrics": out / common.METRICS, "learning curve": out / LEARNING_CURVE}

    def write_progress_files() -> None:
        """metrics.json (history so far, no evaluation yet) and the learning curve, with each checkpoint."""
        if not job.main:
            return
        common.write_json(
            files["metrics"],
            {
                "job": "sinusoid",
                "status": "training",
                "config": state.config,
                "iteration": state.iteration,
                "resumed_from": start if args.resume else None,
                "history": _history(state),
                **_resources(state),
            },
        )
        _learning_curve(state, files["learning curve"], label)

    what = (
        ""
        if state.learner is None and args.method == "maml"
        else (
            f" ({state.learner.describe()})"
            if state.learner is not None
            else " (black-box learner: a neural process, trained by maximum likelihood)"
        )
    )
    job.say(
        f"sinusoid: {'resuming at' if args.resume else 'starting at'} iteration {start} of {args.iterations} "
        f"on {_where(job)}{what}; checkpoint every {job.checkpoint_every} iterations to {job.checkpoint_path}"
    )
    started = time.perf_counter()
    bar = job.progress("sinusoid", args.iterations, initial=start)
    while state.iteration < args.iterations and not job.stop_requested:
        with methods.meta_iteration(state.iteration + 1):
            if job.distributed:
                _train_iteration_ranks(state, args, device, job)
            else:
                _train_iteration(state, args, device)
        bar.update(
            1,
            loss=float(np.mean(state.history["meta_loss"][-100:])),
            pretrained=float(np.mean(state.history["baseline_loss"][-100:])),
        )
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
    predictors = {
        label: predictor(state.model, inner_lr=args.inner_lr, learner=state.learner),
        "pretrained": predictor(state.baseline, inner_lr=args.baseline_lr),
    }
    models = {label: state.model, "pretrained": state.baseline}
    job.say(f"sinusoid: evaluating both networks on {args.eval_tasks} held-out tasks")
    evaluating = job.progress(
        "evaluation", len(models) * len(set([0, *args.eval_steps])), unit="evaluations", leave=False, interruptible=True
    )
    try:
        per_task = {name: _evaluate(m, tasks, args, job, evaluating, predictors[name]) for name, m in models.items()}
    except common.Interrupted:
        evaluating.close()
        return job.stopped(state, " during the evaluation (training is complete)")
    evaluating.close()
    table = {name: summarize(values) for name, values in per_task.items()}

    files["figure"] = out / FIGURE
    adapt_text = (
        "the black-box learner's prediction from the support points (it has no inner steps: the same "
        "for every k), the pretrained network "
        if args.method == "blackbox"
        else ""
    )
    metrics = {
        "job": "sinusoid",
        "status": "done",
        "config": state.config,
        "iteration": state.iteration,
        "method": args.method,
        "label": label,
        "resumed_from": start if args.resume else None,
        "train_seconds_this_run": train_seconds,
        "processes": job.ranks.size,
        **_resources(state),
        "eval": table,
        "eval_description": (
            f"query MSE on {args.eval_tasks} held-out tasks ({args.eval_query} query points each, "
            f"{args.shots} support points), mean and 95% CI half-width, before adaptation "
            f"and after k {adapt_text}SGD steps at inner lr {args.baseline_lr}"
            + ("" if args.method in ("maml", "blackbox") else f" ({label}: its own inner loop)")
        ),
        "history": _history(state),
        "files": {"figure": FIGURE, "learning_curve": LEARNING_CURVE, "checkpoint": common.CHECKPOINT},
    }
    if state.learner is not None and state.learner.rates is not None:
        metrics["learned_inner_lr"] = state.learner.rates.summary()
    if not job.main:
        return metrics
    plot_models = {label: state.model if args.method == "blackbox" else predictors[label], "pretrained": state.baseline}
    plot_tasks(files["figure"], plot_models, tasks, inner_lr=args.baseline_lr, eval_steps=args.eval_steps)
    _learning_curve(state, files["learning curve"], label)
    common.write_json(files["metrics"], metrics)
    print(f"\nsinusoid, {label}, {state.iteration} iterations, {metrics['eval_description']}:")
    print(format_table(table, args.eval_steps))
    job.summary("files:", files)
    return metrics
