"""The scaffolding every training job shares, defined once.

- `add_shared_arguments`: the options every job has (names, types, checks, help), each job giving
  only its default values.
- `Job`: one run of a job: checks the device and the output folder before any work, sets the torch
  thread count, turns SIGINT / SIGTERM into "checkpoint and stop", writes periodic checkpoints,
  shows progress (a bar on a terminal, log lines otherwise) and says how to resume.
- `TrainingState`: what a checkpoint holds (models, optimizers, samplers, generators, histories,
  the global RNG states) with `capture()` / `restore()`, so that a resumed run is bit-identical to an
  uninterrupted one.
- Checkpoint files: atomic writes (temporary file, fsync, rename), a SHA-256 of the contents verified
  on load, temporary files of killed writes removed at the next start, one-line errors (`UserError`)
  for a missing, empty, unreadable, foreign or corrupted checkpoint, a full disk or an unwritable folder.
- Metrics files, confidence intervals, moving averages and learning-curve plots.
- `Ranks`: a job launched by torchrun runs data-parallel: `Job` joins the process group (gloo on CPU,
  NCCL on the GPU of LOCAL_RANK) after checking the launch, rank 0 alone checks and writes --out, shows
  progress and prints, sends the --resume checkpoint to the others, stop requests are agreed on at one
  iteration, and a rank that dies or raises makes the others stop with a `RankFailure` naming it.

A `UserError` is a mistake the user can fix (an option, a folder, a file, the disk): the `fastmaml`
command prints its message as one line and exits with status 2; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import math
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..allocator import allocator_option, apply_allocator, default_allocator

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
METRICS = "metrics.json"
CHECKSUM = "checksum"  # checkpoint key: {"sha256": digest of every other entry}
LOG_EVERY = 30.0  # seconds between progress lines when the output is not a terminal (--log-every)
WRITE_PROBE = ".fastmaml-write-test"
DIST_TIMEOUT = 300.0  # seconds a rank waits in a collective under torchrun (--dist-timeout)


class UserError(Exception):
    """A mistake the user can fix: the CLI prints the message (one line) and exits with `status` (2).

    quiet: the CLI prints nothing (under torchrun, an error every rank found the same way is printed by
    rank 0 only)."""

    status = 2

    def __init__(self, message: str = "", *, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


class RankFailure(UserError):
    """Under torchrun: another rank died, raised or stopped answering; this rank stops too (exit status 1),
    with one line naming the rank and what happened to it."""

    status = 1


class Interrupted(Exception):
    """Raised at a safe point (between evaluation batches) after SIGINT / SIGTERM."""


class ForcedStop(BaseException):
    """A second SIGINT / SIGTERM: stop at once, without a checkpoint (the last one is intact)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ----------------------------------------------------------------------------------------- options


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


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def device_name(text: str) -> str:
    """argparse type: the syntax of a torch device; whether it exists is checked when the job starts."""
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected a torch device such as 'cpu', 'cuda' or 'cuda:1', got {text!r}"
        ) from None
    return text


# The options every job has: (flag, argparse keywords, help). A job passes its defaults (a value, or
# its preset) and may reword a help text; names, types and checks are the same everywhere.
def _order_choices():
    import fastmaml

    return list(fastmaml.ORDERS)


EXPLICIT = "explicit_options"  # attribute of the parsed arguments: the dests the user gave on the command line


