"""`fastmaml compare <job>`: the methods of `--method` trained and evaluated side by side.

    fastmaml compare sinusoid                          # every method, the job's default budget
    fastmaml compare fewshot-demo --methods maml,cavia,blackbox --iterations 100

Each method runs as `fastmaml train <job> --method <m>` into `<out>/<m>/` with the same options (seed,
budget, held-out tasks or episodes), one after the other; a method already finished there is only
re-evaluated with `--resume`. A method whose meta-training diverges (`NonFiniteError`) gets a row saying
so, and the others still run. Then, in `<out>`:
- `comparison.md` and `comparison.json`: one row per method. Sinusoid: the held-out query MSE (mean and
  95% CI) after each of `--eval-steps` inner steps (the black-box learner has no steps: its one prediction
  from the support is shown in every column) and the pretrained baseline's; few-shot: the test accuracy
  (95% CI) after `--eval-steps` steps and the same network adapted from a random initialization. With
  both, the time per meta-step (the method's gradient and optimizer step, averaged over the run) and the
  peak memory of one meta-step (CUDA: allocated; CPU: growth of the process's resident set, indicative).
- `learning_curves.png`: every method's meta-training curve on one figure (sinusoid: the query MSE after
  adaptation, moving median; few-shot: the training query loss and the validation accuracy).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
from pathlib import Path
from typing import Dict, List

from fastmaml.errors import NonFiniteError
from fastmaml.train import common, methods

JOBS = {
    "sinusoid": "fastmaml.train.sinusoid",
    "fewshot-demo": "fastmaml.train.fewshot",
    "omniglot": "fastmaml.train.fewshot",
    "miniimagenet": "fastmaml.train.fewshot",
}
TABLE, SUMMARY, CURVES = "comparison.md", "comparison.json", "learning_curves.png"


def method_list(text: str) -> List[str]:
    """--methods: comma-separated names of `methods.METHODS`, each once."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in methods.METHODS]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct names among {','.join(methods.METHODS)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser, job: str) -> None:
    """The options of `fastmaml train <job>` (applied to every method) and --methods."""
    importlib.import_module(JOBS[job]).add_arguments(parser, job)
    parser.add_argument(
        "--methods",
        type=method_list,
        default=list(methods.METHODS),
        help=f"the methods to compare, comma-separated (default: {','.join(methods.METHODS)})",
    )
    parser.set_defaults(out=Path("runs") / f"compare-{job}")


def _resolve(module, args) -> None:
    """The job's own check of the options (a `UserError` for a combination a method refuses)."""
    if hasattr(module, "resolve"):
        module.resolve(args)
    else:
        module.resolve_config(args)


def run(args) -> Dict:
    """Runs every method of `args.methods` as the job `args.job`, then writes the table, its JSON and the
    learning curves into `args.out`. Returns the summary (or {"interrupted": method} when a run stopped)."""
    if "method" in common.given(args):
        raise common.UserError("--method: `fastmaml compare` runs several methods; list them with --methods")
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1"):
        raise common.UserError(
            "fastmaml compare: runs in one process; under torchrun run `fastmaml train "
            f"{args.job} --method <m>` for each method"
        )
    module = importlib.import_module(JOBS[args.job])
    runs = {}
    for name in args.methods:  # every combination is checked before anything runs
        ns = argparse.Namespace(**{**vars(args), "method": name, "out": Path(args.out) / name})
        _resolve(module, ns)
        runs[name] = ns
    results, failed = {}, {}
    for name, ns in runs.items():
        done = Path(ns.out) / common.CHECKPOINT
        if done.exists() and not ns.resume:
            ns.resume = True  # a method finished (or stopped) by an earlier compare continues
        try:
            metrics = module.run(ns)
        except NonFiniteError as exc:
            failed[name] = f"diverged in meta-training: {exc}"
            print(f"{args.job}: {methods.LABELS[name]} {failed[name]}")
            continue
        if "interrupted" in metrics:
            return {"interrupted": name}
        results[name] = metrics
    if not results:
        raise common.UserError(f"fastmaml compare {args.job}: every method diverged ({'; '.join(failed.values())})")
    summary = summarize(args.job, results, failed)
    out = Path(args.out)
    common.write_json(out / SUMMARY, summary)
    text = format_table(summary)
    (out / TABLE).write_text(text + "\n")
    plot(args.job, results, out / CURVES)
    print(f"\n{args.job}: {len(results)} methods\n{text}\nfiles: {out / TABLE}, {out / SUMMARY}, {out / CURVES}")
    return summary


def _resources(metrics: Dict) -> Dict:
    return {
        "seconds_per_meta_step": metrics.get("seconds_per_meta_step"),
        "step_memory_bytes": metrics.get("step_memory_bytes"),
    }


def _sinusoid_row(name: str, table: Dict, columns: List[str]) -> Dict:
    """{"name", "cells": {column: (mean, ci95)}} and, for the columns where some tasks' adaptation overflowed,
    "diverged": {column: {"diverged", "tasks", "median"}} (how many, of how many, the median over all)."""
    row = {"name": name, "cells": {c: (table[c]["mean"], table[c]["ci95"]) for c in columns}}
    diverged = {
        c: {k: table[c].get(k) for k in ("diverged", "tasks", "median")}
        for c in columns
        if table[c].get("diverged") or not math.isfinite(table[c]["mean"])
    }
    if diverged:
        row["diverged"] = diverged
    return row


