"""Fault injection on the training jobs: SIGKILL at random moments and in the middle of a checkpoint
write, SIGINT / SIGTERM, then --resume; every run must end bit for bit where an uninterrupted run
ends. Bad checkpoints, an unwritable or file --out and a full disk must each give a one-line error
(exit status 2) and leave the earlier checkpoint as it was.

The kill tests run the jobs in subprocesses (through a small wrapper that can SIGKILL the process in
the middle of its n-th write of a file) with tiny settings; `slow` marks the longer variants."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmaml
from fastmaml.cli import main
from fastmaml.train import common, fewshot, sinusoid

REPO = Path(fastmaml.__file__).resolve().parent.parent
SINUSOID = [
    "train",
    "sinusoid",
    "--meta-batch",
    "4",
    "--shots",
    "5",
    "--eval-tasks",
    "4",
    "--eval-query",
    "8",
    "--eval-steps",
    "1",
    "--threads",
    "1",
    "--quiet",
]
DEMO = [
    "train",
    "fewshot-demo",
    "--meta-batch",
    "2",
    "--hidden",
    "4",
    "--query",
    "1",
    "--val-every",
    "3",
    "--val-episodes",
    "2",
    "--eval-batch",
    "2",
    "--test-episodes",
    "2",
    "--threads",
    "1",
    "--quiet",
]
WAIT = 300  # seconds: a generous bound for one subprocess step on a busy machine

# Runs `fastmaml` with argv; with FASTMAML_KILL_WRITE="NAME:N" it SIGKILLs itself halfway through its
# N-th write of the file NAME (after half the bytes reached the temporary file, before the rename).
WRAPPER = """
import os, signal, sys
from fastmaml import cli
from fastmaml.train import common

target = os.environ.get("FASTMAML_KILL_WRITE")
if target:
    name, nth = target.rsplit(":", 1)
    seen = [0]
    real = common._write_file

    def write(f, data, path):
        if path.name == name:
            seen[0] += 1
            if seen[0] == int(nth):
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        real(f, data, path)

    common._write_file = write
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture
def wrapper(tmp_path):
    path = tmp_path / "run_fastmaml.py"
    path.write_text(WRAPPER)
    return path