class Explicit(argparse.Action):
    """`store` that also records the option's dest in `args.explicit_options` (`given(args)`), so that a
    `--method` preset changes only what the user did not set."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _mark(namespace, self.dest)


class ExplicitTrue(argparse.Action):
    """`store_true` that records the option like `Explicit`."""

    def __init__(self, option_strings, dest, default=False, required=False, help=None):
        super().__init__(option_strings, dest, nargs=0, const=True, default=default, required=required, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        _mark(namespace, self.dest)


def _mark(namespace, dest: str) -> None:
    marked = set(getattr(namespace, EXPLICIT, None) or ())
    marked.add(dest)
    setattr(namespace, EXPLICIT, marked)


def given(args) -> set:
    """The options (dests) given explicitly on the command line (those parsed with `Explicit` actions)."""
    return set(getattr(args, EXPLICIT, None) or ())


SHARED_OPTIONS: Tuple[Tuple[str, Dict[str, Any], str], ...] = (
    ("--iterations", dict(type=nonnegative_int), "meta-iterations in total (a resumed run continues up to it)"),
    ("--meta-batch", dict(type=positive_int), "tasks per meta-iteration"),
    ("--shots", dict(type=positive_int), "support examples per class/task (K)"),
    ("--steps", dict(type=nonnegative_int), "inner SGD steps in meta-training"),
    (
        "--order",
        dict(choices=None),
        "meta-gradient (see fastmaml.meta_step): second = exact MAML, checkpoint, first = FOMAML, implicit",
    ),
    ("--inner-lr", dict(type=positive_float), "inner-loop learning rate α (training and evaluation)"),
    ("--meta-lr", dict(type=positive_float), "Adam learning rate"),
    ("--seed", dict(type=int), "seed of the initialization and the training tasks"),
    ("--out", dict(type=Path), "output folder: checkpoint.pt, metrics.json, plots"),
    (
        "--checkpoint-every",
        dict(type=positive_int, metavar="N"),
        f"write <out>/{CHECKPOINT} every N iterations (atomically; also at the end and on SIGINT/SIGTERM)",
    ),
    (
        "--log-every",
        dict(type=nonnegative_float, metavar="SECONDS"),
        "when the output is not a terminal (a log file), one progress line every SECONDS (0: every iteration)",
    ),
    (
        "--method",
        dict(choices=None),
        "the meta-learning method, a preset of the options below (explicit options "
        "override it; see the README's Methods section): maml, fomaml, metasgd "
        "(learned per-parameter rates), anil (head only), mamlpp (MAML++), imaml, "
        "cavia (context parameters), blackbox (no inner loop)",
    ),
    (
        "--msl",
        dict(type=nonnegative_int, metavar="N"),
        "MAML++ multi-step loss, annealed to the last step over the first N iterations (0: off, the last step's "
        "query loss only)",
    ),
    (
        "--first-order-until",
        dict(type=nonnegative_int, metavar="N"),
        "first-order meta-steps before iteration N, then --order (MAML++ derivative-order annealing; 0: off)",
    ),
    (
        "--implicit-lambda",
        dict(type=positive_float, metavar="LAMBDA"),
        "λ of --order implicit (iMAML: the inner steps minimize L_s(φ) + λ/2 ‖φ − θ‖²)",
    ),
    ("--cg-steps", dict(type=positive_int, metavar="N"), "conjugate-gradient iterations of --order implicit"),
    ("--context", dict(type=positive_int, metavar="N"), "context parameters of --method cavia"),
    ("--device", dict(type=device_name), "torch device: cpu, cuda, cuda:1, ..."),
    ("--threads", dict(type=positive_int), "torch CPU threads while the job runs"),
    (
        "--allocator",
        dict(type=allocator_option, metavar="{retain,system}"),
        "retain: keep the CPU memory the job frees for reuse, so its large tensors do not land on freshly mapped "
        "pages every step (fastmaml.retain_freed_memory; the process keeps its peak memory); system: the C "
        "library's defaults. The default comes from $FASTMAML_ALLOCATOR, else retain",
    ),
    (
        "--dist-timeout",
        dict(type=positive_float, metavar="SECONDS"),
        "under torchrun: how long a rank waits for the others in a collective before it stops with an error "
        "naming them (a rank that dies is noticed at once on CPU; the checkpoint writes of rank 0 must fit in it)",
    ),
)


def add_shared_arguments(
    parser: argparse.ArgumentParser,
    job: str,
    defaults: Dict[str, Any],
    helps: Optional[Dict[str, str]] = None,
    method_choices: Sequence[str] = ("maml",),
) -> None:
    """Adds the options every job shares (`SHARED_OPTIONS`, --resume, --quiet) with the job's `defaults`
    {dest: value} over the common ones (seed 0, device cpu, out runs/<job>, threads None = torch's
    choice), `helps` {dest: help text replacing the shared one} and the values --method takes
    (`fastmaml.train.methods.METHODS`). Each option given on the command line is recorded (`given`)."""
    helps = helps or {}
    parser = parser.add_argument_group("options of every training job")
    defaults = {
        "order": "second",
        "seed": 0,
        "device": "cpu",
        "out": Path("runs") / job,
        "threads": None,
        "allocator": default_allocator(),
        "log_every": LOG_EVERY,
        "dist_timeout": DIST_TIMEOUT,
        "method": "maml",
        "msl": 0,
        "first_order_until": 0,
        "implicit_lambda": 1.0,
        "cg_steps": 5,
        **defaults,
    }
    for flag, kwargs, text in SHARED_OPTIONS:
        dest = flag[2:].replace("-", "_")
        if flag == "--order":
            kwargs = dict(kwargs, choices=_order_choices())
        elif flag == "--method":
            kwargs = dict(kwargs, choices=list(method_choices))
        default = defaults.get(dest)
        shown = "torch's choice" if dest == "threads" and default is None else default
        parser.add_argument(
            flag, default=default, help=f"{helps.get(dest, text)} (default: {shown})", action=Explicit, **kwargs
        )
    parser.add_argument(
        "--resume",
        action="store_true",
        help=f"continue from <out>/{CHECKPOINT} (bit-identical to an uninterrupted run)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar or progress lines (the final summary is still printed)"
    )
    parser.add_argument("--no-progress", dest="quiet", action="store_true", help=argparse.SUPPRESS)  # old name


# ------------------------------------------------------------------------------- devices and folders


def resolve_device(text: str) -> torch.device:
    """The torch device named by --device, or a `UserError` saying why it is not there."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text}: expected a torch device such as cpu, cuda or cuda:1") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build of torch" if torch.version.cuda is None else "no CUDA device or driver found"
            raise UserError(
                f"--device {text}: CUDA is not available here (torch {torch.__version__}, {build}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise UserError(
                f"--device {text}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})"
            )
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as exc:  # the message of whichever backend refused
            raise UserError(f"--device {text}: not available here ({_first_line(exc)})") from None
    return dev


