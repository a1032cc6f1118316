"""Few-shot image classification with MAML: jobs `omniglot`, `miniimagenet` and `fewshot-demo`.

    fastmaml train omniglot --data ~/data/omniglot        # Finn et al. 2017, 5-way 1-shot
    fastmaml train miniimagenet --data ~/data/miniimagenet
    fastmaml train fewshot-demo                           # embedded glyph dataset, no download

Each job starts from a preset (the MAML paper's protocol for the real datasets; a budget that
finishes in minutes on 2 CPU cores for the demo) and every option overrides it. Meta-training uses
`fastmaml.meta_step(..., loss="cross_entropy")` and Adam; every `--val-every` iterations the model is
adapted (`fastmaml.adapt`, `--eval-steps` steps) on a fixed list of validation episodes, the best
weights go to `best.pt`, the full state to `checkpoint.pt` (for `--resume`; also every
`--checkpoint-every` iterations and on SIGINT/SIGTERM) and metrics.json, loss.png and accuracy.png are
rewritten. At the end, the best weights are evaluated on `--test-episodes` fixed meta-test episodes
(mean accuracy with a 95% CI), next to the same network adapted from a random initialization as a
baseline. The options every job shares (and the run's scaffolding) are in `fastmaml.train.common`.

Class splits: Omniglot's characters are shuffled with a fixed seed and cut into `--train-classes`
(preset 1100, each with its 3 rotations as new classes) and `--val-classes` (preset 100) characters,
the rest (423 of the 1623) being the meta-test classes (Finn et al.'s split); the demo's 600 glyph
classes likewise (preset 400 / 100 / the rest). Lower them to run on a smaller folder. mini-ImageNet's
split is the one its train.csv / val.csv / test.csv define.

BatchNorm: `--bn batch` (default, MAML: batch statistics of each support/query set), `frozen`
(running statistics, fixed) or `per_step` (MAML++ per-step running statistics, updated in meta-training;
evaluation may run more steps than training), passed to `meta_step`/`adapt` as `batch_norm=`.

MAML++ training schedule (off by default): `--msl N` trains on the multi-step loss, every inner step's
query loss weighted by `fastmaml.msl_weights`, annealed to the last step over the first N iterations;
`--first-order-until N` runs first-order meta-steps before iteration N, then `--order` (derivative-order
annealing).

`--method` (fastmaml.train.methods) trains another member of the family on the same episodes, with the
same validation and test: FOMAML, Meta-SGD, ANIL (the last Linear layer adapts), MAML++, iMAML, CAVIA
(conv4 with FiLM on its third block, `fastmaml.context.context_conv4`, a context vector of `--context`
numbers) or the black-box learner (`fastmaml.blackbox.SnailClassifier`: it classifies the query from the
labelled support, no inner steps). Each adapts in evaluation with its own inner loop; the random-init
baseline is the method's network from a fresh initialization, adapted the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path
from typing import Dict, Optional

import torch

import fastmaml
from fastmaml import distributed
from fastmaml.blackbox import SnailClassifier
from fastmaml.context import context_conv4
from fastmaml.data import (
    Episodes,
    EpisodeSampler,
    Splits,
    glyph_splits,
    load_omniglot,
    miniimagenet_splits,
    split_omniglot,
)
from fastmaml.data.imagefiles import DatasetError
from fastmaml.models import conv4, omniglot_mlp, resnet12
from fastmaml.train import common, methods

# The protocol of each job; every entry can be overridden by the option of the same name.
# checkpoint_every: a few minutes of CPU work at the preset's sizes (seconds on a GPU).
PRESETS: Dict[str, Dict] = {
    # Finn et al. 2017, Omniglot 5-way 1-shot: meta-batch 32, α = 0.4, 1 step in training, 3 at test;
    # characters: 1100 meta-train (+ rotations), 100 validation, the other 423 meta-test
    "omniglot": dict(
        ways=5,
        shots=1,
        query=15,
        meta_batch=32,
        inner_lr=0.4,
        steps=1,
        eval_steps=3,
        iterations=60000,
        meta_lr=1e-3,
        model="conv4",
        hidden=64,
        val_every=1000,
        val_episodes=300,
        test_episodes=600,
        eval_batch=50,
        train_classes=1100,
        val_classes=100,
        checkpoint_every=50,
    ),
    # Finn et al. 2017, mini-ImageNet 5-way 1-shot: meta-batch 4, α = 0.01, 5 steps, 10 at test, 32 filters;
    # classes: those of train.csv / val.csv / test.csv (64 / 16 / 20)
    "miniimagenet": dict(
        ways=5,
        shots=1,
        query=15,
        meta_batch=4,
        inner_lr=0.01,
        steps=5,
        eval_steps=10,
        iterations=60000,
        meta_lr=1e-3,
        model="conv4",
        hidden=32,
        val_every=1000,
        val_episodes=300,
        test_episodes=600,
        eval_batch=20,
        checkpoint_every=50,
    ),
    # the embedded glyphs: the Omniglot recipe on a budget that runs in minutes on 2 CPU cores
    "fewshot-demo": dict(
        ways=5,
        shots=1,
        query=5,
        meta_batch=8,
        inner_lr=0.4,
        steps=1,
        eval_steps=3,
        iterations=200,
        meta_lr=3e-3,
        model="conv4",
        hidden=32,
        val_every=50,
        val_episodes=100,
        test_episodes=600,
        eval_batch=50,
        train_classes=400,
        val_classes=100,
        checkpoint_every=25,
    ),
}
# torch CPU threads by default (None: torch's choice, one per core). On the 2 cores the demo is sized for, a
# second thread can at best halve a meta-step of its conv4-32, and when another process holds a core every
# intra-op parallel region waits for a descheduled thread. Measured on the 2-core CPU with the other
# core busy (load average 6), one meta-step of the demo's meta-batch: the fused engine 0.29 s with 1 thread
# against 0.93 s with 2, the autograd loop 0.52 s against 22.9 s, the fused engine on the torch backend
# 21.8 s with 2 (docs/architecture.md, "Threads on a shared CPU").
DEFAULT_THREADS = {"fewshot-demo": 1}
SPLIT_FILES = ("train.csv", "val.csv", "test.csv")  # mini-ImageNet
DEMO_CLASSES = 600  # glyph classes of the demo dataset
EVAL_SEED = 0  # validation and test episodes are the same for every run (and every --seed)
# options that define the training run: --resume refuses a checkpoint made with different ones
RUN_KEYS = (
    "job",
    "ways",
    "shots",
    "query",
    "meta_batch",
    "inner_lr",
    "steps",
    "order",
    "bn",
    "meta_lr",
    "model",
    "hidden",
    "widths",
    "seed",
    "val_every",
    "val_episodes",
    "eval_steps",
    "train_classes",
    "val_classes",
    "msl",
    "first_order_until",
    "method",
    "implicit_lambda",
    "cg_steps",
    "context",
    "norm",
)
RESNET12_WIDTHS = (64, 160, 320, 640)  # MetaOptNet / learn2learn
# values of run keys added after a checkpoint format existed (what such a checkpoint ran with)
LATER_KEYS = {
    "msl": 0,
    "first_order_until": 0,
    "widths": list(RESNET12_WIDTHS),
    "method": "maml",
    "implicit_lambda": 1.0,
    "cg_steps": 5,
    "context": 100,
    "norm": "batch",
}
CAVIA_CONTEXT = 100  # CAVIA's context size for the conv net (Zintgraf et al. 2019)
REAL_DATA = ("omniglot", "miniimagenet")
LOSS_PLOT, ACCURACY_PLOT = "loss.png", "accuracy.png"


def add_arguments(parser: argparse.ArgumentParser, job: str = "fewshot-demo") -> None:
    """The options of `job` (only those that apply to it), its preset as the defaults."""
    preset = PRESETS[job]
    positive, nonnegative = common.positive_int, common.nonnegative_int
    own = parser.add_argument_group(f"options of {job}")
    if job in REAL_DATA:
        own.add_argument(
            "--data",
            type=Path,
            required=False,
            default=None,
            help=f"dataset folder (required; see fastmaml/data/{job}.py for the layout)",
        )
        own.add_argument(
            "--cache-dir",
            type=Path,
            default=None,
            help="where decoded images are cached (default: <data>/.fastmaml_cache)",
        )
    common.add_shared_arguments(
        parser,
        job,
        {**preset, "context": CAVIA_CONTEXT, "threads": DEFAULT_THREADS.get(job)},
        helps={
            "shots": "support examples per class (K)",
            "threads": "torch CPU threads while the job runs"
            + (
                " (one: on 2 cores a second thread can at best halve a step, and stalls every op while "
                "another process holds a core)"
                if job in DEFAULT_THREADS
                else ""
            ),
            "context": "context parameters of --method cavia, fed to FiLM on the third conv block (CAVIA: 100)",
            "order": "meta-gradient (see fastmaml.meta_step): second = exact MAML, checkpoint, first = FOMAML, "
            "implicit",
        },
        method_choices=methods.METHODS,
    )
    d = " (default: %(default)s)"
    own.add_argument("--first-order", action=common.ExplicitTrue, help="same as --order first")
    own.add_argument("--ways", type=positive, default=preset["ways"], help="classes per task (N)" + d)
    own.add_argument("--query", type=positive, default=preset["query"], help="query examples per class" + d)
    own.add_argument(
        "--eval-steps",
        type=nonnegative,
        default=preset["eval_steps"],
        action=common.Explicit,
        help="inner steps at validation and test" + d,
    )
    own.add_argument(
        "--model",
        choices=["conv4", "resnet12", "mlp"],
        default=preset["model"],
        action=common.Explicit,
        help="network: the MAML paper's conv4, ResNet-12 (fastmaml.models.resnet12) or its MLP" + d,
    )
    own.add_argument("--hidden", type=positive, default=preset["hidden"], help="conv4 filters per layer" + d)
    own.add_argument(
        "--widths",
        type=widths_arg,
        default=RESNET12_WIDTHS,
        metavar="W1,W2,W3,W4",
        help="ResNet-12 block widths (default: 64,160,320,640; 16,32,64,128 fits a CPU)",
    )
    own.add_argument(
        "--norm",
        choices=["batch", "group", "none"],
        default="batch",
        action=common.Explicit,
        help="conv4's norm: batch (BatchNorm2d, the MAML paper's), group (GroupNorm with 4 groups: each example's "
        "own statistics, no running statistics), none" + d,
    )
    own.add_argument(
        "--bn",
        choices=list(fastmaml.BN_MODES),
        default="batch",
        action=common.Explicit,
        help="BatchNorm statistics in the inner loop: batch (MAML, default), frozen, per_step (MAML++)",
    )
    if "train_classes" in preset:
        what = "characters, each also rotated by 90°, 180°, 270°" if job == "omniglot" else "classes"
        own.add_argument(
            "--train-classes",
            type=positive,
            default=preset["train_classes"],
            help=f"meta-training {what}; the classes left after --val-classes are the meta-test's" + d,
        )
        own.add_argument(
            "--val-classes", type=positive, default=preset["val_classes"], help="meta-validation classes" + d
        )
    own.add_argument(
        "--val-every",
        type=positive,
        default=preset["val_every"],
        help="iterations between validations (each also writes checkpoint.pt, best.pt when "
        "better, metrics.json and the plots)" + d,
    )
    own.add_argument("--val-episodes", type=positive, default=preset["val_episodes"], help="validation episodes" + d)
    own.add_argument(
        "--test-episodes",
        type=nonnegative,
        default=preset["test_episodes"],
        help="meta-test episodes at the end (0: no test)" + d,
    )
    own.add_argument(
        "--eval-batch", type=positive, default=preset["eval_batch"], help="episodes adapted at once in evaluation" + d
    )


def _check_norm(cfg: Dict) -> None:
    """--norm against the model, the method and --bn (after the method's own settings)."""
    norm = cfg["norm"]
    if norm == "batch":
        return
    if cfg.get("model", "conv4") != "conv4" or cfg["method"] in ("cavia", "blackbox"):
        raise common.UserError(
            f"--norm {norm}: applies to --model conv4 with MAML and its variants (not CAVIA's or the black-box network)"
        )
    if cfg["bn"] != "batch":
        raise common.UserError(f"--bn {cfg['bn']}: BatchNorm statistics modes need --norm batch, got --norm {norm}")
    if norm == "group" and cfg["hidden"] % 4:
        raise common.UserError(
            f"--hidden: --norm group uses 4 groups, so it needs a multiple of 4, got {cfg['hidden']}"
        )


def resolve_config(args: argparse.Namespace) -> Dict:
    """The preset of `args.job` with every option the user gave on top; validated (`common.UserError`)."""
    if args.job not in PRESETS:
        raise common.UserError(f"job: expected one of {sorted(PRESETS)}, got {args.job!r}")
    cfg = dict(PRESETS[args.job])
    for key in cfg:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg["job"] = args.job
    cfg["order"] = "first" if getattr(args, "first_order", False) else (getattr(args, "order", None) or "second")
    cfg["bn"] = getattr(args, "bn", "batch")
    cfg["norm"] = getattr(args, "norm", None) or "batch"
    cfg["seed"] = getattr(args, "seed", 0)
    for key, default in (
        ("msl", 0),
        ("first_order_until", 0),
        ("implicit_lambda", 1.0),
        ("cg_steps", 5),
        ("context", CAVIA_CONTEXT),
    ):
        value = getattr(args, key, None)
        cfg[key] = default if value is None else value
    cfg["widths"] = list(getattr(args, "widths", None) or RESNET12_WIDTHS)
    cfg = methods.apply(
        cfg, getattr(args, "method", None) or "maml", args.job, common.given(args), PRESETS[args.job]["iterations"]
    )
    _check_norm(cfg)
    for key in ("msl", "first_order_until"):
        if cfg[key] < 0:
            raise common.UserError(
                f"--{key.replace('_', '-')}: expected a non-negative number of iterations, got {cfg[key]}"
            )
    for key in ("train_classes", "val_classes"):
        if getattr(args, key, None) is not None and key not in cfg:
            raise common.UserError(
                f"--{key.replace('_', '-')}: the {args.job} split is fixed by the dataset's "
                "train.csv / val.csv / test.csv; edit those files to change it"
            )
    for key in (
        "ways",
        "shots",
        "query",
        "meta_batch",
        "iterations",
        "hidden",
        "val_every",
        "val_episodes",
        "eval_batch",
        "train_classes",
        "val_classes",
        "checkpoint_every",
    ):
        if key in cfg and cfg[key] < 1:
            raise common.UserError(f"--{key.replace('_', '-')}: expected a positive integer, got {cfg[key]}")
    for key in ("steps", "eval_steps", "test_episodes"):
        if cfg[key] < 0:
            raise common.UserError(f"--{key.replace('_', '-')}: expected a non-negative integer, got {cfg[key]}")
    for key in ("inner_lr", "meta_lr"):
        if not cfg[key] > 0:
            raise common.UserError(f"--{key.replace('_', '-')}: expected a positive number, got {cfg[key]}")
    if args.job in REAL_DATA and getattr(args, "data", None) is None:
        raise common.UserError(
            f"--data: the {args.job} job needs the dataset folder (see `fastmaml train {args.job} "
            f"--help` and fastmaml/data/{args.job}.py for the layout and where to get it)"
        )
    return cfg


def load_splits(cfg: Dict, data: Optional[Path], cache_dir: Optional[Path]) -> Splits:
    """The job's meta-train / validation / test classes, checked against the episode shape."""
    job = cfg["job"]
    if job == "miniimagenet":
        splits = miniimagenet_splits(data, cache_dir=cache_dir)
    else:
        if job == "omniglot":
            dataset = load_omniglot(data, cache_dir=cache_dir)
            available, what = dataset.num_classes, f"the {dataset.num_classes} characters in {data}"
        else:
            available, what = DEMO_CLASSES, f"the {DEMO_CLASSES} demo classes"
        n_train, n_val = cfg["train_classes"], cfg["val_classes"]
        if n_train + n_val >= available:
            preset = PRESETS[job]
            raise common.UserError(
                f"--train-classes, --val-classes: {n_train} + {n_val} classes leave none of {what} for the "
                f"meta-test; pass smaller values (the preset is {preset['train_classes']} + "
                f"{preset['val_classes']}"
                + (", the MAML split of Omniglot's 1623 characters)" if job == "omniglot" else ")")
            )
        if job == "omniglot":
            splits = split_omniglot(dataset, train_characters=n_train, val_characters=n_val)
        else:
            splits = glyph_splits(
                num_classes=DEMO_CLASSES, val_classes=n_val, test_classes=DEMO_CLASSES - n_train - n_val
            )
    _check_split_sizes(cfg, splits)
    return splits


def _check_split_sizes(cfg: Dict, splits: Splits) -> None:
    """Every split must hold `--ways` classes (an error naming the option to change, not the sampler's)."""
    ways, job = cfg["ways"], cfg["job"]
    fixes = (
        "raise --train-classes",
        "raise --val-classes",
        "lower --train-classes or --val-classes (the meta-test gets the rest)",
    )
    for i, (name, split) in enumerate(zip(("meta-training", "validation", "meta-test"), splits)):
        rotated = job == "omniglot" and i == 0
        classes = split.num_classes * (4 if rotated else 1)
        if classes >= ways:
            continue
        hint = f"add classes to {SPLIT_FILES[i]}" if job == "miniimagenet" else fixes[i]
        raise common.UserError(
            f"--ways: {ways}-way episodes need {ways} classes but the {name} split has "
            f"{classes}{' (rotations included)' if rotated else ''}; lower --ways or {hint}"
        )


def widths_arg(text: str):
    """--widths: four positive ints, comma-separated."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        widths = ()
    if len(widths) != 4 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive ints like 64,160,320,640, got {text!r}")
    return widths


def build_model(cfg: Dict, example_shape) -> torch.nn.Module:
    """The network of `cfg["method"]` for `example_shape` `[C, H, W]`: conv4, ResNet-12 or the MLP (CAVIA:
    conv4 with FiLM; black-box: `SnailClassifier`), with per-step BatchNorm statistics for --bn per_step."""
    if cfg.get("method") == "blackbox":
        return SnailClassifier(example_shape[0], cfg["ways"], hidden=cfg["hidden"], image_size=example_shape[-1])
    if cfg.get("method") == "cavia":
        model = context_conv4(
            example_shape[0],
            cfg["ways"],
            hidden=cfg["hidden"],
            image_size=example_shape[-1],
            num_context=cfg["context"],
        )
    elif cfg["model"] == "resnet12":
        model = resnet12(cfg["ways"], widths=tuple(cfg["widths"]), in_channels=example_shape[0])
    elif cfg["model"] == "mlp":
        flat = 1
        for s in example_shape:
            flat *= s
        model = omniglot_mlp(cfg["ways"], in_features=flat)
    else:
        model = conv4(
            example_shape[0],
            cfg["ways"],
            hidden=cfg["hidden"],
            image_size=example_shape[-1],
            norm=cfg.get("norm", "batch"),
        )
    if cfg["bn"] == "per_step":
        fastmaml.add_per_step_stats(model, cfg["steps"])
    return model


def learner(cfg: Dict, model: torch.nn.Module) -> Optional[methods.Learner]:
    """The inner loop of `cfg["method"]` for `model` (None for the black-box learner)."""
    return None if cfg["method"] == "blackbox" else methods.Learner(cfg, model, "cross_entropy")


def query_logits(model, inner: Optional[methods.Learner], batch, steps: int) -> torch.Tensor:
    """Query logits `[T, Nq, ways]` of a batch of episodes: after `steps` steps of `inner`'s inner loop on
    the support sets, or the black-box learner's prediction from them (`inner` None)."""
    if inner is None:
        return model(batch.support_x, batch.support_y, batch.query_x)
    return inner.adapt(model, batch.support_x, batch.support_y, steps)(batch.query_x)


def evaluate(
    model,
    sampler: EpisodeSampler,
    episodes: Episodes,
    cfg: Dict,
    device,
    progress=None,
    inner: Optional[methods.Learner] = None,
) -> torch.Tensor:
    """Query accuracy after `eval_steps` inner steps on each episode's support set -> `[episodes]`.

    inner: the method's inner loop (`learner(cfg, model)`; None: the black-box learner, no steps). Runs
    the model in eval mode (no running statistics are updated). progress: a `common.Progress` advanced by
    the episodes of each batch (it may raise `common.Interrupted`)."""
    accs = []
    was_training = model.training
    model.eval()
    try:
        for batch in sampler.batches(episodes, cfg["eval_batch"]):
            batch = batch.to(device)
            with torch.no_grad():
                logits = query_logits(model, inner, batch, cfg["eval_steps"])
            accs.append((logits.argmax(-1) == batch.query_y).float().mean(-1).cpu())
            if progress is not None:
                progress.update(batch.num_tasks)
    finally:
        model.train(was_training)
    return torch.cat(accs)


def run(args: argparse.Namespace) -> Dict:
    """Meta-trains (or resumes) `args.job`, validates, tests; writes checkpoint.pt, best.pt, metrics.json
    and the plots into --out and returns the metrics (or, when stopped by SIGINT/SIGTERM, a dict with
    "interrupted")."""
    cfg = resolve_config(args)
    with common.Job(args, cfg["job"], meta_batch=cfg["meta_batch"]) as job:
        return _run(args, cfg, job)


def _new_state(cfg: Dict, example_shape, device) -> common.TrainingState:
    """The state at iteration 0: the method's network, its inner loop (`state.inner`; its learned rates
    are trained by the same Adam and kept in the checkpoint), the episode stream, empty histories."""
    common.seed_everything(cfg["seed"])
    model = build_model(cfg, example_shape).to(device)
    inner = learner(cfg, model)
    trainable = [p for p in model.parameters() if p.requires_grad] + ([] if inner is None else inner.parameters())
    parts = {
        "model": model,
        "optimizer": torch.optim.Adam(trainable, lr=cfg["meta_lr"]),
        "episodes_rng": torch.Generator().manual_seed(cfg["seed"]),
    }
    if inner is not None and inner.rates is not None:
        parts["inner_rates"] = inner.rates
    state = common.TrainingState(
        cfg,
        run_keys=RUN_KEYS,
        legacy={**LATER_KEYS, **PRESETS[cfg["job"]]},
        parts=parts,
        values={
            "history": {"query_loss_before": [], "query_loss_after": [], "train_accuracy": [], "val_accuracy": []},
            "best": {"val_accuracy": -1.0, "iteration": 0},
            "best_model": None,
            "best_rates": None,
            "step_seconds": [],
            "step_memory": None,
        },
    )
    state.inner = inner
    return state


class _Counted:
    """A progress that counts its updates (None: counts only)."""

    def __init__(self, progress):
        self.progress, self.calls = progress, 0

    def update(self, n: int = 1, **fields) -> None:
        self.calls += 1
        if self.progress is not None:
            self.progress.update(n, **fields)


def _evaluate_all(
    model,
    sampler: EpisodeSampler,
    episodes: Episodes,
    cfg: Dict,
    device,
    job: common.Job,
    progress=None,
    inner: Optional[methods.Learner] = None,
) -> torch.Tensor:
    """`evaluate` (with the method's inner loop `inner`) on `episodes` -> `[episodes]` accuracies. Under
    torchrun each rank adapts its contiguous share of the episodes and the accuracies are gathered: every
    rank holds those of the whole set (so the mean and the CI are the whole set's). Every rank advances
    `progress` equally often (its stop checks are collective): a rank with fewer batches than the others
    adds empty updates."""
    if not job.distributed:
        return evaluate(model, sampler, episodes, cfg, device, progress, inner)
    ranks, total = job.ranks, len(episodes)
    start, stop = distributed.share_range(total, ranks.rank, ranks.size)
    rounds = math.ceil(max(distributed.share_sizes(total, ranks.size)) / cfg["eval_batch"])
    counted = _Counted(progress)
    if stop > start:
        accs = evaluate(
            model,
            sampler,
            Episodes(episodes.classes[start:stop], episodes.examples[start:stop]),
            cfg,
            device,
            counted,
            inner,
        )
    else:
        accs = torch.zeros(0)
    for _ in range(rounds - counted.calls):
        counted.update(0)
    return ranks.gather(accs, total, "the gathering of the evaluation")


def _shown(job: common.Job, episodes: int, desc: str):
    """(progress total, description) of an evaluation of `episodes`: rank 0 shows its own share."""
    if not job.distributed or job.ranks.size == 1:
        return episodes, desc
    mine = distributed.share_sizes(episodes, job.ranks.size)[0]
    return mine, f"{desc} (rank 0: {mine} of {episodes} episodes)"


def _method_step(state: common.TrainingState, batch, iteration: int) -> Dict[str, torch.Tensor]:
    """The method's gradient on `batch` into `.grad` (not the optimizer step); its logged means over the
    tasks: query loss (before and) after adaptation, query accuracy after."""
    if state.inner is None:
        logits = state.model(batch.support_x, batch.support_y, batch.query_x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.query_y.flatten())
        loss.backward()
        accuracy = (logits.detach().argmax(-1) == batch.query_y).float().mean()
        return {"query_loss_after": loss.detach(), "accuracy_after": accuracy}
    result = state.inner.meta_step(state.model, batch, iteration)
    return {
        "query_loss_before": result.query_loss_before.float().mean(),
        "query_loss_after": result.query_loss_after.float().mean(),
        "accuracy_after": result.accuracy_after.float().mean(),
    }


def _samplers(cfg: Dict, splits: Splits, device):
    train_set, val_set, test_set = (s.to(device) for s in splits)
    shape = (cfg["ways"], cfg["shots"], cfg["query"])
    try:
        return (
            EpisodeSampler(train_set, *shape, rotations=cfg["job"] == "omniglot"),
            EpisodeSampler(val_set, *shape),
            EpisodeSampler(test_set, *shape),
        )
    except ValueError as exc:  # e.g. more shots + query than a class has examples
        raise common.UserError(f"--shots, --query: {exc}") from None


def _run(args: argparse.Namespace, cfg: Dict, job: common.Job) -> Dict:
    device, out, name = job.device, job.out, cfg["job"]
    files = {
        "checkpoint": job.checkpoint_path,
        "best weights": out / common.BEST,
        "metrics": out / common.METRICS,
        "loss plot": out / LOSS_PLOT,
        "accuracy plot": out / ACCURACY_PLOT,
    }
    resume = None
    if args.resume:  # read and checked before the data: a bad checkpoint is reported at once
        spec = common.TrainingState(
            cfg,
            parts=dict.fromkeys(("model", "optimizer", "episodes_rng")),
            values={},
            run_keys=RUN_KEYS,
            legacy={**LATER_KEYS, **PRESETS[name]},
        )
        resume = job.load_checkpoint(spec)
    try:
        if name in REAL_DATA:  # the decoded-image cache is written by one rank at a time (rank 0 first)
            with job.ranks.in_turn("data", "loading the dataset"):
                splits = load_splits(cfg, getattr(args, "data", None), getattr(args, "cache_dir", None))
        else:
            splits = load_splits(cfg, getattr(args, "data", None), getattr(args, "cache_dir", None))
    except DatasetError as exc:
        raise common.UserError(str(exc).replace("\n", " ")) from None
    train, val, test = _samplers(cfg, splits, device)
    val_episodes = val.fixed_episodes(cfg["val_episodes"], EVAL_SEED)
    state = _new_state(cfg, splits.train.example_shape, device)
    if resume is not None:
        state.restore(resume, job.checkpoint_path)
    start, total = state.iteration, cfg["iterations"]

    def is_validation(iteration: int) -> bool:
        return iteration > 0 and (iteration % cfg["val_every"] == 0 or iteration == total)

    def validate() -> None:
        """Validation at `state.iteration`: history, best.pt when better, checkpoint, metrics.json, plots.
        Raises `common.Interrupted` (nothing recorded: the resumed run validates again)."""
        it = state.iteration
        job.say(f"{name}: validation at iteration {it} ({len(val_episodes)} episodes)")
        t0 = time.perf_counter()
        shown, desc = _shown(job, len(val_episodes), f"validation at iteration {it}")
        bar = job.progress(desc, shown, unit="episodes", leave=False, interruptible=True)
        try:
            acc = float(
                _evaluate_all(state.model, val, val_episodes, cfg, device, job, progress=bar, inner=state.inner).mean()
            )
        finally:
            bar.close()
        state.history["val_accuracy"].append((it, acc))
        improved = acc > state.best["val_accuracy"]
        if improved:  # the checkpoint keeps the best weights too: best.pt is rewritten from them if need be
            state.best = {"val_accuracy": acc, "iteration": it}
            state.best_model = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
            if state.inner is not None and state.inner.rates is not None:
                state.best_rates = {k: v.detach().clone() for k, v in state.inner.rates.state_dict().items()}
        job.checkpoint(state)
        if improved:
            write_best()
        write_results({"status": "training"})
        best = state.best
        job.say(
            f"{name}: validation at iteration {it}: accuracy {100 * acc:.2f}% (best "
            f"{100 * best['val_accuracy']:.2f}% at iteration {best['iteration']}), "
            f"{time.perf_counter() - t0:.1f} s"
        )

    def write_best() -> None:
        if not job.main:
            return
        best = {
            "model": state.best_model,
            "iteration": state.best["iteration"],
            "val_accuracy": state.best["val_accuracy"],
            "config": cfg,
            "method": cfg["method"],
        }
        if state.best_rates is not None:
            best["inner_rates"] = state.best_rates
        common.save_checkpoint(files["best weights"], best)

    def write_results(extra: Dict) -> Dict:
        """metrics.json and the two plots, rewritten at every validation and at the end."""
        history, steps = state.history, state.step_seconds
        metrics = {
            "config": cfg,
            "method": cfg["method"],
            "label": methods.LABELS[cfg["method"]],
            "chance": 1.0 / cfg["ways"],
            "iterations_done": state.iteration,
            "best": state.best,
            "seconds_per_meta_step": sum(steps) / len(steps) if steps else None,
            "step_memory_bytes": state.step_memory,
            "device": str(device),
            "processes": job.ranks.size,
            "history": history,
            "resumed_from": start if args.resume else None,
            **extra,
        }
        if not job.main:
            return metrics
        common.write_json(files["metrics"], metrics)
        common.plot_curves(
            {k: history[k] for k in ("query_loss_before", "query_loss_after") if history[k]},
            files["loss plot"],
            title=f"{name}: meta-training query loss",
            ylabel="cross-entropy",
        )
        common.plot_curves(
            {"train (after adaptation)": history["train_accuracy"], "validation": history["val_accuracy"]},
            files["accuracy plot"],
            title=f"{name}: query accuracy",
            ylabel="accuracy",
        )
        return metrics

    where = (
        str(device)
        if not job.distributed
        else (f"{job.ranks.size} processes ({job.ranks.backend}; rank 0 on {device})")
    )
    what = (
        f" ({state.inner.describe()})"
        if state.inner is not None
        else " (black-box learner: SNAIL-style attention over the support, trained on cross-entropy)"
    )
    what = "" if cfg["method"] == "maml" else what
    job.say(
        f"{name}: {'resuming at' if args.resume else 'starting at'} iteration {start} of {total} on {where}{what}; "
        f"validation every {cfg['val_every']}, checkpoint every {cfg['checkpoint_every']} iterations to "
        f"{job.checkpoint_path}"
    )

    def train_step() -> Dict:
        """One meta-iteration: a meta-batch of episodes, `fastmaml.meta_step`, Adam; returns its summary.

        Under torchrun every rank draws the whole meta-batch's episode indices from the same stream, builds
        its share's images and runs `meta_step` on them; one all-reduce weighted by task count combines the
        meta-gradients (with the per-step BatchNorm statistics, the logged means and the stop flag), and every
        rank takes the same Adam step."""
        it = state.iteration
        t0 = time.perf_counter()
        if job.distributed:
            episodes = train.sample_indices(cfg["meta_batch"], state.episodes_rng)
            lo, hi = distributed.share_range(cfg["meta_batch"], job.ranks.rank, job.ranks.size)
            batch = train.gather(Episodes(episodes.classes[lo:hi], episodes.examples[lo:hi]))
        else:
            batch = train.sample(cfg["meta_batch"], state.episodes_rng)
        warm = getattr(state, "warm", False)  # the first step of a process (tracing, allocations) is not timed
        memory = common.StepMemory(device) if state.step_memory is None and warm else None
        with memory or contextlib.nullcontext():
            state.optimizer.zero_grad(set_to_none=True)
            logged = _method_step(state, batch, it)
            if job.distributed:
                stats = distributed.batchnorm_statistics(state.model)  # running and MAML++ per-step statistics
                keys = list(logged)
                rates = None if state.inner is None else state.inner.rates
                with job.ranks.collective(f"the all-reduce of iteration {it + 1}"):
                    reduced = distributed.all_reduce_grads(
                        state.model,
                        extra=rates,
                        num_tasks=batch.num_tasks,
                        buffers=stats,
                        values=[logged[k] for k in keys] + [job.stop_flag],
                    ).tolist()
                job.agree_stop(reduced[-1] > 0)
                logged = dict(zip(keys, reduced))
            if state.inner is not None:  # the method's bound on the meta-gradient entries (MAML++: ±10)
                state.inner.clamp_gradients(p for group in state.optimizer.param_groups for p in group["params"])
            state.optimizer.step()
        if memory is not None:
            state.step_memory = memory.bytes
        if warm:
            state.step_seconds.append(time.perf_counter() - t0)
        state.warm = True
        s = {k: float(v) for k, v in logged.items()}
        state.iteration = it + 1
        if "query_loss_before" in s:
            state.history["query_loss_before"].append((it + 1, s["query_loss_before"]))
        state.history["query_loss_after"].append((it + 1, s["query_loss_after"]))
        state.history["train_accuracy"].append((it + 1, s["accuracy_after"]))
        return s

    bar = job.progress(name, total, initial=start)
    try:
        if is_validation(state.iteration) and all(i != state.iteration for i, _ in state.history["val_accuracy"]):
            validate()  # the checkpoint was written by a run stopped during this validation
        while state.iteration < total and not job.stop_requested:
            with methods.meta_iteration(state.iteration + 1):
                s = train_step()
            shown = {"val": state.best["val_accuracy"]} if state.best["iteration"] else {}  # best validation so far
            bar.update(1, loss=s["query_loss_after"], acc=s["accuracy_after"], **shown)
            if is_validation(state.iteration):
                bar.flush()
                validate()
            elif job.checkpoint_due(state.iteration, total):
                job.checkpoint(state)
    except common.Interrupted:
        bar.close()
        return job.stopped(state, " during the validation")
    bar.close()
    if job.saved_iteration != state.iteration:
        job.checkpoint(state)  # stopped between checkpoints, or resumed with nothing left to train
    if job.stop_requested:
        return job.stopped(state)
    if state.best_model is None:  # a checkpoint from before the best weights were kept in it
        best, error = None, None
        if job.main:
            try:
                best = common.load_checkpoint(files["best weights"], required=("model",))["model"]
            except common.UserError as exc:
                error = exc
        if job.distributed:
            job.ranks.agree(error)
            best = job.ranks.share(best, "the sending of the best weights to every rank")
        elif error is not None:
            raise error
        state.best_model = best
    write_best()  # (a kill between checkpoint.pt and best.pt may have left an older best.pt)

    extra: Dict = {"status": "done"}
    if cfg["test_episodes"] > 0:
        test_episodes = test.fixed_episodes(cfg["test_episodes"], EVAL_SEED + 1)
        state.model.load_state_dict(state.best_model)
        if state.best_rates is not None:
            state.inner.rates.load_state_dict(state.best_rates)
        torch.manual_seed(cfg["seed"])
        baseline = build_model(cfg, splits.train.example_shape).to(device)
        job.say(
            f"{name}: test on {cfg['test_episodes']} episodes (best weights, iteration {state.best['iteration']}, "
            "and the same network from a random initialization)"
        )
        shown, desc = _shown(job, cfg["test_episodes"], "test")
        bar = job.progress(desc, 2 * shown, unit="episodes", leave=False, interruptible=True)
        try:
            acc, ci = common.mean_ci95(
                _evaluate_all(state.model, test, test_episodes, cfg, device, job, bar, inner=state.inner).tolist()
            )
            b_acc, b_ci = common.mean_ci95(
                _evaluate_all(
                    baseline, test, test_episodes, cfg, device, job, bar, inner=learner(cfg, baseline)
                ).tolist()
            )
        except common.Interrupted:
            bar.close()
            return job.stopped(state, " during the test (training is complete)")
        bar.close()
        extra["test"] = {
            "accuracy": acc,
            "ci95": ci,
            "episodes": cfg["test_episodes"],
            "weights": f"best.pt (iteration {state.best['iteration']})",
        }
        extra["random_init_baseline"] = {"accuracy": b_acc, "ci95": b_ci, "episodes": cfg["test_episodes"]}
        headline = (
            f"{name}: {cfg['ways']}-way {cfg['shots']}-shot test accuracy {100 * acc:.2f} ± {100 * ci:.2f}% "
            f"({cfg['test_episodes']} episodes, {cfg['eval_steps']} inner steps); random init "
            f"{100 * b_acc:.2f} ± {100 * b_ci:.2f}%; chance {100 / cfg['ways']:.1f}%"
        )
    else:
        headline = (
            f"{name}: {state.iteration} iterations, best validation accuracy "
            f"{100 * state.best['val_accuracy']:.2f}% at iteration {state.best['iteration']} (no test: "
            "--test-episodes 0)"
        )
    metrics = write_results(extra)
    job.summary(headline + "; files:", files)
    return metrics
