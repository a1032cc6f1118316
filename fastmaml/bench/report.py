"""Writes a results folder: results.json, results.md (Markdown tables) and PNG plots
(speedup.png: speed-up per workload vs the autograd loop; memory_vs_K.png: peak memory against the
number of inner steps, per implementation and order)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

from ..train.common import write_json
from . import flops as flops_module
from .verdicts import OUTLIER_FACTOR, SENSITIVITY_FACTOR

MB = 2**20


def _factors():
    """The verdict's OUTLIER_FACTOR and SENSITIVITY_FACTOR as text."""
    return f"{OUTLIER_FACTOR:g}", f"{SENSITIVITY_FACTOR:g}"


def _ms(s: Optional[float]) -> str:
    return "" if s is None else f"{s * 1e3:.4g}"


def _mb(b: Optional[int]) -> str:
    return "" if b is None else f"{b / MB:.1f}"


def _memory(row: Dict) -> str:
    if row.get("memory_error"):
        return "n/a"
    peak = row.get("alloc_peak_bytes")
    peak = row.get("rss_peak_bytes") if peak is None else peak
    return _mb(peak)


def _sens(row: Dict) -> str:
    return "" if row.get("sensitivity") is None else f"{row['sensitivity']:.2e}"


def _note(row: Dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['reason']}"
    notes = [row["info"]] if row.get("info") else []
    v = row.get("verdict", "")
    if v == "WRONG":
        sens = row.get("sensitivity")
        outlier, sens_factor = _factors()
        notes.append(
            f"**WRONG** gradient (error above {outlier}× the worst autograd-based row's, "
            f"{row['worst_autograd']} {row['worst_autograd_err']:.2e}"
            + ("" if sens is None else f", and above {sens_factor}× the sensitivity {sens:.2e}")
            + "): no speed-up given"
        )
    elif v == "more accurate":
        ratio = row["ref_err"] / row["rel_err"]
        notes.append(f"more accurate than the autograd loop ({ratio:.1f}× lower error)")
    if row["order"] == "first":
        notes.append("first-order (FOMAML)")
    if row.get("precision") and row.get("baseline") and row["baseline"] != row["impl"]:
        notes.append(f"precision {row['precision']}: error and speed-up against {row['baseline']}")
    if row.get("memory_error"):
        notes.append(row["memory_error"])
    if row.get("page_faults") is not None:
        notes.append(f"{row['page_faults']:,} page faults/step")
    return "; ".join(notes)