def prepare_output_folder(out: Path) -> Path:
    """Creates `out` if needed and checks that files can be written there (a file is created, synced and
    deleted), so that an unwritable or full folder is reported at the start, not at the first checkpoint.
    Removes the temporary files of killed writes. Raises `UserError`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: this is a file, not a folder; pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        raise UserError(
            f"--out {out}: cannot create the folder: {blocker or out.parent} is a file, not a folder"
        ) from None
    except OSError as exc:
        raise _os_user_error(exc, out, "--out {path}: cannot create the folder ({reason})") from None
    probe = None
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=f"{WRITE_PROBE}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(b"fastmaml")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise _os_user_error(exc, out, "--out {path}: cannot write files there ({reason})") from None
    finally:
        if probe is not None:
            try:
                os.unlink(probe)
            except OSError:
                pass
    remove_stale_temporaries(out)
    return out


_TEMPORARY = re.compile(r"^\.(?P<name>.+?)(?:\.(?P<pid>\d+))?\.[A-Za-z0-9_]{8}\.tmp$")


def remove_stale_temporaries(folder: Path) -> List[Path]:
    """Deletes the temporary files (`.NAME.PID.XXXXXXXX.tmp`, NAME a checkpoint, JSON or PNG file) that
    writes interrupted by a kill left in `folder`, unless their writer process is still alive; returns
    the deleted paths."""
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = _TEMPORARY.match(path.name)
        if match is None or not (
            match.group("name").endswith((".pt", ".json", ".png")) or match.group("name") == WRITE_PROBE[1:]
        ):
            continue
        pid = match.group("pid")
        if pid is not None and int(pid) != os.getpid() and _process_alive(int(pid)):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NOT_ALLOWED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOENT, errno.EISDIR}


def _os_user_error(exc: OSError, path: Path, template: str) -> Exception:
    """A `UserError` for a full disk or a refused write, else the original error (kept with its traceback)."""
    if exc.errno in _NO_SPACE:
        return UserError(f"no space left on device: {path}")
    if exc.errno in _NOT_ALLOWED or isinstance(exc, PermissionError):
        return UserError(template.format(path=path, reason=exc.strerror or _first_line(exc)))
    return exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:300]


# ------------------------------------------------------------------------------------ atomic files


def _write_file(f, data: bytes, path: Path) -> None:
    """Writes `data` to the open temporary file `f` of `path` (a seam for fault-injection tests)."""
    f.write(data)


def atomic_write_bytes(path, data) -> None:
    """Writes `data` (bytes, or a callable `write(file_object)`) to a temporary file in the same folder,
    fsyncs it and renames it over `path`: a reader (or a kill -9 at any moment) sees the old file or the
    new one, never a mix. A full disk or a refused write raises `UserError` naming the path, the
    temporary file is removed and `path` keeps its previous content."""
    path = Path(path)
    if callable(data):
        buffer = io.BytesIO()
        data(buffer)
        data = buffer.getvalue()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            _write_file(f, data, path)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except OSError as exc:
        error = _os_user_error(exc, path, "cannot write {path}: {reason}")
        if error is exc:
            raise
        raise error from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _fsync_folder(folder: Path) -> None:
    """Makes a rename durable (best effort: not every file system can sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=float)
    atomic_write_bytes(Path(path), text.encode())


