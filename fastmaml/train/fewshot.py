"""Few-shot image classification with MAML: jobs `omniglot`, `miniimagenet` and `fewshot-demo`.

    fastmaml train omniglot --data ~/data/omniglot        # Finn et al. 2017, 5-way 1-shot
    fastmaml train miniimagenet --data ~/data/miniimagenet
    fastmaml train fewshot-demo                           # embedded glyph dataset, no download

Each job starts from a preset (the MAML paper's protocol for the real datasets; a budget that
finishes in minutes on 2 CPU cores for the demo) and every option overrides it. Meta-training uses
`fastmaml.meta_step(..., loss="cross_entropy")` and Adam; every `--val-every` iterations the model is
adapted (`fastmaml.adapt`, `--eval-steps` steps) on a fixed list of validation episodes, the best
weights go to `best.pt` and the full state to `checkpoint.pt` (for `--resume`). At the end, the best
weights are evaluated on `--test-episodes` fixed meta-test episodes (mean accuracy with a 95% CI),
next to the same network adapted from a random initialization as a baseline. Writes metrics.json,
loss.png and accuracy.png to `--out`.

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
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, Optional

import torch

import fastmaml
from fastmaml.data import EpisodeSampler, Episodes, Splits, glyph_splits, load_omniglot, miniimagenet_splits, \
    split_omniglot
from fastmaml.models import conv4, omniglot_mlp
from fastmaml.train import common

# The protocol of each job; every entry can be overridden by the option of the same name.
PRESETS: Dict[str, Dict] = {
    # Finn et al. 2017, Omniglot 5-way 1-shot: meta-batch 32, α = 0.4, 1 step in training, 3 at test;
    # characters: 1100 meta-train (+ rotations), 100 validation, the other 423 meta-test
    "omniglot": dict(ways=5, shots=1, query=15, meta_batch=32, inner_lr=0.4, steps=1, eval_steps=3,
                     iterations=60000, meta_lr=1e-3, model="conv4", hidden=64, val_every=1000,
                     val_episodes=300, test_episodes=600, eval_batch=50, train_classes=1100, val_classes=100),
    # Finn et al. 2017, mini-ImageNet 5-way 1-shot: meta-batch 4, α = 0.01, 5 steps, 10 at test, 32 filters;
    # classes: those of train.csv / val.csv / test.csv (64 / 16 / 20)
    "miniimagenet": dict(ways=5, shots=1, query=15, meta_batch=4, inner_lr=0.01, steps=5, eval_steps=10,
                         iterations=60000, meta_lr=1e-3, model="conv4", hidden=32, val_every=1000,
                         val_episodes=300, test_episodes=600, eval_batch=20),
    # the embedded glyphs: the Omniglot recipe on a budget that runs in minutes on 2 CPU cores
    "fewshot-demo": dict(ways=5, shots=1, query=5, meta_batch=8, inner_lr=0.4, steps=1, eval_steps=3,
                         iterations=200, meta_lr=3e-3, model="conv4", hidden=32, val_every=50,
                         val_episodes=100, test_episodes=600, eval_batch=50, train_classes=400, val_classes=100),
}
SPLIT_FILES = ("train.csv", "val.csv", "test.csv")  # mini-ImageNet
DEMO_CLASSES = 600  # glyph classes of the demo dataset
EVAL_SEED = 0  # validation and test episodes are the same for every run (and every --seed)
# options that define the training run: --resume refuses a checkpoint made with different ones
RUN_KEYS = ("job", "ways", "shots", "query", "meta_batch", "inner_lr", "steps", "order", "bn", "meta_lr",
            "model", "hidden", "seed", "val_every", "val_episodes", "eval_steps", "train_classes", "val_classes",
            "msl", "first_order_until")
# values of run keys added after a checkpoint format existed (what such a checkpoint ran with)
LATER_KEYS = {"msl": 0, "first_order_until": 0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def preset_help(key: str, text: str) -> str:
        values = ", ".join(f"{job} {p[key]}" for job, p in PRESETS.items() if key in p)
        return f"{text} (preset: {values})"

    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder (required for omniglot and miniimagenet; see the job's docs)")
    parser.add_argument("--ways", type=int, help=preset_help("ways", "classes per task (N)"))
    parser.add_argument("--shots", type=int, help=preset_help("shots", "support examples per class (K)"))
    parser.add_argument("--query", type=int, help=preset_help("query", "query examples per class"))
    parser.add_argument("--meta-batch", type=int, help=preset_help("meta_batch", "tasks per meta-step"))
    parser.add_argument("--inner-lr", type=float, help=preset_help("inner_lr", "inner-loop learning rate α"))
    parser.add_argument("--steps", type=int, help=preset_help("steps", "inner steps in meta-training"))
    parser.add_argument("--eval-steps", type=int, help=preset_help("eval_steps", "inner steps at validation/test"))
    parser.add_argument("--iterations", type=int, help=preset_help("iterations", "meta-training iterations"))
    parser.add_argument("--meta-lr", type=float, help=preset_help("meta_lr", "Adam learning rate"))
    parser.add_argument("--model", choices=["conv4", "mlp"], help=preset_help("model", "network"))
    parser.add_argument("--hidden", type=int, help=preset_help("hidden", "conv4 filters per layer"))
    parser.add_argument("--order", choices=list(fastmaml.ORDERS), default="second",
                        help="meta-gradient (see fastmaml.meta_step): second = exact MAML (default), "
                             "checkpoint, first = FOMAML, implicit")
    parser.add_argument("--first-order", action="store_true", help="same as --order first")
    parser.add_argument("--msl", type=int, default=0, metavar="N",
                        help="MAML++ multi-step loss, annealed to the last step over the first N iterations "
                             "(default 0: off, the last step's query loss only)")
    parser.add_argument("--first-order-until", type=int, default=0, metavar="N",
                        help="first-order meta-steps before iteration N, then --order (MAML++ derivative-order "
                             "annealing; default 0: off)")
    parser.add_argument("--bn", choices=list(fastmaml.BN_MODES), default="batch",
                        help="BatchNorm statistics in the inner loop: batch (MAML, default), frozen, per_step (MAML++)")
    parser.add_argument("--train-classes", type=int,
                        help=preset_help("train_classes", "meta-training classes (Omniglot: characters, each also "
                                         "rotated by 90°, 180°, 270°); the classes left after --val-classes are "
                                         "the meta-test's; miniimagenet: fixed by train.csv"))
    parser.add_argument("--val-classes", type=int,
                        help=preset_help("val_classes", "meta-validation classes; miniimagenet: fixed by val.csv"))
    parser.add_argument("--val-every", type=int, help=preset_help("val_every", "iterations between validations"))
    parser.add_argument("--val-episodes", type=int, help=preset_help("val_episodes", "validation episodes"))
    parser.add_argument("--test-episodes", type=int,
                        help=preset_help("test_episodes", "meta-test episodes at the end (0: no test)"))
    parser.add_argument("--eval-batch", type=int,
                        help=preset_help("eval_batch", "episodes adapted at once in evaluation"))
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialization and training episodes")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/<job>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where decoded images are cached (default: <data>/.fastmaml_cache)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_config(args: argparse.Namespace) -> Dict:
    """The preset of `args.job` with every option the user gave on top; validated."""
    if args.job not in PRESETS:
        raise ValueError(f"job: expected one of {sorted(PRESETS)}, got {args.job!r}")
    cfg = dict(PRESETS[args.job])
    for key in cfg:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    cfg["job"] = args.job
    cfg["order"] = "first" if args.first_order else args.order
    cfg["bn"] = args.bn
    cfg["seed"] = args.seed
    cfg["msl"] = getattr(args, "msl", 0)
    cfg["first_order_until"] = getattr(args, "first_order_until", 0)
    for key in ("msl", "first_order_until"):
        if cfg[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')}: expected a non-negative number of iterations, got {cfg[key]}")
    if cfg["msl"] and cfg["order"] == "implicit":
        raise ValueError("--msl: the implicit order has no per-step query losses; use --order second, "
                         "checkpoint or first")
    for key in ("train_classes", "val_classes"):
        if getattr(args, key, None) is not None and key not in cfg:
            raise ValueError(f"--{key.replace('_', '-')}: the {args.job} split is fixed by the dataset's "
                             "train.csv / val.csv / test.csv; edit those files to change it")
    for key in ("ways", "shots", "query", "meta_batch", "iterations", "hidden", "val_every", "val_episodes",
                "eval_batch", "train_classes", "val_classes"):
        if key in cfg and cfg[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')}: expected a positive integer, got {cfg[key]}")
    for key in ("steps", "eval_steps", "test_episodes"):
        if cfg[key] < 0:
            raise ValueError(f"--{key.replace('_', '-')}: expected a non-negative integer, got {cfg[key]}")
    for key in ("inner_lr", "meta_lr"):
        if not cfg[key] > 0:
            raise ValueError(f"--{key.replace('_', '-')}: expected a positive number, got {cfg[key]}")
    if args.job in ("omniglot", "miniimagenet") and args.data is None:
        raise ValueError(f"--data: the {args.job} job needs the dataset folder (see `fastmaml train {args.job} "
                         "--help` and fastmaml/data/" + ("omniglot.py" if args.job == "omniglot" else "miniimagenet.py")
                         + " for the layout and where to get it)")
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
            raise ValueError(
                f"--train-classes, --val-classes: {n_train} + {n_val} classes leave none of {what} for the "
                f"meta-test; pass smaller values (the preset is {preset['train_classes']} + "
                f"{preset['val_classes']}" + (", the MAML split of Omniglot's 1623 characters)" if job == "omniglot"
                                              else ")"))
        if job == "omniglot":
            splits = split_omniglot(dataset, train_characters=n_train, val_characters=n_val)
        else:
            splits = glyph_splits(num_classes=DEMO_CLASSES, val_classes=n_val,
                                  test_classes=DEMO_CLASSES - n_train - n_val)
    _check_split_sizes(cfg, splits)
    return splits


def _check_split_sizes(cfg: Dict, splits: Splits) -> None:
    """Every split must hold `--ways` classes (an error naming the option to change, not the sampler's)."""
    ways, job = cfg["ways"], cfg["job"]
    fixes = ("raise --train-classes", "raise --val-classes",
             "lower --train-classes or --val-classes (the meta-test gets the rest)")
    for i, (name, split) in enumerate(zip(("meta-training", "validation", "meta-test"), splits)):
        rotated = job == "omniglot" and i == 0
        classes = split.num_classes * (4 if rotated else 1)
        if classes >= ways:
            continue
        hint = f"add classes to {SPLIT_FILES[i]}" if job == "miniimagenet" else fixes[i]
        raise ValueError(f"--ways: {ways}-way episodes need {ways} classes but the {name} split has "
                         f"{classes}{' (rotations included)' if rotated else ''}; lower --ways or {hint}")


def build_model(cfg: Dict, example_shape) -> torch.nn.Module:
    """conv4 or the MLP for `example_shape` `[C, H, W]`, with per-step BatchNorm statistics for --bn per_step."""
    if cfg["model"] == "mlp":
        flat = 1
        for s in example_shape:
            flat *= s
        model = omniglot_mlp(cfg["ways"], in_features=flat)
    else:
        model = conv4(example_shape[0], cfg["ways"], hidden=cfg["hidden"], image_size=example_shape[-1])
    if cfg["bn"] == "per_step":
        fastmaml.add_per_step_stats(model, cfg["steps"])
    return model


def evaluate(model, sampler: EpisodeSampler, episodes: Episodes, cfg: Dict, device) -> torch.Tensor:
    """Query accuracy after `eval_steps` inner steps on each episode's support set -> `[episodes]`.

    Runs the model in eval mode (no running statistics are updated)."""
    accs = []
    was_training = model.training
    model.eval()
    try:
        for batch in sampler.batches(episodes, cfg["eval_batch"]):
            batch = batch.to(device)
            with torch.no_grad():
                adapted = fastmaml.adapt(model, batch.support_x, batch.support_y, inner_lr=cfg["inner_lr"],
                                         steps=cfg["eval_steps"], order="first", loss="cross_entropy",
                                         batch_norm=cfg["bn"])
                logits = adapted(batch.query_x)
            accs.append((logits.argmax(-1) == batch.query_y).float().mean(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(accs)


def _check_resume(saved: Dict, cfg: Dict) -> None:
    preset = PRESETS[cfg["job"]]
    # a checkpoint from before a key existed ran with the preset's value
    diff = {k: (saved.get(k, preset.get(k, LATER_KEYS.get(k))), cfg.get(k)) for k in RUN_KEYS
            if saved.get(k, preset.get(k, LATER_KEYS.get(k))) != cfg.get(k)}
    if diff:
        raise ValueError(
            "--resume: the checkpoint was made with other settings "
            + ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            + "; use the same options (only --iterations, --test-episodes, --eval-batch and --device may change)"
        )


def run(args: argparse.Namespace) -> Dict:
    cfg = resolve_config(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out) if args.out is not None else Path("runs") / cfg["job"]
    out.mkdir(parents=True, exist_ok=True)

    splits = load_splits(cfg, args.data, args.cache_dir)
    train_set, val_set, test_set = (s.to(device) for s in splits)
    shape = (cfg["ways"], cfg["shots"], cfg["query"])
    train = EpisodeSampler(train_set, *shape, rotations=cfg["job"] == "omniglot")
    val = EpisodeSampler(val_set, *shape)
    test = EpisodeSampler(test_set, *shape)
    val_episodes = val.fixed_episodes(cfg["val_episodes"], EVAL_SEED)

    common.seed_everything(cfg["seed"])
    model = build_model(cfg, train_set.example_shape).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["meta_lr"])
    episodes_rng = torch.Generator().manual_seed(cfg["seed"])
    history = {"query_loss_before": [], "query_loss_after": [], "train_accuracy": [], "val_accuracy": []}
    best = {"val_accuracy": -1.0, "iteration": 0}
    start, step_seconds = 0, []

    if args.resume:
        state = common.load_checkpoint(out / common.CHECKPOINT)
        _check_resume(state["config"], cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        episodes_rng.set_state(state["episodes_rng"])
        common.set_rng_state(state["rng"])
        history, best, start, step_seconds = state["history"], state["best"], state["iteration"], state["step_seconds"]

    def save_state(iteration: int) -> None:
        common.save_checkpoint(out / common.CHECKPOINT, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration,
            "episodes_rng": episodes_rng.get_state(), "rng": common.rng_state(), "history": history,
            "best": best, "step_seconds": step_seconds, "config": cfg})

    bar = common.progress(range(start, cfg["iterations"]), total=cfg["iterations"], initial=start,
                          desc=cfg["job"], disable=True if args.no_progress else None)
    for it in bar:
        t0 = time.perf_counter()
        batch = train.sample(cfg["meta_batch"], episodes_rng)
        optimizer.zero_grad(set_to_none=True)
        order = "first" if it < cfg["first_order_until"] else cfg["order"]
        weights = fastmaml.msl_weights(cfg["steps"], it, cfg["msl"]) if cfg["msl"] and cfg["steps"] else None
        result = fastmaml.meta_step(model, batch, inner_lr=cfg["inner_lr"], steps=cfg["steps"], order=order,
                                    loss="cross_entropy", batch_norm=cfg["bn"], step_weights=weights)
        optimizer.step()
        step_seconds.append(time.perf_counter() - t0)
        s = result.summary()
        history["query_loss_before"].append((it + 1, s["query_loss_before"]))
        history["query_loss_after"].append((it + 1, s["query_loss_after"]))
        history["train_accuracy"].append((it + 1, s["accuracy_after"]))
        if (it + 1) % cfg["val_every"] == 0 or it + 1 == cfg["iterations"]:
            acc = float(evaluate(model, val, val_episodes, cfg, device).mean())
            history["val_accuracy"].append((it + 1, acc))
            if acc > best["val_accuracy"]:
                best = {"val_accuracy": acc, "iteration": it + 1}
                common.save_checkpoint(out / common.BEST, {"model": model.state_dict(), "iteration": it + 1,
                                                           "val_accuracy": acc, "config": cfg})
            save_state(it + 1)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{s['query_loss_after']:.3f}", acc=f"{s['accuracy_after']:.3f}",
                            val=f"{best['val_accuracy']:.3f}")

    metrics = {
        "config": cfg, "chance": 1.0 / cfg["ways"], "iterations_done": cfg["iterations"],
        "best": best, "seconds_per_meta_step": sum(step_seconds) / max(len(step_seconds), 1),
        "device": str(device), "history": history,
    }
    if cfg["test_episodes"] > 0:
        test_episodes = test.fixed_episodes(cfg["test_episodes"], EVAL_SEED + 1)
        model.load_state_dict(common.load_checkpoint(out / common.BEST)["model"])
        acc, ci = common.mean_ci95(evaluate(model, test, test_episodes, cfg, device).tolist())
        torch.manual_seed(cfg["seed"])
        baseline = build_model(cfg, train_set.example_shape).to(device)
        b_acc, b_ci = common.mean_ci95(evaluate(baseline, test, test_episodes, cfg, device).tolist())
        metrics["test"] = {"accuracy": acc, "ci95": ci, "episodes": cfg["test_episodes"],
                           "weights": f"best.pt (iteration {best['iteration']})"}
        metrics["random_init_baseline"] = {"accuracy": b_acc, "ci95": b_ci, "episodes": cfg["test_episodes"]}
        print(f"{cfg['job']}: {cfg['ways']}-way {cfg['shots']}-shot test accuracy {100 * acc:.2f} ± {100 * ci:.2f}% "
              f"({cfg['test_episodes']} episodes, {cfg['eval_steps']} inner steps); random init "
              f"{100 * b_acc:.2f} ± {100 * b_ci:.2f}%; chance {100 / cfg['ways']:.1f}%")
    common.write_json(out / common.METRICS, metrics)
    common.plot_curves({k: history[k] for k in ("query_loss_before", "query_loss_after")}, out / "loss.png",
                       title=f"{cfg['job']}: meta-training query loss", ylabel="cross-entropy")
    common.plot_curves({"train (after adaptation)": history["train_accuracy"],
                        "validation": history["val_accuracy"]}, out / "accuracy.png",
                       title=f"{cfg['job']}: query accuracy", ylabel="accuracy")
    return metrics
