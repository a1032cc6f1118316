"""The `fastmaml` command (also `python -m fastmaml`).

    fastmaml train <job> [options]     meta-train a job (see `fastmaml train --help`)
    fastmaml compare <job> [options]   every --method of a job side by side: one table, one figure
    fastmaml info                      versions, devices, which backend runs each op and why
    fastmaml --version                 the version
    fastmaml build [--verbose]         compile the C++/CUDA extension now (otherwise at first use)
    fastmaml bench [--quick] [--out D] benchmark suite (see `fastmaml bench --help`)

Train jobs live in `fastmaml.train.<module>`; each module defines `add_arguments(parser, job)` (the
options of that job: `fastmaml.train.common.add_shared_arguments` and its own) and `run(args) -> dict`
(the final metrics) and is listed in `TRAIN_JOBS`.

Errors: a bad option, and any `fastmaml.train.common.UserError` (a missing folder, an unwritable --out,
a device that is not there, a bad checkpoint, a full disk...) is one line on stderr and exit status 2;
an interruption before a job could checkpoint is one line and status 128 + the signal number; other
exceptions keep their traceback.

Under torchrun (`torchrun --nproc_per_node N -m fastmaml train <job> ...`) every rank runs this command;
the jobs run data-parallel (`fastmaml.train.common.Ranks`). A mistake every rank finds the same way is
printed by rank 0 only; when another rank died or raised, a rank stops with one line naming it
(`RankFailure`, exit status 1).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import List, Optional

TRAIN_JOBS = {
    # job name: (module, one-line help)
    "sinusoid": ("fastmaml.train.sinusoid", "MAML on the sinusoid regression family (Finn et al. 2017)"),
    "omniglot": ("fastmaml.train.fewshot", "MAML on Omniglot from a local folder (--data), 5-way 1-shot preset"),
    "miniimagenet": (
        "fastmaml.train.fewshot",
        "MAML on mini-ImageNet from a local folder (--data), 5-way 1-shot preset",
    ),
    "fewshot-demo": (
        "fastmaml.train.fewshot",
        "MAML few-shot classification on the embedded glyph dataset (no download)",
    ),
}


def _info(args) -> int:
    import platform

    import torch

    import fastmaml
    from fastmaml.ops import registry

    print(f"fastmaml {fastmaml.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\ndevice {dev}:")
        for b in registry.BACKENDS[1:]:
            ok, why = registry.availability(b, torch.device(dev))
            print(f"  backend {b:7s} {'available' if ok else 'unavailable'}: {why}")
        table = registry.resolve("auto", dev)
        for op, desc in table.describe().items():
            print(f"  op {op:20s} -> {desc}")
    return 0


def _build(args) -> int:
    from fastmaml import build

    try:
        path = build.build(verbose=args.verbose)
    except build.BuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    cuda = "yes" if build.cuda_enabled() else "no: no CUDA_HOME or a CPU build of torch"
    print(f"built {path} (CUDA kernels: {cuda})")
    return 0


def _train_runner(module: str):
    def run(args) -> int:
        importlib.import_module(module).run(args)
        return 0

    return run


class _Parser(argparse.ArgumentParser):
    """Option errors as one line (the usage of a job lists dozens of options): what is wrong and where
    the help is."""

    def error(self, message: str):
        if _other_rank():  # under torchrun every rank parses the same command: rank 0 says what is wrong
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _other_rank() -> bool:
    """Whether this process is a rank other than 0 of a torchrun launch (RANK set and not 0)."""
    text = os.environ.get("RANK")
    return text is not None and text.strip() not in ("", "0")


BENCH = "fastmaml.bench.suite"
COMPARE = "fastmaml.train.compare"
COMPARE_JOBS = ("sinusoid", "fewshot-demo", "omniglot", "miniimagenet")


def _version() -> str:
    from . import __version__

    return __version__


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The parser. Only the module of the command being run is imported (its options with it), so
    one job's heavy or broken imports never get in the way of another command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    wanted = tuple(a for a in argv if not a.startswith("-"))[:2]
    parser = _Parser(prog="fastmaml", description="Fast, exact meta-gradients for MAML.")
    parser.add_argument("--version", action="version", version=f"fastmaml {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="meta-train a job")
    jobs = train.add_subparsers(dest="job", required=True)
    for name, (module, help_text) in TRAIN_JOBS.items():
        p = jobs.add_parser(name, help=help_text, description=help_text)
        if wanted == ("train", name):
            importlib.import_module(module).add_arguments(p, name)
        p.set_defaults(func=_train_runner(module))
    compare = sub.add_parser("compare", help="train and evaluate the methods of --method side by side")
    compared = compare.add_subparsers(dest="job", required=True)
    for name in COMPARE_JOBS:
        p = compared.add_parser(
            name,
            help=f"compare the methods on {name}",
            description=f"compare the methods on "
            f"{name}: one table and one figure of learning curves (fastmaml.train.compare)",
        )
        if wanted == ("compare", name):
            importlib.import_module(COMPARE).add_arguments(p, name)
        p.set_defaults(func=_train_runner(COMPARE))
    info = sub.add_parser("info", help="versions, devices and backends")
    info.set_defaults(func=_info)
    prebuild = sub.add_parser("build", help="compile the C++/CUDA extension (cached; otherwise built at first use)")
    prebuild.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    prebuild.set_defaults(func=_build)
    bench = sub.add_parser(
        "bench",
        help="benchmark meta-steps against autograd and peer libraries",
        description="Time, peak memory and gradient error per (implementation, workload); "
        "writes results.md, results.json and PNG plots.",
    )
    if wanted[:1] == ("bench",):
        importlib.import_module(BENCH).add_arguments(bench)
    bench.set_defaults(func=lambda args: importlib.import_module(BENCH).run(args))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "fastmaml"
    try:
        args = build_parser(argv).parse_args(argv)
        prog = " ".join(["fastmaml", args.command] + ([args.job] if getattr(args, "job", None) else []))
        args.argv = argv  # for the "resume with: ..." line of an interrupted job
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # a train job checkpoints on SIGINT once started; this is before (or another command)
        starting = (
            " before the job started (nothing to resume from this run)" if argv[:1] in (["train"], ["compare"]) else ""
        )
        print(f"\n{prog}: interrupted{starting}", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as exc:
        from fastmaml.train.common import UserError

        if not isinstance(exc, UserError):
            raise
        if not getattr(exc, "quiet", False):
            message = " ".join(str(exc).split())
            print(f"{prog}: error: {message}", file=sys.stderr)
        return getattr(exc, "status", 2)
    except BaseException as exc:
        from fastmaml.train.common import ForcedStop

        if not isinstance(exc, ForcedStop):
            raise
        print(
            f"\n{prog}: stopped at once by a second {exc} without a new checkpoint (the last one is intact)",
            file=sys.stderr,
        )
        return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