def save_figure(fig, path) -> None:
    """Saves a matplotlib figure as a PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    atomic_write_bytes(Path(path), buffer.getvalue())


# ------------------------------------------------------------------------------------- checkpoints


def state_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes, and every other value's
    repr, walked in a fixed order (the same before saving and after loading)."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        digest.update(f"N{obj.dtype}{obj.shape}:".encode())
        digest.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        digest.update(f"D{len(obj)}:".encode())
        for key in sorted(obj, key=repr):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for item in obj:
            _feed(digest, item)
    else:
        digest.update(f"V{obj!r};".encode())


def save_checkpoint(path, state: Dict[str, Any]) -> None:
    """Saves `state` with its checksum (`state_digest`) atomically. The whole file is serialized in
    memory first, so a full disk is reported as such (not as a serializer error)."""
    state = {k: v for k, v in state.items() if k != CHECKSUM}
    state[CHECKSUM] = {"sha256": state_digest(state)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path, required: Sequence[str] = ("config", "iteration")) -> Dict[str, Any]:
    """Loads a checkpoint and verifies its checksum; every problem is a one-line `UserError` with the
    path (missing, empty, unreadable, not a training checkpoint, corrupted). Checkpoints written before
    checksums existed load unverified."""
    path = Path(path)
    if not path.exists():
        if path.name == CHECKPOINT:
            raise UserError(
                f"--resume: no checkpoint in {path.parent} ({path.name} is missing); run once without --resume first"
            )
        raise UserError(f"missing file {path}")
    if not path.is_file():
        raise UserError(f"bad checkpoint {path}: not a file")
    advice = "delete it (or pass another --out) to start over"
    try:
        size = path.stat().st_size
        if size == 0:
            raise UserError(f"bad checkpoint {path}: the file is empty (0 bytes); {advice}")
        state = torch.load(path, map_location="cpu", weights_only=False)
    except UserError:
        raise
    except Exception as exc:  # EOFError, UnpicklingError, zip errors...: all "this file is not readable"
        raise UserError(
            f"bad checkpoint {path}: unreadable ({type(exc).__name__}: {_first_line(exc)}); {advice}"
        ) from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        what = (
            "a plain state dict"
            if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
            else f"a {type(state).__name__}"
        )
        raise UserError(
            f"bad checkpoint {path}: not a fastmaml training checkpoint ({what} without "
            f"{', '.join(map(repr, missing))}); {advice}"
        )
    saved = state.pop(CHECKSUM, None)
    if saved is not None:
        if not isinstance(saved, dict) or saved.get("sha256") != state_digest(state):
            raise UserError(
                f"bad checkpoint {path}: checksum mismatch, the file is corrupted; {advice} (or restore a copy)"
            )
    return state


def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def option_name(key: str) -> str:
    return key if key == "job" else "--" + key.replace("_", "-")


class TrainingState:
    """What a checkpoint holds, for every job.

    parts: {name: object} restored through `state_dict()` / `load_state_dict()` (models, optimizers,
    samplers) or `get_state()` / `set_state()` (`torch.Generator`s); values: {name: plain data}
    (histories, best scores...). Both become attributes (`state.model`, `state.history`). Also saved:
    `config`, `iteration` and the global RNG states (Python, NumPy, torch).

    run_keys: the config entries that define the training run; `restore` refuses a checkpoint made with
    other values. legacy: the value a key had in checkpoints written before the key existed.
    """

    def __init__(
        self,
        config: Dict[str, Any],
        *,
        parts: Dict[str, Any],
        values: Dict[str, Any],
        run_keys: Sequence[str],
        legacy: Optional[Dict[str, Any]] = None,
    ):
        self.config = config
        self.run_keys = tuple(run_keys)
        self.legacy = dict(legacy or {})
        self.iteration = 0
        self._parts = dict(parts)
        self._values = tuple(values)
        for name, value in {**parts, **values}.items():
            setattr(self, name, value)

    @property
    def required(self) -> Tuple[str, ...]:
        return ("config", "iteration", "rng", *self._parts)

    def capture(self) -> Dict[str, Any]:
        state = {"config": self.config, "iteration": self.iteration, "rng": rng_state()}
        for name, part in self._parts.items():
            state[name] = part.get_state() if isinstance(part, torch.Generator) else part.state_dict()
        for name in self._values:
            state[name] = getattr(self, name)
        return state

    def check(self, ckpt: Dict[str, Any], path: Path) -> None:
        """`UserError` if the checkpoint was made with other run settings or is past --iterations."""
        saved = ckpt.get("config", {})
        diff = []
        for key in self.run_keys:
            old, new = saved.get(key, self.legacy.get(key)), self.config.get(key)
            if old != new:
                diff.append(
                    f"{option_name(key)} {'none' if new is None else new} "
                    f"(checkpoint: {'none' if old is None else old})"
                )
        if diff:
            raise UserError(
                f"--resume: {path} was made with other settings: {', '.join(diff)}; rerun with the "
                "checkpoint's values, or pass another --out to start a new run"
            )
        done, total = ckpt["iteration"], self.config.get("iterations")
        if total is not None and done > total:
            raise UserError(
                f"--iterations {total}: below the {done} iterations of the checkpoint {path}; pass at least {done}"
            )

    def restore(self, ckpt: Dict[str, Any], path: Path) -> None:
        self.check(ckpt, path)
        try:
            for name, part in self._parts.items():
                if isinstance(part, torch.Generator):
                    part.set_state(ckpt[name])
                else:
                    part.load_state_dict(ckpt[name])
            for name in self._values:
                if name in ckpt:
                    setattr(self, name, ckpt[name])
            set_rng_state(ckpt["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise UserError(
                f"bad checkpoint {path}: does not fit this job's model and settings "
                f"({type(exc).__name__}: {_first_line(exc)})"
            ) from None
        self.iteration = int(ckpt["iteration"])


# ---------------------------------------------------------------------------------------- progress


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _format_field(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Progress:
    """Progress of a loop of `total` steps.

    mode "bar": a tqdm bar on stderr (a terminal); "log": a line on stdout every `log_every` seconds
    (and at the end) with the count, the fields given to `update` (loss, accuracy...), the rate and the
    ETA; "off": nothing. `check` is called at every update (it may raise `Interrupted`)."""

    def __init__(
        self,
        desc: str,
        total: int,
        *,
        initial: int = 0,
        mode: str = "log",
        log_every: float = LOG_EVERY,
        unit: str = "it",
        leave: bool = True,
        check: Optional[Callable[[], None]] = None,
    ):
        self.desc, self.total, self.initial, self.done = desc, total, initial, initial
        self.mode, self.log_every, self.unit, self.check = mode, log_every, unit, check
        self.fields: Dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.logged_at = None
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        if self.bar is not None:
            if fields:
                self.bar.set_postfix({k: _format_field(v) for k, v in self.fields.items()}, refresh=False)
            self.bar.update(n)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self.last >= self.log_every:
                self.last = now
                self.line()
        if self.check is not None:
            self.check()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else float("nan")

    def line(self) -> None:
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        fields = "".join(f"  {k} {_format_field(v)}" for k, v in self.fields.items())
        speed = f"{rate:.3g} {self.unit}/s" if math.isfinite(rate) else f"? {self.unit}/s"
        print(
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%){fields}  {speed}  "
            f"ETA {format_duration(left)}",
            flush=True,
        )
        self.logged_at = self.done

    def flush(self) -> None:
        """In log mode, a line now unless the last one is current (before a validation, at the end)."""
        if self.mode == "log" and self.bar is None and self.logged_at != self.done and self.done > self.initial:
            self.line()
            self.last = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self.flush()


# ---------------------------------------------------------------------- ranks: runs under torchrun

FAILED_KEY = "fastmaml/failed/{}"  # store key: rank r raised (value: its one-line error)
LOST_KEY = "fastmaml/lost/{}"  # store key: rank r is alive but a collective with the others failed
DONE_KEY = "fastmaml/turn/{}/{}"  # store key: rank r finished step `tag` (`Ranks.in_turn`)
LOST_GRACE = 2.0  # seconds a rank that lost the others waits for them to say what happened to them


def launched() -> bool:
    """Whether this process is one rank of a launch: torchrun (or any launcher that sets RANK and WORLD_SIZE,
    e.g. torch.multiprocessing with MASTER_ADDR / MASTER_PORT), or torch.distributed is already initialized."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """This process's rank under a launcher (0 when there is none, or RANK is not a number)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _env_int(name: str, default: Optional[int] = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise UserError(
                f"{name} is not set: launch the job with torchrun (or set RANK, WORLD_SIZE, "
                "MASTER_ADDR and MASTER_PORT)"
            )
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"{name}={text!r}: expected an integer (set by torchrun)") from None


