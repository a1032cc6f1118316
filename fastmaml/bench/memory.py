"""Peak memory of one meta-step of one (implementation, workload), each in a fresh subprocess.

    python -m fastmaml.bench.memory --workload conv28-1shot-K5 --impl autograd-loop [--quick] [--device cpu]

prints one JSON line: `rss_peak_bytes` (CPU: growth of the resident set over the step, from
/proc/self/status VmHWM after resetting it through /proc/self/clear_refs) and `alloc_peak_bytes`
(CUDA: torch.cuda.max_memory_allocated over the step; None on CPU, where PyTorch keeps no allocator
statistics). One untimed warm-up step runs first; freed heap memory is then returned to the system
(glibc malloc_trim) so that the measured step's growth is not hidden by memory kept from the warm-up.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import torch

_PAGE_KEYS = ("VmRSS", "VmHWM")


def _status() -> Dict[str, int]:
    """VmRSS and VmHWM of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _PAGE_KEYS:
                out[key] = int(value.split()[0]) * 1024
    return out


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(workload_name: str, impl_name: str, *, quick: bool, device: str) -> Dict[str, Optional[int]]:
    """Peak memory of one meta-step in this process (meant to run in a fresh one)."""
    from . import impls, workloads
    from .measure import Runner

    w = workloads.workloads(quick)[workload_name]
    impl = next(i for i in impls.implementations() if i.name == impl_name)
    dev = torch.device(device)
    runner = Runner(impl, w.make_model(), w, w.make_tasks(), dev)
    runner.step()  # warm-up: one-time setup (caches, compiled programs) is not part of the peak
    for p in runner.model.parameters():
        p.grad = None
    gc.collect()
    _malloc_trim()
    result: Dict[str, Optional[int]] = {"rss_peak_bytes": None, "alloc_peak_bytes": None}
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before_alloc = torch.cuda.memory_allocated(dev)
    can_reset = _reset_peak_rss()
    before = _status()["VmRSS"]
    runner.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        result["alloc_peak_bytes"] = torch.cuda.max_memory_allocated(dev) - before_alloc
    if can_reset:
        result["rss_peak_bytes"] = max(0, _status()["VmHWM"] - before)
    return result


def measure_in_subprocess(
    workload_name: str, impl_name: str, *, quick: bool, device: str, timeout_s: float = 900
) -> Dict:
    """Runs `measure` in a fresh interpreter; returns its dict, or {"memory_error": reason}."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [
        sys.executable,
        "-m",
        "fastmaml.bench.memory",
        "--workload",
        workload_name,
        "--impl",
        impl_name,
        "--device",
        device,
    ] + (["--quick"] if quick else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"memory_error": f"memory measurement timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"memory_error": f"memory subprocess failed (exit {proc.returncode}): {tail}"}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmaml.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--workload", required=True)
    parser.add_argument("--impl", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.workload, args.impl, quick=args.quick, device=args.device)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