def summarize(job: str, results: Dict[str, Dict], failed: Dict[str, str] = None) -> Dict:
    """{"job", "columns", "rows": [{"name", "cells": {column: (mean, ci95)}, resources}], "description"};
    failed: {method: why} for the methods without results (a row with "failed")."""
    rows = []
    failed_rows = [{"name": methods.LABELS[name], "failed": why} for name, why in (failed or {}).items()]
    if job == "sinusoid":
        first = next(iter(results.values()))
        steps = [k for k in first["config"]["eval_steps"] if k > 0]
        columns = [f"after_{k}" for k in steps]
        for m in results.values():
            rows.append({**_sinusoid_row(m["label"], m["eval"][m["label"]], columns), **_resources(m)})
        rows += failed_rows
        base = _sinusoid_row("pretrained", first["eval"]["pretrained"], columns)
        rows.append({**base, "seconds_per_meta_step": None, "step_memory_bytes": None})
        return {
            "job": job,
            "metric": "query MSE",
            "columns": columns,
            "rows": rows,
            "description": first["eval_description"],
        }
    columns = ["test_accuracy"]
    first = next(iter(results.values()))
    for m in results.values():
        test = m.get("test")
        cells = {"test_accuracy": (test["accuracy"], test["ci95"])} if test else {}
        base = m.get("random_init_baseline")
        rows.append(
            {
                "name": m["label"],
                "cells": cells,
                "best_val_accuracy": m["best"]["val_accuracy"],
                "random_init": None if base is None else (base["accuracy"], base["ci95"]),
                **_resources(m),
            }
        )
    cfg = first["config"]
    return {
        "job": job,
        "metric": "accuracy",
        "columns": columns,
        "rows": rows + failed_rows,
        "description": f"{cfg['ways']}-way {cfg['shots']}-shot accuracy on {cfg.get('test_episodes')} test "
        f"episodes after {cfg['eval_steps']} inner steps (95% CI), best validation weights",
    }


def sinusoid_cell(diverged: Dict) -> str:
    """A column where some held-out tasks' adaptation overflowed: "diverges on n/N tasks (median m)"."""
    from fastmaml.train.sinusoid import format_cell

    return format_cell({"mean": math.nan, **diverged})


def _cell(value, percent: bool) -> str:
    if value is None:
        return "n/a"
    mean, ci = value
    if not math.isfinite(mean):
        return "non-finite (diverges)"
    return f"{100 * mean:.1f} ± {100 * ci:.1f}%" if percent else f"{mean:.3f} ± {ci:.3f}"


def _seconds(row: Dict) -> str:
    s = row.get("seconds_per_meta_step")
    return "" if s is None else f"{1000 * s:.1f} ms"


def _memory(row: Dict) -> str:
    b = row.get("step_memory_bytes")
    return "" if b is None else f"{b / 2**20:.1f} MB"


def format_table(summary: Dict) -> str:
    """The summary as a Markdown table."""
    few_shot = summary["metric"] == "accuracy"
    if few_shot:
        head = ["method", "test accuracy", "random init", "best validation", "time / meta-step", "peak memory / step"]
    else:
        head = (
            ["method"]
            + [f"MSE after {c.split('_')[1]} step{'s' if c != 'after_1' else ''}" for c in summary["columns"]]
            + ["time / meta-step", "peak memory / step"]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in summary["rows"]:
        if "failed" in row:
            lines.append(f"| {row['name']} | {row['failed']} |" + " |" * (len(head) - 2))
            continue
        if few_shot:
            cells = [
                _cell(row["cells"].get("test_accuracy"), True),
                _cell(row["random_init"], True),
                f"{100 * row['best_val_accuracy']:.1f}%",
            ]
        else:
            cells = [
                sinusoid_cell(row["diverged"][c]) if c in row.get("diverged", {}) else _cell(row["cells"][c], False)
                for c in summary["columns"]
            ]
        lines.append("| " + " | ".join([row["name"], *cells, _seconds(row), _memory(row)]) + " |")
    return "\n".join(lines) + f"\n\n{summary['description']}"


def moving_median(values, window: int) -> List:
    """[(iteration, median of the last `window` values up to it), ...] (1-based iterations). A median, not a
    mean: a few iterations whose inner loop blew up (MAML++'s first-order phase: query MSE up to 1e30) would
    otherwise flatten every curve of the figure."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    return [(i + 1, float(np.median(v[max(0, i + 1 - window) : i + 1]))) for i in range(v.size)]


def plot(job: str, results: Dict[str, Dict], path: Path) -> None:
    """Every method's learning curve on one figure (sinusoid: one panel; few-shot: loss and accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 1 if job == "sinusoid" else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), dpi=110, squeeze=False)
    axes = axes[0]
    for m in results.values():
        history = m["history"]
        if job == "sinusoid":
            values = [v for v in history["query_loss_after"]]
            window = max(1, min(100, len(values) // 20))
            points = [(i, v) for i, v in moving_median(values, window) if math.isfinite(v)]
            if points:
                axes[0].plot(*zip(*points), label=m["label"])
        else:
            loss = history["query_loss_after"]
            window = max(1, min(50, len(loss) // 20))
            smooth = common.moving_average([v for _, v in loss], window, first_iteration=loss[0][0]) if loss else []
            if smooth:
                axes[0].plot(*zip(*smooth), label=m["label"])
            if history["val_accuracy"]:
                axes[1].plot(*zip(*history["val_accuracy"]), marker="o", ms=3, label=m["label"])
    if job == "sinusoid":
        axes[0].set(
            title="sinusoid: query MSE after adaptation (moving median)",
            xlabel="meta-iteration",
            ylabel="MSE",
            yscale="log",
        )
    else:
        axes[0].set(
            title=f"{job}: query loss after adaptation (moving average)",
            xlabel="meta-iteration",
            ylabel="cross-entropy",
        )
        axes[1].set(title=f"{job}: validation accuracy", xlabel="meta-iteration", ylabel="accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        common.save_figure(fig, path)
    finally:
        plt.close(fig)