class Ranks:
    """The processes of one run: a single process (`active` False: rank 0 of 1), or the ranks of a torchrun
    launch, each running the same job on its share of every meta-batch and evaluation set.

    rank, size: this rank and the world size; local_rank, local_size: on this machine; device: this rank's
    torch device (cuda:LOCAL_RANK on GPUs); comm_device: where the tensors of collectives live (the GPU for
    NCCL, the CPU for gloo); advice: what the error of a failed collective ends with."""

    def __init__(self, device: Optional[torch.device] = None):
        self.rank, self.size, self.local_rank, self.local_size = 0, 1, 0, 1
        self.active = self.owns = False
        self.backend: Optional[str] = None
        self.device = self.comm_device = device
        self.timeout = DIST_TIMEOUT
        self.advice = ""
        self.signal: Callable[[], Optional[int]] = lambda: None

    @property
    def main(self) -> bool:
        """Rank 0: shows the progress and writes every file."""
        return self.rank == 0

    @classmethod
    def join(cls, device: torch.device, *, timeout: float = DIST_TIMEOUT, meta_batch: Optional[int] = None) -> "Ranks":
        """Joins the process group of the launch (gloo on CPU, NCCL on CUDA with the GPU of LOCAL_RANK),
        after checking the launch: a `UserError` for more processes per machine than GPUs, an explicit
        --device cuda:N with several processes per machine, or a meta-batch smaller than the world size.
        (An error every rank finds the same way is printed by rank 0 only.)"""
        import datetime

        import torch.distributed as dist

        r = cls(device)
        r.active, r.timeout = True, float(timeout)
        if dist.is_initialized():  # a script that set up torch.distributed itself
            r.rank, r.size = dist.get_rank(), dist.get_world_size()
            r.local_rank = _env_int("LOCAL_RANK", r.rank)
            r.local_size = _env_int("LOCAL_WORLD_SIZE", r.size)
        else:
            r.rank, r.size = _env_int("RANK"), _env_int("WORLD_SIZE")
            r.local_rank = _env_int("LOCAL_RANK", r.rank)
            r.local_size = _env_int("LOCAL_WORLD_SIZE", r.size)
            if not (0 <= r.rank < r.size and 0 <= r.local_rank < r.local_size):
                raise UserError(
                    f"RANK={r.rank}, WORLD_SIZE={r.size}, LOCAL_RANK={r.local_rank}, LOCAL_WORLD_SIZE="
                    f"{r.local_size}: not a valid launch (launch with torchrun)"
                )
        quiet = not r.main
        if meta_batch is not None and meta_batch < r.size:
            raise UserError(
                f"--meta-batch {meta_batch}: fewer tasks than the {r.size} processes (every rank needs "
                f"at least one task of each meta-batch); pass --meta-batch {r.size} or more, or launch "
                "fewer processes",
                quiet=quiet,
            )
        if device.type == "cuda":
            count = torch.cuda.device_count()
            if device.index is None:
                if r.local_size > count:
                    raise UserError(
                        f"--nproc_per_node {r.local_size}: more processes than the {count} CUDA "
                        f"device{'s' if count != 1 else ''} of this machine (each process uses the GPU of its "
                        f"LOCAL_RANK); launch at most {count} per machine, or pass --device cpu",
                        quiet=quiet,
                    )
                device = torch.device("cuda", r.local_rank)
            elif r.local_size > 1:
                raise UserError(
                    f"--device {device}: with {r.local_size} processes per machine each uses the GPU "
                    "of its LOCAL_RANK; pass --device cuda",
                    quiet=quiet,
                )
            torch.cuda.set_device(device)
            r.backend = "nccl" if dist.is_nccl_available() else "gloo"
        else:
            r.backend = "gloo"
        r.device = device
        if dist.is_initialized():
            r.backend = dist.get_backend()
        else:
            try:
                dist.init_process_group(r.backend, timeout=datetime.timedelta(seconds=r.timeout))
            except Exception as exc:
                where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
                raise UserError(
                    f"rank {r.rank} of {r.size}: cannot join the other processes at {where} "
                    f"({type(exc).__name__}: {_first_line(exc)})"
                ) from None
            r.owns = True
        r.comm_device = device if r.backend == "nccl" else torch.device("cpu")
        return r

    # -- collectives
    @contextlib.contextmanager
    def collective(self, what: str):
        """Runs collectives: any error in them (a rank died, raised or timed out) becomes a `RankFailure`
        naming the rank and what happened to it."""
        try:
            yield
        except (UserError, Interrupted):
            raise
        except Exception as exc:
            raise RankFailure(self._diagnose(what, exc)) from None

    def agree(self, error: Optional[UserError]) -> None:
        """Rank 0's verdict on checks only it runs (the output folder, the checkpoint): every rank raises its
        `UserError` (printed by rank 0) or none does."""
        import torch.distributed as dist

        box = [None if error is None else str(error)]
        with self.collective("the start-up checks"):
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise error if self.main and error is not None else UserError(box[0], quiet=True)

    def share(self, obj: Any, what: str) -> Any:
        """Rank 0's `obj` on every rank."""
        import torch.distributed as dist

        box = [obj if self.main else None]
        with self.collective(what):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool, what: str) -> bool:
        """Whether `flag` is true on some rank."""
        from fastmaml import distributed

        with self.collective(what):
            return distributed.any_rank(flag, device=self.comm_device)

    def gather(self, values: torch.Tensor, total: int, what: str) -> torch.Tensor:
        """The `[total]` values of every rank's share (`fastmaml.distributed.share_range`), on the CPU."""
        from fastmaml import distributed

        if not self.active or self.size == 1:
            return values.cpu()
        with self.collective(what):
            return distributed.all_gather_shares(values.to(self.comm_device), total).cpu()

    @contextlib.contextmanager
    def in_turn(self, tag: str, what: str):
        """Runs the block on rank 0 first, then on the first rank of each other machine, then on the rest
        (e.g. decoding a dataset into a cache folder that ranks share: one writer at a time). A waiting rank
        polls the rendezvous store, with no time limit (a first decoding can take long), and stops with a
        `RankFailure` if the rank it waits for fails."""
        if self.active and self.size > 1 and not self.main:
            previous = 0 if self.local_rank == 0 else self.rank - self.local_rank
            self._wait_for(DONE_KEY.format(tag, previous), previous, what)
        yield
        if self.active and self.size > 1:
            store = _store()
            if store is not None:
                try:
                    store.set(DONE_KEY.format(tag, self.rank), "1")
                except Exception:
                    pass

    def _wait_for(self, key: str, rank: int, what: str) -> None:
        store = _store()
        if store is None:
            return
        while True:
            try:
                if store.check([key]):
                    return
                if store.check([FAILED_KEY.format(rank)]):
                    message = store.get(FAILED_KEY.format(rank)).decode(errors="replace")
                    raise RankFailure(
                        f"rank {self.rank} of {self.size}: rank {rank} failed while it was {what}: {message}"
                    )
            except RankFailure:
                raise
            except Exception as exc:
                raise RankFailure(
                    f"rank {self.rank} of {self.size}: lost rank {rank} while it was {what} (the "
                    f"rendezvous store stopped answering: {_first_line(exc)})"
                ) from None
            signum = self.signal()
            if signum is not None:
                raise RankFailure(
                    f"rank {self.rank} of {self.size}: stopped by {signal.Signals(signum).name} while "
                    f"waiting for rank {rank} ({what})"
                )
            time.sleep(0.2)

    # -- failures
    def report_failure(self, exc: BaseException) -> None:
        """Leaves this rank's error in the rendezvous store, for the ranks that lose contact with it."""
        store = _store()
        if store is None:
            return
        text = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {_first_line(exc)}"
        if isinstance(exc, ForcedStop):
            text = f"stopped at once by a second {exc}"
        try:
            store.set(FAILED_KEY.format(self.rank), " ".join(text.split())[:400])
        except Exception:
            pass

    def _diagnose(self, what: str, exc: BaseException) -> str:
        """One line: which rank failed and how, from the rendezvous store (a rank that raised left its error
        there; one that lost contact like this one says so; one that says nothing within `LOST_GRACE` seconds
        died without a Python error)."""
        others = [r for r in range(self.size) if r != self.rank]
        failed: Dict[int, str] = {}
        lost = set()
        store = _store()
        try:
            if store is not None:
                store.set(LOST_KEY.format(self.rank), "1")
        except Exception:
            store = None
        deadline = time.monotonic() + LOST_GRACE
        while store is not None:
            try:
                for r in others:
                    if r in failed or r in lost:
                        continue
                    if store.check([FAILED_KEY.format(r)]):
                        failed[r] = store.get(FAILED_KEY.format(r)).decode(errors="replace")
                    elif store.check([LOST_KEY.format(r)]):
                        lost.add(r)
            except Exception:
                store = None
                break
            if failed or len(lost) == len(others) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        text = str(exc).lower()
        timed_out = "timed out" in text or "timeout" in text
        silent = [r for r in others if r not in lost and r not in failed]
        if failed:
            r = min(failed)
            cause = f"rank {r} failed: {failed[r]}"
        elif store is None and not self.main:
            cause = (
                "rank 0 stopped responding (its rendezvous store is gone too: it was killed or crashed; see its output)"
            )
        elif silent and timed_out:
            cause = (
                f"rank{'s' if len(silent) > 1 else ''} {_ranks(silent)} did not answer within --dist-timeout "
                f"{self.timeout:g} s"
            )
        elif silent:
            cause = (
                f"rank{'s' if len(silent) > 1 else ''} {_ranks(silent)} stopped responding (killed, out of "
                "memory, or crashed outside Python: see its output)"
            )
        else:
            cause = f"the connection to the other ranks broke ({_first_line(exc)[:160]})"
        advice = f"; {self.advice}" if self.advice else ""
        return f"rank {self.rank} of {self.size} stopped in {what}: {cause}{advice}"

    def close(self) -> None:
        """Leaves the process group (after a run that ended well)."""
        if self.owns:
            import gc

            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            # A reference cycle can keep the gloo process group alive past destroy_process_group; its worker
            # threads then free the last collective's tensors while the interpreter shuts down, which needs the
            # GIL and aborts the process ("terminate called without an active exception"). Collect it now.
            gc.collect()
            self.owns = False


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(map(str, ranks))


