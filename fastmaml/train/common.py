"""Pieces every training job shares: atomic checkpoints, resume, metrics files, confidence
intervals, learning-curve plots, progress bars."""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write_bytes(path: Path, write) -> None:
    """Calls `write(file_object)` on a temporary file in the same folder, then renames it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path, state: Dict[str, Any]) -> None:
    """Saves `state` (model/optimizer state dicts, iteration, RNG states, history...) atomically."""
    atomic_write_bytes(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; run once without --resume first")
    return torch.load(path, map_location="cpu", weights_only=False)


def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def write_json(path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=float)
    atomic_write_bytes(Path(path), lambda f: f.write(text.encode()))


def mean_ci95(values: Iterable[float]) -> Tuple[float, float]:
    """(mean, half-width of the 95% normal confidence interval: 1.96·std/√n)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_ci95: no values")
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else float("nan")
    return float(v.mean()), float(half)


def progress(iterable, *, total: Optional[int] = None, desc: str = "", initial: int = 0, disable=None):
    """A tqdm progress bar (disabled automatically when stderr is not a terminal and `disable` is None)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=disable, dynamic_ncols=True)


def plot_curves(history: Dict[str, Sequence[Tuple[int, float]]], path, *, title: str = "",
                ylabel: str = "") -> None:
    """history: {series name: [(iteration, value), ...]} -> a PNG line plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in history.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (argparse names the option in its error)."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0, "a non-negative integer")


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def moving_average(values: Sequence[float], window: int, *, first_iteration: int = 1) -> list:
    """[(iteration, mean of the last `window` values up to it), ...] for a per-iteration series."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return []
    csum = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(1, v.size + 1)
    lo = np.maximum(idx - window, 0)
    means = (csum[idx] - csum[lo]) / (idx - lo)
    return [(int(i - 1 + first_iteration), float(m)) for i, m in zip(idx, means)]