def markdown(results: Dict) -> str:
    m = results["machine"]
    mm = m["matmul"]
    lines = ["# fastmaml benchmark" + (" (quick)" if results["quick"] else ""), ""]
    lines.append(
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads)"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; device `{m['device']}`"
    )
    lines.append(f"- torch {m['torch']}, Python {m['python']}")
    if "allocator_env" in m:  # (results written before it was recorded lack it)
        env = ", ".join(f"{k}={v}" for k, v in m["allocator_env"].items())
        policy = m.get("allocator")  # (and before the policy was recorded, this)
        if policy is None:
            lines.append("- memory allocator: " + (env or "the C library's defaults (no tuning)"))
        else:
            lines.append(f"- memory allocator: {policy}" + (f"; environment: {env}" if env else ""))
    lines.append(f"- matmul rate ({mm['n']}² float32 GEMM, median): {mm['flops_per_s'] / 1e9:.1f} GFLOP/s")
    peaks = m.get("peaks")
    if peaks:
        lines.append(
            f"- the card's peaks: {peaks['fp32'] / 1e12:.4g} TFLOP/s FP32, {peaks['tf32'] / 1e12:.4g} TFLOP/s "
            f"TF32 tensor cores ({peaks['source']})"
        )
    lines.append(
        f"- load average (1 min) at start / end: {m['load_average_start']:.2f} / "
        f"{m['load_average_end']:.2f} on {m['cores']} cores (this run itself adds up to "
        f"{m['torch_threads']}; more means other processes shared the machine)"
    )
    s = results["settings"]
    lines.append(
        f"- time: median over {s['repeats']} timed meta-steps (interleaved across rows) after "
        f"{s['warmup']} warm-up and one gradient-check step; min–max in brackets; "
        f"whole run {m['wall_s']:.0f} s"
    )
    lines += [
        "- error: ‖g − g*‖/‖g*‖ against the true meta-gradient g* (the autograd loop in float64, same "
        "weights and data; first-order rows against the float64 first-order gradient); the float32 "
        "autograd loop's own error is shown beside it",
        (
            f"- sensitivity: the problem's own conditioning, ‖g*(θ') − g*(θ)‖/‖g*‖ with every weight "
            f"multiplied by (1 + {s.get('sensitivity_noise', 1e-6):g}·n), n ~ N(0, 1), in float64 (mean of "
            f"{s['sensitivity_draws']} draw(s)): float32 rounding perturbs every activation by 1e-7 "
            f"relative and more, so an error up to this is what the problem lets float32 reach"
            if s.get("sensitivity_draws")
            else "- sensitivity: not measured (`--sensitivity-draws 0`)"
        ),
        "- verdict: a row whose error is above both {}× the worst autograd-based row's (autograd loop, torch.func, "
        "learn2learn, higher, TorchOpt; same order) and {}× the sensitivity is marked **WRONG** (no sensitivity "
        "measured: the autograd-based rows alone decide)".format(*_factors()),
        "- speed-up: vs the autograd loop of the same order (`autograd-loop` for exact rows, "
        "`autograd-loop-first` for first-order rows); WRONG rows get none",
        "- memory: peak resident-set growth over one meta-step (CPU) or peak allocated bytes "
        "(CUDA), each in its own process",
        "- page faults/step (note): the median over the timed steps of the process's minor page faults "
        "during one step (memory newly mapped and zeroed); on the CPU many of them slow a row down "
        "(benchmarks/RESULTS.md)",
        "- GFLOP/s: analytic FLOPs of the meta-step (Linear/Conv only; see fastmaml/bench/flops.py) "
        "per median second, and as % of the matmul rate"
        + ("; on a GPU with known peaks, TFLOP/s and % of its FP32 / TF32 peaks" if peaks else ""),
        "",
    ]
    rows = results["rows"]
    for name, w in results["workloads"].items():
        wrows = [r for r in rows if r["workload"] == name]
        lines.append(f"## {name}: {w['description']}")
        lines.append("")
        if w["sweep"]:
            lines.append("| implementation | order | peak memory MB | note |")
            lines.append("|---|---|---:|---|")
            prev_reason = None
            for r in wrows:
                if r["status"] == "ok":
                    lines.append(
                        f"| {r['impl']} | {r['mode'] or r['order']} | {_memory(r) or 'not measured'} | "
                        f"{r.get('memory_error', '')} |"
                    )
                elif r["impl"] == wrows[0]["impl"] or r["reason"] != prev_reason:
                    lines.append(f"| {r['impl']} | {r['mode'] or r['order']} | | {_note(r)} |")
                prev_reason = r["reason"]
            lines.append("")
            continue
        lines.append(
            f"FLOPs per meta-step: {w['flops_second'] / 1e9:.3g} G (second order), "
            f"{w['flops_first'] / 1e9:.3g} G (first order)"
        )
        lines.append("")
        lines.append(
            "| implementation | order | time ms (min–max) | speed-up | error vs float64 "
            "| autograd loop's error | sensitivity | peak memory MB | "
            + ("TFLOP/s (% FP32 / % TF32 peak)" if peaks else "GFLOP/s (% matmul)")
            + " | note |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        said = set()
        for r in wrows:
            if "median_s" not in r:
                name, mode = r["impl"], r["mode"] or r["order"]
                if r["family"] == "fastmaml" and r["status"] == "unavailable":  # one row per backend
                    name, mode = name.split(",")[0] + ",*]", "all"
                    if (name, r["reason"]) in said:
                        continue
                    said.add((name, r["reason"]))
                lines.append(f"| {name} | {mode} | | | | | | | | {_note(r)} |")
                continue
            speed = "—" if r.get("speedup") is None else f"{r['speedup']:.2f}×"
            lines.append(
                f"| {r['impl']} | {r['mode'] or r['order']} | {_ms(r['median_s'])} "
                f"({_ms(r['min_s'])}–{_ms(r['max_s'])}) "
                f"| {speed} | {r['rel_err']:.2e} | {r.get('ref_err', float('nan')):.2e} | {_sens(r)} | {_memory(r)} "
                f"| {_rate(r, peaks)} | {_note(r)} |"
            )
        lines.append("")
    lines.append("FLOP counting rule (fastmaml/bench/flops.py):")
    lines.append("")
    lines += [line.rstrip() for line in flops_module.__doc__.split("Counting rule", 1)[1].splitlines()[1:]]
    return "\n".join(lines)


def _rate(row: Dict, peaks) -> str:
    """The row's achieved FLOP rate: TFLOP/s with % of the card's FP32 and TF32 peaks, or GFLOP/s with % of
    the measured matmul rate."""
    if peaks:
        return (
            f"{row['flops_per_s'] / 1e12:.3g} ({100 * row['fp32_peak_fraction']:.2g}% / "
            f"{100 * row['tf32_peak_fraction']:.2g}%)"
        )
    return f"{row['flops_per_s'] / 1e9:.3g} ({100 * row.get('matmul_fraction', 0):.2g}%)"


def _plot_speedups(results: Dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, w in results["workloads"].items() if not w["sweep"]]
    if not names:
        return False
    heights = [0.25 * sum(1 for r in results["rows"] if r["workload"] == n and "median_s" in r) + 0.9 for n in names]
    fig, axes = plt.subplots(
        len(names), 1, figsize=(8, sum(heights)), squeeze=False, gridspec_kw={"height_ratios": heights}
    )
    for ax, name in zip(axes[:, 0], names):
        rows = [r for r in results["rows"] if r["workload"] == name and "median_s" in r]
        labels = [r["impl"] for r in rows]
        values = [r.get("speedup") or 0.0 for r in rows]
        colors = [
            "#999999" if r["family"] == "autograd" else "#1f77b4" if r["family"] == "fastmaml" else "#ff7f0e"
            for r in rows
        ]
        ax.set_xscale("log")
        # bars grow from 1× (the autograd loop): right = faster, left = slower
        ax.barh(range(len(rows)), [v - 1.0 if v else 0.0 for v in values], left=1.0, color=colors)
        for i, (r, v) in enumerate(zip(rows, values)):
            label = " WRONG gradient" if r.get("verdict") == "WRONG" else f" {v:.2f}×"
            ax.text(
                max(v, 1.0) if v else 1.0,
                i,
                label,
                va="center",
                fontsize=7,
                color="red" if r.get("verdict") == "WRONG" else "black",
            )
        shown = [v for v in values if v] + [1.0]
        ax.set_xlim(min(shown) / 1.5, max(shown) * 2.0)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(f"{name}: speed-up vs autograd loop (same order)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_memory(results: Dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = {n: w for n, w in results["workloads"].items() if w["sweep"]}
    series: Dict[str, List] = {}
    for r in results["rows"]:
        if r["workload"] in sweep and r["status"] == "ok" and _memory(r) not in ("", "n/a"):
            series.setdefault(r["impl"], []).append((sweep[r["workload"]]["steps"], float(_memory(r))))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for impl, points in series.items():
        ks, mbs = zip(*sorted(points))
        ax.plot(ks, mbs, marker="o", label=impl, ls="--" if "first" in impl else "-")
    ax.set_xlabel("inner steps K")
    ax.set_ylabel("peak memory of one meta-step (MB)")
    ax.set_xscale("log")
    ax.set_xticks(sorted({k for pts in series.values() for k, _ in pts}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(bottom=0)
    ax.set_title("peak memory vs K (28×28 5-way 1-shot)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(results: Dict, out: Path, *, plots: bool = True) -> None:
    """results.json, results.md and (with `plots`) speedup.png and memory_vs_K.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = []
    if plots:
        if _plot_speedups(results, out / "speedup.png"):
            results["plots"].append("speedup.png")
        if _plot_memory(results, out / "memory_vs_K.png"):
            results["plots"].append("memory_vs_K.png")
    write_json(out / "results.json", results)
    text = markdown(results)
    if results["plots"]:
        text += "\n" + "\n".join(f"![{p}]({p})" for p in results["plots"]) + "\n"
    (out / "results.md").write_text(text)