def _store():
    """The rendezvous store of the default process group (None if there is none)."""
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


# ----------------------------------------------------------------------------------- a job's run


class Job:
    """One run of a training job, as a context manager:

        with common.Job(args, "sinusoid", default_threads=1) as job:
            ...  job.device, job.out, job.checkpoint(state), job.stop_requested, job.progress(...)

    On entry: checks --device, then (with --resume) that the folder exists, then that --out can be
    written; sets the torch thread count; makes SIGINT / SIGTERM request a stop (a second one stops at
    once). On exit: restores the thread count and the signal handlers.

    Under torchrun (`launched()`), `job.ranks` is this rank of the launch (`Ranks.join`): rank 0 alone checks
    and writes --out, shows progress and prints; the others read nothing there (rank 0 sends them the
    checkpoint). A stop request (a signal on any rank) is agreed on by all ranks at the same iteration
    (`agree_stop`, `check_interrupt`), and an error on one rank makes the others stop with a `RankFailure`."""

    def __init__(self, args, name: str, *, default_threads: Optional[int] = None, meta_batch: Optional[int] = None):
        self.args, self.name = args, name
        self.out = Path(args.out) if getattr(args, "out", None) is not None else Path("runs") / name
        self.checkpoint_path = self.out / CHECKPOINT
        self.checkpoint_every = getattr(args, "checkpoint_every", None)
        self.log_every = getattr(args, "log_every", LOG_EVERY)
        self.quiet = bool(getattr(args, "quiet", False))
        self.threads = getattr(args, "threads", None) or default_threads
        self.meta_batch = meta_batch if meta_batch is not None else getattr(args, "meta_batch", None)
        self.saved_iteration: Optional[int] = None
        self.signal: Optional[int] = None
        self.ranks = Ranks()
        self._stop_all = False
        self._handlers: Dict[int, Any] = {}
        self._threads_before: Optional[int] = None

    # -- setup
    def __enter__(self) -> "Job":
        device = resolve_device(str(getattr(self.args, "device", "cpu")))
        if launched():
            timeout = getattr(self.args, "dist_timeout", None) or DIST_TIMEOUT
            self.ranks = Ranks.join(device, timeout=timeout, meta_batch=self.meta_batch)
            self.ranks.signal = lambda: self.signal
            self.ranks.advice = (
                f"the last checkpoint ({self.checkpoint_path}) is intact: resume with --resume, "
                "on any number of processes"
            )
            device = self.ranks.device
        else:
            self.ranks = Ranks(device)
        self.device = device
        error = None
        if self.ranks.main:
            try:
                self._check_output()
            except UserError as exc:
                error = exc
        if self.ranks.active:
            self.ranks.agree(error)
        elif error is not None:
            raise error
        if self.threads is not None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        try:
            apply_allocator(getattr(self.args, "allocator", None) or default_allocator())
        except ValueError as exc:
            raise UserError(f"--allocator: {exc}") from None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._handlers[signum] = signal.signal(signum, self._on_signal)
        return self

    def _check_output(self) -> None:
        if getattr(self.args, "resume", False):
            if not self.out.is_dir():
                raise UserError(
                    f"--resume: the folder {self.out} does not exist (no run to continue); "
                    "check --out, or run once without --resume"
                )
            if not self.checkpoint_path.exists():
                raise UserError(
                    f"--resume: no checkpoint in {self.out} ({CHECKPOINT} is missing); run once without --resume first"
                )
        prepare_output_folder(self.out)

    def __exit__(self, exc_type, exc, tb) -> None:
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)
        self._handlers.clear()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
        if not self.ranks.active:
            return
        if exc is None:
            self.ranks.close()
        elif not isinstance(exc, RankFailure):  # this rank failed: tell the others (they name it)
            self.ranks.report_failure(exc)
            if isinstance(exc, UserError) and not self.ranks.main and not exc.quiet and exc.args:
                exc.args = (f"rank {self.ranks.rank}: {exc.args[0]}", *exc.args[1:])

    def _on_signal(self, signum, frame) -> None:
        if self.signal is not None:
            raise ForcedStop(signum)
        self.signal = signum
        every = " (all ranks stop after the same iteration)" if self.ranks.active else ""
        message = (
            f"{signal.Signals(signum).name} received: stopping at the next safe point with a "
            f"checkpoint{every} (send it again to stop at once)\n"
        )
        if self.ranks.active:
            message = f"rank {self.ranks.rank}: {message}"
        if getattr(sys.stderr, "isatty", lambda: False)():
            message = "\n" + message  # below the progress bar
        try:
            os.write(sys.stderr.fileno(), message.encode())  # no buffered I/O inside a signal handler
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    # -- ranks
    @property
    def main(self) -> bool:
        """Whether this process writes the files and prints (rank 0, or the only process)."""
        return self.ranks.main

    @property
    def distributed(self) -> bool:
        """Whether the run is data-parallel over the ranks of a launch (torchrun, any world size)."""
        return self.ranks.active

    # -- interruption
    @property
    def stop_requested(self) -> bool:
        """A stop was requested: by a signal to this process; under torchrun, to any rank as of the last
        `agree_stop` (the same answer on every rank)."""
        return self._stop_all if self.ranks.active else self.signal is not None

    @property
    def stop_flag(self) -> float:
        """1.0 when this rank received a stop signal, else 0.0 (reduced with each meta-gradient)."""
        return 0.0 if self.signal is None else 1.0

    def agree_stop(self, any_rank: bool) -> None:
        """Records the reduced stop flag of an iteration: every rank stops after the same iteration."""
        self._stop_all = self._stop_all or bool(any_rank)

    def _stop_name(self) -> str:
        if self.signal is not None:
            return signal.Signals(self.signal).name
        return "a stop request to another rank"

    def check_interrupt(self) -> None:
        """Raises `Interrupted` once a stop was requested (called between evaluation batches; under torchrun
        every rank calls it equally often and they agree)."""
        if self.ranks.active:
            if self.ranks.any(self.signal is not None, "the stop check of an evaluation"):
                self._stop_all = True
                raise Interrupted(self._stop_name())
        elif self.signal is not None:
            raise Interrupted(signal.Signals(self.signal).name)

    def resume_command(self) -> str:
        argv = getattr(self.args, "argv", None)
        if argv:
            argv = [a for a in argv if a != "--resume"]
            command = shlex.join(["fastmaml", *argv, "--resume"])
            if self.ranks.active:
                return f"torchrun <launch options, any number of processes> -m {command}"
            return command
        return f"the same command with --resume (and --out {self.out})"

    def stopped(self, state: TrainingState, where: str = "") -> Dict[str, Any]:
        """After a stop request: checkpoints `state` unless already saved, says how to resume; the job
        returns this dict (the CLI exits 0)."""
        if self.saved_iteration != state.iteration:
            self.checkpoint(state)
        if self.ranks.active:
            name = self._stop_name()
        else:
            name = signal.Signals(self.signal).name if self.signal is not None else "a stop request"
        total = state.config.get("iterations")
        if self.main:
            print(
                f"{self.name}: stopped by {name}{where} at iteration {state.iteration} of {total}; checkpoint "
                f"{self.checkpoint_path}. Resume with: {self.resume_command()}",
                flush=True,
            )
        return {
            "job": self.name,
            "interrupted": name,
            "iteration": state.iteration,
            "checkpoint": str(self.checkpoint_path),
        }

    # -- checkpoints
    def load_checkpoint(self, state: TrainingState) -> Dict[str, Any]:
        """The --resume checkpoint, verified and checked against the run settings (not yet restored). Under
        torchrun rank 0 reads it and sends it to the others (no shared file system needed)."""
        if not self.ranks.active:
            ckpt = load_checkpoint(self.checkpoint_path, required=state.required)
            state.check(ckpt, self.checkpoint_path)
            return ckpt
        ckpt, error = None, None
        if self.main:
            try:
                ckpt = load_checkpoint(self.checkpoint_path, required=state.required)
                state.check(ckpt, self.checkpoint_path)
            except UserError as exc:
                error = exc
        self.ranks.agree(error)
        return self.ranks.share(ckpt, "the sending of the checkpoint to every rank")

    def checkpoint_due(self, iteration: int, total: int) -> bool:
        every = self.checkpoint_every
        return iteration == total or (every is not None and iteration % every == 0)

    def checkpoint(self, state: TrainingState) -> None:
        """Writes the checkpoint (rank 0 only: every rank holds the same global state)."""
        if self.main:
            save_checkpoint(self.checkpoint_path, state.capture())
        self.saved_iteration = state.iteration

    # -- output
    def progress(
        self,
        desc: str,
        total: int,
        *,
        initial: int = 0,
        unit: str = "it",
        leave: bool = True,
        interruptible: bool = False,
    ) -> Progress:
        if self.quiet or not self.main:
            mode = "off"
        else:
            stream = sys.stderr
            mode = "bar" if getattr(stream, "isatty", lambda: False)() else "log"
        return Progress(
            desc,
            total,
            initial=initial,
            mode=mode,
            log_every=self.log_every,
            unit=unit,
            leave=leave,
            check=self.check_interrupt if interruptible else None,
        )

    @property
    def logging(self) -> bool:
        """Whether progress goes to log lines (not quiet, not a terminal)."""
        return self.main and not self.quiet and not getattr(sys.stderr, "isatty", lambda: False)()

    def say(self, message: str) -> None:
        """A progress message (not with --quiet, nor on ranks other than 0; above the progress bars on a
        terminal)."""
        if self.quiet or not self.main:
            return
        if getattr(sys.stderr, "isatty", lambda: False)():
            from tqdm.auto import tqdm

            tqdm.write(message)
        else:
            print(message, flush=True)

    def summary(self, headline: str, files: Dict[str, Path]) -> None:
        """The final summary: a headline and where each file went (rank 0 only)."""
        if not self.main:
            return
        print(headline, flush=True)
        width = max((len(k) for k in files), default=0)
        for what, path in files.items():
            print(f"  {what:<{width}}  {path}", flush=True)