def launch(wrapper, argv, *, kill_write=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("FASTMAML_KILL_WRITE", None)
    if kill_write:
        env["FASTMAML_KILL_WRITE"] = kill_write
    return subprocess.Popen(
        [sys.executable, str(wrapper), *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc, timeout=WAIT):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def signature(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def wait_for_new_checkpoint(proc, path, before, timeout=WAIT) -> bool:
    """True once `path` differs from `before` (a new checkpoint was renamed into place); False if the
    process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if signature(path) not in (None, before):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    proc.kill()
    raise AssertionError(f"no new checkpoint at {path} within {timeout} s")


def same(a, b, where="") -> None:
    """Bit-for-bit equality of nested checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(reference: Path, run: Path, result_keys) -> None:
    """The checkpoints of two runs hold the same weights, optimizer states, samplers, RNG states and
    histories (not the config: --checkpoint-every may differ; not timings or measured memory), and so do their
    results."""
    a, b = (common.load_checkpoint(d / common.CHECKPOINT) for d in (reference, run))
    for key in sorted(set(a) - {"config", "step_seconds", "timing", "step_memory"}):  # measured
        same(a[key], b[key], key)
    ma, mb = (json.loads((d / common.METRICS).read_text()) for d in (reference, run))
    for key in result_keys:
        assert ma[key] == mb[key], key
    assert not list(run.glob(".*.tmp")), "temporary files of killed writes were left behind"


def kill_resume_cycle(wrapper, argv, out, rng, kills, max_delay):
    """SIGKILLs `kills` runs at random moments (each after it wrote a new checkpoint, then a random
    delay), resuming each time; checks every surviving checkpoint loads (checksum verified) and never
    goes back."""
    last = common.load_checkpoint(out / common.CHECKPOINT)["iteration"]
    for _ in range(kills):
        before = signature(out / common.CHECKPOINT)
        proc = launch(wrapper, [*argv, "--out", out, "--resume"])
        if wait_for_new_checkpoint(proc, out / common.CHECKPOINT, before):
            time.sleep(rng.uniform(0, max_delay))
            proc.kill()
        proc.communicate(timeout=WAIT)
        now = common.load_checkpoint(out / common.CHECKPOINT)["iteration"]
        assert now >= last
        last = now


def sigint_then_resume_line(wrapper, argv, out, signum=signal.SIGINT) -> bool:
    """Starts a resumed run, interrupts it after its first new checkpoint: exit 0 and a resume line.
    Returns whether the signal stopped the run (it may have finished first)."""
    before = signature(out / common.CHECKPOINT)
    proc = launch(wrapper, [*argv, "--out", out, "--resume"])
    if wait_for_new_checkpoint(proc, out / common.CHECKPOINT, before):
        proc.send_signal(signum)
    code, stdout, stderr = finish(proc)
    assert code == 0, stderr
    common.load_checkpoint(out / common.CHECKPOINT)
    if "stopped by" not in stdout:
        return False
    line = next(line for line in stdout.splitlines() if "stopped by" in line)
    assert signal.Signals(signum).name in line and "Resume with: fastmaml train" in line
    assert line.rstrip().endswith("--resume") and str(out) in line
    return True


def test_sinusoid_sigkill_and_sigint_then_resume_bit_identical(tmp_path, wrapper):
    """Killed in the middle of its 3rd checkpoint write, killed at 2 random moments, stopped by SIGINT,
    resumed each time: the same final weights, optimizer states, RNG states, history and evaluation as an
    uninterrupted run. (SIGTERM: the in-process test below.)"""
    argv = [*SINUSOID, "--iterations", "16"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main([*argv, "--out", str(reference)]) == 0

    every = [*argv, "--checkpoint-every", "2"]
    code, _, _ = finish(launch(wrapper, [*every, "--out", out], kill_write="checkpoint.pt:3"))
    assert code == -signal.SIGKILL
    assert common.load_checkpoint(out / common.CHECKPOINT)["iteration"] == 4  # the 3rd write never landed
    assert list(out.glob(".checkpoint.pt.*.tmp")), "the killed write should have left its temporary file"

    kill_resume_cycle(wrapper, every, out, random.Random(1), kills=2, max_delay=0.3)
    sigint_then_resume_line(wrapper, every, out, signal.SIGINT)
    code, _, err = finish(launch(wrapper, [*argv, "--out", out, "--resume"]))
    assert code == 0, err
    assert_same_run(reference, out, ["eval", "history", "iteration"])


def test_fewshot_demo_sigkill_during_write_and_sigint_then_resume_bit_identical(tmp_path, wrapper):
    """fewshot-demo (validation every 3 iterations, test at the end): killed halfway through its 2nd
    checkpoint write, then stopped by SIGINT, then resumed to the end: bit-identical to a straight run."""
    argv = [*DEMO, "--iterations", "6"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main([*argv, "--out", str(reference)]) == 0
    code, _, _ = finish(launch(wrapper, [*argv, "--out", out, "--checkpoint-every", "1"], kill_write="checkpoint.pt:2"))
    assert code == -signal.SIGKILL
    assert common.load_checkpoint(out / common.CHECKPOINT)["iteration"] == 1
    assert sigint_then_resume_line(wrapper, [*argv, "--checkpoint-every", "1"], out)
    code, stdout, err = finish(launch(wrapper, [*argv, "--out", out, "--resume"]))
    assert code == 0, err
    assert "test accuracy" in stdout
    assert_same_run(reference, out, ["best", "history", "test", "random_init_baseline", "iterations_done"])


@pytest.mark.slow
@pytest.mark.parametrize("job", ["sinusoid", "fewshot-demo"])
def test_many_sigkills_at_random_moments(tmp_path, wrapper, job):
    """Many kills at random moments (some land in a checkpoint write, some in the evaluation), each run
    resumed: the end is bit-identical to an uninterrupted run."""
    argv = [*SINUSOID, "--iterations", "60"] if job == "sinusoid" else [*DEMO, "--iterations", "12"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert main([*argv, "--out", str(reference)]) == 0
    every = [*argv, "--checkpoint-every", "1"]
    code, _, err = finish(launch(wrapper, [*every, "--out", out], kill_write="checkpoint.pt:3"))
    assert code == -signal.SIGKILL, err
    rng = random.Random(26)
    for _ in range(1, 6):
        code, _, _ = finish(
            launch(wrapper, [*every, "--out", out, "--resume"], kill_write=f"checkpoint.pt:{rng.randint(1, 3)}")
        )
        assert code in (0, -signal.SIGKILL)
    kill_resume_cycle(wrapper, every, out, rng, kills=10 if job == "sinusoid" else 5, max_delay=1.0)
    code, _, err = finish(launch(wrapper, [*argv, "--out", out, "--resume"]))
    assert code == 0, err
    keys = ["eval", "history"] if job == "sinusoid" else ["best", "history", "test"]
    assert_same_run(reference, out, keys)


# ----------------------------------------------------------------------------- in-process faults


def sinusoid_cli(out, *options):
    return main([*SINUSOID, "--out", str(out), *map(str, options)])


def one_line(capsys, code, expected_code=2) -> str:
    """The exit status is `expected_code` and stderr is one line, no traceback; returns the line."""
    assert code == expected_code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_sigterm_in_process_checkpoints_and_resumes_bit_identical(tmp_path, monkeypatch, capsys):
    """SIGTERM during iteration 3: the job finishes that iteration, writes checkpoint.pt, prints how to
    resume and exits 0; the resumed run equals a straight one. A second signal stops at once (128 + n)."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert sinusoid_cli(straight, "--iterations", 6) == 0
    real = sinusoid._train_iteration

    def signalling(state, args, device, when=(3,), signals=(signal.SIGTERM,)):
        real(state, args, device)
        if state.iteration in when:
            for s in signals:
                os.kill(os.getpid(), s)

    monkeypatch.setattr(sinusoid, "_train_iteration", signalling)
    capsys.readouterr()
    assert sinusoid_cli(out, "--iterations", 6) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("sinusoid: stopped by SIGTERM at iteration 3 of 6") and line.endswith("--resume")
    assert common.load_checkpoint(out / common.CHECKPOINT)["iteration"] == 3
    assert not (out / common.METRICS).exists() or json.loads((out / common.METRICS).read_text())["status"] != "done"
    monkeypatch.setattr(sinusoid, "_train_iteration", real)
    assert sinusoid_cli(out, "--iterations", 6, "--resume") == 0
    assert_same_run(straight, out, ["eval", "history"])

    monkeypatch.setattr(
        sinusoid,
        "_train_iteration",
        lambda s, a, d: signalling(s, a, d, when=(2,), signals=(signal.SIGINT, signal.SIGINT)),
    )
    forced = tmp_path / "forced"
    capsys.readouterr()
    assert sinusoid_cli(forced, "--iterations", 6, "--checkpoint-every", 1) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert "stopped at once by a second SIGINT" in err and "Traceback" not in err
    assert common.load_checkpoint(forced / common.CHECKPOINT)["iteration"] == 1
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored


def test_sigint_during_validation_resumes_with_that_validation(tmp_path, monkeypatch, capsys):
    """SIGINT in the middle of the validation at iteration 3: the checkpoint of iteration 3 (without that
    validation) is written, and the resumed run runs the validation first: bit-identical to a straight run."""
    argv = [*DEMO, "--iterations", "4", "--eval-batch", "1"]
    straight, out = tmp_path / "straight", tmp_path / "run"
    assert main([*argv, "--out", str(straight)]) == 0
    real = fewshot.evaluate

    def interrupting(model, sampler, episodes, cfg, device, progress=None, inner=None):
        if progress is not None and progress.desc == "validation at iteration 3":
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, sampler, episodes, cfg, device, progress, inner)

    monkeypatch.setattr(fewshot, "evaluate", interrupting)
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert "stopped by SIGINT during the validation at iteration 3 of 4" in capsys.readouterr().out
    ckpt = common.load_checkpoint(out / common.CHECKPOINT)
    assert ckpt["iteration"] == 3 and [i for i, _ in ckpt["history"]["val_accuracy"]] == []
    monkeypatch.setattr(fewshot, "evaluate", real)
    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert_same_run(straight, out, ["best", "history", "test"])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    assert sinusoid_cli(out, "--iterations", 2) == 0
    return out


@pytest.fixture
def good_run(finished_run, tmp_path):
    """A copy of a finished 2-iteration sinusoid run."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    return out


def flip_a_weight_bit(path: Path) -> None:
    """Flips one bit in the middle of the largest tensor record of a torch.save zip archive."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = info.header_offset
    name_len, extra_len = (
        int.from_bytes(data[header + 26 : header + 28], "little"),
        int.from_bytes(data[header + 28 : header + 30], "little"),
    )
    start = header + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (lambda p: p.write_bytes(os.urandom(4096)), "unreadable"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "unreadable"),
        (
            lambda p: torch.save(sinusoid.sinusoid_mlp().state_dict(), p),
            "not a fastmaml training checkpoint (a plain state dict",
        ),
        (flip_a_weight_bit, "checksum mismatch, the file is corrupted"),
    ],
)
def test_bad_checkpoint_is_one_line_with_its_path_and_left_alone(good_run, capsys, damage, message):
    path = good_run / common.CHECKPOINT
    damage(path)
    before = path.read_bytes()
    capsys.readouterr()
    line = one_line(capsys, sinusoid_cli(good_run, "--iterations", 4, "--resume"))
    assert f"bad checkpoint {path}: " in line and message in line
    assert path.read_bytes() == before


def test_checkpoint_checksum_covers_every_value():
    state = {
        "model": {"w": torch.arange(6.0).view(2, 3)},
        "iteration": 3,
        "rng": common.rng_state(),
        "history": {"loss": [1.0, 0.5]},
    }
    digest = common.state_digest(state)
    assert digest == common.state_digest({k: state[k] for k in reversed(list(state))})  # key order does not matter
    state["model"]["w"].view(-1)[4] = float(np.nextafter(np.float32(4.0), np.float32(5.0)))
    assert common.state_digest(state) != digest
    state["model"]["w"].view(-1)[4] = 4.0
    state["history"]["loss"][1] = 0.5000001
    assert common.state_digest(state) != digest


def test_out_that_is_a_file_or_under_a_file_fails_at_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sinusoid.fastmaml, "meta_step", lambda *a, **k: pytest.fail("trained before the check"))
    file = tmp_path / "file"
    file.write_text("not a folder")
    assert f"--out {file}: this is a file, not a folder" in one_line(capsys, sinusoid_cli(file, "--iterations", 3))
    assert f"{file} is a file, not a folder" in one_line(capsys, sinusoid_cli(file / "run", "--iterations", 3))
    assert file.read_text() == "not a folder"


def _writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"x")
        (folder / ".probe").unlink()
        return True
    except OSError:
        return False


def test_read_only_out_fails_at_once_and_keeps_the_checkpoint(good_run, monkeypatch, capsys):
    path = good_run / common.CHECKPOINT
    before = path.read_bytes()
    good_run.chmod(0o555)
    try:
        if _writable(good_run):
            pytest.skip(
                "running as root: a read-only folder mode does not stop root (the /proc case below and "
                "the full-disk test cover the same error path)"
            )
        monkeypatch.setattr(sinusoid.fastmaml, "meta_step", lambda *a, **k: pytest.fail("trained before the check"))
        for extra in ([], ["--resume"]):
            line = one_line(capsys, sinusoid_cli(good_run, "--iterations", 4, *extra))
            assert f"--out {good_run}: cannot write files there" in line
        assert path.read_bytes() == before
    finally:
        good_run.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_out_location_fails_at_once(monkeypatch, capsys):
    """/proc accepts no new files or folders, even from root."""
    monkeypatch.setattr(sinusoid.fastmaml, "meta_step", lambda *a, **k: pytest.fail("trained before the check"))
    line = one_line(capsys, sinusoid_cli("/proc/fastmaml-test-run", "--iterations", 3))
    assert "--out /proc/fastmaml-test-run: cannot create the folder" in line
    line = one_line(capsys, sinusoid_cli("/proc/self", "--iterations", 3))
    assert "--out /proc/self: cannot write files there" in line


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """ENOSPC on the second checkpoint write: "no space left on device: PATH", exit 2, the first checkpoint
    intact, no temporary file left."""
    writes = []
    real = common._write_file

    def full(f, data, path):
        if path.name == common.CHECKPOINT:
            writes.append(path)
            if len(writes) >= 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, data, path)

    monkeypatch.setattr(common, "_write_file", full)
    out = tmp_path / "run"
    line = one_line(capsys, sinusoid_cli(out, "--iterations", 6, "--checkpoint-every", 2))
    assert line == f"fastmaml train sinusoid: error: no space left on device: {out / common.CHECKPOINT}"
    assert common.load_checkpoint(out / common.CHECKPOINT)["iteration"] == 2
    assert not list(out.glob(".*.tmp"))


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".checkpoint.pt.{dead.pid}.abcd_123.tmp"
        old_style = tmp_path / ".metrics.json.x1y2z3w4.tmp"
        busy = tmp_path / f".checkpoint.pt.{alive.pid}.abcd_123.tmp"
        other = tmp_path / ".notes.tmp"
        for p in (stale, old_style, busy, other):
            p.write_bytes(b"partial")
        assert sorted(common.remove_stale_temporaries(tmp_path)) == sorted([stale, old_style])
        assert busy.exists() and other.exists()
    finally:
        alive.kill()
        alive.wait()