# -------------------------------------------------------------------------- statistics and plots


def mean_ci95(values: Iterable[float]) -> Tuple[float, float]:
    """(mean, half-width of the 95% normal confidence interval: 1.96·std/√n)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_ci95: no values")
    half = 1.96 * v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else float("nan")
    return float(v.mean()), float(half)


def plot_curves(history: Dict[str, Sequence[Tuple[int, float]]], path, *, title: str = "", ylabel: str = "") -> None:
    """history: {series name: [(iteration, value), ...]} -> a PNG line plot (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in history.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=name)
    ax.set_xlabel("meta-iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(points for points in history.values()):
        ax.legend()
    fig.tight_layout()
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)


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


# ------------------------------------------------------------------------------- meta-step resources


class StepMemory:
    """Peak memory of one training step: on CUDA the growth of `torch.cuda.max_memory_allocated` over the step;
    on CPU (Linux) the growth of the resident set's high-water mark (VmHWM, reset through
    /proc/self/clear_refs after returning freed heap memory to the system). None where neither is available.

        with StepMemory(device) as peak:
            step()
        peak.bytes
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.bytes: Optional[int] = None
        self._before = None

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    name, _, value = line.partition(":")
                    if name == key:
                        return int(value.split()[0]) * 1024
        except (OSError, ValueError):
            pass
        return None

    def __enter__(self) -> "StepMemory":
        import gc

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return self
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS (Linux >= 4.0)
        except OSError:
            return self
        self._before = self._status("VmRSS")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._before is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device) - self._before)
        else:
            peak = self._status("VmHWM")
            self.bytes = None if peak is None else max(0, peak - self._before)
